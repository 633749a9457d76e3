"""Test harness: a scriptable origin server, a proxy process and a raw
HTTP/1.1 client, all over real sockets on 127.0.0.1."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from email.utils import formatdate
from pathlib import Path
from urllib.parse import parse_qs

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, proc: subprocess.Popen | None = None, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listens on {port}")


# ---- origin ---------------------------------------------------------------

@dataclass
class Seen:
    method: str
    target: str
    headers: list[tuple[str, str]]
    body: bytes

    def header(self, name: str) -> str | None:
        vals = [v for k, v in self.headers if k.lower() == name.lower()]
        return ", ".join(vals) if vals else None

    def names(self) -> set[str]:
        return {k.lower() for k, _ in self.headers}


class Origin:
    """An HTTP/1.1 origin on its own thread and asyncio loop, whose answers
    are chosen by path (see _answer).  It records every request it reads and
    counts the TCP connections it accepted."""

    def __init__(self, ssl_context=None):
        self.ssl_context = ssl_context   # serve HTTPS (each connection is one handshake)
        self.port = 0
        self.connections = 0
        self.requests: list[Seen] = []
        self.raw_heads: list[bytes] = []
        self.hits: Counter[str] = Counter()      # /cache/<name> requests by name
        self.version: Counter[str] = Counter()   # bump to change /cache/<name>'s body and ETag
        self.failing: set[str] = set()           # /cache/<name> answering 500
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._server = None

    def start(self) -> Origin:
        self._thread.start()
        fut = asyncio.run_coroutine_threadsafe(self._start(), self._loop)
        fut.result(5)
        return self

    async def _start(self):
        self._server = await asyncio.start_server(self._conn, "127.0.0.1", 0, limit=1 << 20,
                                                  ssl=self.ssl_context)
        self.port = self._server.sockets[0].getsockname()[1]

    def stop(self) -> None:
        async def _stop():
            self._server.close()
            for t in asyncio.all_tasks():
                if t is not asyncio.current_task():
                    t.cancel()
        asyncio.run_coroutine_threadsafe(_stop(), self._loop).result(5)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)

    @property
    def url(self) -> str:
        return f"{'https' if self.ssl_context else 'http'}://127.0.0.1:{self.port}"

    async def _conn(self, r: asyncio.StreamReader, w: asyncio.StreamWriter):
        self.connections += 1
        try:
            while True:
                try:
                    head = await r.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, ConnectionError):
                    return
                self.raw_heads.append(head)
                lines = head[:-4].decode("latin-1").split("\r\n")
                method, target, _ = lines[0].split(" ", 2)
                headers = [tuple(x.strip() for x in ln.split(":", 1)) for ln in lines[1:]]
                seen = Seen(method, target, headers, b"")
                if seen.header("expect") == "100-continue" and target.startswith("/expect"):
                    w.write(b"HTTP/1.1 100 Continue\r\n\r\n")
                    await w.drain()
                if seen.header("transfer-encoding") == "chunked":
                    body = bytearray()
                    while True:
                        size = int((await r.readuntil(b"\r\n")).split(b";")[0], 16)
                        if size == 0:
                            while (await r.readuntil(b"\r\n")) != b"\r\n":
                                pass
                            break
                        body += await r.readexactly(size)
                        await r.readexactly(2)
                    seen.body = bytes(body)
                elif seen.header("content-length"):
                    n = int(seen.header("content-length"))
                    if target.startswith("/slowread"):
                        got = 0
                        while got < n:    # a slow backend: 256 KiB at a time
                            got += len(await r.read(min(1 << 18, n - got)))
                            await asyncio.sleep(0.005)
                    else:
                        seen.body = await r.readexactly(n)
                self.requests.append(seen)
                keep = await self._answer(seen, r, w)
                if not keep:
                    w.close()
                    return
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            w.close()

    async def _answer(self, s: Seen, r, w) -> bool:
        parts = s.target.split("?")[0].strip("/").split("/")
        kind = parts[0]
        arg = parts[1] if len(parts) > 1 else ""
        if kind == "size":
            n = int(arg)
            w.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: %d\r\n\r\n" % n)
            if s.method != "HEAD":
                w.write(b"x" * n)
        elif kind == "chunked":
            n = int(arg)
            w.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTrailer: X-Sum\r\n\r\n")
            left = n
            while left:
                k = min(1000, left)
                w.write(b"%x\r\n%s\r\n" % (k, b"c" * k))
                left -= k
            w.write(b"0\r\nX-Sum: done\r\n\r\n")
        elif kind == "close":
            w.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\n" + b"z" * int(arg))
            await w.drain()
            return False
        elif kind == "status":
            code = int(arg)
            w.write(b"HTTP/1.1 %d Whatever\r\nETag: \"e\"\r\n%s\r\n" %
                    (code, b"" if code in (204, 304) else b"Content-Length: 0\r\n"))
        elif kind == "echo" or kind == "expect" or kind == "slowread":
            body = json.dumps({"method": s.method, "target": s.target, "headers": s.headers,
                               "body_len": len(s.body)}).encode()
            w.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                    b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        elif kind == "headers":
            w.write(b"HTTP/1.1 200 OK\r\nServer: gunicorn/21\r\nX-Powered-By: PHP/8\r\n"
                    b"X-AspNet-Version: 4\r\nX-AspNetMvc-Version: 5\r\nX-Runtime: 0.1\r\n"
                    b"X-Debug-Token: secret\r\nConnection: X-Hop\r\nX-Hop: 1\r\n"
                    b"Keep-Alive: timeout=5\r\nProxy-Connection: keep-alive\r\n"
                    b"X-Kept: yes\r\nContent-Length: 2\r\n\r\nok")
        elif kind == "slow":
            await asyncio.sleep(float(arg))
            w.write(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nslow")
        elif kind == "hang":
            await asyncio.sleep(3600)
        elif kind == "reset":
            sock = w.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
            w.transport.abort()
            return False
        elif kind == "bad":
            w.write({"garbage": b"NOT HTTP AT ALL\r\n\r\n",
                     "clte": b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
                     "badcl": b"HTTP/1.1 200 OK\r\nContent-Length: 3x\r\n\r\nabc",
                     "badchunk": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nabc\r\n0\r\n\r\n",
                     }[arg])
            await w.drain()
            return False
        elif kind == "big":
            n = int(arg)
            w.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % n)
            block = b"B" * (1 << 20)
            while n:
                k = min(n, len(block))
                w.write(block[:k])
                n -= k
                await w.drain()
        elif kind == "cache":
            await self._cacheable(s, w, arg, parse_qs(s.target.partition("?")[2]))
        elif kind == "ws":
            if (s.header("upgrade") or "").lower() != "websocket":
                w.write(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")
                return True
            w.write(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n")
            await w.drain()
            while True:
                data = await r.read(65536)
                if not data:
                    return False
                w.write(b"echo:" + data)
                await w.drain()
        else:
            w.write(b"HTTP/1.1 404 Not Found\r\nContent-Length: 9\r\n\r\nnot found")
        await w.drain()
        return True


    async def _cacheable(self, s: Seen, w, name: str, q: dict) -> None:
        """/cache/<name>?cc=...: a response whose caching fields the query
        chooses (cc, etag, lm, age, expires, vary, cookie, len, chunked,
        delay); it counts its hits and answers If-None-Match with 304."""
        self.hits[name] += 1
        opt = {k: v[0] for k, v in q.items()}
        if "delay" in opt:
            await asyncio.sleep(float(opt["delay"]))
        version = self.version[name]
        fields = [b"Date: " + formatdate(time.time(), usegmt=True).encode()]
        if name in self.failing:
            w.write(b"HTTP/1.1 500 Internal Server Error\r\nContent-Length: 4\r\n\r\nfail")
            return
        if "cc" in opt:
            fields.append(b"Cache-Control: " + opt["cc"].encode())
        etag = b'"%s-%d"' % (name.encode(), version)
        if "etag" in opt:
            fields.append(b"ETag: " + etag)
        if "lm" in opt:
            fields.append(b"Last-Modified: Mon, 01 Jan 2024 00:00:00 GMT")
        if "age" in opt:
            fields.append(b"Age: " + opt["age"].encode())
        if "expires" in opt:
            fields.append(b"Expires: " + formatdate(time.time() + float(opt["expires"]),
                                                    usegmt=True).encode())
        if "vary" in opt:
            fields.append(b"Vary: " + opt["vary"].encode())
        if "cookie" in opt:
            fields.append(b"Set-Cookie: session=1")
        if "leaky" in opt:
            fields += [b"Server: gunicorn/21", b"X-Powered-By: PHP/8", b"Connection: X-Hop",
                       b"X-Hop: 1", b"X-Kept: yes"]
        head = b"\r\n".join(fields) + b"\r\n"
        if "etag" in opt and s.header("if-none-match") == etag.decode():
            w.write(b"HTTP/1.1 304 Not Modified\r\n" + head + b"\r\n")
            return
        if "len" in opt:
            body = bytes((i * 7 + version) % 251 for i in range(int(opt["len"])))
        else:
            variant = s.header(opt["vary"]) if "vary" in opt and opt["vary"] != "*" else ""
            body = f"{name} v{version} {variant}".encode()
        # one write, as most origins send a small response: the proxy then
        # has it whole with its head, and its Cache-Status can say `stored`
        if "chunked" in opt:
            out = [b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n" + head + b"\r\n"]
            if s.method != "HEAD":
                for i in range(0, len(body), 1000):
                    part = body[i:i + 1000]
                    out.append(b"%x\r\n%s\r\n" % (len(part), part))
                out.append(b"0\r\n\r\n")
            w.write(b"".join(out))
            return
        w.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n" % len(body) + head + b"\r\n"
                + (body if s.method != "HEAD" else b""))


# ---- proxy process ----------------------------------------------------------

@dataclass
class Proxy:
    proc: subprocess.Popen
    port: int
    config_path: Path
    log_path: Path
    ports: list[int] = field(default_factory=list)

    def stop(self, sig=signal.SIGTERM, timeout: float = 10.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        return self.proc.returncode

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def rss_peak_kib(self) -> int:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
        raise RuntimeError("no VmHWM")


def start_proxy(tmp_path: Path, body: str, *, listeners: int = 1, env: dict | None = None,
                args: tuple[str, ...] = (), listen_lines: list[str] | None = None) -> Proxy:
    """Start `edgeproxy run -c` on a config made of body plus [[listen]]
    entries on free ports (listen_lines[i] is added to the i-th); wait until
    it accepts connections."""
    if listen_lines is not None:
        listeners = len(listen_lines)
    ports = [free_port() for _ in range(listeners)]
    extra = listen_lines or [""] * listeners
    text = "".join(f'[[listen]]\nbind = "127.0.0.1:{p}"\n{x}\n\n' for p, x in zip(ports, extra, strict=True)) + body
    cfg = tmp_path / f"edgeproxy-{ports[0]}.toml"
    cfg.write_text(text)
    log_path = tmp_path / f"edgeproxy-{ports[0]}.log"
    e = dict(os.environ)
    e["PYTHONPATH"] = str(ROOT) + os.pathsep + e.get("PYTHONPATH", "")
    e.update(env or {})
    proc = subprocess.Popen([sys.executable, "-m", "edgeproxy", "--log-level", "debug", "run",
                             "-c", str(cfg), *args],
                            stdout=subprocess.DEVNULL, stderr=open(log_path, "wb"), env=e,
                            cwd=str(tmp_path))
    try:
        for p in ports:
            wait_port(p, proc)
    except Exception:
        proc.kill()
        proc.wait()
        raise RuntimeError("proxy did not start:\n" + log_path.read_text(errors="replace")) from None
    return Proxy(proc, ports[0], cfg, log_path, ports)


def simple_config(origin_url: str, extra: str = "") -> str:
    return f'[[route]]\npath = "/"\npool = "web"\n\n[pool.web]\nbackends = ["{origin_url}"]\n\n{extra}'


# ---- client -----------------------------------------------------------------

@dataclass
class Response:
    status: int
    reason: str
    headers: list[tuple[str, str]]
    body: bytes
    version: str = "HTTP/1.1"
    interim: list[int] = field(default_factory=list)

    def header(self, name: str) -> str | None:
        vals = [v for k, v in self.headers if k.lower() == name.lower()]
        return ", ".join(vals) if vals else None

    def json(self):
        return json.loads(self.body)


class Client:
    """A raw HTTP/1.1 client over one socket: sends exactly the bytes given,
    parses responses strictly."""

    def __init__(self, port: int, timeout: float = 10.0, ssl_context=None,
                 server_name: str | None = None):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        if ssl_context is not None:
            self.sock = ssl_context.wrap_socket(self.sock, server_hostname=server_name)
        self.buf = b""

    def close(self) -> None:
        self.sock.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _fill(self) -> bool:
        data = self.sock.recv(1 << 16)
        if not data:
            return False
        self.buf += data
        return True

    def _read_until(self, sep: bytes) -> bytes:
        while sep not in self.buf:
            if not self._fill():
                raise ConnectionError(f"closed before {sep!r}; have {self.buf[:200]!r}")
        i = self.buf.index(sep) + len(sep)
        out, self.buf = self.buf[:i], self.buf[i:]
        return out

    def _read_exact(self, n: int) -> bytes:
        while len(self.buf) < n:
            if not self._fill():
                raise ConnectionError("closed inside a body")
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    def read_response(self, head_request: bool = False) -> Response:
        interim = []
        while True:
            head = self._read_until(b"\r\n\r\n").decode("latin-1")
            lines = head[:-4].split("\r\n")
            version, status, *reason = lines[0].split(" ", 2)
            assert version == "HTTP/1.1", lines[0]
            headers = []
            for ln in lines[1:]:
                k, v = ln.split(":", 1)
                assert k == k.strip() and k, ln
                headers.append((k, v.strip()))
            status = int(status)
            if 100 <= status < 200 and status != 101:
                interim.append(status)
                continue
            break
        resp = Response(status, reason[0] if reason else "", headers, b"", version, interim)
        te = resp.header("transfer-encoding")
        cl = resp.header("content-length")
        if head_request or status in (204, 304, 101):
            return resp
        if te:
            assert te.lower() == "chunked" and cl is None
            body = bytearray()
            while True:
                size = int(self._read_until(b"\r\n").split(b";")[0], 16)
                if size == 0:
                    while self._read_until(b"\r\n") != b"\r\n":
                        pass
                    break
                body += self._read_exact(size)
                assert self._read_exact(2) == b"\r\n"
            resp.body = bytes(body)
        elif cl is not None:
            resp.body = self._read_exact(int(cl))
        else:
            while self._fill():
                pass
            resp.body, self.buf = self.buf, b""
        return resp

    def request(self, method: str = "GET", target: str = "/", headers: dict | None = None,
                body: bytes | None = None, host: str = "example.test") -> Response:
        h = {"Host": host}
        h.update(headers or {})
        if body is not None and "Content-Length" not in h and "Transfer-Encoding" not in h:
            h["Content-Length"] = str(len(body))
        data = f"{method} {target} HTTP/1.1\r\n".encode() + b"".join(
            f"{k}: {v}\r\n".encode("latin-1") for k, v in h.items()) + b"\r\n" + (body or b"")
        self.send(data)
        return self.read_response(head_request=(method == "HEAD"))

    def is_closed(self, wait: float = 2.0) -> bool:
        """True when the peer closed (EOF or reset) within wait seconds."""
        self.sock.settimeout(wait)
        try:
            return self.sock.recv(1) == b""
        except ConnectionResetError:
            return True
        except TimeoutError:
            return False


def raw_exchange(port: int, data: bytes, timeout: float = 5.0) -> bytes:
    """Send data, half-close, and return everything the proxy sends back
    until it closes."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(data)
        try:
            s.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        out = b""
        while True:
            try:
                d = s.recv(65536)
            except ConnectionResetError:
                break
            if not d:
                break
            out += d
        return out
