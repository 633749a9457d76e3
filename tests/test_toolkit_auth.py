"""Basic auth (issue 15 item 4) in real proxy processes: htpasswd entries
in bcrypt and SHA-crypt checked off the event loop while the request is
held, 401 with the challenge, the credentials not forwarded unless asked,
the file re-read on reload, and the loader's refusals naming the line."""

from __future__ import annotations

import base64
import signal
import time

import bcrypt
import pytest
from harness import Client
from passlib.hash import sha256_crypt, sha512_crypt

from edgeproxy.config import ConfigError, parse_config
from edgeproxy.toolkit.auth import Checker, read_htpasswd, verify

CHALLENGE = 'Basic realm="staff", charset="UTF-8"'


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def htpasswd_lines() -> str:
    # cost 4: the lowest, to keep the tests fast ($2y$ is what htpasswd -B writes)
    b = bcrypt.hashpw(b"alice-pw", bcrypt.gensalt(4)).decode().replace("$2b$", "$2y$", 1)
    return (f"# staff\nalice:{b}\n"
            f"bob:{sha512_crypt.using(rounds=5000).hash('bob-pw')}\n"
            f"carol:{sha256_crypt.using(rounds=5000).hash('cärol-pw')}\n")


@pytest.fixture
def users(tmp_path):
    f = tmp_path / "htpasswd"
    f.write_text(htpasswd_lines())
    return f


def auth_config(origin_url: str, forward: bool = False) -> str:
    return f'''
[timeout]
read = 3.0

[[route]]
path = "/"
pool = "web"
auth_basic = {{ realm = "staff", users = "htpasswd", forward = {str(forward).lower()} }}

[[route]]
path = "/public/"
pool = "web"

[pool.web]
backends = ["{origin_url}"]
'''


def test_challenge_and_each_kind_of_entry(origin, proxy_factory, users):
    p = proxy_factory(auth_config(origin.url))
    with Client(p.port) as c:
        r = c.request("GET", "/echo/")
        assert r.status == 401 and r.header("www-authenticate") == CHALLENGE
        assert not origin.requests
        for user, pw in (("alice", "alice-pw"), ("bob", "bob-pw"), ("carol", "cärol-pw")):
            r = c.request("GET", "/echo/" + user, {"Authorization": basic(user, pw)})
            assert r.status == 200, (user, r.status)
            seen = origin.requests[-1]
            assert seen.target == "/echo/" + user
            assert seen.header("authorization") is None     # not forwarded
        for auth in (basic("alice", "wrong"), basic("nobody", "alice-pw"), "Basic !!!",
                     "Bearer abc", basic("bob", "")):
            r = c.request("GET", "/echo/", {"Authorization": auth})
            assert r.status == 401 and r.header("www-authenticate") == CHALLENGE, auth
        # other routes are open
        assert c.request("GET", "/public/x").status == 404
    # two Authorization fields: refused
    with Client(p.port) as c:
        r = c.request("GET", "/echo/", {"Authorization": basic("alice", "alice-pw"),
                                        "authorization": basic("bob", "bob-pw")})
        assert r.status == 401


def test_forward_true_sends_the_credentials_on(origin, proxy_factory, users):
    p = proxy_factory(auth_config(origin.url, forward=True))
    with Client(p.port) as c:
        r = c.request("GET", "/echo/", {"Authorization": basic("alice", "alice-pw")})
        assert r.status == 200
        assert origin.requests[-1].header("authorization") == basic("alice", "alice-pw")


def test_held_request_keeps_its_body_and_pipelined_followers(origin, proxy_factory, users):
    p = proxy_factory(auth_config(origin.url))
    auth = basic("bob", "bob-pw")
    body = b"b" * 200_000
    with Client(p.port) as c:
        r = c.request("POST", "/echo/up", {"Authorization": auth}, body=body)
        assert r.status == 200 and r.json()["body_len"] == len(body)
        # a fresh check (a new password) with a request pipelined behind it
        c.send(f"GET /echo/1 HTTP/1.1\r\nHost: a\r\nAuthorization: {basic('alice', 'alice-pw')}"
               f"\r\n\r\nGET /echo/2 HTTP/1.1\r\nHost: a\r\nAuthorization: {auth}\r\n\r\n"
               .encode())
        first, second = c.read_response(), c.read_response()
        assert (first.status, second.status) == (200, 200)
        assert first.json()["target"] == "/echo/1" and second.json()["target"] == "/echo/2"
        # a wrong password with a body the proxy does not read: 401, then close
        c.send(f"POST /echo/ HTTP/1.1\r\nHost: a\r\nAuthorization: {basic('bob', 'no')}\r\n"
               f"Content-Length: 100000\r\n\r\n".encode() + b"x" * 1000)
        r = c.read_response()
        assert r.status == 401 and r.header("connection") == "close"


def test_reload_rereads_the_users_file(origin, proxy_factory, users):
    p = proxy_factory(auth_config(origin.url))
    dave = {"Authorization": basic("dave", "dave-pw")}
    assert Client(p.port).request("GET", "/echo/", dave).status == 401
    users.write_text(htpasswd_lines() + "dave:" + bcrypt.hashpw(b"dave-pw", bcrypt.gensalt(4)).decode() + "\n")
    p.proc.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 15
    status = 401
    while time.monotonic() < deadline and status != 200:
        time.sleep(0.2)
        status = Client(p.port).request("GET", "/echo/", dave).status
    assert status == 200


def test_successes_are_remembered_bounded():
    entries = read_htpasswd_from(htpasswd_lines())
    ch = Checker(entries, cache_size=2)
    good = basic("alice", "alice-pw").encode()
    assert ch.known(good) is False and ch.check(good) is True
    ch.remember(good)
    assert ch.known(good) is True
    assert ch.known(b"Basic !!!") is None and ch.known(b"Digest x") is None
    assert ch.check(basic("alice", "nope").encode()) is False
    assert ch.check(basic("ghost", "x").encode()) is False   # unknown: a dummy check, same cost
    for u, pw in (("bob", "bob-pw"), ("carol", "cärol-pw")):
        v = basic(u, pw).encode()
        assert ch.check(v)
        ch.remember(v)
    assert ch.known(good) is False      # the oldest went first
    assert len(ch._ok) == 2


def read_htpasswd_from(text: str, tmp=None):
    import os
    import tempfile

    fd, path = tempfile.mkstemp()
    try:
        os.write(fd, text.encode())
        os.close(fd)
        return read_htpasswd(path)
    finally:
        os.unlink(path)


def test_verify_takes_bcrypt_2a_2b_2y_and_long_passwords():
    pw = b"x" * 80                      # bcrypt uses the first 72 bytes, as htpasswd does
    h = bcrypt.hashpw(pw[:72], bcrypt.gensalt(4)).decode()
    for prefix in ("$2a$", "$2b$", "$2y$"):
        assert verify(pw, prefix + h[4:])
    assert not verify(b"y", h)


@pytest.mark.parametrize("line, message", [
    ("eve:$apr1$abc$defghijklmnopqrstuvwx", "line 2: user 'eve': apr1-MD5 hashes are weak"),
    ("eve:{SHA}W6ph5Mm5Pz8GgiULbPgzG37mj9g=", "line 2: user 'eve': unsalted SHA-1"),
    ("eve:plaintext", "line 2: user 'eve': not a bcrypt"),
    ("eve:abCDefGHijKLm", "line 2: user 'eve': not a bcrypt"),          # DES crypt
    ("no-colon-here", "line 2: not \"user:hash\""),
    ("alice:$2y$04$" + "a" * 53, "line 2: user 'alice' is also on line 1"),
    ("eve:$6$rounds=99999999$salt$" + "a" * 86, "rounds=99999999 is more than"),
])
def test_unsupported_htpasswd_entries_are_config_errors_naming_the_line(tmp_path, line, message):
    f = tmp_path / "htpasswd"
    f.write_text("alice:$2y$04$" + "b" * 53 + "\n" + line + "\n")
    text = f'''
[[listen]]
bind = "127.0.0.1:0"

[[route]]
path = "/"
pool = "web"
auth_basic = {{ realm = "staff", users = "{f}" }}

[pool.web]
backends = ["http://127.0.0.1:1"]
'''
    with pytest.raises(ConfigError) as exc:
        parse_config(text)
    assert any(e.startswith("route[0].auth_basic.users") and message in e
               for e in exc.value.errors), exc.value.errors


@pytest.mark.parametrize("value, message", [
    ('{ realm = "a\\"b", users = "h" }', "without quotes"),
    ('{ realm = "staff", users = "missing" }', "cannot be read"),
    ('{ realm = "staff" }', "expected an htpasswd file path"),
    ('{ realm = "staff", users = "h", forward = 1 }', "expected true or false"),
])
def test_bad_auth_basic_values(tmp_path, value, message):
    (tmp_path / "h").write_text("alice:$2y$04$" + "b" * 53 + "\n")
    text = f'''
[[listen]]
bind = "127.0.0.1:0"

[[route]]
path = "/"
pool = "web"
auth_basic = {value}

[pool.web]
backends = ["http://127.0.0.1:1"]
'''
    with pytest.raises(ConfigError) as exc:
        parse_config(text, source=str(tmp_path / "edgeproxy.toml"))
    assert any(e.startswith("route[0].auth_basic") and message in e
               for e in exc.value.errors), exc.value.errors


def test_toolkit_phases_on_a_route_with_hooks(origin, proxy_factory, users):
    """Python hooks first (one async), then auth (held for its check), the
    prefix stripped, the rules applied, the response hooks after."""
    p = proxy_factory(f'''
[timeout]
read = 3.0

[[route]]
path = "/app/"
pool = "web"
hooks = ["tests.phase_hooks:First", "tests.phase_hooks:AsyncThenSync"]
auth_basic = {{ realm = "staff", users = "htpasswd" }}
strip_prefix = true
request_headers = {{ set = {{ "X-Rule" = "{{route}}" }} }}
response_headers = {{ set = {{ "X-Frame-Options" = "DENY" }}, always = true }}

[pool.web]
backends = ["{origin.url}"]
''')
    with Client(p.port) as c:
        r = c.request("GET", "/app/echo/x")
        assert r.status == 401 and r.header("x-frame-options") == "DENY"
        for _ in range(2):          # a check, then a remembered success
            r = c.request("POST", "/app/echo/x", {"Authorization": basic("bob", "bob-pw")},
                          body=b"hello")
            assert r.status == 200 and r.json()["body_len"] == 5
            assert r.header("x-frame-options") == "DENY"
            assert r.header("x-resp-order") == "first"
            seen = origin.requests[-1]
            assert seen.target == "/echo/x"
            assert seen.header("x-order") == "first" and seen.header("x-async") == "done"
            assert seen.header("x-rule") == "/app/"
            assert seen.header("authorization") is None
