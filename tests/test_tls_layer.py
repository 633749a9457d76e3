"""The TLS layer of client connections (_ext.TLSServerConn) through a real
proxy process, on uvloop and on the standard asyncio loop: flow control both
ways, pipelining, the handshake deadline, TLS-level end of input, and input
that is not TLS at all (plain HTTP is answered 400, anything else dropped)."""

from __future__ import annotations

import json
import os
import socket
import ssl
import time

import pytest
from harness import Client, free_port, simple_config
from ops_support import _connectable, metrics, server_section, wait_until
from tlsutil import CA


@pytest.fixture(scope="module")
def ca():
    return CA()


@pytest.fixture(params=["uvloop", "asyncio"])
def tls_proxy(request, tmp_path, ca, origin, proxy_factory):
    cc = ca.issue("a.test").write(str(tmp_path), "site")
    listen = f'tls.certs = [{{ cert = "{cc.cert}", key = "{cc.key}" }}]\n'
    p = proxy_factory(simple_config(origin.url, "[timeout]\nheader = 1.0\n"),
                      listen_lines=[listen], env={"EDGEPROXY_LOOP": request.param})
    p.client_ctx = ssl.create_default_context(cadata=ca.pem().decode())
    return p


def _client(p, **kw) -> Client:
    return Client(p.port, ssl_context=p.client_ctx, server_name="a.test", **kw)


def _still_serves(p) -> None:
    with _client(p) as c:
        assert c.request("GET", "/size/5").body == b"xxxxx"


class MemClient:
    """A TLS client over memory BIOs, so a test can send exactly what it wants
    on the TCP connection before, during and after TLS."""

    def __init__(self, p):
        self.sock = socket.create_connection(("127.0.0.1", p.port), timeout=5)
        self.inc, self.out = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.tls = p.client_ctx.wrap_bio(self.inc, self.out, server_hostname="a.test")
        while True:
            try:
                self.tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                self._pump()
        self._send_out()

    def _send_out(self) -> None:
        if self.out.pending:
            self.sock.sendall(self.out.read())

    def _pump(self) -> bool:
        self._send_out()
        data = self.sock.recv(65536)
        if not data:
            return False
        self.inc.write(data)
        return True

    def read_until(self, marker: bytes, limit: float = 5.0) -> bytes:
        got = b""
        end = time.monotonic() + limit
        while marker not in got and time.monotonic() < end:
            try:
                got += self.tls.read(65536)
            except ssl.SSLWantReadError:
                if not self._pump():
                    break
            except ssl.SSLZeroReturnError:
                break
        return got

    def closed_by_peer(self, wait: float = 5.0) -> bool:
        self.sock.settimeout(wait)
        try:
            while self.sock.recv(65536):
                pass
            return True
        except ConnectionResetError:
            return True
        except TimeoutError:
            return False


def test_large_downloads_to_a_slow_reader(tls_proxy):
    """8 MiB bodies through a client that reads slowly, on one connection:
    the proxy pauses the backend instead of buffering, every body arrives
    whole, and the next request is answered. A response can end while the
    backend connection is paused; it must go back to the pool reading (the
    pool resumes it), or the next request on it would wait forever."""
    n = 8 << 20
    with _client(tls_proxy, timeout=10) as c:
        c.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16384)
        for _ in range(3):
            c.send(b"GET /big/%d HTTP/1.1\r\nHost: a.test\r\n\r\n" % n)
            head = c._read_until(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 200") and b"Content-Length: %d" % n in head
            got = 0
            while got < n:
                chunk = c._read_exact(min(1 << 20, n - got))
                assert chunk == b"B" * len(chunk)
                got += len(chunk)
                time.sleep(0.02)
            assert c.request("GET", "/size/3").body == b"xxx"


def test_large_upload(tls_proxy):
    body = os.urandom(5 << 20)
    with _client(tls_proxy, timeout=20) as c:
        r = c.request("POST", "/echo", body=body)
        assert r.status == 200 and json.loads(r.body)["body_len"] == len(body)


def test_pipelined_requests_in_one_write(tls_proxy):
    with _client(tls_proxy) as c:
        c.send(b"".join(b"GET /size/%d HTTP/1.1\r\nHost: a.test\r\n\r\n" % i for i in (1, 2, 3)))
        assert [c.read_response().body for _ in range(3)] == [b"x", b"xx", b"xxx"]


def test_pipelined_requests_in_separate_records(tls_proxy):
    """Three records in one TCP write, a request each: every record is
    decrypted (none left behind in OpenSSL or the BIO) and answered in order."""
    mc = MemClient(tls_proxy)
    for i in (1, 2, 3):
        mc.tls.write(b"GET /size/%d HTTP/1.1\r\nHost: a.test\r\n\r\n" % i)
    mc._send_out()
    got = mc.read_until(b"xxx")
    assert got.count(b"HTTP/1.1 200") == 3 and got.endswith(b"\r\n\r\nxxx")


@pytest.mark.parametrize("sent", [b"", b"\x16\x03\x01\x02\x00\x01"], ids=["nothing", "partial-hello"])
def test_handshake_deadline(tls_proxy, sent):
    """A connection that does not finish its handshake within timeout.header
    (1 s here) is dropped; others are served meanwhile."""
    with socket.create_connection(("127.0.0.1", tls_proxy.port), timeout=10) as s:
        s.sendall(sent)
        t = time.monotonic()
        _still_serves(tls_proxy)
        try:
            assert s.recv(100) == b""
        except ConnectionResetError:
            pass
        assert 0.5 < time.monotonic() - t < 8


def test_close_notify_after_request_still_gets_the_response(tls_proxy):
    """The client ends its side with close_notify right after a request:
    the response still comes, as with a TCP half-close on plain HTTP."""
    mc = MemClient(tls_proxy)
    mc.tls.write(b"GET /slow/0.3 HTTP/1.1\r\nHost: a.test\r\n\r\n")
    try:
        mc.tls.unwrap()
    except ssl.SSLWantReadError:
        pass                            # the server's close_notify has not come yet
    mc._send_out()
    got = mc.read_until(b"slow")
    assert got.startswith(b"HTTP/1.1 200") and got.endswith(b"slow")
    assert mc.closed_by_peer()


def _exchange_until_closed(port: int, first: bytes, then: bytes = b"") -> bytes:
    got = b""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(first)
        if then:
            time.sleep(0.3)            # the rest of the request comes after the answer
            s.sendall(then)
        s.settimeout(5)
        try:
            while data := s.recv(4096):
                got += data
        except ConnectionResetError:
            pass
    return got


@pytest.mark.parametrize("junk", [
    b"\x16\x03\x01\x00\x05\x01\x00\x00\x01\x00",          # a malformed ClientHello
    b"hello there\r\n\r\n",
    b"\x00" + os.urandom(3000),
], ids=["bad-hello", "text", "random"])
def test_not_tls_is_dropped(tls_proxy, junk):
    got = _exchange_until_closed(tls_proxy.port, junk)
    assert not got.startswith(b"HTTP/"), got     # an alert at most, then the end
    _still_serves(tls_proxy)


@pytest.mark.parametrize("first,then", [
    (b"GET / HTTP/1.1\r\nHost: a.test\r\n\r\n", b""),
    (b"DELETE /x HTTP/1.1\r\nHost: a.test\r\n\r\n", b""),    # a method OpenSSL does not spot
    (b"OPTIONS * HTTP/1.1\r\nHost: a.test\r\n\r\n", b""),
    (b"POST /up HTTP/1.1\r\nHost: a.test\r\nContent-Length: 100000\r\n\r\n", b"x" * 100000),
], ids=["get", "delete", "options", "post-body-after"])
def test_plain_http_to_the_tls_port_is_answered_400(tls_proxy, first, then):
    """As nginx does: a connection that starts with an HTTP request instead
    of a ClientHello gets a plain-text 400 saying so, then the close; a
    body that follows the answer does not reset it away."""
    got = _exchange_until_closed(tls_proxy.port, first, then)
    head, _, body = got.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400 Bad Request\r\n"), got[:200]
    assert b"\r\nConnection: close" in head
    assert body == b"400 The plain HTTP request was sent to HTTPS port\n"
    _still_serves(tls_proxy)


def test_garbage_after_the_handshake_is_dropped(tls_proxy):
    mc = MemClient(tls_proxy)
    mc.tls.write(b"GET /size/2 HTTP/1.1\r\nHost: a.test\r\n\r\n")
    mc._send_out()
    assert mc.read_until(b"xx").endswith(b"xx")
    mc.sock.sendall(b"\x17\x03\x03\x00\x20" + os.urandom(32))   # a record that fails to decrypt
    assert mc.closed_by_peer()
    _still_serves(tls_proxy)


def test_failed_handshakes_are_counted(tmp_path, ca, origin, proxy_factory):
    """edgeproxy_tls_handshake_failures_total counts handshakes that fail or
    time out, and not the ones that succeed."""
    cc = ca.issue("a.test").write(str(tmp_path), "site")
    admin_port = free_port()
    body = (server_section(tmp_path, admin_port=admin_port, extra="")
            + simple_config(origin.url, "[timeout]\nheader = 1.0\n"))
    p = proxy_factory(body, listen_lines=[f'tls.certs = [{{ cert = "{cc.cert}", key = "{cc.key}" }}]\n'])
    p.client_ctx = ssl.create_default_context(cadata=ca.pem().decode())
    name = "edgeproxy_tls_handshake_failures_total"
    wait_until(lambda: _connectable(admin_port), what="admin listener")
    assert metrics(admin_port)[name] == 0
    _still_serves(p)
    with socket.create_connection(("127.0.0.1", p.port), timeout=5) as s:
        s.sendall(b"GET / HTTP/1.1\r\nHost: a.test\r\n\r\n")           # not TLS
        try:
            while s.recv(4096):        # an alert at most, then the end
                pass
        except ConnectionResetError:
            pass
    idle = socket.create_connection(("127.0.0.1", p.port), timeout=5)   # times out
    try:
        wait_until(lambda: metrics(admin_port).get(name) == 2, timeout=10, what="2 failures")
    finally:
        idle.close()
    _still_serves(p)
    assert metrics(admin_port)[name] == 2


def test_upgraded_connection_over_tls(tls_proxy):
    """A WebSocket upgrade through the TLS layer: after the 101 the bytes
    go both ways through it (the origin echoes each read it gets, prefixed
    with "echo:"), and the connection is served again afterwards."""
    with _client(tls_proxy) as c:
        c.send(b"GET /ws HTTP/1.1\r\nHost: a.test\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n")
        assert c._read_until(b"\r\n\r\n").startswith(b"HTTP/1.1 101")
        for msg in (b"one", b"two" * 20000):
            c.send(msg)
            got = b""
            while got.replace(b"echo:", b"") != msg:
                assert len(got.replace(b"echo:", b"")) < len(msg), got[:100]
                if not c._fill():
                    raise AssertionError("tunnel closed")
                got, c.buf = got + c.buf, b""
            assert got.startswith(b"echo:")
    _still_serves(tls_proxy)
