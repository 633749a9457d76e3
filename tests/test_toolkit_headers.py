"""Header rules (issue 15 item 1) in real proxy processes in front of a real
origin: request_headers toward the backend, response_headers toward the
client (the backend's answers, cache hits, and with `always` the proxy's
own answers), their variables, global rules, and the loader's checks."""

from __future__ import annotations

import pytest
from harness import Client, free_port
from test_cache_proxy import FRESH, wait_for

from edgeproxy.config import ConfigError, parse_config


def route_config(origin_url: str, route_extra: str, extra: str = "") -> str:
    return f"""
[timeout]
read = 2.0
connect = 1.0

{extra}

[[route]]
path = "/"
pool = "web"
{route_extra}

[pool.web]
backends = ["{origin_url}"]
"""


def test_request_rules_set_add_remove_with_variables(origin, proxy_factory):
    p = proxy_factory(route_config(origin.url, '''
request_headers.set = { "X-Real-IP" = "{client_ip}", "Host" = "backend.internal", "X-Scheme" = "{scheme}", "X-Asked-Host" = "{host}", "X-Id" = "{request_id}" }
request_headers.add = { "X-Route" = "route {route}", "X-Literal" = "{{braces}}" }
request_headers.remove = ["X-Debug"]
'''))
    with Client(p.port) as c:
        r = c.request("GET", "/echo/x", {"X-Real-IP": "6.6.6.6", "X-Debug": "1",
                                         "X-Kept": "yes"}, host="site.example:8080")
    assert r.status == 200
    seen = origin.requests[-1]
    assert seen.header("x-real-ip") == "127.0.0.1"       # the client's spoof is replaced
    assert seen.header("host") == "backend.internal"
    assert seen.header("x-scheme") == "http"
    assert seen.header("x-asked-host") == "site.example"  # no port, as nginx's $host
    assert seen.header("x-route") == "route /"
    assert seen.header("x-literal") == "{braces}"
    assert seen.header("x-id") == seen.header("x-request-id") and seen.header("x-id")
    assert seen.header("x-debug") is None
    assert seen.header("x-kept") == "yes"
    # the core's own fields are still there, once
    assert [k.lower() for k, _ in seen.headers].count("host") == 1
    assert seen.header("x-forwarded-for") == "127.0.0.1"


def test_response_rules_on_backend_answers(origin, proxy_factory):
    p = proxy_factory(route_config(origin.url, '''
response_headers.set = { "X-Frame-Options" = "DENY", "X-Debug-Token" = "none" }
response_headers.add = { "Link" = "</app.css>; rel=preload" }
response_headers.remove = ["X-Kept"]
'''))
    with Client(p.port) as c:
        r = c.request("GET", "/headers")          # X-Debug-Token: secret, X-Kept: yes
        assert r.status == 200 and r.body == b"ok"
        assert r.header("x-frame-options") == "DENY"
        assert r.header("x-debug-token") == "none"   # set replaces the backend's
        assert r.header("link") == "</app.css>; rel=preload"
        assert r.header("x-kept") is None
        # a backend's error is a backend answer: it gets them too, and the
        # connection stays usable
        r = c.request("GET", "/nothing-here")
        assert r.status == 404 and r.header("x-frame-options") == "DENY"
        r = c.request("GET", "/chunked/3000")
        assert r.status == 200 and len(r.body) == 3000 and r.header("link")


@pytest.mark.parametrize("always", [False, True])
def test_always_applies_rules_to_the_proxys_own_answers(origin, proxy_factory, always):
    dead = free_port()
    p = proxy_factory(f'''
[timeout]
connect = 1.0

[[route]]
path = "/"
pool = "web"
response_headers = {{ set = {{ "X-Frame-Options" = "DENY" }}, always = {str(always).lower()} }}

[[route]]
path = "/dead/"
pool = "dead"
response_headers = {{ set = {{ "X-Frame-Options" = "DENY" }}, always = {str(always).lower()} }}

[pool.web]
backends = ["{origin.url}"]

[pool.dead]
backends = ["http://127.0.0.1:{dead}"]
retries = 0
''')
    with Client(p.port) as c:
        assert c.request("GET", "/echo/").header("x-frame-options") == "DENY"
        r = c.request("GET", "/dead/x")             # the proxy's own 502
        assert r.status == 502
        assert (r.header("x-frame-options") == "DENY") is always
        assert r.header("content-length") == str(len(r.body))


def test_global_rules_are_inherited_and_route_rules_win(origin, proxy_factory):
    p = proxy_factory(f'''
[server]
request_headers = {{ set = {{ "X-Env" = "prod", "X-Who" = "global" }} }}
response_headers = {{ set = {{ "X-Frame-Options" = "SAMEORIGIN" }}, always = true }}

[[route]]
path = "/"
pool = "web"

[[route]]
path = "/echo/own/"
pool = "web"
request_headers = {{ set = {{ "X-Who" = "route" }} }}
response_headers = {{ set = {{ "X-Frame-Options" = "DENY" }}, always = true }}

[pool.web]
backends = ["{origin.url}"]
''')
    with Client(p.port) as c:
        r = c.request("GET", "/echo/")
        assert r.header("x-frame-options") == "SAMEORIGIN"
        assert origin.requests[-1].header("x-env") == "prod"
        assert origin.requests[-1].header("x-who") == "global"
        r = c.request("GET", "/echo/own/")
        assert r.header("x-frame-options") == "DENY"
        assert origin.requests[-1].header("x-env") == "prod"
        assert origin.requests[-1].header("x-who") == "route"
    # a request no route takes: the global rules with always
    p2 = proxy_factory(f'''
[server]
response_headers = {{ set = {{ "X-Frame-Options" = "SAMEORIGIN" }}, always = true }}

[[route]]
host = "only.example"
path = "/"
pool = "web"

[pool.web]
backends = ["{origin.url}"]
''')
    with Client(p2.port) as c:
        r = c.request("GET", "/", host="other.example")
        assert r.status == 404 and r.header("x-frame-options") == "SAMEORIGIN"


@pytest.mark.parametrize("rules", [
    'add = { "X-Edge" = "on {scheme}" }',                       # adds only: the hot path
    'add = { "X-Edge" = "on {scheme}" }, remove = ["X-Kept"]',  # removes: the cache phase
])
def test_cache_hits_get_the_response_rules(origin, proxy_factory, tmp_path, rules):
    p = proxy_factory(f'''
[timeout]
read = 3.0

[cache]
path = "{tmp_path / 'cache'}"
max_size = "64MiB"

[[route]]
path = "/"
pool = "web"
cache = true
response_headers = {{ {rules} }}

[pool.web]
backends = ["{origin.url}"]
''')
    target = f"/cache/ruled?{FRESH}&leaky=1"
    first = Client(p.port).request("GET", target)
    assert first.status == 200 and first.header("x-edge") == "on http"

    def hit():
        r = Client(p.port).request("GET", target)
        return r if "hit" in (r.header("cache-status") or "") else None
    assert wait_for(hit, timeout=8.0)
    r = hit()
    assert r.header("x-edge") == "on http", r.headers
    assert [k.lower() for k, _ in r.headers].count("x-edge") == 1
    if "remove" in rules:
        assert r.header("x-kept") is None and first.header("x-kept") is None
    else:
        assert r.header("x-kept") == "yes"
    assert origin.hits["ruled"] == 1


@pytest.mark.parametrize("rules, message", [
    ('request_headers = { set = { "X-A" = "a\\r\\nX-Evil: 1" } }', "contains CR, LF"),
    ('request_headers = { set = { "X-A" = "a\\u0000" } }', "contains CR, LF, NUL"),
    ('request_headers = { set = { "Bad Name" = "a" } }', "not a valid field name"),
    ('request_headers = { set = { "Content-Length" = "5" } }', "frames the message"),
    ('response_headers = { remove = ["Transfer-Encoding"] }', "frames the message"),
    ('request_headers = { set = { "Connection" = "close" } }', "frames the message"),
    ('request_headers = { add = { "Host" = "x" } }', "Host can only be set"),
    ('request_headers = { set = { "X-Forwarded-For" = "1.2.3.4" } }', "the proxy writes it"),
    ('response_headers = { set = { "Server" = "x" } }', "server.server_header"),
    ('request_headers = { set = { "X-A" = "{nope}" } }', "unknown variable {nope}"),
    ('request_headers = { set = { "X-A" = "{oops" } }', "unmatched brace"),
    ('request_headers = { always = true }', "unknown key"),
    ('response_headers = { set = { "X-A" = "1" }, remove = ["x-a"] }', "both removed and set"),
])
def test_bad_rules_are_config_errors_naming_the_key(rules, message):
    text = f'''
[[listen]]
bind = "127.0.0.1:0"

[[route]]
path = "/"
pool = "web"
{rules}

[pool.web]
backends = ["http://127.0.0.1:1"]
'''
    with pytest.raises(ConfigError) as exc:
        parse_config(text)
    assert any(e.startswith("route[0].") and message in e for e in exc.value.errors), \
        exc.value.errors


def test_a_route_without_rules_has_no_toolkit_phase(origin):
    from edgeproxy.proxy.build import build_pools, build_router, build_settings

    cfg = parse_config(route_config(origin.url, "", '[[listen]]\nbind = "127.0.0.1:0"\n'))
    settings = build_settings(cfg)
    assert settings.resp_edits is None and settings.answers is None
    pools = build_pools(cfg)
    build_router(cfg, pools)   # builds; the route carries no compiled phase
    from edgeproxy.proxy.compiled import BuildEnv, route_phase
    assert route_phase(BuildEnv(cfg, pools), cfg.routes[0], 0, None) is None
