"""The data plane end to end: a real proxy process between a raw client and
a real origin, on 127.0.0.1."""

from __future__ import annotations

import socket
import time

import pytest
from harness import Client, raw_exchange, simple_config

HIDDEN = {"server", "x-powered-by", "x-aspnet-version", "x-aspnetmvc-version", "x-runtime"}


def test_get_passes_through(proxy, origin):
    with Client(proxy.port) as c:
        r = c.request("GET", "/size/1000")
    assert r.status == 200
    assert r.body == b"x" * 1000
    assert r.header("date")
    assert r.header("server") is None      # server_header defaults to none
    assert origin.requests[0].target == "/size/1000"


def test_keepalive_reuses_one_backend_connection(proxy, origin):
    with Client(proxy.port) as c:
        for i in range(20):
            r = c.request("GET", f"/size/{10 + i}")
            assert r.status == 200 and len(r.body) == 10 + i
    assert len(origin.requests) == 20
    assert origin.connections == 1


def test_backend_connections_are_pooled_across_clients(proxy, origin):
    for _ in range(10):
        with Client(proxy.port) as c:
            assert c.request("GET", "/size/5").status == 200
    assert origin.connections == 1


def test_post_with_content_length(proxy, origin):
    body = bytes(range(256)) * 400
    with Client(proxy.port) as c:
        r = c.request("POST", "/echo", body=body)
    assert r.status == 200 and r.json()["body_len"] == len(body)
    assert origin.requests[0].body == body
    assert origin.requests[0].header("content-length") == str(len(body))


def test_post_chunked_is_forwarded_chunked(proxy, origin):
    with Client(proxy.port) as c:
        c.send(b"POST /echo HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
               b"5;ext=1\r\nhello\r\n6\r\n world\r\n0\r\nX-T: 1\r\n\r\n")
        r = c.read_response()
    assert r.status == 200
    assert origin.requests[0].body == b"hello world"
    assert origin.requests[0].header("transfer-encoding") == "chunked"


def test_chunked_response(proxy, origin):
    with Client(proxy.port) as c:
        r = c.request("GET", "/chunked/5500")
        assert r.status == 200 and r.body == b"c" * 5500
        assert r.header("transfer-encoding") == "chunked"
        assert c.request("GET", "/size/3").body == b"xxx"   # still in step afterwards


def test_chunked_response_to_http10_client_is_decoded(proxy, origin):
    out = raw_exchange(proxy.port, b"GET /chunked/2500 HTTP/1.0\r\nHost: a\r\n\r\n")
    head, _, body = out.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200")
    assert b"transfer-encoding" not in head.lower()
    assert body == b"c" * 2500


def test_close_delimited_response(proxy, origin):
    with Client(proxy.port) as c:
        r = c.request("GET", "/close/3000")
        assert r.body == b"z" * 3000
        assert r.header("connection") == "close"


def test_head_204_304_have_no_body(proxy, origin):
    with Client(proxy.port) as c:
        r = c.request("HEAD", "/size/500")
        assert r.status == 200 and r.header("content-length") == "500" and r.body == b""
        r = c.request("GET", "/status/204")
        assert r.status == 204 and r.body == b""
        r = c.request("GET", "/status/304")
        assert r.status == 304 and r.body == b""
        assert c.request("GET", "/size/2").body == b"xx"   # framing still in step


def test_expect_100_continue(proxy, origin):
    with Client(proxy.port) as c:
        c.send(b"POST /expect HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\nContent-Length: 4\r\n\r\n")
        c.sock.settimeout(5)
        first = c._read_until(b"\r\n\r\n")
        assert first.startswith(b"HTTP/1.1 100")
        c.send(b"body")
        r = c.read_response()
    assert r.status == 200 and r.json()["body_len"] == 4


def test_pipelined_requests_answered_in_order(proxy, origin):
    with Client(proxy.port) as c:
        c.send(b"".join(b"GET /size/%d HTTP/1.1\r\nHost: a\r\n\r\n" % n for n in (7, 1, 300, 2)))
        sizes = [len(c.read_response().body) for _ in range(4)]
    assert sizes == [7, 1, 300, 2]


def test_hop_by_hop_request_fields_removed(proxy, origin):
    with Client(proxy.port) as c:
        r = c.request("GET", "/echo", headers={
            "Connection": "keep-alive, X-Secret-Hop", "X-Secret-Hop": "1", "Keep-Alive": "300",
            "TE": "trailers", "Trailer": "X-T", "Proxy-Connection": "keep-alive",
            "Upgrade": "h2c", "X-End-To-End": "yes"})
    assert r.status == 200
    seen = origin.requests[0]
    names = seen.names()
    for hop in ("x-secret-hop", "keep-alive", "te", "trailer", "proxy-connection", "upgrade"):
        assert hop not in names, hop
    assert seen.header("connection") is None
    assert seen.header("x-end-to-end") == "yes"


def test_forwarded_fields(proxy, origin):
    with Client(proxy.port) as c:
        c.request("GET", "/echo", host="app.test:8080",
                  headers={"X-Forwarded-For": "203.0.113.7", "X-Forwarded-Proto": "https",
                           "Forwarded": "for=203.0.113.7"})
    seen = origin.requests[0]
    assert seen.header("x-forwarded-for") == "203.0.113.7, 127.0.0.1"
    assert seen.header("x-forwarded-proto") == "http"     # ours, not the client's
    assert seen.header("x-forwarded-host") == "app.test:8080"
    assert seen.header("forwarded") == 'for=203.0.113.7, for=127.0.0.1;host="app.test:8080";proto=http'
    assert seen.header("host") == "app.test:8080"


def test_backend_identity_hidden(origin, proxy_factory):
    p = proxy_factory(simple_config(origin.url, '[server]\nserver_header = "edge"\nhide_headers = ["X-Debug-Token"]\n'))
    with Client(p.port) as c:
        r = c.request("GET", "/headers")
    names = {k.lower() for k, _ in r.headers}
    assert not (HIDDEN - {"server"}) & names
    assert r.header("server") == "edge"
    assert "x-debug-token" not in names
    for hop in ("x-hop", "keep-alive", "proxy-connection"):
        assert hop not in names
    assert r.header("connection") is None
    assert r.header("x-kept") == "yes"


def test_websocket_upgrade_tunnels(proxy, origin):
    with Client(proxy.port) as c:
        c.send(b"GET /ws HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
               b"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n")
        r = c.read_response()
        assert r.status == 101 and r.header("upgrade").lower() == "websocket"
        assert "upgrade" in r.header("connection").lower()
        for msg in (b"one", b"two" * 1000):
            c.send(msg)
            want = b"echo:" + msg
            got = c._read_exact(len(want))
            assert got == want
    assert origin.requests[0].header("upgrade") == "websocket"


# ---- errors ---------------------------------------------------------------

def test_backend_refused_is_502(proxy_factory, tmp_path):
    from harness import free_port
    p = proxy_factory(simple_config(f"http://127.0.0.1:{free_port()}"))
    with Client(p.port) as c:
        r = c.request("GET", "/")
    assert r.status == 502
    assert b"127.0.0.1" not in r.body and b"Traceback" not in r.body


def test_backend_reset_is_502(proxy, origin):
    with Client(proxy.port) as c:
        r = c.request("GET", "/reset")
        assert r.status == 502
        assert c.request("GET", "/size/1").status == 200    # the client connection survives


def test_backend_timeout_is_504(proxy, origin):
    with Client(proxy.port) as c:
        t = time.monotonic()
        r = c.request("GET", "/hang")
        assert r.status == 504
        assert time.monotonic() - t < 6


@pytest.mark.parametrize("kind", ["garbage", "clte", "badcl"])
def test_invalid_backend_response_is_502(proxy, origin, kind):
    with Client(proxy.port) as c:
        r = c.request("GET", f"/bad/{kind}")
    assert r.status == 502


def test_invalid_backend_chunking_cuts_the_response(proxy, origin):
    with Client(proxy.port) as c:
        c.send(b"GET /bad/badchunk HTTP/1.1\r\nHost: a\r\n\r\n")
        with pytest.raises((ConnectionError, ValueError)):
            c.read_response()


def test_header_timeout_is_408(proxy):
    with Client(proxy.port) as c:
        c.send(b"GET / HTTP/1.1\r\nHost: a\r\n")      # never finished
        c.sock.settimeout(5)
        data = c.sock.recv(4096)
        assert data.startswith(b"HTTP/1.1 408")
        assert c.is_closed()


def test_idle_keepalive_is_closed(proxy, origin):
    with Client(proxy.port) as c:
        assert c.request("GET", "/size/1").status == 200
        assert c.is_closed(wait=5)


def test_no_route_is_404(origin, proxy_factory):
    p = proxy_factory(f'[[route]]\nhost = "only.test"\npath = "/"\npool = "web"\n\n'
                      f'[pool.web]\nbackends = ["{origin.url}"]\n')
    with Client(p.port) as c:
        assert c.request("GET", "/", host="other.test").status == 404
        assert c.request("GET", "/", host="only.test").status == 404   # origin's own 404
    assert len(origin.requests) == 1


def test_routing_by_host_and_longest_prefix(proxy_factory):
    from harness import Origin
    origins = [Origin().start() for _ in range(4)]
    try:
        a, b, c_, d = origins
        p = proxy_factory(f'''
[[route]]
path = "/"
pool = "default"
[[route]]
path = "/api/"
pool = "api"
[[route]]
host = "*.example.test"
path = "/"
pool = "wild"
[[route]]
host = "app.example.test"
path = "/"
pool = "exact"
[pool.default]
backends = ["{a.url}"]
[pool.api]
backends = ["{b.url}"]
[pool.wild]
backends = ["{c_.url}"]
[pool.exact]
backends = ["{d.url}"]
''')
        # "/api/../size/1" routes as its normal form, "/size/1" (test_routing_path.py)
        cases = [("x.test", "/size/1", a), ("x.test", "/api/../size/1", a),
                 ("x.test", "/apiz", a), ("foo.example.test", "/size/1", c_),
                 ("APP.example.test:443", "/size/1", d), ("example.test", "/size/1", a)]
        for host, path, want in cases:
            before = len(want.requests)
            with Client(p.port) as cl:
                cl.request("GET", path, host=host)
            assert len(want.requests) == before + 1, (host, path)
    finally:
        for o in origins:
            o.stop()


# ---- backpressure ---------------------------------------------------------

def test_slow_client_download_does_not_buffer(proxy, origin):
    """200 MB to a client reading slowly: the proxy must hold back the
    backend instead of buffering the response."""
    total = 200 * 1024 * 1024
    with Client(proxy.port, timeout=30) as c:
        c.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 16)
        c.send(b"GET /big/%d HTTP/1.1\r\nHost: a\r\n\r\n" % total)
        head = c._read_until(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200")
        got = len(c.buf)
        c.buf = b""
        deadline = time.monotonic() + 60
        while got < total and time.monotonic() < deadline:
            d = c.sock.recv(1 << 20)
            if not d:
                break
            got += len(d)
            if got < 20 * 1024 * 1024:
                time.sleep(0.002)     # throttled at first, while the proxy could pile up
        assert got == total
    assert proxy.rss_peak_kib() < 100 * 1024


def test_slow_backend_upload_does_not_buffer(proxy, origin):
    total = 100 * 1024 * 1024
    with Client(proxy.port, timeout=60) as c:
        c.send(b"POST /slowread HTTP/1.1\r\nHost: a\r\nContent-Length: %d\r\n\r\n" % total)
        block = b"U" * (1 << 20)
        for _ in range(total // len(block)):
            c.send(block)
        r = c.read_response()
    assert r.status == 200
    assert proxy.rss_peak_kib() < 100 * 1024


def test_response_head_in_pieces(proxy_factory, tmp_path):
    """A backend that sends its head a few bytes at a time (both loops)."""
    import asyncio
    import threading

    from harness import simple_config

    head = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nX-Slow: yes\r\nContent-Length: 5\r\n\r\nhello"

    async def slow(r, w):
        while True:
            try:
                await r.readuntil(b"\r\n\r\n")
            except Exception:
                return
            for i in range(0, len(head), 3):
                w.write(head[i:i + 3])
                await w.drain()
                await asyncio.sleep(0.002)

    loop = asyncio.new_event_loop()
    srv = loop.run_until_complete(asyncio.start_server(slow, "127.0.0.1", 0))
    port = srv.sockets[0].getsockname()[1]
    t = threading.Thread(target=loop.run_forever, daemon=True)
    t.start()
    try:
        for kind in ("uvloop", "asyncio"):
            p = proxy_factory(simple_config(f"http://127.0.0.1:{port}"), env={"EDGEPROXY_LOOP": kind})
            with Client(p.port) as c:
                for _ in range(3):
                    r = c.request("GET", "/")
                    assert r.status == 200 and r.body == b"hello" and r.header("x-slow") == "yes"
    finally:
        loop.call_soon_threadsafe(loop.stop)
        t.join(5)
