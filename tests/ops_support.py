"""Helpers for the operations tests (tests/test_ops_*.py): a proxy started
with a [server] section, admin requests, a WebSocket client and log
polling, all over real sockets and real processes."""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path

from harness import Client, Response, free_port, start_proxy


def server_section(tmp_path: Path, *, workers: int = 1, admin_port: int | None = None,
                   extra: str = "") -> str:
    admin = f'admin = "127.0.0.1:{admin_port}"\n' if admin_port else ""
    return (f'[server]\nworkers = {workers}\ngrace = 5\npid_file = "{tmp_path}/edgeproxy.pid"\n'
            f"{admin}{extra}\n")


def web_config(origin_url: str) -> str:
    return f'[[route]]\npath = "/"\npool = "web"\n\n[pool.web]\nbackends = ["{origin_url}"]\n\n'


def start(proxy_factory, tmp_path: Path, origin_url: str, *, workers: int = 1,
          admin: bool = False, server_extra: str = "", extra: str = ""):
    """A supervised proxy; returns (proxy, admin port or None)."""
    admin_port = free_port() if admin else None
    body = server_section(tmp_path, workers=workers, admin_port=admin_port,
                          extra=server_extra) + web_config(origin_url) + extra
    proxy = proxy_factory(body)
    if admin_port:
        wait_until(lambda: _connectable(admin_port), what="admin listener")
    return proxy, admin_port


def _connectable(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
        return True
    except OSError:
        return False


def wait_until(cond, timeout: float = 10.0, what: str = "condition", every: float = 0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = cond()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out waiting for {what}")


def admin(port: int, method: str = "GET", path: str = "/status", body: bytes | None = None) -> Response:
    with Client(port, timeout=30) as c:
        return c.request(method, path, body=body, host="127.0.0.1")


def status(port: int) -> dict:
    r = admin(port)
    assert r.status == 200, r
    return r.json()


def metrics(port: int) -> dict[str, float]:
    """{'name{labels}': value} of the Prometheus text."""
    r = admin(port, path="/metrics")
    assert r.status == 200 and r.header("content-type").startswith("text/plain")
    out = {}
    for line in r.body.decode().splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            out[key] = float(value)
    return out


def worker_pids(port: int, generation: int | None = None) -> list[int]:
    return [w["pid"] for w in status(port)["workers"]
            if generation is None or w["generation"] == generation]


class WebSocket:
    """An upgraded connection through the proxy to harness.Origin's /ws echo."""

    def __init__(self, port: int):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.sock.sendall(b"GET /ws HTTP/1.1\r\nHost: a\r\nUpgrade: websocket\r\n"
                          b"Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\n\r\n")
        head = b""
        while b"\r\n\r\n" not in head:
            data = self.sock.recv(4096)
            assert data, "closed during the upgrade"
            head += data
        assert head.startswith(b"HTTP/1.1 101"), head

    def echo(self, data: bytes) -> bytes:
        self.sock.sendall(data)
        want = b"echo:" + data
        got = b""
        while len(got) < len(want):
            chunk = self.sock.recv(4096)
            if not chunk:
                raise ConnectionError("websocket closed")
            got += chunk
        return got

    def close(self) -> None:
        self.sock.close()


def json_lines(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


__all__ = ["start", "start_proxy", "admin", "status", "metrics", "worker_pids", "wait_until",
           "WebSocket", "json_lines", "server_section", "web_config"]
