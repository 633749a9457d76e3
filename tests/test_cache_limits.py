"""The cache under pressure, over real proxy processes and real LMDB files:
bodies far over max_object, a full disk, a stream of distinct objects larger
than the map, cut-off responses and corrupt entries."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest
from harness import Client, raw_exchange

from edgeproxy.cache.store import CacheStore
from edgeproxy.config.model import CacheConfig


class StreamOrigin:
    """An origin on its own thread whose answer each test sets: `respond`
    is an async function (path, reader, writer) that writes the response."""

    def __init__(self, respond):
        self.respond = respond
        self.requests: list[str] = []
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(5)

    async def _start(self) -> None:
        self._server = await asyncio.start_server(self._conn, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _conn(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await r.readuntil(b"\r\n\r\n")
                path = head.split(b" ", 2)[1].decode()
                self.requests.append(path)
                if not await self.respond(path, r, w):
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            w.close()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        async def stop() -> None:
            self._server.close()
            for t in asyncio.all_tasks():
                if t is not asyncio.current_task():
                    t.cancel()
        asyncio.run_coroutine_threadsafe(stop(), self._loop).result(5)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)


def cache_config(tmp_path: Path, origin_url: str, *, max_size: str = "64MiB",
                 max_object: str = "1MiB", path: Path | None = None) -> str:
    return f"""
[server]
workers = 1

[cache]
path = "{path or tmp_path / 'cache'}"
max_size = "{max_size}"
max_object = "{max_object}"

[[route]]
path = "/"
pool = "web"
cache = true

[pool.web]
backends = ["{origin_url}"]
"""


def worker_pid(supervisor_pid: int) -> int:
    """The one worker of a supervisor (the port may accept before it is forked)."""
    deadline = time.monotonic() + 10
    while True:
        children = Path(f"/proc/{supervisor_pid}/task/{supervisor_pid}/children").read_text().split()
        if len(children) == 1 or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert len(children) == 1, children
    return int(children[0])


def proc_status_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(f"no {field} for {pid}")


# --- max_object: a body far over it streams through in bounded memory ---------------------

PATTERN = bytes(range(256))
BLOCK = PATTERN * 256                    # 64 KiB of a pattern the client checks


def test_body_over_max_object_streams_in_bounded_memory(proxy_factory, tmp_path):
    """300 MiB of chunked body without Content-Length through a cache route
    with max_object = 1MiB: once refused, the body is no longer held for the
    store, so the worker's peak RSS stays far below the body's size."""
    total_blocks = 300 * 16              # 300 MiB

    async def endless(path, r, w):
        w.write(b"HTTP/1.1 200 OK\r\nCache-Control: max-age=600\r\n"
                b"Transfer-Encoding: chunked\r\n\r\n")
        frame = b"%x\r\n%s\r\n" % (len(BLOCK), BLOCK)
        for _ in range(total_blocks):
            w.write(frame)
            await w.drain()
        w.write(b"0\r\n\r\n")
        await w.drain()
        return True

    origin = StreamOrigin(endless)
    try:
        p = proxy_factory(cache_config(tmp_path, origin.url))
        pid = worker_pid(p.proc.pid)
        before = proc_status_kib(pid, "VmRSS")
        with socket.create_connection(("127.0.0.1", p.port), timeout=30) as s:
            s.sendall(b"GET /stream HTTP/1.1\r\nHost: example.test\r\n\r\n")
            got, buf = 0, bytearray()
            while b"\r\n\r\n" not in buf:
                buf += s.recv(65536)
            head, _, rest = bytes(buf).partition(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 200") and b"transfer-encoding: chunked" in head.lower()
            buf = bytearray(rest)
            done = False
            while not done:
                # one chunk: size line, data, CRLF
                while b"\r\n" not in buf:
                    data = s.recv(1 << 20)
                    assert data, "closed inside the body"
                    buf += data
                line, _, _ = bytes(buf[:buf.index(b"\r\n")]).partition(b";")
                size = int(line, 16)
                start = buf.index(b"\r\n") + 2
                while len(buf) < start + size + 2:
                    data = s.recv(1 << 20)
                    assert data, "closed inside the body"
                    buf += data
                if size == 0:
                    done = True
                else:
                    # the pattern repeats every 256 bytes from the body's start
                    k = got % 256
                    assert buf[start:start + size] == (PATTERN[k:] + BLOCK)[:size]
                    got += size
                del buf[:start + size + 2]
        assert got == total_blocks * len(BLOCK)
        peak = proc_status_kib(pid, "VmHWM")
        assert peak - before < 100 * 1024, (before, peak)
        assert peak < 150 * 1024, (before, peak)
        assert "larger than 1048576 bytes" in p.log()
        # not stored: the next request goes to the origin again
        n = len(origin.requests)
        origin.respond = _small
        with Client(p.port) as c:
            r = c.request("GET", "/stream")
        assert r.body == b"small" and len(origin.requests) == n + 1
    finally:
        origin.stop()


async def _small(path, r, w):
    w.write(b"HTTP/1.1 200 OK\r\nCache-Control: max-age=600\r\nContent-Length: 5\r\n\r\nsmall")
    await w.drain()
    return True


# --- a stream of distinct objects larger than the map ----------------------------------------

OBJECT = 200 * 1024


async def _distinct(path, r, w):
    w.write(b"HTTP/1.1 200 OK\r\nCache-Control: max-age=600\r\nContent-Length: %d\r\n\r\n"
            % OBJECT + path.encode().ljust(OBJECT, b"."))
    await w.drain()
    return True


def test_stream_of_distinct_objects_keeps_storing(proxy_factory, tmp_path):
    """1,000 distinct 200 KiB objects into a 64 MiB cache, two workers, each
    new object followed by a hit on a recent one (so that both workers hold
    read snapshots): eviction keeps up, the last objects that fit are all
    stored, and the log says so in a few lines, not one per failure."""
    from edgeproxy.cache.store import LOW_WATER
    n, batch = 1000, 4
    origin = StreamOrigin(_distinct)
    try:
        p = proxy_factory(cache_config(tmp_path, origin.url).replace("workers = 1", "workers = 2"))
        clients = [Client(p.port) for _ in range(batch)]

        def fetch(c: Client, i: int) -> str:
            r = c.request("GET", f"/o/{i}")
            assert r.status == 200 and r.body == f"/o/{i}".encode().ljust(OBJECT, b"."), i
            return r.header("cache-status")

        def run(c: Client, i: int) -> None:
            fetch(c, i)
            if i >= 2 * batch:
                fetch(c, i - batch)      # usually a hit: pins a snapshot in its worker

        try:
            for start in range(0, n, batch):
                threads = [threading.Thread(target=run, args=(c, start + k))
                           for k, c in enumerate(clients)]
                for t in threads:
                    t.start()
                for t in threads:
                    t.join(30)
            fit = int(LOW_WATER * 64 * 1024 * 1024) // OBJECT
            # oldest first: a miss here stores again and evicts the oldest, already looked at
            hits = sum("; hit" in fetch(clients[0], i) for i in range(n - fit, n))
        finally:
            for c in clients:
                c.close()
        assert hits >= 0.9 * fit, (hits, fit)
        lines = [ln for ln in p.log().splitlines()
                 if "edgeproxy.cache" in ln and " DEBUG " not in ln]
        assert len(lines) < 10, lines
        p.stop()                 # the workers write their counters as they close
        with CacheStore.open(CacheConfig(path=str(tmp_path / "cache"))) as store:
            stats = store.stats()
        # every store is one origin response, counted once
        assert n <= stats["stores"] <= len(origin.requests), (stats, len(origin.requests))
        assert stats["store_failures"] == 0
    finally:
        origin.stop()


# --- a full disk under the cache ----------------------------------------------------------------

@pytest.fixture
def small_fs(tmp_path):
    """A 1 MiB tmpfs (needs root and mount); unmounted afterwards."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    mnt = tmp_path / "small"
    mnt.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)],
                          capture_output=True, text=True, check=False)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield mnt
    finally:
        if subprocess.run(["umount", str(mnt)], capture_output=True, check=False).returncode:
            subprocess.run(["umount", "-l", str(mnt)], capture_output=True, check=False)


def fill_up(mnt: Path) -> None:
    """Take every free block of the filesystem at mnt."""
    with open(mnt / "filler", "ab", buffering=0) as f:
        try:
            while True:
                f.write(b"\0" * 4096)
        except OSError:
            pass
    assert os.statvfs(mnt).f_bavail == 0


async def _numbered(path, r, w):
    body = path.encode() * 1000
    w.write(b"HTTP/1.1 200 OK\r\nCache-Control: max-age=600\r\nContent-Length: %d\r\n\r\n"
            % len(body) + body)
    await w.drain()
    return True


def test_full_disk_at_start_runs_uncached(proxy_factory, tmp_path, small_fs):
    fill_up(small_fs)
    origin = StreamOrigin(_numbered)
    try:
        p = proxy_factory(cache_config(tmp_path, origin.url, path=small_fs / "cache"))
        pid = worker_pid(p.proc.pid)
        with Client(p.port, timeout=5) as c:
            for _ in range(2):
                r = c.request("GET", "/a")
                assert r.status == 200 and r.body == b"/a" * 1000
                assert r.header("cache-status") is None      # no cache phase at all
        assert len(origin.requests) == 2
        assert worker_pid(p.proc.pid) == pid
        lines = [ln for ln in p.log().splitlines() if "is full" in ln]
        assert len(lines) == 1 and "running without the cache" in lines[0], p.log()
    finally:
        origin.stop()


def test_disk_filling_up_while_running_never_kills_the_worker(proxy_factory, tmp_path,
                                                              small_fs):
    origin = StreamOrigin(_numbered)
    try:
        p = proxy_factory(cache_config(tmp_path, origin.url, path=small_fs / "cache"))
        pid = worker_pid(p.proc.pid)
        with Client(p.port, timeout=5) as c:
            assert c.request("GET", "/before").status == 200
        time.sleep(0.5)
        fill_up(small_fs)
        # distinct keys: each claims a slot in `fills` and tries to store
        with Client(p.port, timeout=5) as c:
            for i in range(40):
                r = c.request("GET", f"/k{i}")
                assert r.status == 200 and r.body == f"/k{i}".encode() * 1000
            r = c.request("GET", "/before")
            assert r.status == 200 and "; hit" in r.header("cache-status")
        assert worker_pid(p.proc.pid) == pid
        log = p.log()
        lines = [ln for ln in log.splitlines() if "is full" in ln]
        assert 1 <= len(lines) <= 2, log
        assert "cache: not storing" in lines[0] and str(small_fs) in lines[0]
    finally:
        origin.stop()


# --- a damaged data.mdb ------------------------------------------------------------------------

def _payload(path: str) -> tuple[bytes, bytes]:
    """The unique header value and body of path (/small, /large, /head)."""
    n = {"/small": 20_000, "/large": 1_500_000, "/head": 3_000}[path]
    seed = path.encode()
    body = (seed + b"-" + bytes(range(48, 123))) * (n // (len(seed) + 76) + 1)
    return b"tag-" + seed[1:] * 8, body[:n]


async def _tagged(path, r, w):
    tag, body = _payload(path)
    w.write(b"HTTP/1.1 200 OK\r\nCache-Control: max-age=600\r\nX-Tag: %s\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (tag, len(body), body))
    await w.drain()
    return True


def test_corrupt_entries_are_detected_not_served(proxy_factory, tmp_path):
    """Bytes changed in data.mdb behind the proxy's back (a bad disk, a
    stray write): a damaged body, small (sent from the map) or large (read
    in a thread), and a damaged entry record, are each answered as a miss
    with the origin's bytes, deleted, and stored again."""
    origin = StreamOrigin(_tagged)
    paths = ("/small", "/large", "/head")
    try:
        config = cache_config(tmp_path, origin.url, max_object="4MiB")
        p = proxy_factory(config)
        with Client(p.port) as c:
            for path in paths:
                assert "detail=" not in c.request("GET", path).header("cache-status")
        for path in paths:       # stored, and whole
            deadline = time.monotonic() + 10
            while True:
                with Client(p.port) as c:
                    r = c.request("GET", path)
                if "; hit" in r.header("cache-status") or time.monotonic() > deadline:
                    break
                time.sleep(0.05)
            assert "; hit" in r.header("cache-status") and r.body == _payload(path)[1]
        p.stop()
        data = tmp_path / "cache" / "data.mdb"
        raw = data.read_bytes()
        # every copy: LMDB may have left older ones in free pages
        for piece in (_payload("/small")[1][5000:5100], _payload("/large")[1][900_000:900_100],
                      _payload("/head")[0]):
            assert piece in raw
            k = len(piece) // 2
            raw = raw.replace(piece, piece[:k] + bytes([piece[k] ^ 0x20]) + piece[k + 1:])
        data.write_bytes(raw)
        p = proxy_factory(config)
        with Client(p.port) as c:
            for path in paths:
                r = c.request("GET", path)
                assert r.status == 200 and "fwd=uri-miss" in r.header("cache-status"), path
                assert r.body == _payload(path)[1] and r.header("x-tag") == _payload(path)[0].decode()
        for path in paths:       # stored again
            deadline = time.monotonic() + 10
            while True:
                with Client(p.port) as c:
                    r = c.request("GET", path)
                if "; hit" in r.header("cache-status") or time.monotonic() > deadline:
                    break
                time.sleep(0.05)
            assert "; hit" in r.header("cache-status") and r.body == _payload(path)[1], path
        log = p.log()
        assert log.count("does not match its checksum") == 1     # once a minute at most
        assert "checksum mismatch" in log                        # the record
        p.stop()
        with CacheStore.open(CacheConfig(path=str(tmp_path / "cache"))) as store:
            assert store.stats()["corrupt"] == 2
    finally:
        origin.stop()


# --- Cache-Status of responses that are cut off or badly framed ---------------------------------

_FRAMED = {
    # whole with the head: stored, and said so
    "/whole": b"Content-Length: 5\r\n\r\nwhole",
    "/whole-chunked": b"Transfer-Encoding: chunked\r\n\r\n5\r\nwhole\r\n0\r\n\r\n",
    # cut off, or badly framed: not stored, and not said to be
    "/cut": b"Content-Length: 1000\r\n\r\n" + b"c" * 500,
    "/cut-chunked": b"Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n",
    "/bad-chunked": b"Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\nzz\r\nabc\r\n0\r\n\r\n",
}


async def _framed(path, r, w):
    w.write(b"HTTP/1.1 200 OK\r\nCache-Control: max-age=600\r\n" + _FRAMED[path])
    await w.drain()
    await asyncio.sleep(0.05)
    return False                 # close: what was sent is all there is


def test_cache_status_says_stored_only_for_whole_responses(proxy_factory, tmp_path):
    origin = StreamOrigin(_framed)
    try:
        p = proxy_factory(cache_config(tmp_path, origin.url))
        for path in _FRAMED:
            for attempt in range(2):
                out = raw_exchange(p.port, f"GET {path} HTTP/1.1\r\nHost: example.test\r\n\r\n"
                                   .encode())
                head = out.partition(b"\r\n\r\n")[0].decode("latin-1").lower()
                status = [ln for ln in head.split("\r\n") if ln.startswith("cache-status:")]
                assert len(status) == 1, (path, out)
                if path.startswith("/whole"):
                    expect = "fwd=uri-miss; fwd-status=200; stored" if attempt == 0 else "; hit"
                    assert expect in status[0], (path, attempt, status)
                    if attempt == 0:
                        time.sleep(0.3)          # the commit, in the writer thread
                else:
                    assert "fwd=uri-miss" in status[0] and "stored" not in status[0], status
        assert origin.requests.count("/cut") == 2 and origin.requests.count("/bad-chunked") == 2
        assert origin.requests.count("/whole") == 1
    finally:
        origin.stop()
