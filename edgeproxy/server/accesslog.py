"""The access log: one line per request, combined or JSON format, written
from a buffer flushed at least once a second and at exit, so the event loop
never waits on the disk for each request.

Combined lines are the Apache/nginx "combined" format followed by four
fields: the duration in seconds, the backend chosen, the cache status and
the request id:

    127.0.0.1 - - [01/May/2024:12:00:00 +0000] "GET /a HTTP/1.1" 200 512 "-" "curl/8" 0.003 127.0.0.1:5000 - 5f0c9a2e11b4-1a

JSON lines carry the same as named fields (see docs/operations.md).
"""

from __future__ import annotations

import json
import os
import sys
import time

_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")


def _clf_time(t: float) -> str:
    g = time.localtime(t)
    off = g.tm_gmtoff // 60
    sign = "+" if off >= 0 else "-"
    off = abs(off)
    return (f"{g.tm_mday:02d}/{_MONTHS[g.tm_mon - 1]}/{g.tm_year}:{g.tm_hour:02d}:"
            f"{g.tm_min:02d}:{g.tm_sec:02d} {sign}{off // 60:02d}{off % 60:02d}")


def _q(b: bytes) -> str:
    # keep one line per request whatever the client sent
    return b.decode("latin-1").replace("\\", "\\\\").replace('"', '\\"')


def _extra_text(extra: dict) -> str:
    # a hook's value may hold anything: control characters are escaped
    return "".join(f' {_name(k)}="{_q(str(v).encode("utf-8", "surrogateescape")).translate(_CTL)}"'
                   for k, v in extra.items())


_CTL = {i: f"\\x{i:02x}" for i in list(range(32)) + [127]}


def _name(key: object) -> str:
    return "".join(ch if ch.isalnum() or ch in "_-." else "_" for ch in str(key)) or "_"


class AccessLog:
    """Buffers formatted lines; flush() writes them in one write(2) on an
    O_APPEND descriptor, so lines from several workers sharing a file never
    interleave (the worker calls it every second, on SIGUSR1 and at exit)."""

    def __init__(self, path: str, fmt: str = "combined"):
        self.path = path
        self.fmt = fmt
        self._lines: list[str] = []
        self._fd = -1
        self._clf_second = -1
        self._clf_text = ""
        self.reopen()

    def reopen(self) -> None:
        """Open (again) the file, e.g. after logrotate moved it."""
        self.flush()
        if self._fd > 2:
            os.close(self._fd)
        if self.path == "-":
            self._fd = sys.stderr.fileno()
        else:
            self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC,
                               0o644)

    def log(self, peer: bytes, request_line: bytes, status: int, nbytes: int,
            duration: float, referer: bytes, agent: bytes, backend: str,
            request_id: bytes = b"-", cache: str = "-", extra: dict | None = None) -> None:
        """extra: fields the phases added (RequestCtx.log): JSON keys, or
        `key="value"` pairs after a combined line."""
        now = time.time()
        if self.fmt == "json":
            method, _, rest = request_line.partition(b" ")
            target, _, protocol = rest.rpartition(b" ") if b" " in rest else (rest, b"", b"")
            record = {
                "time": round(now, 3), "remote": peer.decode("latin-1"),
                "method": method.decode("latin-1"), "target": target.decode("latin-1"),
                "protocol": protocol.decode("latin-1"), "status": status,
                "bytes": nbytes, "duration": round(duration, 6),
                "referer": referer.decode("latin-1"), "agent": agent.decode("latin-1"),
                "backend": backend, "cache": cache,
                "request_id": request_id.decode("latin-1")}
            if extra:
                for k, v in extra.items():
                    record.setdefault(str(k), v if isinstance(v, (int, float, bool)) or v is None
                                      else str(v))
            self._lines.append(json.dumps(record) + "\n")
        else:
            second = int(now)
            if second != self._clf_second:
                self._clf_second = second
                self._clf_text = _clf_time(now)
            self._lines.append(
                f'{peer.decode("latin-1")} - - [{self._clf_text}] "{_q(request_line)}" {status} '
                f'{nbytes} "{_q(referer)}" "{_q(agent)}" {duration:.3f} {backend} {cache} '
                f'{request_id.decode("latin-1")}{_extra_text(extra) if extra else ""}\n')

    def flush(self) -> None:
        if not self._lines or self._fd < 0:
            return
        data = "".join(self._lines).encode("utf-8", "surrogateescape")
        self._lines.clear()
        try:
            while data:
                n = os.write(self._fd, data)
                data = data[n:]
        except OSError as exc:  # a full disk must not take the worker down
            print(f"edgeproxy: access log {self.path}: {exc.strerror}", file=sys.stderr)

    def close(self) -> None:
        self.flush()
        if self._fd > 2:
            os.close(self._fd)
        self._fd = -1
