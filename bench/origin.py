"""The origin every contender proxies to: nginx serving static files and an upload sink.

When nginx is not installed, ``python -m bench.origin --port P`` is the fallback:
a small asyncio server (uvloop when available) answering the same paths.  It is
slower than nginx and shares the load CPU with wrk, so with it the absolute
numbers are lower; the ratios between contenders stay meaningful as long as the
origin's CPU is not saturated (the JSON records its CPU time per round).
"""
from __future__ import annotations

import argparse
import asyncio
import http.client
import os
import shutil
from pathlib import Path

from bench.servers import Pinning, Server, StartError, wait_until_serving
from bench.templates import fill

KiB = 1024
MiB = 1024 * KiB

# Path on the origin -> size of the file served there.
FILES = {"/1k.bin": KiB, "/100k.bin": 100 * KiB, "/1m.bin": MiB}
UPLOAD_PATH = "/upload"
UPLOAD_ANSWER = b"ok\n"
# The FILES again under this prefix, answered with CACHE_CONTROL: what the cache cases proxy.
CACHED_PREFIX = "/cached/"
CACHE_CONTROL = "public, max-age=600"
CACHED_LOG = "origin-cached.log"   # in the workdir: one line per request under CACHED_PREFIX
# The FILES again under this prefix: what the static cases serve from disk
# (edgeproxy's route.static, nginx's alias; HAProxy, which serves no files,
# proxies them to the origin).
STATIC_PREFIX = "/static/"
STATIC_ROOT = "static-root"        # in the workdir: the directory the contenders serve

NGINX = "/usr/sbin/nginx"
ECHO_MODULE = Path("/usr/lib/nginx/modules/ngx_http_echo_module.so")


def nginx_binary() -> str | None:
    return shutil.which("nginx") or (NGINX if Path(NGINX).exists() else None)


def nginx_user_line() -> str:
    # Started as root, nginx workers become "nobody" and could not read a docroot
    # under a private temp dir; keep them as the user that runs the bench.
    return "user root;" if os.geteuid() == 0 else ""


def file_body(size: int) -> bytes:
    """A deterministic body of that size (not compressible to nothing, not random)."""
    # letters and digits only: the 1 KiB body is also written into the
    # origin's nginx config as a string
    pattern = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
    return (pattern * (size // len(pattern) + 1))[:size]


def write_docroot(docroot: Path) -> None:
    docroot.mkdir(parents=True, exist_ok=True)
    for path, size in FILES.items():
        (docroot / path.lstrip("/")).write_bytes(file_body(size))


def static_root(workdir: Path) -> Path:
    """The directory the static cases' contenders serve (the FILES), written once."""
    root = workdir / STATIC_ROOT
    if not root.exists():
        write_docroot(root)
    return root


def nginx_origin(workdir: Path, port: int, nofile: int, pinning: Pinning) -> Server:
    """The nginx origin; the upload sink reads the whole body before it answers."""
    nginx = nginx_binary()
    if nginx is None:
        raise StartError("nginx is not installed")
    docroot = workdir / "docroot"
    write_docroot(docroot)
    if ECHO_MODULE.exists():
        # echo_read_request_body reads the body to the end, then the answer is sent.
        modules = f"load_module {ECHO_MODULE};"
        handler = "echo_read_request_body;\n            echo ok;"
        extra = ""
    else:
        # Without the echo module: proxy_pass buffers the whole body before it
        # forwards it to a one-line sink on a Unix socket.
        modules = ""
        handler = f"proxy_pass http://unix:{workdir}/upload-sink.sock;"
        extra = (f"    server {{\n        listen unix:{workdir}/upload-sink.sock;\n"
                 f"        location / {{ return 200 \"ok\\n\"; }}\n    }}\n")
    conf = workdir / "origin.conf"
    conf.write_text(fill("nginx-origin.conf", USER=nginx_user_line(), LOAD_MODULES=modules,
                         NOFILE=nofile, WORKER_CONNECTIONS=nofile - 64, WORKDIR=workdir, PORT=port,
                         DOCROOT=docroot, UPLOAD_HANDLER=handler, EXTRA_SERVERS=extra,
                         CACHED_PREFIX=CACHED_PREFIX, CACHED_LOG=workdir / CACHED_LOG,
                         BODY_1K=file_body(FILES["/1k.bin"]).decode("ascii")))
    argv = [nginx, "-p", str(workdir), "-c", str(conf), "-e", str(workdir / "origin-error.log")]
    return Server("origin (nginx)", pinning.for_load(argv), port, workdir / "origin.log")


def asyncio_origin(workdir: Path, port: int, pinning: Pinning, python: str, repo: Path) -> Server:
    argv = [python, "-m", "bench.origin", "--port", str(port)]
    return Server("origin (asyncio)", pinning.for_load(argv), port, workdir / "origin.log",
                  cwd=str(repo))


def cached_requests_seen(workdir: Path) -> int | None:
    """How many requests under CACHED_PREFIX the origin has answered so far
    (None: this origin does not count them, as the asyncio fallback)."""
    try:
        with open(workdir / CACHED_LOG, "rb") as log:
            return sum(chunk.count(b"\n") for chunk in iter(lambda: log.read(1 << 16), b""))
    except OSError:
        return None


def verify_origin(server: Server) -> None:
    """Wait for the origin, then check every file (plain and cacheable) and a full 1 MiB upload."""
    wait_until_serving(server, "/1k.bin", FILES["/1k.bin"])
    for path, size in FILES.items():
        for url, cache_control in ((path, None), (CACHED_PREFIX + path[1:], CACHE_CONTROL)):
            conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=5)
            try:
                conn.request("GET", url)
                response = conn.getresponse()
                body = response.read()
            finally:
                conn.close()
            if response.status != 200 or body != file_body(size):
                raise StartError(f"{server.name}: GET {url} answered {response.status} "
                                 f"with {len(body)} bytes, expected 200 with {size}")
            if response.getheader("Cache-Control") != cache_control:
                raise StartError(f"{server.name}: GET {url} answered Cache-Control: "
                                 f"{response.getheader('Cache-Control')}, expected {cache_control}")
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=5)
    try:
        conn.request("POST", UPLOAD_PATH, body=file_body(MiB),
                     headers={"Content-Type": "application/octet-stream"})
        response = conn.getresponse()
        body = response.read()
    finally:
        conn.close()
    if response.status != 200 or body.strip() != UPLOAD_ANSWER.strip():
        raise StartError(f"{server.name}: POST {UPLOAD_PATH} answered {response.status} "
                         f"{body[:40]!r}, expected 200 {UPLOAD_ANSWER!r}")


# --- the asyncio fallback origin -------------------------------------------

class _OriginProtocol(asyncio.Protocol):
    """HTTP/1.1 keep-alive: GET of the FILES, POST /upload (body read to the end)."""

    def __init__(self, answers: dict[str, bytes]) -> None:
        self._answers = answers
        self._buffer = bytearray()
        self._body_left = 0
        self._pending: tuple[bytes, bytes, bool] | None = None
        self._transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        while self._transport is not None and not self._transport.is_closing():
            if self._pending is not None:
                taken = min(self._body_left, len(self._buffer))
                del self._buffer[:taken]
                self._body_left -= taken
                if self._body_left:
                    return
                method, path, close = self._pending
                self._pending = None
                self._answer(method, path, close)
                continue
            end = self._buffer.find(b"\r\n\r\n")
            if end < 0:
                if len(self._buffer) > 64 * KiB:
                    self._transport.close()
                return
            head = bytes(self._buffer[:end]).decode("latin-1").split("\r\n")
            del self._buffer[:end + 4]
            parts = head[0].split(" ")
            if len(parts) != 3:
                self._transport.close()
                return
            method, path = parts[0].encode(), parts[1].encode()
            headers = {}
            for line in head[1:]:
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip()
            close = headers.get("connection", "").lower() == "close" or parts[2] == "HTTP/1.0"
            if "chunked" in headers.get("transfer-encoding", "").lower():
                self._transport.write(b"HTTP/1.1 501 Not Implemented\r\nContent-Length: 0\r\n"
                                      b"Connection: close\r\n\r\n")
                self._transport.close()
                return
            self._body_left = int(headers.get("content-length", "0") or 0)
            self._pending = (method, path, close)

    def _answer(self, method: bytes, path: bytes, close: bool) -> None:
        assert self._transport is not None
        if method == b"POST" and path == UPLOAD_PATH.encode():
            status, body = b"200 OK", UPLOAD_ANSWER
        elif method in (b"GET", b"HEAD") and path.decode("latin-1") in self._answers:
            status, body = b"200 OK", self._answers[path.decode("latin-1")]
        else:
            status, body = b"404 Not Found", b"not found\n"
        cacheable = status == b"200 OK" and path.startswith(CACHED_PREFIX.encode())
        head = (b"HTTP/1.1 " + status + b"\r\nContent-Type: application/octet-stream\r\n"
                + (b"Cache-Control: " + CACHE_CONTROL.encode() + b"\r\n" if cacheable else b"")
                + b"Content-Length: " + str(len(body)).encode() + b"\r\n"
                + (b"Connection: close\r\n" if close else b"") + b"\r\n")
        self._transport.write(head if method == b"HEAD" else head + body)
        if close:
            self._transport.close()


async def serve(port: int) -> None:
    answers = {path: file_body(size) for path, size in FILES.items()}
    answers.update({prefix + path[1:]: answers[path] for path in FILES
                    for prefix in (CACHED_PREFIX, STATIC_PREFIX)})
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: _OriginProtocol(answers), "127.0.0.1", port,
                                      backlog=4096, reuse_address=True)
    async with server:
        await server.serve_forever()


def main() -> None:
    parser = argparse.ArgumentParser(description="The bench's fallback origin (asyncio).")
    parser.add_argument("--port", type=int, required=True)
    port = parser.parse_args().port
    try:
        import uvloop
        run = uvloop.run
    except ImportError:
        run = asyncio.run
    try:
        run(serve(port))
    except KeyboardInterrupt:
        pass
    except OSError as exc:
        raise SystemExit(f"bench.origin: cannot serve on 127.0.0.1:{port}: {exc}") from None


if __name__ == "__main__":
    main()
