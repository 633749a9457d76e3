"""Compression of backends' responses (route.compress) through a real proxy
process and a real origin on loopback: each coding decompressed and
compared byte for byte, q-values, the fields (Content-Encoding, Vary
merged, a weak ETag, chunked or close-delimited framing), what is never
compressed, a body that streams (compressed output reaches the client
before the backend has finished), a large body under backpressure, the
cache storing one variant per coding class, and static files compressed on
the fly."""

from __future__ import annotations

import gzip
import socket
import socketserver
import subprocess
import sys
import threading
import time
import zlib
from urllib.parse import parse_qs, urlsplit

import brotli
import pytest
import zstandard
from harness import ROOT, Client

TEXT = b"".join(b"line %d: the quick brown fox jumps over the lazy dog\n" % i for i in range(4000))


def decode(coding, data):
    if coding == "gzip":
        return gzip.decompress(data)
    if coding == "br":
        return brotli.decompress(data)
    if coding == "zstd":
        return zstandard.ZstdDecompressor().decompressobj().decompress(data)
    assert coding is None
    return data


class _Handler(socketserver.StreamRequestHandler):
    def handle(self):
        srv = self.server
        while True:
            line = self.rfile.readline()
            if not line:
                return
            method, target, _ = line.decode().split(" ", 2)
            while self.rfile.readline() not in (b"\r\n", b""):
                pass
            srv.hits += 1
            u = urlsplit(target)
            q = {k: v[0] for k, v in parse_qs(u.query).items()}
            body = TEXT[:int(q.get("n", len(TEXT)))]
            status = int(q.get("status", 200))
            head = [f"HTTP/1.1 {status} X", f"Content-Type: {q.get('ct', 'text/html; charset=utf-8')}"]
            for k in ("etag", "vary", "cache-control", "content-encoding", "content-range"):
                if k in q:
                    head.append(f"{k}: {q[k]}")
            if "cc" in q:
                head.append(f"Cache-Control: {q['cc']}")
            if status in (204, 304):
                self.wfile.write(("\r\n".join(head) + "\r\n\r\n").encode())
                continue
            if u.path == "/stream":
                # chunked, in pieces: the second waits until the test saw the first
                head.append("Transfer-Encoding: chunked")
                self.wfile.write(("\r\n".join(head) + "\r\n\r\n").encode())
                half = len(body) // 2
                self.wfile.write(b"%x\r\n%s\r\n" % (half, body[:half]))
                self.wfile.flush()
                srv.go.wait(20)
                self.wfile.write(b"%x\r\n%s\r\n0\r\n\r\n" % (len(body) - half, body[half:]))
                self.wfile.flush()
                continue
            if u.path == "/big":
                n = int(q["n"])
                head.append(f"Content-Length: {n}")
                self.wfile.write(("\r\n".join(head) + "\r\n\r\n").encode())
                if method != "HEAD":
                    block = TEXT * (1 + (1 << 20) // len(TEXT))
                    left = n
                    while left:
                        k = min(left, len(block))
                        self.wfile.write(block[:k])
                        left -= k
                continue
            head.append(f"Content-Length: {len(body)}")
            self.wfile.write(("\r\n".join(head) + "\r\n\r\n").encode())
            if method != "HEAD":
                self.wfile.write(body)
            self.wfile.flush()


class _Server(socketserver.ThreadingMixIn, socketserver.TCPServer):
    daemon_threads = True
    allow_reuse_address = True


@pytest.fixture
def text_origin():
    srv = _Server(("127.0.0.1", 0), _Handler)
    srv.hits = 0
    srv.go = threading.Event()
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    yield srv
    srv.go.set()
    srv.shutdown()
    srv.server_close()


def _config(origin, compress='["zstd", "br", "gzip"]', extra="", cache=False):
    port = origin.server_address[1]
    text = (f'[[route]]\npath = "/"\npool = "web"\ncompress = {compress}\n{extra}\n'
            f'{"cache = true" if cache else ""}\n\n'
            f'[pool.web]\nbackends = ["http://127.0.0.1:{port}"]\n')
    return text


@pytest.fixture(params=["uvloop", "asyncio"])
def loop_env(request):
    return {"EDGEPROXY_LOOP": request.param}


def get(port, target, ae=None, method="GET", headers=None):
    h = dict(headers or {})
    if ae is not None:
        h["Accept-Encoding"] = ae
    with Client(port) as c:
        return c.request(method, target, headers=h)


@pytest.mark.parametrize("coding", ["gzip", "br", "zstd"])
def test_each_coding_round_trips(text_origin, proxy_factory, loop_env, coding):
    p = proxy_factory(_config(text_origin), env=loop_env)
    with Client(p.port) as c:
        for _ in range(2):          # keep-alive after a chunked, compressed body
            r = c.request("GET", "/t?etag=%22v1%22", headers={"Accept-Encoding": coding})
            assert r.status == 200
            assert r.header("content-encoding") == coding
            assert r.header("transfer-encoding") == "chunked"
            assert r.header("content-length") is None
            assert r.header("vary") == "Accept-Encoding"
            assert r.header("etag") == 'W/"v1"'
            assert decode(coding, r.body) == TEXT
            assert len(r.body) < len(TEXT) // 4


def test_http10_client_gets_a_close_delimited_body(text_origin, proxy_factory):
    p = proxy_factory(_config(text_origin))
    s = socket.create_connection(("127.0.0.1", p.port), timeout=10)
    s.sendall(b"GET /t HTTP/1.0\r\nHost: a\r\nAccept-Encoding: gzip\r\n\r\n")
    data = b""
    while True:
        d = s.recv(65536)
        if not d:
            break
        data += d
    s.close()
    head, _, body = data.partition(b"\r\n\r\n")
    assert b"Content-Encoding: gzip" in head
    assert b"Transfer-Encoding" not in head and b"Content-Length" not in head
    assert gzip.decompress(body) == TEXT


def test_q_values_choose_the_coding(text_origin, proxy_factory):
    p = proxy_factory(_config(text_origin))
    cases = {
        "gzip;q=0.5, br;q=0.9": "br",
        "br;q=0, gzip": "gzip",
        "gzip, br, zstd": "zstd",             # ties: the route's order
        "*": "zstd",
        "*;q=0.1, br;q=0": "zstd",
        "zstd;q=0, br;q=0, gzip;q=0": None,
        "identity": None,
        "deflate": None,
        "x-gzip": "gzip",
        "GZIP": "gzip",
        "gzip;q=nonsense": None,              # not well formed: identity
    }
    for ae, want in cases.items():
        r = get(p.port, "/t", ae)
        assert r.header("content-encoding") == want, ae
        assert decode(want, r.body) == TEXT, ae
        assert r.header("vary") == "Accept-Encoding", ae
    r = get(p.port, "/t")
    assert r.header("content-encoding") is None and r.body == TEXT
    assert r.header("vary") == "Accept-Encoding"
    assert r.header("content-length") == str(len(TEXT))
    p2 = proxy_factory(_config(text_origin, compress='["gzip", "br"]'))
    assert get(p2.port, "/t", "br, gzip").header("content-encoding") == "gzip"


def test_what_is_never_compressed(text_origin, proxy_factory):
    p = proxy_factory(_config(text_origin, extra="compress_min_size = 1000"))
    ae = "gzip, br, zstd"
    never = {
        "/t?content-encoding=identity": "Content-Encoding present",
        "/t?cc=no-transform": "no-transform",
        "/t?cc=public,%20No-Transform": "no-transform among others",
        "/t?ct=image/png": "not a compressible type",
        "/t?n=999": "below the minimum size",
        "/t?status=206&content-range=bytes%200-9/100": "a range",
        "/t?status=404": "not a 2xx",
    }
    for target, why in never.items():
        r = get(p.port, target, ae)
        assert r.header("content-encoding") in (None, "identity"), why
        assert r.header("transfer-encoding") is None, why
        assert r.header("content-length") is not None, why
    r = get(p.port, "/t?n=999", ae)
    assert r.header("vary") == "Accept-Encoding"      # another size could be compressed
    r = get(p.port, "/t?ct=image/png", ae)
    assert r.header("vary") is None
    for status in (204, 304):
        r = get(p.port, f"/t?status={status}", ae)
        assert r.status == status and r.header("content-encoding") is None
    r = get(p.port, "/t?etag=%22v1%22", ae, method="HEAD")
    assert r.status == 200 and r.header("content-encoding") is None
    assert r.header("content-length") == str(len(TEXT)) and r.header("etag") == '"v1"'
    assert r.header("vary") == "Accept-Encoding"
    r = get(p.port, "/t?n=1000", ae)
    assert r.header("content-encoding") == "zstd"


def test_vary_is_merged_and_weak_etags_stay(text_origin, proxy_factory):
    p = proxy_factory(_config(text_origin))
    r = get(p.port, "/t?vary=Origin&etag=W/%22w%22", "gzip")
    assert r.header("content-encoding") == "gzip"
    vary = [v.strip().lower() for v in r.header("vary").split(",")]
    assert sorted(vary) == ["accept-encoding", "origin"]
    assert r.header("etag") == 'W/"w"'
    r = get(p.port, "/t?vary=accept-encoding,%20Origin", "gzip")
    assert r.header("vary").lower().count("accept-encoding") == 1


def test_compression_streams(text_origin, proxy_factory):
    """The first half of a body reaches the client compressed while the
    backend holds the second half back: nothing waits for the whole body."""
    p = proxy_factory(_config(text_origin, compress='["gzip"]'))
    s = socket.create_connection(("127.0.0.1", p.port), timeout=10)
    s.sendall(b"GET /stream HTTP/1.1\r\nHost: a\r\nAccept-Encoding: gzip\r\n\r\n")
    buf = b""
    while b"\r\n\r\n" not in buf:
        buf += s.recv(65536)
    head, _, rest = buf.partition(b"\r\n\r\n")
    assert b"Content-Encoding: gzip" in head and b"Transfer-Encoding: chunked" in head
    d = zlib.decompressobj(16 + zlib.MAX_WBITS)
    got = b""
    deadline = time.monotonic() + 10
    pending = rest
    while len(got) < len(TEXT) // 2 and time.monotonic() < deadline:
        # de-chunk what arrived so far
        while b"\r\n" in pending:
            size_line, _, after = pending.partition(b"\r\n")
            size = int(size_line, 16)
            if len(after) < size + 2:
                break
            got += d.decompress(after[:size])
            pending = after[size + 2:]
        if len(got) >= len(TEXT) // 2:
            break
        pending += s.recv(65536)
    assert got == TEXT[:len(got)] and len(got) >= len(TEXT) // 2 - 64
    assert not text_origin.go.is_set()
    text_origin.go.set()
    while not pending.endswith(b"0\r\n\r\n"):
        data = s.recv(65536)
        assert data
        pending += data
    body = b""
    while pending:
        size_line, _, after = pending.partition(b"\r\n")
        size = int(size_line, 16)
        if size == 0:
            break
        body += after[:size]
        pending = after[size + 2:]
    got += d.decompress(body) + d.flush()
    assert got == TEXT
    s.close()


def test_large_body_under_backpressure(text_origin, proxy_factory):
    p = proxy_factory(_config(text_origin, compress='["br"]'))
    n = 8 << 20
    with Client(p.port, timeout=30) as c:
        r = c.request("GET", f"/big?n={n}", headers={"Accept-Encoding": "br"})
    assert r.header("content-encoding") == "br"
    out = brotli.decompress(r.body)
    block = TEXT * (1 + (1 << 20) // len(TEXT))
    assert len(out) == n and out[:len(block)] == block[:min(n, len(block))]


def test_cache_stores_one_variant_per_coding_class(tmp_path, text_origin, proxy_factory):
    body = _config(text_origin, cache=True) + f'\n[cache]\npath = "{tmp_path / "cache"}"\n'
    p = proxy_factory(body)
    u = "/t?cc=max-age=60"
    r1 = get(p.port, u, "gzip, deflate, br")
    assert r1.header("content-encoding") == "br"
    hits = text_origin.hits
    # the same codings accepted, spelled otherwise: the stored br variant
    for ae in ("br, gzip, deflate", "deflate;q=0.5, BR, gzip", "gzip,br,deflate"):
        r = get(p.port, u, ae)
        assert r.header("content-encoding") == "br", ae
        assert brotli.decompress(r.body) == TEXT
        assert "hit" in (r.header("cache-status") or ""), (ae, r.header("cache-status"))
    assert text_origin.hits == hits
    # another class: its own variant, fetched once, then a hit
    r = get(p.port, u, "gzip")
    assert r.header("content-encoding") == "gzip" and gzip.decompress(r.body) == TEXT
    r = get(p.port, u, "gzip")
    assert r.header("content-encoding") == "gzip" and "hit" in r.header("cache-status")
    assert text_origin.hits == hits + 1
    # a client without Accept-Encoding never gets a compressed copy
    r = get(p.port, u)
    assert r.header("content-encoding") is None and r.body == TEXT
    r = get(p.port, u)
    assert r.header("content-encoding") is None and r.body == TEXT


def test_static_files_compressed_on_the_fly(tmp_path, proxy_factory):
    root = tmp_path / "dist"
    root.mkdir()
    (root / "app.js").write_bytes(TEXT)
    (root / "pic.png").write_bytes(TEXT)
    p = proxy_factory(f'[[route]]\npath = "/"\ncompress = ["gzip", "br"]\n'
                      f'static = {{ root = "{root}" }}\n')
    r = get(p.port, "/app.js", "br")
    assert r.header("content-encoding") == "br" and brotli.decompress(r.body) == TEXT
    assert r.header("etag").startswith('W/"') and r.header("vary") == "Accept-Encoding"
    assert r.header("content-length") == str(len(r.body))
    tag = r.header("etag")
    r = get(p.port, "/app.js", "br", headers={"If-None-Match": tag})
    assert r.status == 304 and r.header("etag") == tag
    r = get(p.port, "/app.js")
    assert r.header("content-encoding") is None and r.body == TEXT
    r = get(p.port, "/app.js", "gzip", headers={"Range": "bytes=0-9"})
    assert r.status == 206 and r.body == TEXT[:10] and r.header("content-encoding") is None
    r = get(p.port, "/pic.png", "gzip")
    assert r.header("content-encoding") is None and r.body == TEXT


@pytest.mark.parametrize("line, message", [
    ('compress = ["lzma"]', 'is not one of "zstd", "br", "gzip"'),
    ('compress = ["gzip", "gzip"]', "lists a coding twice"),
    ('compress = ["gzip"]\ncompress_types = ["text"]', "is not a media type"),
    ('compress = ["gzip"]\ncompress_min_size = -1', "must be 0 or more"),
])
def test_config_errors(tmp_path, line, message):
    cfg = tmp_path / "c.toml"
    cfg.write_text('[[listen]]\nbind = "127.0.0.1:0"\n\n[[route]]\npath = "/"\npool = "web"\n'
                   f'{line}\n\n[pool.web]\nbackends = ["http://127.0.0.1:9"]\n')
    out = subprocess.run([sys.executable, "-m", "edgeproxy", "check", "-c", str(cfg)],
                         capture_output=True, text=True, cwd=str(ROOT), timeout=60)
    assert out.returncode != 0
    assert message in out.stderr, out.stderr


def test_negotiation_table():
    from edgeproxy.static.negotiate import ranked_encodings

    offer = ("zstd", "br", "gzip")
    assert ranked_encodings(b"gzip;q=0.8, br;q=0.9, zstd;q=0.1", offer) == ("br", "gzip", "zstd")
    assert ranked_encodings(b"*;q=0.5, gzip", offer) == ("gzip", "zstd", "br")
    assert ranked_encodings(b"gzip;q=0, *", offer) == ("zstd", "br")
    assert ranked_encodings(b"gzip;q=1.5", offer) == ()          # q above 1: not well formed
    assert ranked_encodings(b"gzip;q=0.0001", offer) == ()       # more than 3 decimals
    assert ranked_encodings(b"", offer) == () and ranked_encodings(None, offer) == ()
    assert ranked_encodings(b" GZip ; Q=0.5 ", offer) == ("gzip",)
