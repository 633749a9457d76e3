"""The admin HTTP endpoints, served by the supervisor with asyncio streams
(no framework: a handful of routes, one request per connection).

    GET    /                                   status page (status.html)
    GET    /metrics                            Prometheus text, summed over workers
    GET    /status                             JSON: workers, config, requests, backends
    POST   /reload                             reload the configuration file
    POST   /backends/{pool}/{backend}/drain    stop sending requests to a backend
    POST   /backends/{pool}/{backend}/enable   send them again
    PUT    /pools/{pool}/backends/{backend}    add a backend (body: optional {"weight": N})
    DELETE /pools/{pool}/backends/{backend}    remove a backend
    POST   /cache/purge                        purge: {"url": U} | {"prefix": P} | {"tags": [T]},
                                               optional "soft": true (to every edge with purge_bus)

Backend changes last until the next reload of the file.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import socket
import subprocess
import sys
from pathlib import Path
from urllib.parse import unquote

from edgeproxy.config.load import Invalid, Reader
from edgeproxy.config.load import backend as parse_backend

log = logging.getLogger("edgeproxy.admin")

STATUS_PAGE = Path(__file__).with_name("status.html")
MAX_HEAD = 16 * 1024
MAX_BODY = 64 * 1024
REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed",
           409: "Conflict", 413: "Content Too Large", 422: "Unprocessable Content",
           500: "Internal Server Error", 507: "Insufficient Storage"}

BACKEND_STATE = re.compile(r"/backends/([^/]+)/([^/]+)/(drain|enable)")
POOL_BACKEND = re.compile(r"/pools/([^/]+)/backends/([^/]+)")


class AdminServer:
    def __init__(self, supervisor):
        self.sup = supervisor

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            try:
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
            except asyncio.LimitOverrunError:
                return await self._reply(writer, 413, {"error": "request head too large"})
            except (TimeoutError, asyncio.IncompleteReadError, ConnectionError):
                return
            lines = head.decode("latin-1").split("\r\n")
            parts = lines[0].split(" ")
            if len(parts) != 3:
                return await self._reply(writer, 400, {"error": "bad request line"})
            method, target, _ = parts
            length = 0
            for line in lines[1:]:
                name, _, value = line.partition(":")
                if name.strip().lower() == "content-length":
                    try:
                        length = int(value.strip())
                    except ValueError:
                        return await self._reply(writer, 400, {"error": "bad Content-Length"})
            if length > MAX_BODY or length < 0:
                return await self._reply(writer, 413, {"error": "body too large"})
            body = await reader.readexactly(length) if length else b""
            status, payload = await self.route(method, target.split("?", 1)[0], body)
            await self._reply(writer, status, payload)
        except Exception:
            log.exception("admin request failed")
            try:
                await self._reply(writer, 500, {"error": "internal error"})
            except Exception:
                pass
        finally:
            writer.close()

    async def route(self, method: str, path: str, body: bytes):
        sup = self.sup
        if path == "/":
            return _only(method, "GET") or (200, ("text/html; charset=utf-8",
                                                  STATUS_PAGE.read_bytes()))
        if path == "/metrics":
            return _only(method, "GET") or (200, ("text/plain; version=0.0.4; charset=utf-8",
                                                  sup.metrics_text().encode()))
        if path == "/status":
            return _only(method, "GET") or (200, sup.status())
        if path == "/reload":
            if method != "POST":
                return 405, {"error": "use POST"}
            ok, message = await sup.reload()
            return (200 if ok else 422), {"ok": ok, "message": message}
        if path == "/cache/purge":
            if method != "POST":
                return 405, {"error": "use POST"}
            return await purge(sup, body)
        m = BACKEND_STATE.fullmatch(path)
        if m:
            if method != "POST":
                return 405, {"error": "use POST"}
            status, message = sup.backend_op({"op": m.group(3), "pool": unquote(m.group(1)),
                                              "backend": unquote(m.group(2))})
            return status, {"ok": status == 200, "message": message}
        m = POOL_BACKEND.fullmatch(path)
        if m:
            pool, name = unquote(m.group(1)), unquote(m.group(2))
            if method == "DELETE":
                status, message = sup.backend_op({"op": "remove", "pool": pool, "backend": name})
                return status, {"ok": status == 200, "message": message}
            if method != "PUT":
                return 405, {"error": "use PUT or DELETE"}
            try:
                options = json.loads(body) if body.strip() else {}
                weight = options.get("weight", 1) if isinstance(options, dict) else None
                if not isinstance(weight, int) or isinstance(weight, bool) or not 1 <= weight <= 1000:
                    raise ValueError("weight must be an integer from 1 to 1000")
                # "host:port", or "unix:/path" (its slashes percent-encoded)
                unix = name.lower().startswith("unix:")
                if unix and not name[5:].startswith("/"):
                    raise ValueError("a unix socket backend needs an absolute path")
                bc = parse_backend(name if unix else f"http://{name}", "backend", Reader("/"))
            except (ValueError, Invalid) as exc:
                return 400, {"ok": False, "message": f"{name}: {exc}"}
            status, message = sup.backend_op({"op": "add", "pool": pool, "backend": bc.name,
                                              "host": bc.host, "port": bc.port, "path": bc.path,
                                              "weight": weight})
            return status, {"ok": status == 200, "message": message}
        return 404, {"error": f"no such endpoint: {path}"}

    async def _reply(self, writer: asyncio.StreamWriter, status: int, payload) -> None:
        if isinstance(payload, tuple):
            ctype, data = payload
        else:
            ctype, data = "application/json", (json.dumps(payload, indent=1) + "\n").encode()
        writer.write(f"HTTP/1.1 {status} {REASONS.get(status, 'Error')}\r\n"
                     f"Content-Type: {ctype}\r\nContent-Length: {len(data)}\r\n"
                     "Cache-Control: no-store\r\nConnection: close\r\n\r\n".encode() + data)
        try:
            await writer.drain()
        except ConnectionError:
            pass


async def purge(sup, body: bytes):
    """POST /cache/purge: run `edgeproxy cache purge` on the running
    configuration (a process of its own: the supervisor never opens the
    cache), which applies it here and, with cache.purge_bus, announces it."""
    config = sup.config
    if config.cache is None:
        return 409, {"ok": False, "message": "no [cache] section"}
    if not config.source:
        return 409, {"ok": False, "message": "the configuration is not from a file"}
    try:
        spec = json.loads(body) if body.strip() else None
        if not isinstance(spec, dict):
            raise ValueError("expected a JSON object")
        args: list[str] = []
        given = [k for k in ("url", "prefix", "tags") if k in spec]
        if len(given) != 1 or set(spec) - {"url", "prefix", "tags", "soft"}:
            raise ValueError('give exactly one of "url", "prefix" or "tags" (and "soft")')
        value = spec[given[0]]
        if given[0] == "tags":
            if not isinstance(value, list) or not value or \
                    not all(isinstance(t, str) and t and "\n" not in t for t in value):
                raise ValueError('"tags" must be a non-empty list of strings')
            for tag in value:
                args += ["--tag", tag]
        elif not isinstance(value, str) or not value:
            raise ValueError(f'"{given[0]}" must be an absolute http(s) URL')
        elif given[0] == "prefix":
            args += ["--prefix", value]
        soft = spec.get("soft", False)
        if not isinstance(soft, bool):
            raise ValueError('"soft" must be true or false')
        if soft:
            args.append("--soft")
        if given[0] == "url":
            args += ["--", value]
    except ValueError as exc:
        return 400, {"ok": False, "message": str(exc)}
    cmd = [sys.executable, "-m", "edgeproxy", "cache", "purge", "-c",
           os.path.abspath(config.source), *args]
    try:
        done = await asyncio.get_running_loop().run_in_executor(
            None, lambda: subprocess.run(cmd, capture_output=True, timeout=60,
                                         stdin=subprocess.DEVNULL))
    except (OSError, subprocess.TimeoutExpired) as exc:
        return 500, {"ok": False, "message": f"cache purge: {exc}"}
    out = done.stdout.decode(errors="replace").strip()
    m = re.match(r"(purged|marked stale) (\d+) entr", out)
    if m is None:
        err = done.stderr.decode(errors="replace").strip().splitlines()
        return 422, {"ok": False, "message": err[-1] if err else out or "cache purge failed"}
    return 200, {"ok": True, "purged": int(m.group(2)), "soft": soft,
                 "bus": bool(config.cache.purge_bus), "message": out}


def _only(method: str, allowed: str):
    return None if method == allowed else (405, {"error": f"use {allowed}"})


def bind_admin(host: str, port: int) -> socket.socket:
    """The admin listener's socket, bound before any worker starts so that
    an address in use fails the start (OSError) rather than a running proxy."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(128)
    except OSError:
        sock.close()
        raise
    sock.setblocking(False)
    return sock


async def start_admin(supervisor, sock: socket.socket) -> asyncio.AbstractServer:
    """Serve the admin endpoints on sock (from bind_admin)."""
    admin = AdminServer(supervisor)
    server = await asyncio.start_server(admin.handle, sock=sock, limit=MAX_HEAD)
    host, port = sock.getsockname()[:2]
    log.info("admin listener on http://%s:%d", host if ":" not in host else f"[{host}]", port)
    return server
