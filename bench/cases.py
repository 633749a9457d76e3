"""The benchmark cases: one line each in CASES, run in the order listed."""
from __future__ import annotations

from dataclasses import dataclass

from bench.origin import UPLOAD_PATH, MiB


@dataclass(frozen=True)
class Case:
    name: str
    path: str = "/1k.bin"
    connections: int = 50           # concurrent client connections
    close: bool = False             # "Connection: close": a new connection per request
    body_bytes: int = 0             # > 0: every request is a POST of this many bytes
    idle: bool = False              # memory case: hold `connections` idle keep-alive connections
    quick: bool = False             # part of --quick

    @property
    def method(self) -> str:
        return "POST" if self.body_bytes else "GET"

    def describe(self) -> str:
        if self.idle:
            return f"{self.connections} idle keep-alive connections after one GET {self.path} each"
        conn = "Connection: close" if self.close else "keep-alive"
        return f"{self.method} {self.path}, {self.connections} connections, {conn}"


CASES: dict[str, Case] = {case.name: case for case in (
    Case("get-1k", "/1k.bin", quick=True),
    Case("get-100k", "/100k.bin", quick=True),
    Case("get-1m", "/1m.bin"),
    Case("get-1k-c1000", "/1k.bin", connections=1000),
    Case("get-1k-close", "/1k.bin", close=True),
    Case("post-1m", UPLOAD_PATH, body_bytes=MiB),
    Case("idle-10k", "/1k.bin", connections=10_000, idle=True),
)}
