"""Allow/deny lists by CIDR (IPv4 and IPv6), per route and per listener,
first match wins, 403 and counted: over real sockets on 127.0.0.1 and ::1,
and the matcher itself (ext/limits.pyx AccessList)."""

from __future__ import annotations

import re
import socket

import pytest
from harness import Client, free_port, start_proxy
from ops_support import metrics, start

from edgeproxy import _ext
from edgeproxy.config.model import AccessRule
from edgeproxy.limits.rules import compile_access, parse_access_rule


def acl(*lines: str) -> _ext.AccessList:
    return _ext.AccessList(compile_access([AccessRule(*parse_access_rule(x), x) for x in lines]))


def test_first_match_wins_ipv4_and_ipv6():
    a = acl("deny 10.1.0.0/16", "allow 10.0.0.0/8", "allow 2001:db8::/32", "deny all")
    assert a.allows("10.2.3.4")
    assert not a.allows("10.1.3.4")           # the earlier deny wins
    assert not a.allows("11.0.0.1")
    assert a.allows("2001:db8:ffff::1")
    assert not a.allows("2001:db9::1")
    assert a.allows("::ffff:10.9.9.9")        # IPv4-mapped IPv6 is the IPv4 address
    assert not a.allows("-")                  # no address (a Unix socket): only "all" matches
    # odd prefix lengths, and no rule matching allows (as nginx)
    b = acl("deny 192.168.1.128/25", "deny fe80::/10")
    assert not b.allows("192.168.1.200") and b.allows("192.168.1.127")
    assert not b.allows("febf::1") and b.allows("fec0::1")
    assert b.allows("8.8.8.8")


def routes(origin_url: str) -> str:
    return ('[[route]]\npath = "/admin/"\npool = "web"\n'
            'access = ["allow 10.0.0.0/8", "allow 2001:db8::/32", "deny all"]\n\n'
            '[[route]]\npath = "/local/"\npool = "web"\naccess = ["allow 127.0.0.0/8", "deny all"]\n\n')


def test_route_access_403_keeps_the_connection_and_counts(origin, proxy_factory, tmp_path):
    p, admin = start(proxy_factory, tmp_path, origin.url, admin=True,
                     extra=routes(origin.url))
    with Client(p.port) as c:
        r = c.request("GET", "/admin/x")
        assert r.status == 403 and r.body == b"403 Forbidden\n"
        assert c.request("GET", "/local/size/1").status == 404   # allowed: the origin's answer
        assert c.request("GET", "/size/2").status == 200          # no list on "/"
        assert c.request("POST", "/admin/x", body=b"abc").status == 403
        assert c.is_closed()                                     # a body: closed after the 403
    assert not any(s.target.startswith("/admin") for s in origin.requests)
    m = metrics(admin)
    assert m['edgeproxy_access_denied_total{list="route /admin/"}'] == 2
    assert m['edgeproxy_access_denied_total{list="route /local/"}'] == 0
    assert m['edgeproxy_requests_total{route="/admin/",pool="web",code="4xx"}'] == 2


def test_listener_access_answers_403_before_routing(origin, proxy_factory):
    body = (f'[[route]]\npath = "/"\npool = "web"\n\n[pool.web]\nbackends = ["{origin.url}"]\n')
    p = proxy_factory(body, listen_lines=['access = ["deny 127.0.0.1", "allow all"]',
                                          'access = ["allow 127.0.0.0/8", "deny all"]'])
    with Client(p.ports[0]) as c:
        assert c.request("GET", "/size/1").status == 403
        assert c.request("GET", "/nowhere").status == 403      # before routing: not a 404
    with Client(p.ports[1]) as c:
        assert c.request("GET", "/size/1").status == 200
    assert len(origin.requests) == 1


def _has_ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


@pytest.mark.skipif(not _has_ipv6_loopback(), reason="no ::1")
def test_ipv6_clients_match_ipv6_rules(origin, proxy_factory, tmp_path):
    port6 = free_port()
    body = (f'[[listen]]\nbind = "[::1]:{port6}"\n\n' + routes(origin.url)
            + f'[[route]]\npath = "/six/"\npool = "web"\naccess = ["allow ::1/128", "deny all"]\n\n'
            f'[pool.web]\nbackends = ["{origin.url}"]\n')
    p = start_proxy(tmp_path, body)
    try:
        s = socket.create_connection(("::1", port6), timeout=5)
        s.sendall(b"GET /six/size/1 HTTP/1.1\r\nHost: a\r\n\r\n"
                  b"GET /local/size/1 HTTP/1.1\r\nHost: a\r\n\r\n"
                  b"GET /admin/ HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
        data = b""
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
        s.close()
        statuses = [int(x) for x in re.findall(rb"HTTP/1\.1 (\d{3}) ", data)]
        # ::1 is allowed on /six/, not an IPv4 loopback on /local/, not in 2001:db8::/32
        assert statuses == [404, 403, 403], data[:500]
        with Client(p.port) as c:           # the IPv4 listener: 127.0.0.1 is not ::1
            assert c.request("GET", "/six/size/1").status == 403
    finally:
        p.stop()
