"""strip_prefix, rewrite and redirect routes (issue 15 item 2) in real proxy
processes: the forwarded target is made from the routing path (one
normalisation, so an encoded spelling cannot get around a rule), the query
is kept, and redirect routes answer without any pool."""

from __future__ import annotations

import pytest
from harness import Client, raw_exchange

from edgeproxy.config import ConfigError, parse_config


@pytest.fixture
def rewriting(origin, proxy_factory):
    return proxy_factory(f'''
[timeout]
read = 2.0

[[route]]
path = "/api/"
pool = "web"
strip_prefix = true

[[route]]
path = "/v1"
pool = "web"
strip_prefix = true

[[route]]
path = "/old/"
pool = "web"
rewrite = {{ from = "^/old/([a-z]+)/(.*)$", to = "/echo/$2/$1" }}

[[route]]
path = "/q/"
pool = "web"
rewrite = {{ from = "^/q/(.*)$", to = "/echo/?page=$1" }}

[[route]]
path = "/"
pool = "web"

[pool.web]
backends = ["{origin.url}"]
''')


@pytest.mark.parametrize("sent, forwarded", [
    ("/api/echo/users", "/echo/users"),
    ("/api/echo/users?x=1&y=%20", "/echo/users?x=1&y=%20"),
    ("/api/", "/"),
    ("/api/%65cho/a", "/echo/a"),               # unreserved %65 = e: decoded first
    ("/api/x/../echo//b", "/echo/b"),           # dot segments and double slashes
    ("/v1", "/"),                               # a route path without the slash
    ("/v1/echo/c", "/echo/c"),
    ("/old/users/12?full=1", "/echo/12/users?full=1"),
    ("/%6Fld/users/12", "/echo/12/users"),      # encoded: the rule still applies
    ("/old/NOMATCH/1", "/old/NOMATCH/1"),       # no match: forwarded as it is
    ("/q/7?sort=a", "/echo/?page=7&sort=a"),    # the rewrite has a query: joined with &
    ("/echo/plain", "/echo/plain"),             # other routes are untouched
])
def test_forwarded_target(rewriting, origin, sent, forwarded):
    with Client(rewriting.port) as c:
        c.request("GET", sent)
    assert origin.requests[-1].target == forwarded


def test_rewritten_request_keeps_its_body_and_keep_alive(rewriting, origin):
    with Client(rewriting.port) as c:
        r = c.request("POST", "/api/echo/p", body=b"x" * 5000)
        assert r.status == 200 and r.json()["body_len"] == 5000
        assert r.json()["target"] == "/echo/p"
        r = c.request("GET", "/echo/again")          # the same connection
        assert r.json()["target"] == "/echo/again"


@pytest.fixture
def redirecting(origin, proxy_factory):
    return proxy_factory(f'''
[[route]]
host = "old.example"
path = "/"
redirect = {{ to = "https://new.example{{request_uri}}", status = 301 }}

[[route]]
path = "/moved/"
redirect = {{ to = "{{scheme}}://{{host}}/new{{path}}?was={{query}}", status = 308 }}

[[route]]
path = "/temp/"
redirect = {{ to = "/elsewhere" }}

[[route]]
path = "/"
pool = "web"

[pool.web]
backends = ["{origin.url}"]
''')


def test_redirect_routes(redirecting, origin):
    before = len(origin.requests)
    with Client(redirecting.port) as c:
        r = c.request("GET", "/a/./b//c?x=1", host="old.example:8080")
        assert r.status == 301 and r.reason == "Moved Permanently"
        assert r.header("location") == "https://new.example/a/b/c?x=1"
        assert r.header("content-length") == "0"
        r = c.request("GET", "/moved/%7Euser", host="site.example:8080")   # %7E is ~
        assert r.status == 308
        assert r.header("location") == "http://site.example/new/moved/~user?was="
        r = c.request("HEAD", "/temp/x")
        assert r.status == 302 and r.header("location") == "/elsewhere"
        # the connection went on after each: a normal request on it
        assert c.request("GET", "/echo/").status == 200
    assert len(origin.requests) == before + 1   # no redirect reached the origin


def test_redirect_with_an_unread_body_answers_then_closes(redirecting):
    out = raw_exchange(redirecting.port, b"POST /temp/x HTTP/1.1\r\nHost: a\r\n"
                       b"Content-Length: 100000\r\n\r\n" + b"z" * 1000)
    assert out.startswith(b"HTTP/1.1 302 Found\r\n"), out[:200]
    assert b"\r\nLocation: /elsewhere\r\n" in out and b"Connection: close\r\n" in out


@pytest.mark.parametrize("route, message", [
    ('path = "/a/"\npool = "web"\nstrip_prefix = true\nrewrite = { from = "^/a", to = "/" }',
     "not both"),
    ('path = "/a/"\npool = "web"\nrewrite = { from = "^/(a", to = "/" }', "not an RE2 expression"),
    ('path = "/a/"\npool = "web"\nrewrite = { from = "^/(a)", to = "/$2" }', "uses $2"),
    ('path = "/a/"\npool = "web"\nrewrite = { from = "^/(a)", to = "x$1" }', "must start with"),
    ('path = "/a/"\npool = "web"\nrewrite = { from = "^/(a)", to = "/ $1" }', "must be a path"),
    ('path = "/a/"\nredirect = { to = "https://x{nope}" }', "unknown variable {nope}"),
    ('path = "/a/"\nredirect = { to = "https://x", status = 200 }', "is not one of"),
    ('path = "/a/"\nredirect = { to = "https://x y" }', "without spaces"),
    ('path = "/a/"', "pool: missing (required): name a pool, serve files with static, or redirect"),
])
def test_bad_rewrites_and_redirects_are_config_errors(route, message):
    text = f'''
[[listen]]
bind = "127.0.0.1:0"

[[route]]
{route}

[pool.web]
backends = ["http://127.0.0.1:1"]
'''
    with pytest.raises(ConfigError) as exc:
        parse_config(text)
    assert any(e.startswith("route[0]") and message in e for e in exc.value.errors), \
        exc.value.errors


def test_backtracking_pattern_runs_in_linear_time(origin, proxy_factory):
    """(a+)+$ on a long run of a's then !: catastrophic for a backtracking
    engine, nothing for re2."""
    p = proxy_factory(f'''
[[route]]
path = "/"
pool = "web"
rewrite = {{ from = "^/(a+)+$", to = "/echo/$1" }}

[pool.web]
backends = ["{origin.url}"]
''')
    with Client(p.port, timeout=5.0) as c:
        r = c.request("GET", "/" + "a" * 4000 + "!")
        assert r.status == 404      # no match: forwarded as it is (the origin knows no such path)
        r = c.request("GET", "/aaa")
        assert r.status == 200 and origin.requests[-1].target == "/echo/aaa"
