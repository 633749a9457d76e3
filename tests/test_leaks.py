"""Live-object counters return to zero: after traffic that ends in every way
the data plane knows (done, refused, backend reset, backend timeout, client
gone mid-response, upgraded tunnel), no client connection, in-flight
request or busy backend connection is left behind."""

from __future__ import annotations

import socket

from harness import Client, raw_exchange
from ops_support import metrics, start, wait_until


def _gauge(m, name):
    return sum(v for k, v in m.items() if k == name or k.startswith(name + "{"))


def test_counters_return_to_zero(proxy_factory, tmp_path, origin):
    proxy, admin_port = start(proxy_factory, tmp_path, origin.url, admin=True,
                              extra="[timeout]\nread = 1.0\nheader = 1.0\nkeepalive = 1.0\n")
    with Client(proxy.port) as c:
        for i in range(20):
            assert c.request("GET", f"/size/{i}").status == 200
        assert c.request("POST", "/echo", body=b"x" * 100000).status == 200
        assert c.request("GET", "/reset").status == 502
        assert c.request("GET", "/hang").status == 504
    raw_exchange(proxy.port, b"GET / HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\n"
                             b"Transfer-Encoding: chunked\r\n\r\n")          # refused
    with socket.create_connection(("127.0.0.1", proxy.port)) as s:            # client gone
        s.sendall(b"GET /big/50000000 HTTP/1.1\r\nHost: a\r\n\r\n")
        s.recv(65536)
    with Client(proxy.port) as ws:                                            # a tunnel
        ws.send(b"GET /ws HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n")
        assert ws.read_response().status == 101
        ws.send(b"ping")
        assert ws._read_exact(9) == b"echo:ping"
    with socket.create_connection(("127.0.0.1", proxy.port)) as s:            # half a head
        s.sendall(b"GET / HTTP/1.1\r\nHo")

    def settled():
        m = metrics(admin_port)
        return (_gauge(m, "edgeproxy_client_connections") == 0
                and _gauge(m, "edgeproxy_backend_active_requests") == 0
                and _gauge(m, "edgeproxy_upstream_connections")
                == _gauge(m, "edgeproxy_upstream_idle_connections")) and m
    m = wait_until(settled, timeout=15, what="counters back to zero")
    assert _gauge(m, "edgeproxy_client_connections_accepted_total") >= 5   # the ones above
