"""A small HTTP/1.1 origin server on asyncio, the backend of `edgeproxy demo` and of the tests.

Paths:
  /                 an HTML page saying it is served by the demo origin
  /api/hello        a JSON greeting
  /big?size=N       N bytes (default 1 MiB) of `big_body(N)`
  /echo             any method: the request (method, target, headers as
                    "Name: value" strings, body length and SHA-256) as JSON
  /slow?delay=S     waits S seconds (default 1, at most 60), then answers JSON
  /cached/NAME      a cacheable text page (Cache-Control: max-age=30, an ETag,
                    Last-Modified; 304 to a matching If-None-Match), the same
                    for as long as the origin runs: the demo's cached route

It speaks keep-alive, answers with Content-Length, reads request bodies
framed by Content-Length or chunked, answers `Expect: 100-continue`, and
sends `Server` and `X-Powered-By` headers so the demo shows edgeproxy
removing them.  `start_origin()` runs it on its own event loop in a
background thread; `OriginServer` runs it on the caller's loop.
"""
from __future__ import annotations

import asyncio
import hashlib
import json
import os
import sys
import threading
import time
from email.utils import formatdate
from urllib.parse import parse_qs, urlsplit

__all__ = ["OriginServer", "OriginThread", "start_origin", "big_body"]

MAX_HEAD = 64 * 1024          # request line and headers
MAX_BIG = 1024 ** 3           # largest /big answer
MAX_DELAY = 60.0              # longest /slow wait
IDLE_TIMEOUT = 60.0           # an idle keep-alive connection is closed after this
WRITE_PIECE = 64 * 1024

BIG_PATTERN = b"edgeproxy demo origin: 0123456789abcdefghijklmnopqrstuvwxyz ..\n"  # 64 bytes

INDEX_HTML = b"""<!doctype html>
<html>
<head><meta charset="utf-8"><title>edgeproxy demo</title></head>
<body>
<h1>Hello from the demo origin</h1>
<p>This page is served by the edgeproxy demo origin, behind edgeproxy.</p>
<ul>
<li><a href="/api/hello">/api/hello</a>: JSON</li>
<li><a href="/big?size=1048576">/big?size=1048576</a>: a body of N bytes</li>
<li>/echo: the request, as JSON (try a POST)</li>
<li><a href="/slow?delay=2">/slow?delay=2</a>: an answer after S seconds</li>
<li><a href="/cached/page">/cached/page</a>: cacheable for 30 s (see its Cache-Status)</li>
</ul>
</body>
</html>
"""

CACHED_MAX_AGE = 30           # seconds /cached/ pages are fresh for
STARTED = time.time()         # /cached/ pages say when the origin started: their content

REASONS = {100: "Continue", 200: "OK", 304: "Not Modified", 400: "Bad Request", 404: "Not Found",
           405: "Method Not Allowed", 413: "Content Too Large",
           431: "Request Header Fields Too Large", 501: "Not Implemented"}


def big_body(size: int, offset: int = 0) -> bytes:
    """Bytes `offset` to `offset + size` of the /big body (BIG_PATTERN repeated)."""
    n = len(BIG_PATTERN)
    start = offset % n
    repeats = (start + size) // n + 1
    return (BIG_PATTERN * repeats)[start:start + size]


class BadRequest(Exception):
    """The client sent something this origin will not answer; the connection is closed."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


class Request:
    """One parsed request head."""

    def __init__(self, method: str, target: str, version: str,
                 headers: list[tuple[str, str]]):
        self.method = method
        self.target = target
        self.version = version
        self.headers = headers

    def get(self, name: str) -> list[str]:
        return [v for k, v in self.headers if k.lower() == name]

    @property
    def keep_alive(self) -> bool:
        tokens = {t.strip().lower() for v in self.get("connection") for t in v.split(",")}
        if self.version == "HTTP/1.0":
            return "keep-alive" in tokens
        return "close" not in tokens


def parse_head(head: bytes) -> Request:
    try:
        text = head.decode("latin-1")
    except UnicodeDecodeError:  # pragma: no cover - latin-1 decodes anything
        raise BadRequest(400, "undecodable head") from None
    lines = text.split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) != 3 or not parts[0].isalpha() or parts[2] not in ("HTTP/1.0", "HTTP/1.1") \
            or not parts[1]:
        raise BadRequest(400, "bad request line")
    headers = []
    for line in lines[1:]:
        if not line:
            continue
        name, colon, value = line.partition(":")
        if not colon or not name or name != name.strip() or line[0] in " \t":
            raise BadRequest(400, "bad header line")
        headers.append((name, value.strip(" \t")))
    return Request(parts[0], parts[1], parts[2], headers)


class BodyReader:
    """Reads a request body framed by Content-Length or chunked, piece by piece."""

    def __init__(self, reader: asyncio.StreamReader, request: Request):
        self.reader = reader
        encodings = [t.strip().lower() for v in request.get("transfer-encoding")
                     for t in v.split(",")]
        lengths = {v.strip() for v in request.get("content-length")}
        if encodings and lengths:
            raise BadRequest(400, "both Transfer-Encoding and Content-Length")
        if encodings and encodings != ["chunked"]:
            raise BadRequest(501, "only chunked transfer-encoding is supported")
        self.chunked = bool(encodings)
        self.remaining = 0
        if lengths:
            if len(lengths) > 1 or not all(v.isdigit() and v.isascii() for v in lengths):
                raise BadRequest(400, "bad Content-Length")
            self.remaining = int(lengths.pop())
        self.done = not self.chunked and self.remaining == 0

    async def pieces(self):
        if self.chunked:
            while True:
                line = await self.reader.readuntil(b"\r\n")
                size_text = line[:-2].split(b";", 1)[0].strip()
                try:
                    size = int(size_text, 16)
                except ValueError:
                    raise BadRequest(400, "bad chunk size") from None
                if size_text[:1] in (b"+", b"-") or size_text.startswith(b"0x"):
                    raise BadRequest(400, "bad chunk size")
                if size == 0:
                    while (await self.reader.readuntil(b"\r\n")) != b"\r\n":
                        pass  # trailer fields are read and dropped
                    self.done = True
                    return
                while size:
                    piece = await self.reader.read(min(size, WRITE_PIECE))
                    if not piece:
                        raise asyncio.IncompleteReadError(b"", size)
                    size -= len(piece)
                    yield piece
                if await self.reader.readexactly(2) != b"\r\n":
                    raise BadRequest(400, "chunk not followed by CRLF")
        else:
            while self.remaining:
                piece = await self.reader.read(min(self.remaining, WRITE_PIECE))
                if not piece:
                    raise asyncio.IncompleteReadError(b"", self.remaining)
                self.remaining -= len(piece)
                yield piece
            self.done = True


class Response:
    """What a path handler answers: status, headers, and a body (bytes or a size for /big)."""

    def __init__(self, status: int, content_type: str | None, body: bytes = b"",
                 big: int | None = None, headers: list[tuple[str, str]] | None = None):
        self.status = status
        self.content_type = content_type
        self.body = body
        self.big = big
        self.headers = headers or []

    @property
    def length(self) -> int:
        return self.big if self.big is not None else len(self.body)


def json_response(data: object, status: int = 200) -> Response:
    return Response(status, "application/json",
                    json.dumps(data, indent=2).encode() + b"\n")


def text_response(status: int, message: str) -> Response:
    return Response(status, "text/plain; charset=utf-8", message.encode() + b"\n")


async def answer(request: Request, body_length: int, body_sha256: str) -> Response:
    """The response to one request (its body already read)."""
    url = urlsplit(request.target)
    query = parse_qs(url.query)
    path = url.path
    if path == "/echo":
        return json_response({
            "method": request.method,
            "target": request.target,
            "path": path,
            "query": url.query,
            "version": request.version,
            "headers": [f"{k}: {v}" for k, v in request.headers],  # in order, as received
            "body_length": body_length,
            "body_sha256": body_sha256,
        })
    handlers = {"/": index, "/api/hello": hello, "/big": big, "/slow": slow}
    handler = handlers.get(path)
    if handler is None and not path.startswith("/cached/"):
        return text_response(404, f"not found: {path}")
    if request.method not in ("GET", "HEAD"):
        response = text_response(405, f"{request.method} is not allowed on {path}")
        response.headers.append(("Allow", "GET, HEAD"))
        return response
    if handler is None:
        return cached(path, request.get("if-none-match"))
    return await handler(query)


async def index(query: dict) -> Response:
    return Response(200, "text/html; charset=utf-8", INDEX_HTML)


async def hello(query: dict) -> Response:
    return json_response({"message": "hello from the edgeproxy demo origin",
                          "time": time.time()})


async def big(query: dict) -> Response:
    text = query.get("size", ["1048576"])[-1]
    if not text.isdigit() or int(text) > MAX_BIG:
        return text_response(400, f"size must be an integer from 0 to {MAX_BIG}")
    return Response(200, "text/plain; charset=utf-8", big=int(text))


def cached(path: str, if_none_match: list[str]) -> Response:
    """A page that may be cached for CACHED_MAX_AGE seconds; 304 when the
    client (or the proxy revalidating) already has it."""
    body = (f"{path}: a cacheable page from the demo origin, unchanged since it started "
            f"({formatdate(STARTED, usegmt=True)}). edgeproxy keeps it for "
            f"{CACHED_MAX_AGE} s: see Cache-Status.\n").encode()
    etag = f'"{hashlib.sha256(body).hexdigest()[:16]}"'
    headers = [("Cache-Control", f"public, max-age={CACHED_MAX_AGE}"), ("ETag", etag),
               ("Last-Modified", formatdate(STARTED, usegmt=True))]
    tags = {t.strip().removeprefix("W/") for v in if_none_match for t in v.split(",")}
    if etag in tags or "*" in tags:
        return Response(304, None, headers=headers)
    return Response(200, "text/plain; charset=utf-8", body, headers=headers)


async def slow(query: dict) -> Response:
    text = query.get("delay", ["1"])[-1]
    try:
        delay = float(text)
    except ValueError:
        delay = -1.0
    if not 0 <= delay <= MAX_DELAY:
        return text_response(400, f"delay must be a number of seconds from 0 to {MAX_DELAY:g}")
    await asyncio.sleep(delay)
    return json_response({"delayed": delay})


def response_head(response: Response, keep_alive: bool, http10: bool) -> bytes:
    lines = [f"HTTP/1.1 {response.status} {REASONS.get(response.status, 'Unknown')}",
             f"Date: {formatdate(usegmt=True)}",
             "Server: edgeproxy-demo-origin",
             "X-Powered-By: edgeproxy-demo"]
    if response.content_type:
        lines.append(f"Content-Type: {response.content_type}")
    if response.status != 304:     # a 304 has no body, and no length of its own
        lines.append(f"Content-Length: {response.length}")
    lines.extend(f"{k}: {v}" for k, v in response.headers)
    if not keep_alive:
        lines.append("Connection: close")
    elif http10:
        lines.append("Connection: keep-alive")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


class OriginServer:
    """The origin on the running event loop: `await OriginServer.start()`, then `await close()`."""

    def __init__(self) -> None:
        self.server: asyncio.Server | None = None
        self.connections: set[asyncio.Task] = set()
        self.host = ""
        self.port = 0

    @classmethod
    async def start(cls, host: str = "127.0.0.1", port: int = 0) -> OriginServer:
        origin = cls()
        origin.server = await asyncio.start_server(origin.serve_connection, host, port,
                                                   limit=MAX_HEAD)
        sockname = origin.server.sockets[0].getsockname()
        origin.host, origin.port = sockname[0], sockname[1]
        return origin

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    async def close(self) -> None:
        """Stop listening and close every connection, idle or busy."""
        if self.server is not None:
            self.server.close()
        for _ in range(5):  # let connections accepted just now reach serve_connection
            await asyncio.sleep(0)
        for task in list(self.connections):
            task.cancel()
        await asyncio.gather(*self.connections, return_exceptions=True)
        if self.server is not None:
            await self.server.wait_closed()

    async def serve_connection(self, reader: asyncio.StreamReader,
                               writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        self.connections.add(task)
        try:
            while await self.serve_one(reader, writer):
                pass
        except (asyncio.IncompleteReadError, ConnectionError, TimeoutError):
            pass  # the client went away or stayed idle: nothing to answer
        except asyncio.LimitOverrunError:
            await self.refuse(writer, 431, "request head too large")
        except BadRequest as exc:
            await self.refuse(writer, exc.status, str(exc))
        except asyncio.CancelledError:
            # close() ends the connection.  Ending the task normally keeps
            # StreamReaderProtocol's done-callback from logging the cancellation.
            pass
        finally:
            self.connections.discard(task)
            writer.close()

    async def refuse(self, writer: asyncio.StreamWriter, status: int, message: str) -> None:
        response = text_response(status, message)
        try:
            writer.write(response_head(response, False, False) + response.body)
            await writer.drain()
        except ConnectionError:
            pass

    async def serve_one(self, reader: asyncio.StreamReader,
                        writer: asyncio.StreamWriter) -> bool:
        """Answer one request; False when the connection should close."""
        async with asyncio.timeout(IDLE_TIMEOUT):
            head = await reader.readuntil(b"\r\n\r\n")
        head = head.lstrip(b"\r\n")  # empty lines before a request are allowed
        if not head:
            return True
        request = parse_head(head[:-4])
        body = BodyReader(reader, request)
        if not body.done and any(v.lower() == "100-continue" for v in request.get("expect")):
            writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        digest = hashlib.sha256()
        length = 0
        async for piece in body.pieces():
            digest.update(piece)
            length += len(piece)
        response = await answer(request, length, digest.hexdigest())
        keep_alive = request.keep_alive
        writer.write(response_head(response, keep_alive, request.version == "HTTP/1.0"))
        if request.method != "HEAD":
            if response.big is None:
                writer.write(response.body)
            else:
                sent = 0
                while sent < response.big:
                    piece = big_body(min(WRITE_PIECE * 4, response.big - sent), sent)
                    writer.write(piece)
                    sent += len(piece)
                    await writer.drain()
        await writer.drain()
        return keep_alive


class OriginThread:
    """The origin running on its own event loop in a daemon thread; `.stop()` ends it."""

    def __init__(self, host: str, port: int):
        self._ready = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._origin: OriginServer | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(host, port),
                                        name="edgeproxy-demo-origin", daemon=True)

    @property
    def host(self) -> str:
        return self._origin.host

    @property
    def port(self) -> int:
        return self._origin.port

    @property
    def url(self) -> str:
        return self._origin.url

    def _run(self, host: str, port: int) -> None:
        loop = self._loop = asyncio.new_event_loop()
        try:
            self._origin = loop.run_until_complete(OriginServer.start(host, port))
        except BaseException as exc:  # reported to the starting thread
            self._error = exc
            self._ready.set()
            loop.close()
            return
        self._ready.set()
        try:
            loop.run_forever()
        finally:
            loop.run_until_complete(self._origin.close())
            leftovers = asyncio.all_tasks(loop)
            if leftovers:
                for task in leftovers:
                    task.cancel()
                loop.run_until_complete(asyncio.gather(*leftovers, return_exceptions=True))
            loop.close()

    def start(self) -> OriginThread:
        self._thread.start()
        self._ready.wait()
        if self._error is not None:
            self._thread.join()
            raise self._error
        return self

    def stop(self, timeout: float = 5.0) -> None:
        """Close the listener and every connection, and wait for the thread."""
        if self._thread.is_alive() and self._loop is not None:
            try:
                self._loop.call_soon_threadsafe(self._loop.stop)
            except RuntimeError:
                pass  # the loop is already closed
            self._thread.join(timeout)

    def __enter__(self) -> OriginThread:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def start_origin(host: str = "127.0.0.1", port: int = 0) -> OriginThread:
    """Start the origin in a background thread; port 0 picks a free port (see `.port`)."""
    return OriginThread(host, port).start()


def main() -> None:
    import argparse
    parser = argparse.ArgumentParser(prog="python -m edgeproxy.demo.origin",
                                     description="Run the edgeproxy demo origin.")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=5000,
                        help="port to listen on (default 5000; 0: any free port)")
    parser.add_argument("--until-stdin-closes", action="store_true",
                        help="exit when standard input reaches its end (run by `edgeproxy "
                             "demo`, it ends with its parent however that stops)")
    args = parser.parse_args()

    async def run() -> None:
        origin = await OriginServer.start(args.host, args.port)
        print(f"demo origin on {origin.url}", flush=True)
        done = asyncio.Event()
        if args.until_stdin_closes:
            fd = sys.stdin.fileno()

            def readable() -> None:
                if not os.read(fd, 4096):
                    asyncio.get_running_loop().remove_reader(fd)
                    done.set()
            asyncio.get_running_loop().add_reader(fd, readable)
        try:
            await done.wait()
        finally:
            await origin.close()

    try:
        asyncio.run(run())
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
