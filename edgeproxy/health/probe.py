"""One active health probe: an HTTP/1.1 GET of the health path on one
backend, over TLS for https backends or a unix socket for unix ones,
judged by its status line."""
from __future__ import annotations

import asyncio
import ssl as _ssl
from dataclasses import dataclass

MAX_HEAD = 16384


@dataclass(frozen=True)
class ProbeResult:
    ok: bool
    status: int           # 0 when no status line came back
    detail: str           # "200 OK", "connection refused", "timed out after 1.0s", ...


async def probe(host: str, port: int, path: str, *, timeout: float, expect: tuple[int, int],
                host_header: str, ssl: _ssl.SSLContext | None = None,
                server_hostname: str | None = None, unix_path: str | None = None) -> ProbeResult:
    """GET `path` on host:port (or on the unix socket `unix_path`); passes
    when the status is within `expect`."""
    try:
        return await asyncio.wait_for(
            _get(host, port, path, expect, host_header, ssl, server_hostname, unix_path), timeout)
    except TimeoutError:
        return ProbeResult(False, 0, f"timed out after {timeout:g}s")
    except ConnectionRefusedError:
        return ProbeResult(False, 0, "connection refused")
    except (OSError, EOFError, ValueError) as exc:
        what = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
        return ProbeResult(False, 0, what)


async def _get(host, port, path, expect, host_header, ssl, server_hostname,
               unix_path) -> ProbeResult:
    kw = {}
    if ssl is not None:
        kw = {"ssl": ssl, "server_hostname": server_hostname or host}
    if unix_path is not None:
        reader, writer = await asyncio.open_unix_connection(unix_path, limit=MAX_HEAD)
    else:
        reader, writer = await asyncio.open_connection(host, port, limit=MAX_HEAD, **kw)
    try:
        writer.write(f"GET {path} HTTP/1.1\r\nHost: {host_header}\r\n"
                     "User-Agent: edgeproxy-health\r\nConnection: close\r\n\r\n".encode("latin-1"))
        await writer.drain()
        line = await reader.readline()
        if not line:
            raise EOFError("closed without answering")
        parts = line.decode("latin-1").rstrip("\r\n").split(" ", 2)
        if len(parts) < 2 or not parts[0].startswith("HTTP/1.") or not parts[1].isdigit() \
                or len(parts[1]) != 3:
            raise ValueError(f"not an HTTP response: {line[:60]!r}")
        status = int(parts[1])
        reason = parts[2] if len(parts) > 2 else ""
        ok = expect[0] <= status <= expect[1]
        return ProbeResult(ok, status, f"{status} {reason}".strip())
    finally:
        writer.close()
