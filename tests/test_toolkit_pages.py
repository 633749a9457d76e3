"""Error pages (issue 15 item 3) in real proxy processes: the proxy's own
errors (no route, dead or silent backends) answered with the configured
file and its content type, global and per route; backend 5xx answers only
with error_pages_backend, with framing and keep-alive intact."""

from __future__ import annotations

import pytest
from harness import Client, free_port

from edgeproxy.config import ConfigError, parse_config

PAGE_502 = b"<!doctype html><h1>We will be right back</h1>\n"
PAGE_404 = b'{"error": "no such site"}'


@pytest.fixture
def pages(tmp_path):
    d = tmp_path / "pages"
    d.mkdir()
    (d / "502.html").write_bytes(PAGE_502)
    (d / "504.txt").write_bytes(b"too slow\n")
    (d / "404.json").write_bytes(PAGE_404)
    (d / "500.html").write_bytes(b"<p>backend broke</p>")
    return d


def config(origin_url: str, dead: int, pages_dir, backend_pages: bool) -> str:
    return f'''
[server]
error_pages = {{ 404 = "{pages_dir}/404.json" }}

[timeout]
connect = 1.0
read = 0.5

[[route]]
host = "site.example"
path = "/"
pool = "web"
error_pages = {{ 502 = "pages/502.html", 504 = "pages/504.txt", 500 = "pages/500.html" }}
error_pages_backend = {str(backend_pages).lower()}

[[route]]
host = "site.example"
path = "/dead/"
pool = "dead"
error_pages = {{ 502 = "pages/502.html" }}

[[route]]
host = "plain.example"
path = "/"
pool = "dead"

[pool.web]
backends = ["{origin_url}"]
retries = 0

[pool.dead]
backends = ["http://127.0.0.1:{dead}"]
retries = 0
'''


def test_the_proxys_own_errors_get_the_pages(origin, proxy_factory, pages):
    p = proxy_factory(config(origin.url, free_port(), "pages", False))
    with Client(p.port) as c:
        r = c.request("GET", "/dead/x", host="site.example")
        assert r.status == 502 and r.body == PAGE_502
        assert r.header("content-type") == "text/html; charset=utf-8"
        r = c.request("GET", "/hang/", host="site.example")      # timeout.read
        assert r.status == 504 and r.body == b"too slow\n"
        assert r.header("content-type") == "text/plain; charset=utf-8"
    with Client(p.port) as c:
        # no route: the global page; the connection stays open after it
        r = c.request("GET", "/", host="nowhere.example")
        assert r.status == 404 and r.body == PAGE_404
        assert r.header("content-type") == "application/json; charset=utf-8"
        r = c.request("HEAD", "/x", host="nowhere.example")
        assert r.status == 404 and r.header("content-length") == str(len(PAGE_404))
        assert c.request("GET", "/echo/", host="site.example").status == 200
    with Client(p.port) as c:
        # a route without pages of its own keeps the canned answer
        r = c.request("GET", "/", host="plain.example")
        assert r.status == 502 and r.body == b"502 Bad Gateway\n"


@pytest.mark.parametrize("backend_pages", [False, True])
def test_backend_5xx_pages_are_opt_in(origin, proxy_factory, pages, backend_pages):
    p = proxy_factory(config(origin.url, free_port(), "pages", backend_pages))
    origin.failing.add("f")
    with Client(p.port) as c:
        for _ in range(2):      # the same connection, twice: framing stays right
            r = c.request("GET", "/cache/f", host="site.example")   # 500 with body "fail"
            assert r.status == 500
            if backend_pages:
                assert r.body == b"<p>backend broke</p>"
                assert r.header("content-type") == "text/html; charset=utf-8"
            else:
                assert r.body == b"fail"
        # a status without a page is passed on as it is
        r = c.request("GET", "/status/503", host="site.example")
        assert r.status == 503 and r.body == b""
        assert c.request("GET", "/echo/", host="site.example").status == 200


@pytest.mark.parametrize("pages_value, message", [
    ('{ 502 = "missing.html" }', "cannot be read"),
    ('{ 200 = "p.html" }', "an error status, 400 to 599"),
    ('{ abc = "p.html" }', "an error status"),
    ('{ 502 = "big.html" }', "larger than"),
    ('{ 502 = 3 }', "expected a file path"),
])
def test_bad_error_pages_are_config_errors(tmp_path, pages_value, message):
    (tmp_path / "p.html").write_text("x")
    (tmp_path / "big.html").write_bytes(b"x" * ((1 << 20) + 1))
    text = f'''
[[listen]]
bind = "127.0.0.1:0"

[[route]]
path = "/"
pool = "web"
error_pages = {pages_value}

[pool.web]
backends = ["http://127.0.0.1:1"]
'''
    with pytest.raises(ConfigError) as exc:
        parse_config(text, source=str(tmp_path / "edgeproxy.toml"))
    assert any(e.startswith("route[0].error_pages") and message in e
               for e in exc.value.errors), exc.value.errors


def test_pages_for_413_before_routing_and_for_a_401(origin, proxy_factory, pages, tmp_path):
    (pages / "413.html").write_bytes(b"<p>too big</p>")
    (pages / "401.html").write_bytes(b"<p>who are you?</p>")
    (tmp_path / "htpasswd").write_text("alice:$2y$04$" + "b" * 53 + "\n")
    p = proxy_factory(f'''
[server]
error_pages = {{ 413 = "pages/413.html" }}

[limits]
body_size = 1000

[[route]]
path = "/"
pool = "web"
auth_basic = {{ realm = "staff", users = "htpasswd" }}
error_pages = {{ 401 = "pages/401.html" }}

[pool.web]
backends = ["{origin.url}"]
''')
    with Client(p.port) as c:
        r = c.request("POST", "/echo/", body=b"x" * 2000)
        assert r.status == 413 and r.body == b"<p>too big</p>"
    with Client(p.port) as c:
        r = c.request("GET", "/echo/")
        assert r.status == 401 and r.body == b"<p>who are you?</p>"
        assert r.header("content-type") == "text/html; charset=utf-8"
        assert r.header("www-authenticate").startswith('Basic realm="staff"')
        assert c.request("GET", "/echo/").status == 401     # kept alive
