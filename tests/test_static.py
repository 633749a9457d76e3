"""Static files from disk (route.static): a real proxy process serving a
directory made by the test, over real sockets (plain TCP with sendfile, and
TLS), on uvloop and the standard asyncio loop: bodies byte for byte, the
alias-style prefix, content types, ETag and Last-Modified, the conditional
fields in RFC 9110 §13.2.2's order, Range (single, multipart, If-Range,
416), HEAD, 405, directories, the single-page-app fallback, precompressed
siblings, and paths that try to leave the root."""

from __future__ import annotations

import gzip
import os
import re
import socket
import ssl
import subprocess
import sys
import time
from email.utils import formatdate

import pytest
from harness import ROOT, Client
from tlsutil import CA

MTIME = 1_700_000_000           # a fixed mtime, so ETag and Last-Modified are known


def _etag(path) -> str:
    st = os.stat(path)
    return f'"{int(st.st_mtime):x}-{st.st_size:x}"'


@pytest.fixture
def site(tmp_path):
    """A front end's build output, and a secret beside it (outside the root)."""
    root = tmp_path / "dist"
    (root / "assets").mkdir(parents=True)
    (root / "sub").mkdir()
    (root / "bare").mkdir()
    (root / "index.html").write_bytes(b"<!doctype html><title>app</title>\n")
    (root / "sub" / "index.html").write_bytes(b"sub index\n")
    (root / "assets" / "app.js").write_bytes(b"console.log('hello');\n" * 200)
    (root / "assets" / "style.css").write_bytes(b"body{color:red}\n")
    (root / "assets" / "logo.svg").write_bytes(b"<svg/>")
    (root / "assets" / "blob.qqq").write_bytes(b"\x00\x01")
    (root / "assets" / "with space.txt").write_bytes(b"spaced\n")
    big = os.urandom(3 << 20) + b"tail"
    (root / "assets" / "big.bin").write_bytes(big)
    (tmp_path / "secret.txt").write_bytes(b"TOP SECRET\n")
    for p in root.rglob("*"):
        os.utime(p, (MTIME, MTIME))
    return root


def _config(root, extra="", path="/app/"):
    return (f'[[route]]\npath = "{path}"\n'
            f'static = {{ root = "{root}", cache_control = "public, max-age=3600"{extra} }}\n')


@pytest.fixture(params=["uvloop", "asyncio"])
def loop_env(request):
    return {"EDGEPROXY_LOOP": request.param}


def get(port, target, headers=None, method="GET"):
    with Client(port) as c:
        return c.request(method, target, headers=headers)


def test_files_served_with_alias_prefix_types_and_validators(site, proxy_factory, loop_env):
    p = proxy_factory(_config(site), env=loop_env)
    js = site / "assets" / "app.js"
    r = get(p.port, "/app/assets/app.js")
    assert r.status == 200
    assert r.body == js.read_bytes()
    assert r.header("content-type") == "text/javascript; charset=utf-8"
    assert r.header("content-length") == str(js.stat().st_size)
    assert r.header("etag") == _etag(js)
    assert r.header("last-modified") == formatdate(MTIME, usegmt=True)
    assert r.header("accept-ranges") == "bytes"
    assert r.header("cache-control") == "public, max-age=3600"
    assert r.header("date")
    assert r.header("vary") is None          # no precompressed siblings, no compression
    assert get(p.port, "/app/assets/style.css").header("content-type") == "text/css; charset=utf-8"
    assert get(p.port, "/app/assets/logo.svg").header("content-type") == "image/svg+xml; charset=utf-8"
    assert get(p.port, "/app/assets/blob.qqq").header("content-type") == "application/octet-stream"
    r = get(p.port, "/app/assets/with%20space.txt")
    assert (r.status, r.body) == (200, b"spaced\n")
    # the prefix is taken off: /app/index.html is root/index.html, and no
    # route takes /index.html
    assert get(p.port, "/app/index.html").body == (site / "index.html").read_bytes()
    assert get(p.port, "/index.html").status == 404


def test_large_file_by_sendfile_keeps_alive_and_pipelines(site, proxy_factory, loop_env):
    p = proxy_factory(_config(site), env=loop_env)
    big = (site / "assets" / "big.bin").read_bytes()
    small = (site / "assets" / "style.css").read_bytes()
    with Client(p.port, timeout=20) as c:
        # pipelined: a big body, then a small one, on one connection, in order
        c.send(b"GET /app/assets/big.bin HTTP/1.1\r\nHost: a\r\n\r\n"
               b"GET /app/assets/style.css HTTP/1.1\r\nHost: a\r\n\r\n")
        r1 = c.read_response()
        r2 = c.read_response()
        assert r1.status == 200 and r1.body == big
        assert r2.status == 200 and r2.body == small
        r3 = c.request("GET", "/app/assets/big.bin")
        assert r3.body == big


def test_slow_reader_gets_every_byte(site, proxy_factory):
    """A client that reads slowly: the rest of the file waits on the
    transport's backpressure (bounded chunks), and arrives whole."""
    p = proxy_factory(_config(site))
    big = (site / "assets" / "big.bin").read_bytes()
    s = socket.create_connection(("127.0.0.1", p.port), timeout=20)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s.sendall(b"GET /app/assets/big.bin HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
    got = bytearray()
    time.sleep(0.5)         # let the proxy fill the socket and queue
    while True:             # each recv within the socket's timeout; the proxy closes at the end
        data = s.recv(65536)
        if not data:
            break
        got += data
    s.close()
    head, _, body = bytes(got).partition(b"\r\n\r\n")
    assert b" 200 " in head.split(b"\r\n")[0]
    assert body == big


def test_https_reads_and_writes(site, tmp_path, proxy_factory):
    ca = CA()
    cc = ca.issue("a.test").write(str(tmp_path), "site")
    p = proxy_factory(_config(site),
                      listen_lines=[f'tls.certs = [{{ cert = "{cc.cert}", key = "{cc.key}" }}]'])
    ctx = ssl.create_default_context()
    ctx.load_verify_locations(cadata=ca.pem().decode())
    big = (site / "assets" / "big.bin").read_bytes()
    with Client(p.port, timeout=20, ssl_context=ctx, server_name="a.test") as c:
        r = c.request("GET", "/app/assets/big.bin", host="a.test")
        assert r.status == 200 and r.body == big
        r = c.request("GET", "/app/assets/style.css", host="a.test")
        assert r.body == (site / "assets" / "style.css").read_bytes()


def test_head_and_methods(site, proxy_factory):
    p = proxy_factory(_config(site))
    js = site / "assets" / "app.js"
    with Client(p.port) as c:
        r = c.request("HEAD", "/app/assets/app.js")
        assert r.status == 200 and r.body == b""
        assert r.header("content-length") == str(js.stat().st_size)
        assert r.header("etag") == _etag(js)
        # the connection is still in step: no body was sent after the HEAD
        assert c.request("GET", "/app/assets/style.css").status == 200
        for method in ("POST", "PUT", "DELETE", "OPTIONS"):
            r = c.request(method, "/app/assets/app.js", body=b"" if method != "OPTIONS" else None)
            assert r.status == 405, method
            assert r.header("allow") == "GET, HEAD"


def test_conditional_requests_in_rfc_order(site, proxy_factory):
    p = proxy_factory(_config(site))
    js = site / "assets" / "app.js"
    tag = _etag(js)
    lm = formatdate(MTIME, usegmt=True)
    before = formatdate(MTIME - 10, usegmt=True)
    after = formatdate(MTIME + 10, usegmt=True)
    u = "/app/assets/app.js"
    r = get(p.port, u, {"If-None-Match": tag})
    assert r.status == 304 and r.body == b""
    assert r.header("etag") == tag and r.header("cache-control") == "public, max-age=3600"
    assert get(p.port, u, {"If-None-Match": f'"x", W/{tag}'}).status == 304    # weak comparison
    assert get(p.port, u, {"If-None-Match": "*"}).status == 304
    assert get(p.port, u, {"If-None-Match": '"other"'}).status == 200
    assert get(p.port, u, {"If-Modified-Since": lm}).status == 304
    assert get(p.port, u, {"If-Modified-Since": after}).status == 304
    assert get(p.port, u, {"If-Modified-Since": before}).status == 200
    assert get(p.port, u, {"If-Modified-Since": "not a date"}).status == 200
    # If-None-Match present: If-Modified-Since is ignored (§13.2.2 step 4)
    assert get(p.port, u, {"If-None-Match": '"other"', "If-Modified-Since": lm}).status == 200
    assert get(p.port, u, {"If-Match": tag}).status == 200
    assert get(p.port, u, {"If-Match": f"W/{tag}"}).status == 412                # strong comparison
    assert get(p.port, u, {"If-Match": '"other"'}).status == 412
    assert get(p.port, u, {"If-Unmodified-Since": before}).status == 412
    assert get(p.port, u, {"If-Unmodified-Since": lm}).status == 200
    # If-Match passes: If-Unmodified-Since is not looked at (step 2 only without If-Match)
    assert get(p.port, u, {"If-Match": tag, "If-Unmodified-Since": before}).status == 200
    # If-Match fails before If-None-Match is looked at
    assert get(p.port, u, {"If-Match": '"x"', "If-None-Match": tag}).status == 412
    r = get(p.port, u, {"If-None-Match": tag}, method="HEAD")
    assert r.status == 304


def test_ranges(site, proxy_factory):
    p = proxy_factory(_config(site))
    js = site / "assets" / "app.js"
    data = js.read_bytes()
    n = len(data)
    tag = _etag(js)
    u = "/app/assets/app.js"
    r = get(p.port, u, {"Range": "bytes=0-9"})
    assert r.status == 206 and r.body == data[:10]
    assert r.header("content-range") == f"bytes 0-9/{n}"
    assert r.header("content-type") == "text/javascript; charset=utf-8"
    r = get(p.port, u, {"Range": "bytes=-5"})
    assert r.status == 206 and r.body == data[-5:]
    r = get(p.port, u, {"Range": f"bytes={n - 3}-"})
    assert r.body == data[-3:] and r.header("content-range") == f"bytes {n - 3}-{n - 1}/{n}"
    r = get(p.port, u, {"Range": f"bytes=10-{n + 100}"})        # clipped to the end
    assert r.status == 206 and r.body == data[10:]
    r = get(p.port, u, {"Range": f"bytes={n}-"})
    assert r.status == 416 and r.header("content-range") == f"bytes */{n}"
    assert get(p.port, u, {"Range": "bytes=5-1"}).status == 200        # invalid: ignored
    assert get(p.port, u, {"Range": "pages=1-2"}).status == 200
    # a Range on HEAD is ignored (§14.2: GET only)
    assert get(p.port, u, {"Range": "bytes=0-9"}, method="HEAD").status == 200
    # If-Range: the range only while the validator still matches
    assert get(p.port, u, {"Range": "bytes=0-9", "If-Range": tag}).status == 206
    assert get(p.port, u, {"Range": "bytes=0-9", "If-Range": '"old"'}).status == 200
    lm = formatdate(MTIME, usegmt=True)
    assert get(p.port, u, {"Range": "bytes=0-9", "If-Range": lm}).status == 206
    assert get(p.port, u, {"Range": "bytes=0-9",
                           "If-Range": formatdate(MTIME - 5, usegmt=True)}).status == 200
    # multipart/byteranges
    r = get(p.port, u, {"Range": "bytes=0-4, 100-109, -3"})
    assert r.status == 206
    m = re.fullmatch(r"multipart/byteranges; boundary=(\S+)", r.header("content-type"))
    assert m
    boundary = m.group(1).encode()
    parts = r.body.split(b"--" + boundary)
    assert parts[-1] == b"--\r\n"
    got = []
    for part in parts[1:-1]:
        head, _, body = part.partition(b"\r\n\r\n")
        assert b"Content-Type: text/javascript; charset=utf-8" in head
        cr = re.search(rb"Content-Range: bytes (\d+)-(\d+)/(\d+)", head)
        a, b, total = (int(x) for x in cr.groups())
        assert total == n
        body = body[:-2] if body.endswith(b"\r\n") else body
        assert body == data[a:b + 1]
        got.append((a, b))
    assert got == [(0, 4), (100, 109), (n - 3, n - 1)]
    # a range of the big file: sendfile from an offset
    big = (site / "assets" / "big.bin").read_bytes()
    r = get(p.port, "/app/assets/big.bin", {"Range": "bytes=1000000-2999999"})
    assert r.status == 206 and r.body == big[1000000:3000000]


def test_paths_never_leave_the_root(site, tmp_path, proxy_factory):
    os.symlink(tmp_path / "secret.txt", site / "assets" / "out.txt")
    os.symlink(site / "assets" / "style.css", site / "assets" / "abs-in.css")
    os.symlink("style.css", site / "assets" / "in.css")
    os.symlink(tmp_path, site / "updir")
    os.mkfifo(site / "assets" / "fifo")
    p = proxy_factory(_config(site))
    secret = b"TOP SECRET"
    for target in ("/app/../secret.txt", "/app/%2e%2e/secret.txt", "/app/assets/%2E%2E/%2E%2E/secret.txt",
                   "/app/..%2Fsecret.txt", "/app/assets%2F..%2F..%2Fsecret.txt",
                   "/app/%5C..%5Csecret.txt", "/app/a%00b", "/app/assets/out.txt",
                   "/app/updir/secret.txt", "/app/assets/abs-in.css"):
        r = get(p.port, target)
        assert secret not in r.body, target
        assert r.status in (400, 403, 404), (target, r.status)
    assert get(p.port, "/app/..%2Fsecret.txt").status == 400
    assert get(p.port, "/app/a%00b").status == 400
    assert get(p.port, "/app/x%5Cy").status == 400
    assert get(p.port, "/app/assets/out.txt").status == 403
    assert get(p.port, "/app/updir/secret.txt").status == 403
    # a symlink that stays beneath the root is followed (relative, no absolute names)
    r = get(p.port, "/app/assets/in.css")
    assert r.status == 200 and r.body == b"body{color:red}\n"
    # a FIFO is not opened for reading (it would block) and never served
    t0 = time.monotonic()
    assert get(p.port, "/app/assets/fifo").status == 403
    assert time.monotonic() - t0 < 2


def test_symlinks_true_follows_links_out(site, tmp_path, proxy_factory):
    os.symlink(tmp_path / "secret.txt", site / "assets" / "out.txt")
    p = proxy_factory(_config(site, ", symlinks = true"))
    r = get(p.port, "/app/assets/out.txt")
    assert r.status == 200 and r.body == b"TOP SECRET\n"


def test_directories_index_and_no_listing(site, proxy_factory):
    p = proxy_factory(_config(site))
    r = get(p.port, "/app/sub/")
    assert (r.status, r.body) == (200, b"sub index\n")
    assert r.header("content-type") == "text/html; charset=utf-8"
    r = get(p.port, "/app/sub?x=1")
    assert r.status == 301 and r.header("location") == "/app/sub/?x=1"
    assert get(p.port, "/app/").body == (site / "index.html").read_bytes()
    r = get(p.port, "/app/bare/")               # a directory without index: no listing
    assert r.status == 403 and b"index" not in r.body
    assert get(p.port, "/app/nope/").status == 404
    assert get(p.port, "/app/missing.js").status == 404
    assert get(p.port, "/app/assets/app.js/x").status == 404      # ENOTDIR


def test_spa_fallback(site, proxy_factory):
    p = proxy_factory(_config(site, ', fallback = "/index.html"'))
    index = (site / "index.html").read_bytes()
    for target in ("/app/some/client/route", "/app/missing.js", "/app/bare/"):
        r = get(p.port, target)
        assert (r.status, r.body) == (200, index), target
        assert r.header("content-type") == "text/html; charset=utf-8"
    assert get(p.port, "/app/assets/style.css").body == b"body{color:red}\n"
    # a path that leads out of the root is refused, not given the fallback
    assert get(p.port, "/app/..%2Fsecret.txt").status == 400


def test_precompressed_siblings(site, proxy_factory):
    import brotli

    js = site / "assets" / "app.js"
    data = js.read_bytes()
    (site / "assets" / "app.js.gz").write_bytes(gzip.compress(data))
    (site / "assets" / "app.js.br").write_bytes(brotli.compress(data))
    p = proxy_factory(_config(site, ", precompressed = true"))
    u = "/app/assets/app.js"
    r = get(p.port, u, {"Accept-Encoding": "gzip, br"})
    assert r.header("content-encoding") == "br" and brotli.decompress(r.body) == data
    assert r.header("vary") == "Accept-Encoding"
    assert r.header("content-type") == "text/javascript; charset=utf-8"
    assert r.header("etag") == _etag(site / "assets" / "app.js.br")
    r = get(p.port, u, {"Accept-Encoding": "gzip, br;q=0"})
    assert r.header("content-encoding") == "gzip" and gzip.decompress(r.body) == data
    r = get(p.port, u, {"Accept-Encoding": "gzip;q=0.5, br;q=0.4"})
    assert r.header("content-encoding") == "gzip"
    r = get(p.port, u, {"Accept-Encoding": "zstd"})      # no .zst sibling: identity
    assert r.header("content-encoding") is None and r.body == data
    r = get(p.port, u)
    assert r.header("content-encoding") is None and r.body == data
    assert r.header("vary") == "Accept-Encoding"
    r = get(p.port, u, {"Accept-Encoding": "*;q=0"})
    assert r.header("content-encoding") is None
    # a file without siblings
    r = get(p.port, "/app/assets/style.css", {"Accept-Encoding": "gzip"})
    assert r.header("content-encoding") is None and r.body == b"body{color:red}\n"


@pytest.mark.parametrize("route, message", [
    ('path = "/"\npool = "web"\nstatic = { root = "ROOT" }', "static route serves files itself"),
    ('path = "/"\nstatic = { root = "ROOT/nope" }', "is not a directory"),
    ('path = "/"\nstatic = { root = "ROOT", fallback = "/../x" }', "beneath the root"),
    ('path = "/"\nstatic = { root = "ROOT", index = "a/b" }', "must be a file name"),
    ('path = "/"\nstatic = { root = "ROOT", cache_control = "a\\nb" }', "control character"),
    ('path = "/"\nstatic = { root = "ROOT" }\ncache = true', "served from disk"),
    ('path = "/"', "missing (required): name a pool, serve files with static, or redirect"),
])
def test_config_errors(tmp_path, route, message):
    root = tmp_path / "r"
    root.mkdir()
    cfg = tmp_path / "c.toml"
    cfg.write_text('[[listen]]\nbind = "127.0.0.1:0"\n\n[[route]]\n' + route.replace("ROOT", str(root))
                   + '\n\n[pool.web]\nbackends = ["http://127.0.0.1:9"]\n\n[cache]\npath = "c"\n')
    out = subprocess.run([sys.executable, "-m", "edgeproxy", "check", "-c", str(cfg)],
                         capture_output=True, text=True, cwd=str(ROOT), timeout=60)
    assert out.returncode != 0
    assert message in out.stderr, out.stderr


def test_range_parsing_edge_cases():
    from edgeproxy.static.conditional import MAX_RANGES, parse_range

    assert parse_range(b"bytes=0-0", 10) == [(0, 0)]
    assert parse_range(b"bytes=-20", 10) == [(0, 9)]          # a suffix longer than the file
    assert parse_range(b"bytes=-0", 10) == []                 # unsatisfiable
    assert parse_range(b"bytes=10-", 10) == []
    assert parse_range(b"bytes=0-1, 20-30", 10) == [(0, 1)]   # the satisfiable ones only
    assert parse_range(b"BYTES = 1-2", 10) == [(1, 2)]
    for bad in (b"bytes=", b"bytes=a-b", b"bytes=1-2-3", b"bytes=-", b"items=0-1", b"bytes=3-1",
                b"bytes=" + b",".join(b"0-1" for _ in range(MAX_RANGES + 1))):
        assert parse_range(bad, 10) is None, bad
