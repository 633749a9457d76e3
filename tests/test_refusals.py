"""Hostile and malformed requests through a real proxy: each is refused with
its status, the connection is closed, and the origin sees nothing."""

from __future__ import annotations

import pytest
from harness import raw_exchange, simple_config

H = b"Host: a\r\n"

REFUSED = [
    # framing ambiguity (request smuggling)
    ("cl-and-te", b"POST / HTTP/1.1\r\n" + H + b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 400),
    ("te-and-cl", b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n0\r\n\r\n", 400),
    ("two-cl-differ", b"POST / HTTP/1.1\r\n" + H + b"Content-Length: 5\r\nContent-Length: 6\r\n\r\nhello!", 400),
    ("cl-list-differ", b"POST / HTTP/1.1\r\n" + H + b"Content-Length: 5, 6\r\n\r\nhello!", 400),
    ("cl-plus", b"POST / HTTP/1.1\r\n" + H + b"Content-Length: +5\r\n\r\nhello", 400),
    ("cl-hex", b"POST / HTTP/1.1\r\n" + H + b"Content-Length: 0x5\r\n\r\nhello", 400),
    ("cl-negative", b"POST / HTTP/1.1\r\n" + H + b"Content-Length: -1\r\n\r\n", 400),
    ("cl-space-inside", b"POST / HTTP/1.1\r\n" + H + b"Content-Length: 1 0\r\n\r\n", 400),
    ("cl-empty", b"POST / HTTP/1.1\r\n" + H + b"Content-Length:\r\n\r\n", 400),
    ("cl-huge", b"POST / HTTP/1.1\r\n" + H + b"Content-Length: 99999999999999999999\r\n\r\n", 400),
    ("te-gzip-chunked", b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n", 400),
    ("te-chunked-gzip", b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked, gzip\r\n\r\n0\r\n\r\n", 400),
    ("te-identity", b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: identity\r\n\r\n", 400),
    ("te-twice", b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 400),
    ("te-xchunked", b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: xchunked\r\n\r\n0\r\n\r\n", 400),
    ("te-http10", b"POST / HTTP/1.0\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 400),
    ("te-space-before-colon", b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding : chunked\r\n\r\n0\r\n\r\n", 400),
    ("te-obs-fold", b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding:\r\n chunked\r\n\r\n0\r\n\r\n", 400),
    ("te-vertical-tab", b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: \x0bchunked\r\n\r\n0\r\n\r\n", 400),
    # field syntax
    ("obs-fold", b"GET / HTTP/1.1\r\n" + H + b"X-A: 1\r\n  continued\r\n\r\n", 400),
    ("obs-fold-tab", b"GET / HTTP/1.1\r\n" + H + b"X-A: 1\r\n\tcontinued\r\n\r\n", 400),
    ("space-before-colon", b"GET / HTTP/1.1\r\n" + H + b"X-A : 1\r\n\r\n", 400),
    ("tab-before-colon", b"GET / HTTP/1.1\r\n" + H + b"X-A\t: 1\r\n\r\n", 400),
    ("bad-name-char", b"GET / HTTP/1.1\r\n" + H + b"X(A): 1\r\n\r\n", 400),
    ("empty-name", b"GET / HTTP/1.1\r\n" + H + b": 1\r\n\r\n", 400),
    ("ctl-in-value", b"GET / HTTP/1.1\r\n" + H + b"X-A: a\x01b\r\n\r\n", 400),
    ("nul-in-value", b"GET / HTTP/1.1\r\n" + H + b"X-A: a\x00b\r\n\r\n", 400),
    ("bare-cr-in-value", b"GET / HTTP/1.1\r\n" + H + b"X-A: a\rb\r\n\r\n", 400),
    ("bare-lf-line", b"GET / HTTP/1.1\r\n" + H + b"X-A: 1\n\r\n", 400),
    ("space-first-field", b"GET / HTTP/1.1\r\n X-A: 1\r\n" + H + b"\r\n", 400),
    # request line
    ("two-spaces", b"GET  / HTTP/1.1\r\n" + H + b"\r\n", 400),
    ("tab-separator", b"GET\t/ HTTP/1.1\r\n" + H + b"\r\n", 400),
    ("trailing-space", b"GET / HTTP/1.1 \r\n" + H + b"\r\n", 400),
    ("no-version", b"GET /\r\n" + H + b"\r\n", 400),
    ("http2-version", b"GET / HTTP/2.0\r\n" + H + b"\r\n", 400),
    ("http12-version", b"GET / HTTP/1.2\r\n" + H + b"\r\n", 400),
    ("lowercase-version", b"GET / http/1.1\r\n" + H + b"\r\n", 400),
    ("bare-lf-request-line", b"GET / HTTP/1.1\n" + H + b"\r\n", 400),
    ("nul-in-target", b"GET /a\x00b HTTP/1.1\r\n" + H + b"\r\n", 400),
    ("non-ascii-target", b"GET /\xc3\xa9 HTTP/1.1\r\n" + H + b"\r\n", 400),
    ("bad-method", b"G(T / HTTP/1.1\r\n" + H + b"\r\n", 400),
    ("target-not-origin-form", b"GET foo HTTP/1.1\r\n" + H + b"\r\n", 400),
    ("asterisk-not-options", b"GET * HTTP/1.1\r\n" + H + b"\r\n", 400),
    ("connect", b"CONNECT a:443 HTTP/1.1\r\nHost: a:443\r\n\r\n", 405),
    # Host
    ("no-host", b"GET / HTTP/1.1\r\n\r\n", 400),
    ("two-hosts", b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", 400),
    ("host-with-space", b"GET / HTTP/1.1\r\nHost: a b\r\n\r\n", 400),
    ("host-with-slash", b"GET / HTTP/1.1\r\nHost: a/b\r\n\r\n", 400),
    ("host-with-at", b"GET / HTTP/1.1\r\nHost: user@a\r\n\r\n", 400),
    # chunked body syntax
    ("chunk-size-invalid", b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n", 400),
    ("chunk-size-overflow", b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n10000000000000000\r\nx\r\n0\r\n\r\n", 400),
    ("chunk-size-negative", b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n-5\r\nhello\r\n0\r\n\r\n", 400),
    ("chunk-missing-crlf", b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n5\r\nhelloX\r\n0\r\n\r\n", 400),
    ("chunk-bare-lf", b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n5\nhello\r\n0\r\n\r\n", 400),
    ("chunk-size-space", b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n5 \r\nhello\r\n0\r\n\r\n", 400),
    ("chunk-ext-ctl", b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n5;a\x01\r\nhello\r\n0\r\n\r\n", 400),
    ("chunk-bad-trailer", b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n0\r\nBad Trailer: x\r\n\r\n", 400),
    # expectations
    ("expect-unknown", b"POST / HTTP/1.1\r\n" + H + b"Expect: teapot\r\nContent-Length: 0\r\n\r\n", 417),
]


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    from harness import Origin, start_proxy
    o = Origin().start()
    p = start_proxy(tmp_path_factory.mktemp("refusals"), simple_config(
        o.url, '[limits]\nrequest_line = "1KiB"\nheader_size = "4KiB"\nheader_count = 20\n'
               'body_size = "1MiB"\n'))
    yield p, o
    p.stop()
    o.stop()


@pytest.mark.parametrize("name,data,status", REFUSED, ids=[c[0] for c in REFUSED])
@pytest.mark.parametrize("feed", ["whole", "split"])
def test_refused_and_unseen(shared, name, data, status, feed):
    proxy, origin = shared
    before = len(origin.requests)
    if feed == "whole":
        out = raw_exchange(proxy.port, data)
    else:
        import socket
        import time
        with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as s:
            try:
                for i in range(0, len(data), 7):     # in small pieces, with pauses
                    s.sendall(data[i:i + 7])
                    time.sleep(0.001)
                s.shutdown(socket.SHUT_WR)
            except OSError:
                pass       # refused before the end: the answer must still be readable
            out = b""
            while d := s.recv(65536):
                out += d
    assert out.startswith(b"HTTP/1.1 %d " % status), out[:80]
    assert b"Connection: close" in out.split(b"\r\n\r\n")[0]
    if name.startswith("chunk-"):
        # the head was valid, so the request started; the backend must not
        # have seen a complete request (it is cut before its body ends)
        assert all(r.body == b"" for r in origin.requests[before:])
    else:
        assert len(origin.requests) == before


LIMITS = [
    ("request-line-414", b"GET /" + b"a" * 2000 + b" HTTP/1.1\r\n" + H + b"\r\n", 414),
    ("request-line-414-incomplete", b"GET /" + b"a" * 2000, 414),
    ("header-block-431", b"GET / HTTP/1.1\r\n" + H + b"X-A: " + b"b" * 5000 + b"\r\n\r\n", 431),
    ("header-block-431-incomplete", b"GET / HTTP/1.1\r\n" + H + b"X-A: " + b"b" * 5000, 431),
    ("header-count-431", b"GET / HTTP/1.1\r\n" + H + b"".join(b"X-%d: 1\r\n" % i for i in range(25)) + b"\r\n", 431),
    ("body-413", b"POST / HTTP/1.1\r\n" + H + b"Content-Length: 2000000\r\n\r\n", 413),
]


@pytest.mark.parametrize("name,data,status", LIMITS, ids=[c[0] for c in LIMITS])
def test_limits(shared, name, data, status):
    proxy, origin = shared
    before = len(origin.requests)
    out = raw_exchange(proxy.port, data)
    assert out.startswith(b"HTTP/1.1 %d " % status), out[:80]
    assert len(origin.requests) == before


def test_chunked_body_over_limit_is_cut(shared):
    proxy, origin = shared
    chunk = b"%x\r\n%s\r\n" % (65536, b"q" * 65536)
    data = (b"POST /echo HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n" + chunk * 20
            + b"0\r\n\r\n")
    out = raw_exchange(proxy.port, data)
    assert out.startswith(b"HTTP/1.1 413 ") or out == b""
    assert not any(len(r.body) >= 20 * 65536 for r in origin.requests)


def test_leading_empty_lines_are_ignored(shared):
    proxy, origin = shared
    out = raw_exchange(proxy.port, b"\r\n\r\nGET /size/3 HTTP/1.1\r\n" + H + b"Connection: close\r\n\r\n")
    assert out.startswith(b"HTTP/1.1 200 ") and out.endswith(b"xxx")


def test_request_after_refusal_on_same_connection_is_not_forwarded(shared):
    """A smuggled second request hidden behind a refused first one never
    reaches the backend."""
    proxy, origin = shared
    before = len(origin.requests)
    out = raw_exchange(proxy.port, b"POST / HTTP/1.1\r\n" + H + b"Content-Length: 4\r\n"
                       b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /size/1 HTTP/1.1\r\n" + H + b"\r\n")
    assert out.count(b"HTTP/1.1") == 1 and out.startswith(b"HTTP/1.1 400")
    assert len(origin.requests) == before


def test_every_byte_value_in_a_field_value(shared):
    """Fuzz-style sweep: each byte value inside a field value is either
    refused with 400 or forwarded unchanged; the proxy never dies."""
    proxy, origin = shared
    for b in range(256):
        v = b"a" + bytes([b]) + b"z"
        out = raw_exchange(proxy.port, b"GET /echo HTTP/1.1\r\n" + H + b"X-V: " + v + b"\r\nConnection: close\r\n\r\n")
        ok = b == 9 or b == 32 or 0x21 <= b <= 0x7e or b >= 0x80
        if ok:
            assert out.startswith(b"HTTP/1.1 200"), (b, out[:60])
            assert origin.raw_heads[-1].count(b"X-V: " + v + b"\r\n") == 1, b
        else:
            assert out.startswith(b"HTTP/1.1 400"), (b, out[:60])
    assert proxy.proc.poll() is None
