"""Access log templates and the JSON format's fields through a real proxy:
named fields, the cache status of misses and hits, the proxy's own answers
counted in bytes, and a client's bytes escaped (one line per request,
valid JSON whatever it sent)."""

from __future__ import annotations

import json
import re
import socket

import pytest
from harness import Client
from ops_support import json_lines, wait_until

from edgeproxy._ext import ACCESS_LOG_CAPTURE
from edgeproxy.config import ConfigError, parse_config
from edgeproxy.server.accesslog import AccessLog

FIELDS = ("{time_iso} {client_ip} {host} {method} {target} {status} {bytes_sent} "
          "{body_bytes_sent} {duration_ms} {route} {backend} {cache} {request_id} {scheme} "
          "{protocol} {listener} [{user_agent}] [{referer}]")


def logged_proxy(proxy_factory, tmp_path, origin, fmt: str):
    log_path = tmp_path / "access.log"
    body = f"""
[[route]]
host = "example.test"
pool = "web"

[[route]]
host = "cached.test"
pool = "web"
cache = true

[pool.web]
backends = ["{origin.url}"]

[cache]
path = "{tmp_path / 'cache'}"
max_size = "16MiB"
max_object = "1MiB"

[log]
access_log = "{log_path}"
access_format = {json.dumps(fmt)}
"""
    return proxy_factory(body), log_path


def lines_of(path, n):
    return wait_until(lambda: path.exists() and len(path.read_text().splitlines()) >= n
                      and path.read_text().splitlines(), what=f"{n} log lines")


def raw(port: int, data: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(data)
        out = b""
        while b"\r\n\r\n" not in out:
            out += s.recv(65536)
        return out


def test_a_template_prints_the_named_fields(proxy_factory, tmp_path, origin):
    proxy, log_path = logged_proxy(proxy_factory, tmp_path, origin, FIELDS)
    with Client(proxy.port) as c:
        r = c.request("GET", "/size/7?q=1", headers={"User-Agent": "t/1", "Referer": "http://r/",
                                                      "X-Request-Id": "rid-1"})
        assert r.status == 200
        r = c.request("GET", "/x", host="nowhere.test")        # no route: the proxy's 404
        assert r.status == 404
        not_found_body = len(r.body)
    target = "/cache/t?cc=max-age%3D60"
    for _ in range(3):          # a miss, then hits (the Python phase's, the hot index's)
        with Client(proxy.port) as c:
            assert c.request("GET", target, host="cached.test").status == 200
    lines = lines_of(log_path, 5)
    ok, nf, miss, hit, hit2 = lines
    f = ok.split(" ")
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d[+-]\d\d:\d\d", f[0]), f[0]
    assert f[1:6] == ["127.0.0.1", "example.test", "GET", "/size/7?q=1", "200"]
    assert int(f[6]) > int(f[7]) == 7                         # head and body / body
    assert float(f[8]) >= 0
    assert f[9:13] == ["example.test/", f"127.0.0.1:{origin.port}", "-", "rid-1"]
    assert f[13:16] == ["http", "HTTP/1.1", f"127.0.0.1:{proxy.port}"]
    assert ok.endswith("[t/1] [http://r/]")
    n = nf.split(" ")
    assert n[2:6] == ["nowhere.test", "GET", "/x", "404"]
    assert int(n[7]) == not_found_body > 0                    # its body length, not 0
    assert n[9:11] == ["-", "-"]                              # no route, no backend
    assert re.fullmatch(r"fwd=[a-z-]*miss;fwd-status=200;stored", miss.split(" ")[11]), miss
    assert hit.split(" ")[11].startswith("hit;ttl="), hit
    assert hit2.split(" ")[11].startswith("hit;ttl="), hit2
    assert miss.split(" ")[9] == "cached.test/"


def test_client_bytes_are_escaped(proxy_factory, tmp_path, origin):
    proxy, log_path = logged_proxy(proxy_factory, tmp_path, origin,
                                   "{status} [{user_agent}] [{referer}] {host}")
    ua = b'a\tb\xff"c\\d'
    raw(proxy.port, b"GET /size/1 HTTP/1.1\r\nHost: example.test\r\nUser-Agent: " + ua
        + b"\r\nReferer: \x80x\r\n\r\n")
    line, = lines_of(log_path, 1)
    assert line == '200 [a\\x09b\\xff\\"c\\\\d] [\\x80x] example.test', line
    assert log_path.read_bytes().count(b"\n") == 1


def test_json_carries_host_scheme_route_listener(proxy_factory, tmp_path, origin):
    proxy, log_path = logged_proxy(proxy_factory, tmp_path, origin, "json")
    raw(proxy.port, b"GET /size/3 HTTP/1.1\r\nHost: example.test\r\nUser-Agent: \xff\t\"\r\n\r\n")
    with Client(proxy.port) as c:
        r = c.request("GET", "/nope", host="nowhere.test")
        assert r.status == 404
    wait_until(lambda: len(json_lines(log_path)) == 2, what="two lines")
    # each line parses: valid JSON (the order is the order the requests ended in)
    first, nf = sorted(json_lines(log_path), key=lambda ln: ln["status"])
    assert first["host"] == "example.test" and first["scheme"] == "http"
    assert first["route"] == "example.test/" and first["listener"] == f"127.0.0.1:{proxy.port}"
    assert first["agent"] == "\xff\t\"" and first["bytes"] == 3
    assert nf["status"] == 404 and nf["bytes"] == len(r.body) > 0 and nf["route"] == "-"


def test_templates_are_checked_at_load():
    base = ('[[listen]]\nbind = "127.0.0.1:0"\n[[route]]\npool = "p"\n'
            '[pool.p]\nbackends = ["http://127.0.0.1:1"]\n[log]\n')
    ok = parse_config(base + 'access_format = "{client_ip} {{literal}} {status}"\n')
    assert ok.log.access_format == "{client_ip} {{literal}} {status}"
    for fmt, words in (('"{client_ip} {stauts}"', "unknown field {stauts} (did you mean {status}?)"),
                       ('"{status:>5}"', "no format spec"),
                       ('"{status"', "unbalanced braces"),
                       ('"apache"', 'is not "combined", "json" or a template')):
        with pytest.raises(ConfigError) as e:
            parse_config(base + f"access_format = {fmt}\n")
        assert any(err.startswith("log.access_format:") and words in err
                   for err in e.value.errors), e.value.errors


def test_only_what_the_format_prints_is_captured(tmp_path):
    cap = ACCESS_LOG_CAPTURE
    log = AccessLog(str(tmp_path / "a.log"), "{status} {duration_ms} {backend}")
    assert log.fields == 0                         # nothing of the request head is kept
    log = AccessLog(str(tmp_path / "b.log"), "{user_agent} {method}")
    assert log.fields == cap["agent"] | cap["line"]
    log = AccessLog(str(tmp_path / "c.log"), "combined")
    assert log.fields == cap["line"] | cap["referer"] | cap["agent"] | cap["cache"]
    assert not log.fields & cap["host"]
    assert AccessLog(str(tmp_path / "d.log"), "json").fields & cap["host"]
    # a direct caller (hooks' tests, tools) keeps the old signature working
    log = AccessLog(str(tmp_path / "e.log"), "{request} {status} {cache} {route}")
    log.log(b"1.2.3.4", b"GET / HTTP/1.1", 200, 5, 0.01, b"-", b"ua", "b:1", b"-", "hit")
    log.close()
    assert (tmp_path / "e.log").read_text() == "GET / HTTP/1.1 200 hit -\n"
