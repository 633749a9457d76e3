"""A Range request on a miss: its range goes to the origin as it is, and the
whole object is fetched once in the background and stored, so the next
Range request is a hit. A real proxy process in front of a threaded origin
that serves byte ranges (single and multipart), If-Range, or no ranges."""

from __future__ import annotations

import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from harness import Client
from test_cache_hot import counters
from test_cache_proxy import cache_config, wait_for


def body_of(path: str, size: int) -> bytes:
    seed = path.encode()
    return (seed * (size // len(seed) + 1))[:size]


class RangeOrigin:
    """GET /<kind>/<name>?size=N: a body of N bytes with an ETag and
    Cache-Control: max-age=3600. /r/ honours Range (single: 206 with
    Content-Range; several: multipart/byteranges) and If-Range; /plain/
    ignores Range. `delay` slows full responses (so concurrent misses overlap).
    Records, per path, each request's Range (None for a full GET)."""

    def __init__(self, delay: float = 0.0):
        self.delay = delay
        self.seen: dict[str, list[str | None]] = {}
        self.lock = threading.Lock()
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def full(self, path: str) -> int:
        with self.lock:
            return sum(1 for r in self.seen.get(path, []) if r is None)

    def ranged(self, path: str) -> int:
        with self.lock:
            return sum(1 for r in self.seen.get(path, []) if r is not None)

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        buf = b""
        with conn:
            while True:
                while b"\r\n\r\n" not in buf:
                    data = conn.recv(65536)
                    if not data:
                        return
                    buf += data
                head, buf = buf.split(b"\r\n\r\n", 1)
                lines = head.decode("latin-1").split("\r\n")
                target = lines[0].split(" ")[1]
                fields = {k.strip().lower(): v.strip()
                          for k, v in (ln.split(":", 1) for ln in lines[1:])}
                path, _, query = target.partition("?")
                size = int(query.partition("size=")[2] or 1000)
                body = body_of(path, size)
                etag = '"v1"'
                rng = fields.get("range")
                with self.lock:
                    self.seen.setdefault(path, []).append(rng)
                if rng and fields.get("if-range") not in (None, etag):
                    rng = None                      # If-Range does not match: whole
                base = [f"ETag: {etag}", "Cache-Control: max-age=3600",
                        "Content-Type: text/plain"]
                if rng and path.startswith("/r/"):
                    specs = [tuple(int(x) for x in s.split("-"))
                             for s in rng.partition("=")[2].split(",")]
                    if len(specs) == 1:
                        a, b = specs[0]
                        part = body[a:b + 1]
                        out = ["HTTP/1.1 206 Partial Content", *base,
                               f"Content-Range: bytes {a}-{b}/{size}",
                               f"Content-Length: {len(part)}"]
                        payload = part
                    else:
                        pieces = []
                        for a, b in specs:
                            pieces.append(b"--SEP\r\nContent-Type: text/plain\r\n"
                                          b"Content-Range: bytes %d-%d/%d\r\n\r\n" % (a, b, size)
                                          + body[a:b + 1] + b"\r\n")
                        payload = b"".join(pieces) + b"--SEP--\r\n"
                        out = ["HTTP/1.1 206 Partial Content", f"ETag: {etag}",
                               "Cache-Control: max-age=3600",
                               "Content-Type: multipart/byteranges; boundary=SEP",
                               f"Content-Length: {len(payload)}"]
                else:
                    if self.delay:
                        time.sleep(self.delay)
                    out = ["HTTP/1.1 200 OK", *base, "Accept-Ranges: bytes"
                           if path.startswith("/r/") else "Accept-Ranges: none",
                           f"Content-Length: {len(body)}"]
                    payload = body
                try:
                    conn.sendall(("\r\n".join(out) + "\r\n\r\n").encode() + payload)
                except OSError:
                    return

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def ranged(proxy_factory, tmp_path):
    made = []

    def make(*, delay: float = 0.0, workers: int = 1, max_object: str = "1MiB"):
        origin = RangeOrigin(delay)
        made.append(origin)
        return origin, proxy_factory(cache_config(tmp_path, origin.url, workers=workers,
                                                  max_object=max_object))

    yield make
    for o in made:
        o.close()


def get(port: int, target: str, **headers: str):
    with Client(port) as c:
        return c.request("GET", target, {k.replace("_", "-"): v for k, v in headers.items()})


def stored(proxy, n: int) -> bool:
    return wait_for(lambda: counters(proxy)["stores"] >= n, timeout=8.0)


def test_a_single_range_miss_stores_the_whole_object(ranged):
    origin, p = ranged()
    path = "/r/one"
    body = body_of(path, 5000)
    r = get(p.port, path + "?size=5000", Range="bytes=100-199")
    assert r.status == 206 and r.body == body[100:200]
    assert r.header("content-range") == "bytes 100-199/5000"
    assert "detail=range-fill" in r.header("cache-status")
    assert stored(p, 1)
    assert origin.full(path) == 1 and origin.ranged(path) == 1
    hit = get(p.port, path + "?size=5000", Range="bytes=4990-")
    assert hit.status == 206 and hit.body == body[4990:]
    assert hit.header("content-range") == "bytes 4990-4999/5000"
    assert hit.header("cache-status").startswith("edgeproxy; hit")
    whole = get(p.port, path + "?size=5000")
    assert whole.status == 200 and whole.body == body
    assert origin.full(path) == 1 and origin.ranged(path) == 1
    # the fill counts itself once it has stored (the counters are written after the entry)
    assert wait_for(lambda: counters(p)["range_fills"] == 1, timeout=8.0)


def test_a_multi_range_miss_is_filled_too(ranged):
    origin, p = ranged()
    path = "/r/multi"
    body = body_of(path, 3000)
    r = get(p.port, path + "?size=3000", Range="bytes=0-9,100-109")
    assert r.status == 206 and r.header("content-type").startswith("multipart/byteranges")
    assert body[0:10] in r.body and body[100:110] in r.body
    assert stored(p, 1)
    assert origin.full(path) == 1
    # the cache answers several ranges with the whole response (RFC 9110
    # §14.2 lets it ignore Range), from the entry: no request to the origin
    hit = get(p.port, path + "?size=3000", Range="bytes=0-9,100-109")
    assert hit.status == 200 and hit.body == body
    assert hit.header("cache-status").startswith("edgeproxy; hit")
    single = get(p.port, path + "?size=3000", Range="bytes=-5")
    assert single.status == 206 and single.body == body[-5:]
    assert origin.full(path) == 1 and origin.ranged(path) == 1


def test_if_range_on_a_miss_and_on_the_stored_object(ranged):
    origin, p = ranged()
    path = "/r/ifr"
    body = body_of(path, 2000)
    # a miss whose If-Range does not match: the origin sends the whole, stored as it is
    whole = get(p.port, path + "?size=2000", Range="bytes=0-9", If_Range='"old"')
    assert whole.status == 200 and whole.body == body
    assert stored(p, 1)
    match = get(p.port, path + "?size=2000", Range="bytes=10-19", If_Range='"v1"')
    assert match.status == 206 and match.body == body[10:20]
    assert match.header("cache-status").startswith("edgeproxy; hit")
    stale_validator = get(p.port, path + "?size=2000", Range="bytes=10-19", If_Range='"v0"')
    assert stale_validator.status == 200 and stale_validator.body == body
    assert stale_validator.header("cache-status").startswith("edgeproxy; hit")
    assert len(origin.seen[path]) == 1              # the first request only
    # a miss whose If-Range matches: a 206, filled in the background
    path2 = "/r/ifr2"
    r = get(p.port, path2 + "?size=2000", Range="bytes=0-9", If_Range='"v1"')
    assert r.status == 206 and r.body == body_of(path2, 2000)[:10]
    assert stored(p, 2)
    assert origin.full(path2) == 1


def test_an_object_over_max_object_passes_through_and_is_not_stored(ranged):
    origin, p = ranged(max_object="64KiB")
    path = "/r/big"
    size = 200 * 1024
    body = body_of(path, size)
    for _ in range(2):
        r = get(p.port, f"{path}?size={size}", Range="bytes=1000-1099")
        assert r.status == 206 and r.body == body[1000:1100]
        assert "detail=too-large" in r.header("cache-status")
    time.sleep(0.5)
    assert origin.full(path) == 0 and origin.ranged(path) == 2
    assert counters(p)["stores"] == 0


def test_an_origin_without_ranges_is_stored_from_its_200(ranged):
    origin, p = ranged()
    path = "/plain/x"
    body = body_of(path, 4000)
    r = get(p.port, path + "?size=4000", Range="bytes=0-99")
    assert r.status == 200 and r.body == body          # the origin ignored the Range
    assert stored(p, 1)
    hit = get(p.port, path + "?size=4000", Range="bytes=0-99")
    assert hit.status == 206 and hit.body == body[:100]
    assert hit.header("cache-status").startswith("edgeproxy; hit")
    assert origin.full(path) == 0 and origin.ranged(path) == 1   # one request in all
    assert counters(p)["range_fills"] == 0


@pytest.mark.parametrize("workers", [1, 2])
def test_concurrent_range_misses_collapse_into_one_fill(ranged, workers):
    origin, p = ranged(delay=0.6, workers=workers)
    path = "/r/busy"
    body = body_of(path, 50_000)

    def one(i: int):
        a = i * 1000
        r = get(p.port, path + "?size=50000", Range=f"bytes={a}-{a + 99}")
        return r.status, r.body == body[a:a + 100]

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(one, range(8)))
    assert all(ok for _, ok in results), results
    assert {s for s, _ in results} <= {206}
    assert stored(p, 1)
    assert origin.full(path) == 1, origin.seen[path]
    hit = get(p.port, path + "?size=50000", Range="bytes=20000-20009")
    assert hit.status == 206 and hit.body == body[20000:20010]
    assert hit.header("cache-status").startswith("edgeproxy; hit")
