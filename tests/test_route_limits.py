"""Per-route max_body and timeouts over a real proxy (routes by host, so
the origin sees its own paths): an upload route takes
bodies and waits the global limits refuse, other routes keep the global
ones, also on the same keep-alive connection, for Content-Length and
chunked bodies alike."""

from __future__ import annotations

import socket
import time

import pytest
from harness import Client

from edgeproxy._ext import ProxySettings
from edgeproxy.config import ConfigError, parse_config

CONFIG = """
[[route]]
path = "/"
pool = "web"

[[route]]
host = "upload.test"
pool = "web"
max_body = "64KiB"
timeout = {{ read = 3.0 }}

[[route]]
host = "small.test"
pool = "web"
max_body = 100

[[route]]
host = "nolimit.test"
pool = "web"
max_body = 0

[pool.web]
backends = ["{url}"]

[limits]
body_size = "1KiB"

[timeout]
read = 1.0
"""


def chunked(c: Client, host: str, size: int, piece: int = 1000):
    head = f"POST /echo HTTP/1.1\r\nHost: {host}\r\nTransfer-Encoding: chunked\r\n\r\n".encode()
    body = b"".join(b"%x\r\n%s\r\n" % (min(piece, size - i), b"u" * min(piece, size - i))
                    for i in range(0, size, piece))
    c.send(head + body + b"0\r\n\r\n")
    return c.read_response()


@pytest.fixture(params=["uvloop", "asyncio"])
def proxy(request, origin, proxy_factory):
    return proxy_factory(CONFIG.format(url=origin.url), env={"EDGEPROXY_LOOP": request.param})


def test_route_max_body_overrides_the_global_one(proxy):
    with Client(proxy.port) as c:
        r = c.request("POST", "/echo", body=b"u" * 10000, host="upload.test")
        assert r.status == 200 and r.json()["body_len"] == 10000
        # the same connection, another route: the global 1 KiB again
        assert c.request("POST", "/echo", body=b"u" * 10000).status == 413
    with Client(proxy.port) as c:
        assert c.request("POST", "/echo", body=b"u" * 1000).status == 200
        assert c.request("POST", "/echo", body=b"u" * 200, host="small.test").status == 413
    with Client(proxy.port) as c:
        assert c.request("POST", "/echo", body=b"u" * 70000, host="upload.test").status == 413
    with Client(proxy.port) as c:
        r = c.request("POST", "/echo", body=b"u" * 100000, host="nolimit.test")
        assert r.status == 200 and r.json()["body_len"] == 100000


def test_route_max_body_for_chunked_bodies(proxy, origin):
    with Client(proxy.port) as c:
        r = chunked(c, "upload.test", 10000)
        assert r.status == 200 and r.json()["body_len"] == 10000
        assert chunked(c, "example.test", 10000).status == 413       # global limit, same connection
    with Client(proxy.port) as c:
        assert chunked(c, "small.test", 200, piece=50).status == 413
    with Client(proxy.port) as c:
        assert chunked(c, "upload.test", 70000).status == 413
    with Client(proxy.port) as c:
        assert chunked(c, "example.test", 900).status == 200


def test_route_read_timeout_overrides_the_global_one(proxy):
    with Client(proxy.port) as c:
        r = c.request("GET", "/slow/1.6", host="upload.test")
        assert r.status == 200 and r.body == b"slow"
        assert c.request("GET", "/slow/1.6").status == 504      # the global 1 s
    assert "no response within 1.0s" in proxy.log()
    assert "no response within 3.0s" not in proxy.log()


def test_route_limits_config():
    base = '[[listen]]\nbind = "127.0.0.1:0"\n[pool.p]\nbackends = ["http://127.0.0.1:1"]\n'
    c = parse_config(base + '[[route]]\npool = "p"\nmax_body = "1GiB"\n'
                     'timeout = { read = 300, send = 5, connect = 1.5, body = 20 }\n')
    r = c.routes[0]
    assert r.max_body == 1 << 30
    assert (r.timeout.read, r.timeout.send, r.timeout.connect, r.timeout.body) == (300, 5, 1.5, 20)
    plain = parse_config(base + '[[route]]\npool = "p"\n').routes[0]
    assert plain.max_body is None and plain.timeout is None
    with pytest.raises(ConfigError) as e:
        parse_config(base + '[[route]]\npool = "p"\nmax_body = "lots"\n'
                     'timeout = { read = -1, header = 2 }\n')
    errors = "\n".join(e.value.errors)
    assert "route[0].max_body:" in errors and "route[0].timeout.read:" in errors
    assert "route[0].timeout.header: unknown key" in errors


def test_route_settings_copy_only_what_the_route_sets():
    from edgeproxy.proxy.build import build_settings, route_settings
    config = parse_config(
        '[[listen]]\nbind = "127.0.0.1:0"\n[pool.p]\nbackends = ["http://127.0.0.1:1"]\n'
        '[[route]]\npool = "p"\n[[route]]\npath = "/up/"\npool = "p"\n'
        'timeout = { read = 300 }\n[timeout]\nsend = 7\n')
    settings = build_settings(config)
    assert route_settings(settings, config.routes[0]) is None    # no copy, no cost
    derived = route_settings(settings, config.routes[1])
    assert isinstance(derived, ProxySettings) and derived is not settings
    assert (derived.t_read, derived.t_send, derived.max_body) == (300.0, 7.0, settings.max_body)
    assert (derived.t_connect, derived.t_body) == (settings.t_connect, settings.t_body)
    assert settings.t_read == 60.0


@pytest.fixture
def stuck_backend():
    """A port whose listen queue is full: connects to it hang (SYNs are dropped)."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(0)
    filler = socket.create_connection(s.getsockname(), timeout=2)
    yield f"http://127.0.0.1:{s.getsockname()[1]}"
    filler.close()
    s.close()


def test_route_connect_and_body_timeouts(origin, stuck_backend, proxy_factory):
    proxy = proxy_factory(f"""
[[route]]
pool = "stuck"
[[route]]
host = "quick.test"
pool = "stuck"
timeout = {{ connect = 0.5 }}
[[route]]
host = "web.test"
pool = "web"
[[route]]
host = "upload.test"
pool = "web"
timeout = {{ body = 0.5 }}
[pool.stuck]
backends = ["{stuck_backend}"]
[pool.web]
backends = ["{origin.url}"]
[timeout]
connect = 2.0
body = 30.0
""")
    with Client(proxy.port) as c:
        t = time.monotonic()
        assert c.request("GET", "/", host="quick.test").status == 504
        assert time.monotonic() - t < 1.8
    with Client(proxy.port) as c:
        t = time.monotonic()
        assert c.request("GET", "/", host="example.test").status == 504
        assert time.monotonic() - t >= 1.9
    log = proxy.log()
    assert "connect timed out after 0.5s" in log and "connect timed out after 2.0s" in log
    # a body that stops: 408 after the route's 0.5 s; the global 30 s elsewhere
    with Client(proxy.port, timeout=5) as c:
        c.send(b"POST /echo HTTP/1.1\r\nHost: upload.test\r\nContent-Length: 100\r\n\r\n0123456789")
        t = time.monotonic()
        assert c.read_response().status == 408
        assert time.monotonic() - t < 2.5
    with Client(proxy.port, timeout=1.5) as c:
        c.send(b"POST /echo HTTP/1.1\r\nHost: web.test\r\nContent-Length: 100\r\n\r\n0123456789")
        with pytest.raises(TimeoutError):
            c.read_response()
