"""The phase pipeline over real sockets: users' hooks (examples/hooks and
tests/phase_hooks.py) loaded by a real proxy in front of real origins."""
from __future__ import annotations

import asyncio
import json
import re
import threading
import time

import pytest
from harness import ROOT, Client, Origin, free_port, raw_exchange, start_proxy

pytest.importorskip("edgeproxy._ext")

EXAMPLES = "examples.hooks"
T = "tests.phase_hooks"


class AuthService:
    """A tiny auth backend for the async example hook: 200 + X-User for the cookie sid=good."""

    def __init__(self):
        self.port = 0
        self.calls = 0
        self.loop = asyncio.new_event_loop()
        threading.Thread(target=self.loop.run_forever, daemon=True).start()
        asyncio.run_coroutine_threadsafe(self._start(), self.loop).result(5)

    async def _start(self):
        self.server = await asyncio.start_server(self._conn, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]

    async def _conn(self, r, w):
        head = await r.readuntil(b"\r\n\r\n")
        self.calls += 1
        if b"sid=good" in head:
            w.write(b"HTTP/1.1 200 OK\r\nX-User: alice\r\nContent-Length: 0\r\n\r\n")
        else:
            w.write(b"HTTP/1.1 401 Unauthorized\r\nContent-Length: 0\r\n\r\n")
        await w.drain()
        w.close()

    def stop(self):
        self.loop.call_soon_threadsafe(self.server.close)


def _route(host, hooks, pool="web", extra=""):
    hs = ", ".join(f'"{h}"' for h in hooks)
    return f'[[route]]\nhost = "{host}"\npath = "/"\npool = "{pool}"\nhooks = [{hs}]\n{extra}\n'


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("phases")
    a, b = Origin().start(), Origin().start()
    auth = AuthService()
    access = tmp / "access.log"
    routes = [
        _route("headers.test", [f"{EXAMPLES}.headers:RewriteHeaders"]),
        _route("token.test", [f"{EXAMPLES}.token:RequireToken"]),
        _route("ab.test", [f"{EXAMPLES}.ab:CookieSplit"]),
        _route("cache.test", [f"{EXAMPLES}.cachekey:IgnoreTracking"], extra="cache = true"),
        _route("sso.test", [f"{EXAMPLES}.authcall:AskAuthService", f"{EXAMPLES}.logfield:LogUser"]),
        _route("order.test", [f"{T}:First", f"{T}:AsyncThenSync", f"{T}:Second"]),
        _route("slow.test", [f"{T}:TooSlow"]),
        _route("raises.test", [f"{T}:Raises"]),
        _route("araises.test", [f"{T}:AsyncRaises"]),
        _route("badfield.test", [f"{T}:BadField"]),
        _route("badname.test", [f"{T}:BadName"]),
        _route("badreturn.test", [f"{T}:BadReturn"]),
        _route("badstatus.test", [f"{T}:BadStatus"]),
        _route("body.test", [f"{T}:InspectBody"]),
        _route("err.test", [f"{T}:ErrorPage"], pool="dead"),
        _route("aerr.test", [f"{T}:AsyncErrorPage"], pool="dead"),
        _route("upstream.test", [f"{T}:UpstreamHost"]),
        _route("resp.test", [f"{T}:ReplaceResponse"]),
        _route("rewrite.test", [f"{T}:Rewrite"]),
        _route("noop.test", [f"{T}:Noop"]),
        _route("pin.test", [f"{T}:Backend"]),
        _route("stamp.test", [f"{T}:StampEveryAnswer"], extra="cache = true"),
        _route("stamp401.test", [f"{EXAMPLES}.token:RequireToken", f"{T}:StampEveryAnswer"]),
        _route("stamp502.test", [f"{T}:StampEveryAnswer"], pool="dead"),
        _route("bodywatch.test", [f"{T}:BodyWatch"]),
        _route("bodywatch502.test", [f"{T}:BodyWatch"], pool="dead"),
        '[[route]]\npath = "/"\npool = "web"\n',
    ]
    dead = free_port()
    body = (f'[server]\nhooks_timeout = 0.5\nhooks_body_limit = "64KiB"\n\n'
            f'[log]\naccess_log = "{access}"\n\n'
            f'[cache]\npath = "{tmp / "cache"}"\nmax_size = "16MiB"\nmax_object = "1MiB"\n\n'
            + "\n".join(routes) +
            f'\n[pool.web]\nbackends = ["{a.url}"]\n\n[pool.web_b]\nbackends = ["{b.url}"]\n\n'
            f'[pool.two]\nbackends = ["{a.url}", "{b.url}"]\n\n'
            f'[pool.dead]\nbackends = ["http://127.0.0.1:{dead}"]\nretries = 0\n')
    body = body.replace(_route("pin.test", [f"{T}:Backend"]),
                        _route("pin.test", [f"{T}:Backend"], pool="two"))
    p = start_proxy(tmp, body, env={
        "PYTHONPATH": str(ROOT),
        "AUTH_URL": f"http://127.0.0.1:{auth.port}/check", "EDGE_TOKEN": "t0ken"})
    yield {"proxy": p, "a": a, "b": b, "auth": auth, "access": access}
    p.stop()
    a.stop()
    b.stop()
    auth.stop()


def get(env, host, target="/echo", headers=None, method="GET", body=None):
    with Client(env["proxy"].port) as c:
        return c.request(method, target, headers=headers, body=body, host=host)


def seen_last(origin):
    return origin.requests[-1]


def test_header_rewrite_both_ways(env):
    r = get(env, "headers.test", headers={"X-Debug": "1"})
    assert r.status == 200
    assert r.header("X-Frame-Options") == "DENY"
    s = seen_last(env["a"])
    assert s.header("X-Real-IP") == "127.0.0.1"
    assert s.header("X-Debug") is None


def test_bearer_token_401_and_pass(env):
    n = len(env["a"].requests)
    r = get(env, "token.test")
    assert r.status == 401
    assert r.header("WWW-Authenticate") == 'Bearer realm="api"'
    r = get(env, "token.test", headers={"Authorization": "Bearer wrong"})
    assert r.status == 401
    assert len(env["a"].requests) == n            # nothing reached the backend
    r = get(env, "token.test", headers={"Authorization": "Bearer t0ken"})
    assert r.status == 200
    assert seen_last(env["a"]).header("Authorization") is None


def test_ab_routing_by_cookie(env):
    na, nb = len(env["a"].requests), len(env["b"].requests)
    assert get(env, "ab.test", headers={"Cookie": "ab=b"}).status == 200
    assert len(env["b"].requests) == nb + 1 and len(env["a"].requests) == na
    assert get(env, "ab.test", headers={"Cookie": "x=1; ab=a"}).status == 200
    assert get(env, "ab.test").status == 200
    assert len(env["a"].requests) == na + 2 and len(env["b"].requests) == nb + 1


def test_custom_cache_key(env):
    a = env["a"]
    base = a.hits["ck"]
    r1 = get(env, "cache.test", "/cache/ck?cc=max-age=60&utm_source=x")
    r2 = get(env, "cache.test", "/cache/ck?cc=max-age=60&utm_campaign=y")
    assert r1.status == r2.status == 200
    assert r1.body == r2.body
    assert a.hits["ck"] == base + 1               # the tracking parameter did not split the entry
    assert "hit" in (r2.header("Cache-Status") or "")
    r3 = get(env, "cache.test", "/cache/ck?cc=max-age=60", headers={"Accept-Language": "de"})
    assert a.hits["ck"] == base + 2               # another language, another entry
    assert "hit" not in (r3.header("Cache-Status") or "")


def test_async_auth_call_before_forwarding(env):
    auth = env["auth"]
    calls = auth.calls
    n = len(env["a"].requests)
    r = get(env, "sso.test", headers={"Cookie": "sid=bad"})
    assert r.status == 403
    assert len(env["a"].requests) == n
    r = get(env, "sso.test", headers={"Cookie": "sid=good"})
    assert r.status == 200
    assert seen_last(env["a"]).header("X-User") == "alice"
    assert auth.calls == calls + 2


def test_log_field_in_access_log(env):
    r = get(env, "sso.test", "/echo?logme=1", headers={"Cookie": "sid=good"})
    assert r.status == 200
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        lines = [ln for ln in env["access"].read_text().splitlines() if "logme=1" in ln]
        if lines:
            break
        time.sleep(0.1)
    assert lines, "no access log line"
    assert 'user="alice"' in lines[-1]
    assert re.search(r'upstream="127\.0\.0\.1:\d+"', lines[-1])


def test_order_sync_async_sync(env):
    r = get(env, "order.test", headers={"X-Order": "client"})
    assert r.status == 200
    s = seen_last(env["a"])
    assert [v for k, v in s.headers if k.lower() == "x-order"] == ["client", "first", "second"]
    assert s.header("X-Async") == "done"
    # the response side runs the route's hooks in reverse (as Envoy's encoder filters)
    assert [v for k, v in r.headers if k.lower() == "x-resp-order"] == ["second", "first"]


def test_hook_timeout_is_503_and_logged(env):
    t = time.monotonic()
    r = get(env, "slow.test")
    assert r.status == 503
    assert time.monotonic() - t < 5
    assert "tests.phase_hooks:TooSlow.request: no answer within 0.5s" in env["proxy"].log()


@pytest.mark.parametrize("host,detail", [("raises.test", "secret internal detail"),
                                         ("araises.test", "secret async detail")])
def test_hook_exception_is_generic_500(env, host, detail):
    r = get(env, host)
    assert r.status == 500
    assert detail.encode() not in r.body
    log = env["proxy"].log()
    assert detail in log and "Traceback" in log


@pytest.mark.parametrize("host,words", [
    ("badfield.test", "BadField.request failed: ValueError: field value"),
    ("badname.test", "BadName.request failed: ValueError: invalid field name"),
    ("badreturn.test", "BadReturn.request failed: TypeError: returned 42"),
    ("badstatus.test", "BadStatus.request failed: ValueError: a hook's answer needs a status"),
])
def test_bad_values_from_a_hook_are_refused(env, host, words):
    n = len(env["a"].requests)
    r = get(env, host)
    assert r.status == 500
    assert len(env["a"].requests) == n
    assert words in env["proxy"].log()


def test_worker_survives_and_counts_hook_errors(env):
    get(env, "raises.test")
    assert get(env, "noop.test").status == 200


def test_request_body_inspection(env):
    n = len(env["a"].requests)
    r = get(env, "body.test", method="POST", body=b"an attack payload")
    assert r.status == 403
    assert len(env["a"].requests) == n
    r = get(env, "body.test", method="POST", body=b"x" * 5000)
    assert r.status == 200
    assert r.json()["body_len"] == 5000
    assert seen_last(env["a"]).header("X-Body-Len") == "5000"
    # chunked: the hook sees the data, the backend gets the body whole
    chunked = b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"
    r = get(env, "body.test", method="POST", body=chunked,
            headers={"Transfer-Encoding": "chunked"})
    assert r.status == 200
    assert seen_last(env["a"]).body == b"hello world"
    assert seen_last(env["a"]).header("X-Body-Len") == "11"


def test_request_body_over_the_limit_is_413(env):
    r = get(env, "body.test", method="POST", body=b"y" * (65 * 1024))
    assert r.status == 413


def test_error_phase_answers_for_the_backend(env):
    r = get(env, "err.test")
    assert r.status == 502
    assert b"sorry (502)" in r.body
    assert r.header("Content-Type") == "text/html"
    r = get(env, "aerr.test")
    assert r.status == 503 and r.body == b"maintenance\n"
    assert r.header("Retry-After") == "120"


def test_upstream_request_fields(env):
    assert get(env, "upstream.test").status == 200
    s = seen_last(env["a"])
    assert s.header("Host") == "backend.internal"
    assert s.header("X-Forwarded-Host") is None
    assert s.header("X-Forwarded-For") == "127.0.0.1"


def test_response_phase_changes_and_replaces(env):
    r = get(env, "resp.test", "/nothing-here")
    assert r.status == 404 and r.body == b"custom not found\n"
    r = get(env, "resp.test", headers={"X-Status": "299"})
    assert r.status == 299 and r.json()["method"] == "GET"


def test_rewrite_method_and_target(env):
    r = get(env, "rewrite.test", "/old")
    assert r.status == 200
    assert r.json()["target"] == "/echo?moved=1"
    r = get(env, "rewrite.test", headers={"X-Method": "DELETE"})
    assert r.json()["method"] == "DELETE"


def test_pin_backend(env):
    a_port = env["a"].port
    b_port = env["b"].port
    nb = len(env["b"].requests)
    for _ in range(3):
        assert get(env, "pin.test", headers={"X-Backend": f"127.0.0.1:{b_port}"}).status == 200
    assert len(env["b"].requests) == nb + 3
    assert get(env, "pin.test", headers={"X-Backend": "127.0.0.1:1"}).status == 503
    assert a_port


def test_pipelined_requests_through_hooks(env):
    req = (b"GET /echo HTTP/1.1\r\nHost: order.test\r\n\r\n"
           b"GET /echo HTTP/1.1\r\nHost: token.test\r\n\r\n"
           b"GET /echo HTTP/1.1\r\nHost: order.test\r\nConnection: close\r\n\r\n")
    out = raw_exchange(env["proxy"].port, req)
    assert re.findall(rb"HTTP/1.1 (\d+)", out) == [b"200", b"401", b"200"]


def _normalise(data: bytes) -> bytes:
    return re.sub(rb"(X-Request-Id|Date|Age): [^\r]*", rb"\1: -", data)


def test_noop_hook_route_is_byte_for_byte_a_plain_route(env):
    """A route whose hooks change nothing sends the backend and the client
    the same bytes as a route without hooks."""
    a = env["a"]
    outs, heads = [], []
    for host in ("plain.test", "noop.test"):
        n = len(a.raw_heads)
        outs.append(raw_exchange(env["proxy"].port,
                                 b"GET /headers HTTP/1.1\r\nHost: x\r\nX-A: 1\r\nConnection: close\r\n\r\n"
                                 .replace(b"Host: x", b"Host: " + host.encode())))
        heads.append(a.raw_heads[n])
    assert _normalise(outs[0]) == _normalise(outs[1])
    assert _normalise(heads[0]).replace(b"plain.test", b"H") == \
        _normalise(heads[1]).replace(b"noop.test", b"H")


def test_metrics_count_hook_errors(env, tmp_path):
    get(env, "raises.test")
    # the metrics region is the supervisor's; the count shows on the admin listener
    # when there is one: checked in test_connect_phase_and_metrics


@pytest.fixture
def connect_proxy(tmp_path):
    a = Origin().start()
    admin = free_port()
    body = (f'[server]\nhooks = ["{T}:DenyConnect", "{T}:AsyncConnect"]\n'
            f'admin = "127.0.0.1:{admin}"\n\n'
            f'[[route]]\npath = "/raise"\npool = "web"\nhooks = ["{T}:Raises"]\n\n'
            f'[[route]]\npath = "/"\npool = "web"\n\n[pool.web]\nbackends = ["{a.url}"]\n')
    p = start_proxy(tmp_path, body, env={"PYTHONPATH": str(ROOT)})
    yield p, a, admin
    p.stop()
    a.stop()


def test_connect_phase_and_metrics(connect_proxy):
    import socket
    p, a, admin = connect_proxy
    with Client(p.port) as c:
        r = c.request("GET", "/echo")
        assert r.status == 200
        assert a.requests[-1].header("X-Conn-Checked") == "yes"
    s = socket.socket()
    s.bind(("127.0.0.2", 0))
    s.settimeout(5)
    s.connect(("127.0.0.1", p.port))
    s.sendall(b"GET /echo HTTP/1.1\r\nHost: x\r\n\r\n")
    try:
        assert s.recv(100) == b""                 # refused: closed without an answer
    except ConnectionResetError:
        pass
    s.close()
    with Client(p.port) as c:
        assert c.request("GET", "/raise").status == 500
    with Client(admin) as c:
        text = c.request("GET", "/metrics").body.decode()
    m = re.search(r"^edgeproxy_hook_errors_total (\d+)", text, re.M)
    assert m and int(m.group(1)) >= 1


def test_check_names_bad_hooks(tmp_path):
    import subprocess
    import sys
    cfg = tmp_path / "bad.toml"
    cfg.write_text(
        '[[listen]]\nbind = "127.0.0.1:0"\n\n'
        '[[route]]\npath = "/"\npool = "web"\n'
        f'hooks = ["{T}:First", "no_such_module_x:Hook", "{T}:Missing", "{T}:NoPhase", "nocolon"]\n\n'
        '[pool.web]\nbackends = ["http://127.0.0.1:5000"]\n')
    out = subprocess.run([sys.executable, "-m", "edgeproxy", "check", "-c", str(cfg)],
                         capture_output=True, text=True, cwd=str(ROOT),
                         env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert out.returncode != 0
    text = out.stdout + out.stderr
    assert "route[0].hooks[1]: no module named 'no_such_module_x'" in text
    assert "route[0].hooks[2]: module 'tests.phase_hooks' has no attribute 'Missing'" in text
    assert "route[0].hooks[3]: tests.phase_hooks:NoPhase defines none of the phases" in text
    assert "route[0].hooks[4]: expected \"module:attr\"" in text
    assert "hooks[0]" not in text


def test_hook_in_config_directory(tmp_path):
    (tmp_path / "myhooks.py").write_text(
        "class Tag:\n    def request(self, ctx):\n        ctx.headers.set('X-Tag', 'mine')\n")
    a = Origin().start()
    try:
        p = start_proxy(tmp_path, '[[route]]\npath = "/"\npool = "web"\nhooks = ["myhooks:Tag"]\n\n'
                        f'[pool.web]\nbackends = ["{a.url}"]\n')
        try:
            with Client(p.port) as c:
                assert c.request("GET", "/echo").status == 200
            assert a.requests[-1].header("X-Tag") == "mine"
        finally:
            p.stop()
    finally:
        a.stop()


def test_json_access_log_extra_fields(tmp_path):
    from edgeproxy.server.accesslog import AccessLog
    path = tmp_path / "a.log"
    log = AccessLog(str(path), "json")
    log.log(b"1.2.3.4", b"GET / HTTP/1.1", 200, 5, 0.01, b"-", b"ua", "b:1",
            extra={"user": "bob", "status": "not-overridden"})
    log.log(b"1.2.3.4", b"GET / HTTP/1.1", 200, 5, 0.01, b"-", b"ua", "b:1")
    log.close()
    rows = [json.loads(x) for x in path.read_text().splitlines()]
    assert rows[0]["user"] == "bob" and rows[0]["status"] == 200
    assert "user" not in rows[1]
    clf = AccessLog(str(tmp_path / "c.log"))
    clf.log(b"1.2.3.4", b"GET / HTTP/1.1", 200, 5, 0.01, b"-", b"ua", "b:1",
            extra={"who": "a\nb\"c"})
    clf.close()
    line = (tmp_path / "c.log").read_text()
    assert line.count("\n") == 1 and 'who="a\\x0ab\\"c"' in line


def test_hooks_match_on_the_normal_path(env):
    """A rule on ctx.path cannot be dodged by spelling the path another way."""
    for target in ("/x/../old", "/%6fld", "//old"):
        r = get(env, "rewrite.test", target)
        assert r.status == 200, target
        assert r.json()["target"] == "/echo?moved=1", target


def test_expect_continue_with_a_body_hook_is_answered_at_once(env):
    """The proxy reads the body itself for request_body hooks, so it says
    100 Continue at once (not after the backend's wait) and the backend is
    not asked to say it again."""
    with Client(env["proxy"].port) as c:
        c.send(b"POST /echo HTTP/1.1\r\nHost: body.test\r\nContent-Length: 5\r\n"
               b"Expect: 100-continue\r\n\r\n")
        c.sock.settimeout(0.5)
        assert c.sock.recv(100).startswith(b"HTTP/1.1 100 Continue\r\n\r\n")
        c.sock.settimeout(5)
        c.send(b"hello")
        r = c.read_response()
    assert r.status == 200 and r.json()["body_len"] == 5
    assert seen_last(env["a"]).header("Expect") is None


def test_response_phase_sees_every_answer(env):
    """Backend answers, cache hits, the proxy's errors and other hooks'
    answers all pass the response phase (as nginx's add_header ... always)."""
    r1 = get(env, "stamp.test", "/cache/stamp?cc=max-age=60")
    r2 = get(env, "stamp.test", "/cache/stamp?cc=max-age=60")
    assert r1.header("X-Stamp") == "200"
    assert "hit" in (r2.header("Cache-Status") or "") and r2.header("X-Stamp") == "200"
    r = get(env, "stamp401.test")
    assert r.status == 401 and r.header("X-Stamp") == "401"
    assert r.header("WWW-Authenticate") == 'Bearer realm="api"'
    r = get(env, "stamp502.test")
    assert r.status == 502 and r.header("X-Stamp") == "502"
    assert r.body == b"502 Bad Gateway\n"
    r = get(env, "stamp401.test", method="POST", body=b"x" * 10)   # answered with its body unread
    assert r.status == 401 and r.header("X-Stamp") == "401"


def _log_line(env, marker):
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        lines = [ln for ln in env["access"].read_text().splitlines() if marker in ln]
        if lines:
            return lines[-1]
        time.sleep(0.1)
    raise AssertionError(f"no access log line with {marker}")


@pytest.mark.parametrize("target,size", [("/size/70000?m=len", 70000),
                                         ("/chunked/5500?m=chunked", 5500),
                                         ("/status/204?m=empty", 0)])
def test_response_body_hooks_see_the_data_as_it_streams(env, target, size):
    r = get(env, "bodywatch.test", target)
    assert len(r.body) == size
    line = _log_line(env, target)
    assert f'body_bytes="{size}"' in line           # chunk framing removed
    assert 'ended="yes"' in line


def test_response_body_hooks_see_a_proxy_answer(env):
    with Client(env["proxy"].port) as c:
        r = c.request("GET", "/x?m=bodywatch502", host="bodywatch502.test")
    assert r.status == 502
    line = _log_line(env, "m=bodywatch502")
    assert f'body_bytes="{len(r.body)}"' in line and 'ended="yes"' in line
