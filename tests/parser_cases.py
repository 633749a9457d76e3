"""Helpers and case tables shared by the parser tests (pure and compiled parsers).

The tests run once per implementation: `load_parser("py-parser")` is the pure
twin, `load_parser("c-parser")` is edgeproxy._ext, skipped when it is not built
unless EDGEPROXY_REQUIRE_EXT=1 (CI) makes that a failure.
"""
from __future__ import annotations

import importlib
import os
from types import ModuleType

import pytest

from edgeproxy.http import implementations

PARSER_IDS = ["py-parser", "c-parser"]

REQUEST_ATTRS = ("method", "target", "version", "headers", "head_length", "host",
                 "body", "content_length", "keep_alive", "expect_continue",
                 "upgrade", "connection_tokens")
RESPONSE_ATTRS = ("status", "reason", "version", "headers", "head_length", "body",
                  "content_length", "keep_alive", "upgrade")

# The contract's values, so the tables do not depend on either implementation.
BODY_NONE, BODY_LENGTH, BODY_CHUNKED, BODY_CLOSE = 0, 1, 2, 3


def load_parser(name: str) -> ModuleType:
    """The parser module for a test id; skips (or fails, in CI) when missing."""
    module = implementations()[name]
    if module is not None:
        return module
    try:
        importlib.import_module("edgeproxy._ext")
        reason = "edgeproxy._ext imported only on the second try"
    except ImportError as exc:
        reason = f"edgeproxy._ext cannot be imported: {exc}"
    if os.environ.get("EDGEPROXY_REQUIRE_EXT") == "1":
        pytest.fail(f"EDGEPROXY_REQUIRE_EXT=1 but {reason}")
    pytest.skip(reason)


def attrs(obj, names) -> dict:
    return {name: getattr(obj, name) for name in names}


def outcome(parse, data: bytes, **kwargs):
    """One comparable value for what parse does with data.

    ("none",) for incomplete, ("error", status) for a refusal, else
    ("head", attributes...).
    """
    parser_module = _module_of(parse)
    try:
        head = parse(data, **kwargs)
    except parser_module.HTTPError as exc:
        return ("error", exc.status)
    if head is None:
        return ("none",)
    names = REQUEST_ATTRS if hasattr(head, "method") else RESPONSE_ATTRS
    return ("head",) + tuple(getattr(head, name) for name in names)


def outcome_bytewise(parse, data: bytes, **kwargs):
    """The outcome of feeding data one more byte at a time, as a server does.

    Stops at the first prefix that gives a head or an error.
    """
    for end in range(1, len(data) + 1):
        result = outcome(parse, data[:end], **kwargs)
        if result[0] != "none":
            return result
    return ("none",)


def _module_of(function) -> ModuleType:
    return importlib.import_module(function.__module__)


def decode_chunked(parser, pieces_of_input, **kwargs):
    """Feed ChunkedDecoder the given pieces; (body, consumed, done) or ("error", status).

    Stops feeding once the decoder is done; `consumed` counts the bytes of
    all pieces it took.
    """
    decoder = parser.ChunkedDecoder(**kwargs)
    body = []
    consumed = 0
    try:
        for piece in pieces_of_input:
            if decoder.done:
                break
            data, used = decoder.feed(piece)
            body.extend(data)
            consumed += used
            assert used == len(piece) or decoder.done, "consumed short while not done"
    except parser.HTTPError as exc:
        return ("error", exc.status)
    return (b"".join(body), consumed, decoder.done)


def request(raw: bytes, **expected):
    """A valid-request case: raw head and the attributes it must parse to."""
    values = dict(method=b"GET", target=b"/", version=1, head_length=len(raw),
                  host=b"example.com", body=BODY_NONE, content_length=-1,
                  keep_alive=True, expect_continue=False, upgrade=False,
                  connection_tokens=[])
    values.update(expected)
    assert set(values) == set(REQUEST_ATTRS), set(REQUEST_ATTRS) ^ set(values)
    return raw, values


def response(raw: bytes, **expected):
    """A valid-response case: raw head and the attributes it must parse to."""
    values = dict(status=200, reason=b"OK", version=1, head_length=len(raw),
                  body=BODY_LENGTH, content_length=-1, keep_alive=True,
                  upgrade=False)
    values.update(expected)
    assert set(values) == set(RESPONSE_ATTRS), set(RESPONSE_ATTRS) ^ set(values)
    return raw, values


H = b"Host: example.com\r\n"

VALID_REQUESTS = {
    "simple-get": request(
        b"GET / HTTP/1.1\r\n" + H + b"\r\n",
        headers=[(b"Host", b"example.com")]),
    "post-length-ows-trimmed": request(
        b"POST /submit?a=1&b=%20 HTTP/1.1\r\nHost: example.com:8080\r\n"
        b"Content-Length: 5\r\nX-Custom:   spaced  value \t\r\nx-lower:v\r\n\r\n",
        method=b"POST", target=b"/submit?a=1&b=%20", host=b"example.com:8080",
        body=BODY_LENGTH, content_length=5,
        headers=[(b"Host", b"example.com:8080"), (b"Content-Length", b"5"),
                 (b"X-Custom", b"spaced  value"), (b"x-lower", b"v")]),
    "chunked": request(
        b"PUT /up HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n",
        method=b"PUT", target=b"/up", body=BODY_CHUNKED,
        headers=[(b"Host", b"example.com"), (b"Transfer-Encoding", b"chunked")]),
    "chunked-case-and-ows": request(
        b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding:  Chunked \r\n\r\n",
        method=b"POST", body=BODY_CHUNKED,
        headers=[(b"Host", b"example.com"), (b"Transfer-Encoding", b"Chunked")]),
    "chunked-leading-space": request(
        b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding:\t chunked\r\n\r\n",
        method=b"POST", body=BODY_CHUNKED,
        headers=[(b"Host", b"example.com"), (b"Transfer-Encoding", b"chunked")]),
    "length-list-equal": request(
        b"POST / HTTP/1.1\r\n" + H + b"Content-Length: 5, 5\r\nContent-Length: 5\r\n\r\n",
        method=b"POST", body=BODY_LENGTH, content_length=5,
        headers=[(b"Host", b"example.com"), (b"Content-Length", b"5, 5"),
                 (b"Content-Length", b"5")]),
    "length-zero": request(
        b"POST / HTTP/1.1\r\n" + H + b"Content-Length: 0\r\n\r\n",
        method=b"POST", body=BODY_LENGTH, content_length=0,
        headers=[(b"Host", b"example.com"), (b"Content-Length", b"0")]),
    "length-18-digits-leading-zeros": request(
        b"POST / HTTP/1.1\r\n" + H + b"Content-Length: 000000000000000007\r\n\r\n",
        method=b"POST", body=BODY_LENGTH, content_length=7,
        headers=[(b"Host", b"example.com"), (b"Content-Length", b"000000000000000007")]),
    "length-18-nines": request(
        b"POST / HTTP/1.1\r\n" + H + b"Content-Length: 999999999999999999\r\n\r\n",
        method=b"POST", body=BODY_LENGTH, content_length=999999999999999999,
        headers=[(b"Host", b"example.com"), (b"Content-Length", b"999999999999999999")]),
    "http10-no-host": request(
        b"GET /old HTTP/1.0\r\nUser-Agent: x\r\n\r\n",
        target=b"/old", version=0, host=None, keep_alive=False,
        headers=[(b"User-Agent", b"x")]),
    "http10-keep-alive": request(
        b"GET / HTTP/1.0\r\n" + H + b"Connection: Keep-Alive\r\n\r\n",
        version=0, keep_alive=True, connection_tokens=[b"keep-alive"],
        headers=[(b"Host", b"example.com"), (b"Connection", b"Keep-Alive")]),
    "http10-keep-alive-and-close": request(
        b"GET / HTTP/1.0\r\n" + H + b"Connection: keep-alive, close\r\n\r\n",
        version=0, keep_alive=False, connection_tokens=[b"keep-alive", b"close"],
        headers=[(b"Host", b"example.com"), (b"Connection", b"keep-alive, close")]),
    "connection-close": request(
        b"GET / HTTP/1.1\r\n" + H + b"Connection: close\r\n\r\n",
        keep_alive=False, connection_tokens=[b"close"],
        headers=[(b"Host", b"example.com"), (b"Connection", b"close")]),
    "connection-list-empty-elements": request(
        b"GET / HTTP/1.1\r\n" + H + b"Connection: , X-Foo ,,TE\r\nConnection: Close\r\n\r\n",
        keep_alive=False, connection_tokens=[b"x-foo", b"te", b"close"],
        headers=[(b"Host", b"example.com"), (b"Connection", b", X-Foo ,,TE"),
                 (b"Connection", b"Close")]),
    "upgrade": request(
        b"GET /chat HTTP/1.1\r\n" + H + b"Connection: Upgrade\r\nUpgrade: websocket\r\n\r\n",
        target=b"/chat", upgrade=True, connection_tokens=[b"upgrade"],
        headers=[(b"Host", b"example.com"), (b"Connection", b"Upgrade"),
                 (b"Upgrade", b"websocket")]),
    "upgrade-token-without-field": request(
        b"GET / HTTP/1.1\r\n" + H + b"Connection: upgrade\r\n\r\n",
        upgrade=False, connection_tokens=[b"upgrade"],
        headers=[(b"Host", b"example.com"), (b"Connection", b"upgrade")]),
    "upgrade-field-without-token": request(
        b"GET / HTTP/1.1\r\n" + H + b"Upgrade: websocket\r\n\r\n",
        upgrade=False,
        headers=[(b"Host", b"example.com"), (b"Upgrade", b"websocket")]),
    "expect-continue": request(
        b"POST / HTTP/1.1\r\n" + H + b"Expect: 100-Continue\r\nContent-Length: 3\r\n\r\n",
        method=b"POST", expect_continue=True, body=BODY_LENGTH, content_length=3,
        headers=[(b"Host", b"example.com"), (b"Expect", b"100-Continue"),
                 (b"Content-Length", b"3")]),
    "absolute-form": request(
        b"GET http://Example.COM:8080/p/q?x=1 HTTP/1.1\r\nHost: other.example\r\n\r\n",
        target=b"/p/q?x=1", host=b"Example.COM:8080",
        headers=[(b"Host", b"other.example")]),
    "absolute-form-https-upper-no-path": request(
        b"GET HTTPS://example.com HTTP/1.1\r\n" + H + b"\r\n",
        headers=[(b"Host", b"example.com")]),
    "absolute-form-query-only": request(
        b"GET http://example.com?q=1 HTTP/1.1\r\n" + H + b"\r\n",
        target=b"/?q=1", headers=[(b"Host", b"example.com")]),
    "absolute-form-http10-no-host": request(
        b"GET http://[::1]:8080/x HTTP/1.0\r\n\r\n",
        target=b"/x", version=0, host=b"[::1]:8080", keep_alive=False, headers=[]),
    "options-asterisk": request(
        b"OPTIONS * HTTP/1.1\r\n" + H + b"\r\n",
        method=b"OPTIONS", target=b"*", headers=[(b"Host", b"example.com")]),
    "leading-empty-lines": request(
        b"\r\n\r\nGET / HTTP/1.1\r\n" + H + b"\r\n",
        headers=[(b"Host", b"example.com")]),
    "empty-host": request(
        b"GET / HTTP/1.1\r\nHost:\r\n\r\n", host=b"", headers=[(b"Host", b"")]),
    "host-all-allowed-chars": request(
        b"GET / HTTP/1.1\r\nHost: aZ09-._~%20!$&'()*+,;=:8080\r\n\r\n",
        host=b"aZ09-._~%20!$&'()*+,;=:8080",
        headers=[(b"Host", b"aZ09-._~%20!$&'()*+,;=:8080")]),
    "host-ip-literal-port": request(
        b"GET / HTTP/1.1\r\nHost: [v1.x:y]:65535\r\n\r\n",
        host=b"[v1.x:y]:65535", headers=[(b"Host", b"[v1.x:y]:65535")]),
    # RFC 3986 3.2.3: port = *DIGIT, so an empty port is allowed (6.2.3: it
    # means the default one)
    "host-empty-port": request(
        b"GET / HTTP/1.1\r\nHost: example.com:\r\n\r\n",
        host=b"example.com:", headers=[(b"Host", b"example.com:")]),
    "host-port-leading-zeros": request(
        b"GET / HTTP/1.1\r\nHost: example.com:0000080\r\n\r\n",
        host=b"example.com:0000080", headers=[(b"Host", b"example.com:0000080")]),
    "lower-case-host-name-no-ows": request(
        b"GET / HTTP/1.1\r\nhOsT:example.com\r\n\r\n",
        headers=[(b"hOsT", b"example.com")]),
    "value-obs-text-tab-colon": request(
        b"GET / HTTP/1.1\r\n" + H
        + b"X-A: caf\xc3\xa9\tb:c\x80\xff\r\nX-Empty:\r\nX-Ows: \t \r\n\r\n",
        headers=[(b"Host", b"example.com"), (b"X-A", b"caf\xc3\xa9\tb:c\x80\xff"),
                 (b"X-Empty", b""), (b"X-Ows", b"")]),
    "tchar-method-and-names": request(
        b"M-SEARCH! /* HTTP/1.1\r\n" + H + b"!#$%&'*+-.^_`|~09aZ: 1\r\n\r\n",
        method=b"M-SEARCH!", target=b"/*",
        headers=[(b"Host", b"example.com"), (b"!#$%&'*+-.^_`|~09aZ", b"1")]),
    "target-all-vchar": request(
        b"GET /" + bytes(range(0x21, 0x7F)) + b" HTTP/1.1\r\n" + H + b"\r\n",
        target=b"/" + bytes(range(0x21, 0x7F)), headers=[(b"Host", b"example.com")]),
    # RFC 9110 §10.1.1: a 100-continue from HTTP/1.0 is ignored.
    "expect-continue-http10-ignored": request(
        b"POST / HTTP/1.0\r\nExpect: 100-continue\r\nContent-Length: 1\r\n\r\n",
        method=b"POST", version=0, host=None, keep_alive=False, body=BODY_LENGTH,
        content_length=1,
        headers=[(b"Expect", b"100-continue"), (b"Content-Length", b"1")]),
}

GET = b"GET / HTTP/1.1\r\n"

# (raw, status, parse_request keyword arguments)
BAD_REQUESTS = {
    # framing (RFC 9112 §6)
    "cl-and-te": (GET + H + b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n", 400),
    "te-and-cl": (GET + H + b"Transfer-Encoding: chunked\r\nContent-Length: 0\r\n\r\n", 400),
    "cl-differing-fields": (GET + H + b"Content-Length: 5\r\nContent-Length: 6\r\n\r\n", 400),
    "cl-list-differing": (GET + H + b"Content-Length: 5, 6\r\n\r\n", 400),
    "cl-plus": (GET + H + b"Content-Length: +5\r\n\r\n", 400),
    "cl-inner-space": (GET + H + b"Content-Length: 5 5\r\n\r\n", 400),
    "cl-hex": (GET + H + b"Content-Length: 0x5\r\n\r\n", 400),
    "cl-empty": (GET + H + b"Content-Length:\r\n\r\n", 400),
    "cl-negative": (GET + H + b"Content-Length: -1\r\n\r\n", 400),
    "cl-underscore": (GET + H + b"Content-Length: 1_0\r\n\r\n", 400),
    "cl-empty-element": (GET + H + b"Content-Length: 5,,5\r\n\r\n", 400),
    "cl-trailing-comma": (GET + H + b"Content-Length: 5,\r\n\r\n", 400),
    "cl-19-digits": (GET + H + b"Content-Length: 0000000000000000005\r\n\r\n", 400),
    "cl-unicode-digit": (GET + H + "Content-Length: \u0665\r\n\r\n".encode(), 400),
    "te-gzip-chunked": (GET + H + b"Transfer-Encoding: gzip, chunked\r\n\r\n", 400),
    "te-chunked-gzip": (GET + H + b"Transfer-Encoding: chunked, gzip\r\n\r\n", 400),
    "te-identity": (GET + H + b"Transfer-Encoding: identity\r\n\r\n", 400),
    "te-chunked-twice": (GET + H + b"Transfer-Encoding: chunked, chunked\r\n\r\n", 400),
    "te-two-fields": (GET + H + b"Transfer-Encoding: chunked\r\n"
                      b"Transfer-Encoding: chunked\r\n\r\n", 400),
    "te-with-params": (GET + H + b"Transfer-Encoding: chunked;q=1\r\n\r\n", 400),
    "te-empty": (GET + H + b"Transfer-Encoding:\r\n\r\n", 400),
    "te-http10": (b"POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n", 400),
    # field lines (RFC 9112 §5)
    "obs-fold": (GET + H + b"X-A: a\r\n b\r\n\r\n", 400),
    "obs-fold-tab": (GET + H + b"X-A: a\r\n\tb\r\n\r\n", 400),
    "space-before-first-field": (GET + b" Host: example.com\r\n\r\n", 400),
    "space-before-colon": (GET + b"Host : example.com\r\n\r\n", 400),
    "tab-before-colon": (GET + H + b"X-A\t: 1\r\n\r\n", 400),
    "name-paren": (GET + H + b"X(a): 1\r\n\r\n", 400),
    "name-at": (GET + H + b"X@a: 1\r\n\r\n", 400),
    "name-quote": (GET + H + b'"x": 1\r\n\r\n', 400),
    "name-slash": (GET + H + b"X/a: 1\r\n\r\n", 400),
    "name-obs-text": (GET + H + b"X\xe9: 1\r\n\r\n", 400),
    "name-empty": (GET + H + b": 1\r\n\r\n", 400),
    "no-colon": (GET + H + b"X-A 1\r\n\r\n", 400),
    "value-ctl": (GET + H + b"X-A: a\x01b\r\n\r\n", 400),
    "value-del": (GET + H + b"X-A: a\x7fb\r\n\r\n", 400),
    "value-nul": (GET + H + b"X-A: a\x00b\r\n\r\n", 400),
    "value-bare-cr": (GET + H + b"X-A: a\rb\r\n\r\n", 400),
    "value-vtab": (GET + H + b"X-A: a\x0bb\r\n\r\n", 400),
    "field-bare-lf": (GET + b"Host: example.com\nX: 1\r\n\r\n", 400),
    "head-end-bare-lf": (GET + H + b"\n", 400),
    "head-end-bare-lf-lf": (b"GET / HTTP/1.1\n\n", 400),
    # request line (RFC 9112 §3)
    "two-spaces-after-method": (b"GET  / HTTP/1.1\r\n" + H + b"\r\n", 400),
    "two-spaces-after-target": (b"GET /  HTTP/1.1\r\n" + H + b"\r\n", 400),
    "tab-separator": (b"GET\t/ HTTP/1.1\r\n" + H + b"\r\n", 400),
    "tab-before-version": (b"GET /\tHTTP/1.1\r\n" + H + b"\r\n", 400),
    "missing-version": (b"GET /\r\n" + H + b"\r\n", 400),
    "missing-target": (b"GET HTTP/1.1\r\n" + H + b"\r\n", 400),
    "method-only": (b"GET\r\n\r\n", 400),
    "empty-method": (b" / HTTP/1.1\r\n" + H + b"\r\n", 400),
    "http-2.0": (b"GET / HTTP/2.0\r\n" + H + b"\r\n", 400),
    "http-1.2": (b"GET / HTTP/1.2\r\n" + H + b"\r\n", 400),
    "http-0.9-style": (b"GET /\r\n\r\n", 400),
    "http-1.10": (b"GET / HTTP/1.10\r\n" + H + b"\r\n", 400),
    "lower-case-version": (b"GET / http/1.1\r\n" + H + b"\r\n", 400),
    "trailing-space": (b"GET / HTTP/1.1 \r\n" + H + b"\r\n", 400),
    "lf-only-request-line": (b"GET / HTTP/1.1\n" + H + b"\r\n", 400),
    "bare-cr-request-line": (b"GET / HTTP/1.1\r" + H + b"\r\n", 400),
    "bare-cr-in-target": (b"GET /a\rb HTTP/1.1\r\n" + H + b"\r\n", 400),
    "leading-bare-lf": (b"\nGET / HTTP/1.1\r\n" + H + b"\r\n", 400),
    "leading-bare-cr": (b"\rGET / HTTP/1.1\r\n" + H + b"\r\n", 400),
    "method-non-tchar": (b"GE(T / HTTP/1.1\r\n" + H + b"\r\n", 400),
    "method-with-slash": (b"GET/ / HTTP/1.1\r\n" + H + b"\r\n", 400),
    "nul-in-method": (b"G\x00T / HTTP/1.1\r\n" + H + b"\r\n", 400),
    "nul-in-target": (b"GET /a\x00b HTTP/1.1\r\n" + H + b"\r\n", 400),
    "obs-text-in-target": (b"GET /caf\xc3\xa9 HTTP/1.1\r\n" + H + b"\r\n", 400),
    "target-relative": (b"GET foo HTTP/1.1\r\n" + H + b"\r\n", 400),
    "target-ftp": (b"GET ftp://example.com/ HTTP/1.1\r\n" + H + b"\r\n", 400),
    "target-scheme-only": (b"GET http: HTTP/1.1\r\n" + H + b"\r\n", 400),
    "target-empty-authority": (b"GET http:///x HTTP/1.1\r\n" + H + b"\r\n", 400),
    "target-no-authority": (b"GET http:// HTTP/1.1\r\n" + H + b"\r\n", 400),
    "target-userinfo": (b"GET http://user@example.com/ HTTP/1.1\r\n" + H + b"\r\n", 400),
    "asterisk-not-options": (b"GET * HTTP/1.1\r\n" + H + b"\r\n", 400),
    "asterisk-with-path": (b"OPTIONS */x HTTP/1.1\r\n" + H + b"\r\n", 400),
    "connect-authority": (b"CONNECT example.com:443 HTTP/1.1\r\n" + H + b"\r\n", 405),
    "connect-origin-form": (b"CONNECT / HTTP/1.1\r\n" + H + b"\r\n", 405),
    # Host (RFC 9112 §3.2)
    "no-host-http11": (GET + b"X-A: 1\r\n\r\n", 400),
    "no-host-absolute-form-http11": (b"GET http://example.com/ HTTP/1.1\r\n\r\n", 400),
    "two-hosts": (GET + H + H + b"\r\n", 400),
    "two-hosts-http10": (b"GET / HTTP/1.0\r\n" + H + H + b"\r\n", 400),
    "host-space": (GET + b"Host: exa mple.com\r\n\r\n", 400),
    "host-slash": (GET + b"Host: example.com/x\r\n\r\n", 400),
    "host-at": (GET + b"Host: user@example.com\r\n\r\n", 400),
    "host-obs-text": (GET + b"Host: caf\xc3\xa9.example\r\n\r\n", 400),
    "host-quote": (GET + b'Host: "example.com"\r\n\r\n', 400),
    "host-port-too-big": (GET + b"Host: t:99999\r\n\r\n", 400),
    "host-port-65536": (GET + b"Host: t:65536\r\n\r\n", 400),
    "host-port-letters": (GET + b"Host: t:abc\r\n\r\n", 400),
    "host-port-two-colons": (GET + b"Host: t:80:81\r\n\r\n", 400),
    "host-port-huge": (GET + b"Host: t:" + b"9" * 5000 + b"\r\n\r\n", 400),
    "host-bracket-in-name": (GET + b"Host: a[b]\r\n\r\n", 400),
    "host-ip-literal-unclosed": (GET + b"Host: [::1\r\n\r\n", 400),
    "host-ip-literal-then-name": (GET + b"Host: [::1]x\r\n\r\n", 400),
    "host-ip-literal-nested": (GET + b"Host: [[::1]]\r\n\r\n", 400),
    "authority-port-too-big": (b"GET http://t:99999/ HTTP/1.1\r\n" + H + b"\r\n", 400),
    "authority-port-letters": (b"GET http://t:abc HTTP/1.1\r\n" + H + b"\r\n", 400),
    "authority-ip-literal-then-name": (b"GET http://[::1]x/ HTTP/1.1\r\n" + H + b"\r\n", 400),
    # Connection and Expect
    "connection-non-token": (GET + H + b"Connection: close, a b\r\n\r\n", 400),
    "connection-quoted": (GET + H + b'Connection: "close"\r\n\r\n', 400),
    "expect-other": (GET + H + b"Expect: 200-ok\r\n\r\n", 417),
    "expect-continue-and-other": (GET + H + b"Expect: 100-continue, foo\r\n\r\n", 417),
    # limits
    "line-over-max-line-incomplete": (b"GET /" + b"a" * 9000, 414),
    "line-over-max-line-complete": (b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\n" + H + b"\r\n", 414),
    "head-over-max-head-incomplete": (GET + H + b"X-A: " + b"a" * 40000, 431),
    "head-over-max-head-complete": (GET + H + b"X-A: " + b"a" * 40000 + b"\r\n\r\n", 431),
    "many-empty-lines-over-max-head": (b"\r\n" * 20000, 431),
    "fields-over-max-fields": (GET + H + b"X-A: 1\r\n" * 100 + b"\r\n", 431),
}

# Exact limit boundaries, with small limits: (raw, kwargs, status or None for accepted).
# max_line counts the whole request line, CRLF included ("no LF within the first
# max_line bytes"); max_head counts the whole head, leading empty lines and the
# final CRLF included.
_LINE_32 = b"GET /" + b"a" * 16 + b" HTTP/1.1\r\n"            # 32 bytes
REQUEST_LIMITS = {
    "line-exactly-max-line": (_LINE_32 + H + b"\r\n", dict(max_line=32), None),
    "line-one-over-max-line": (_LINE_32 + H + b"\r\n", dict(max_line=31), 414),
    "line-at-max-line-no-lf-yet": (_LINE_32[:-1], dict(max_line=31), 414),
    "head-exactly-max-head": (_LINE_32 + H + b"\r\n", dict(max_head=53), None),
    "head-one-over-max-head": (_LINE_32 + H + b"\r\n", dict(max_head=52), 431),
    "head-incomplete-at-max-head": (_LINE_32 + H + b"\r", dict(max_head=52), 431),
    "leading-lines-count-in-head": (b"\r\n" + _LINE_32 + H + b"\r\n", dict(max_head=55), None),
    "leading-lines-over-max-head": (b"\r\n" + _LINE_32 + H + b"\r\n", dict(max_head=54), 431),
    "fields-exactly-max-fields": (GET + H + b"A: 1\r\nB: 2\r\n\r\n", dict(max_fields=3), None),
    "fields-one-over-max-fields": (GET + H + b"A: 1\r\nB: 2\r\nC: 3\r\n\r\n",
                                   dict(max_fields=3), 431),
    "fields-over-max-fields-incomplete": (GET + H + b"A: 1\r\nB: 2\r\nC: 3\r\n",
                                          dict(max_fields=3), 431),
}

VALID_RESPONSES = {
    "ok-length": response(
        b"HTTP/1.1 200 OK\r\nContent-Length: 12\r\nServer:  x \r\n\r\n",
        content_length=12, headers=[(b"Content-Length", b"12"), (b"Server", b"x")]),
    "chunked": response(
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: Chunked\r\n\r\n",
        body=BODY_CHUNKED, headers=[(b"Transfer-Encoding", b"Chunked")]),
    "close-delimited": response(
        b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\n",
        body=BODY_CLOSE, keep_alive=False, headers=[(b"Content-Type", b"text/plain")]),
    "http10-length": response(
        b"HTTP/1.0 200 OK\r\nContent-Length: 0\r\n\r\n",
        version=0, content_length=0, keep_alive=False,
        headers=[(b"Content-Length", b"0")]),
    "http10-keep-alive": response(
        b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: 1\r\n\r\n",
        version=0, content_length=1, keep_alive=True,
        headers=[(b"Connection", b"keep-alive"), (b"Content-Length", b"1")]),
    "connection-close": response(
        b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 1\r\n\r\n",
        content_length=1, keep_alive=False,
        headers=[(b"Connection", b"close"), (b"Content-Length", b"1")]),
    "length-list": response(
        b"HTTP/1.1 200 OK\r\nContent-Length: 7 , 7\r\n\r\n",
        content_length=7, headers=[(b"Content-Length", b"7 , 7")]),
    "no-content": response(
        b"HTTP/1.1 204 No Content\r\n\r\n",
        status=204, reason=b"No Content", body=BODY_NONE, headers=[]),
    "not-modified-with-length": response(
        b"HTTP/1.1 304 Not Modified\r\nContent-Length: 50\r\n\r\n",
        status=304, reason=b"Not Modified", body=BODY_NONE, content_length=50,
        headers=[(b"Content-Length", b"50")]),
    "not-modified-with-chunked": response(
        b"HTTP/1.1 304 Not Modified\r\nTransfer-Encoding: chunked\r\n\r\n",
        status=304, reason=b"Not Modified", body=BODY_NONE,
        headers=[(b"Transfer-Encoding", b"chunked")]),
    "continue": response(
        b"HTTP/1.1 100 Continue\r\n\r\n",
        status=100, reason=b"Continue", body=BODY_NONE, headers=[]),
    "switching-protocols": response(
        b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n",
        status=101, reason=b"Switching Protocols", body=BODY_NONE, upgrade=True,
        headers=[(b"Connection", b"Upgrade"), (b"Upgrade", b"websocket")]),
    "no-reason": response(
        b"HTTP/1.1 404\r\nContent-Length: 0\r\n\r\n",
        status=404, reason=b"", content_length=0, headers=[(b"Content-Length", b"0")]),
    "empty-reason": response(
        b"HTTP/1.1 500 \r\nContent-Length: 0\r\n\r\n",
        status=500, reason=b"", content_length=0, headers=[(b"Content-Length", b"0")]),
    "reason-spaces-tab-obs-text": response(
        b"HTTP/1.1 200 Tr\xe8s  bien\tmerci \r\nContent-Length: 0\r\n\r\n",
        reason=b"Tr\xe8s  bien\tmerci ", content_length=0,
        headers=[(b"Content-Length", b"0")]),
    "status-599": response(
        b"HTTP/1.1 599 Custom\r\nContent-Length: 0\r\n\r\n",
        status=599, reason=b"Custom", content_length=0, headers=[(b"Content-Length", b"0")]),
}
# The HEAD case needs method=b"HEAD".
HEAD_RESPONSE = response(
    b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n",
    body=BODY_NONE, content_length=100, headers=[(b"Content-Length", b"100")])

OK = b"HTTP/1.1 200 OK\r\n"

# (raw, parse_response keyword arguments); every one is 502.
BAD_RESPONSES = {
    "status-2-digits": (b"HTTP/1.1 20 OK\r\n\r\n", {}),
    "status-4-digits": (b"HTTP/1.1 2000 OK\r\n\r\n", {}),
    "status-no-space-before-reason": (b"HTTP/1.1 200OK\r\n\r\n", {}),
    "status-two-spaces": (b"HTTP/1.1  200 OK\r\n\r\n", {}),
    "status-letters": (b"HTTP/1.1 2x0 OK\r\n\r\n", {}),
    "status-below-100": (b"HTTP/1.1 099 Odd\r\nContent-Length: 0\r\n\r\n", {}),
    "status-missing": (b"HTTP/1.1\r\n\r\n", {}),
    "status-missing-with-space": (b"HTTP/1.1 \r\n\r\n", {}),
    "version-http2": (b"HTTP/2 200 OK\r\n\r\n", {}),
    "version-1.2": (b"HTTP/1.2 200 OK\r\n\r\n", {}),
    "version-lower-case": (b"http/1.1 200 OK\r\n\r\n", {}),
    "not-http": (b"ICY 200 OK\r\n\r\n", {}),
    "leading-empty-line": (b"\r\n" + OK + b"Content-Length: 0\r\n\r\n", {}),
    "reason-ctl": (b"HTTP/1.1 200 O\x01K\r\nContent-Length: 0\r\n\r\n", {}),
    "reason-nul": (b"HTTP/1.1 200 O\x00K\r\nContent-Length: 0\r\n\r\n", {}),
    "status-line-bare-lf": (b"HTTP/1.1 200 OK\nContent-Length: 0\r\n\r\n", {}),
    "status-line-bare-cr": (b"HTTP/1.1 200 OK\rContent-Length: 0\r\n\r\n", {}),
    "te-and-cl": (OK + b"Transfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n", {}),
    "te-gzip": (OK + b"Transfer-Encoding: gzip\r\n\r\n", {}),
    "te-chunked-gzip": (OK + b"Transfer-Encoding: chunked, gzip\r\n\r\n", {}),
    "te-gzip-chunked": (OK + b"Transfer-Encoding: gzip, chunked\r\n\r\n", {}),
    "te-http10": (b"HTTP/1.0 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n", {}),
    "cl-differing": (OK + b"Content-Length: 3\r\nContent-Length: 4\r\n\r\n", {}),
    "cl-not-digits": (OK + b"Content-Length: 3a\r\n\r\n", {}),
    "cl-19-digits": (OK + b"Content-Length: 1000000000000000000\r\n\r\n", {}),
    "head-te-and-cl": (OK + b"Transfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n",
                       {"method": b"HEAD"}),
    "connection-non-token": (OK + b"Connection: a/b\r\nContent-Length: 0\r\n\r\n", {}),
    "obs-fold": (OK + b"X-A: a\r\n b\r\nContent-Length: 0\r\n\r\n", {}),
    "space-before-colon": (OK + b"Content-Length : 0\r\n\r\n", {}),
    "value-nul": (OK + b"X-A: \x00\r\nContent-Length: 0\r\n\r\n", {}),
    "value-del": (OK + b"X-A: \x7f\r\nContent-Length: 0\r\n\r\n", {}),
    "field-bare-lf": (OK + b"Content-Length: 0\n\r\n", {}),
    "head-over-max-head-incomplete": (OK + b"X-A: " + b"a" * 70000, {}),
    "head-over-max-head-complete": (OK + b"X-A: " + b"a" * 70000 + b"\r\n\r\n", {}),
    "head-over-small-max-head": (OK + b"Content-Length: 0\r\n\r\n", {"max_head": 30}),
    "fields-over-max-fields": (OK + b"X-A: 1\r\n" * 3 + b"\r\n", {"max_fields": 2}),
}

CHUNKED_TRAILING = b"GET /next HTTP/1.1\r\nHost: example.com\r\n\r\n"

# (encoded, decoded body, ChunkedDecoder keyword arguments)
VALID_CHUNKED = {
    "one-chunk": (b"5\r\nhello\r\n0\r\n\r\n", b"hello", {}),
    "empty-body": (b"0\r\n\r\n", b"", {}),
    "several-hex-cases": (b"a\r\n0123456789\r\nA\r\nabcdefghij\r\n1\r\n!\r\n0\r\n\r\n",
                          b"0123456789abcdefghij!", {}),
    "leading-zeros": (b"0005\r\nhello\r\n000\r\n\r\n", b"hello", {}),
    "sixteen-digits": (b"000000000000000A\r\n0123456789\r\n0000000000000000\r\n\r\n",
                       b"0123456789", {}),
    "crlf-inside-data": (b"4\r\n\r\n\r\n\r\n0\r\n\r\n", b"\r\n\r\n", {}),
    "binary-data": (b"6\r\n\x00\xff\n\r;0\r\n0\r\n\r\n", b"\x00\xff\n\r;0", {}),
    "extensions": (b"5;name=value;flag\r\nhello\r\n0;last=\"a b\"\r\n\r\n", b"hello", {}),
    "extension-after-whitespace": (b"5 \t ;x\r\nhello\r\n0\t;y\r\n\r\n", b"hello", {}),
    "empty-extension": (b"5;\r\nhello\r\n0;\r\n\r\n", b"hello", {}),
    "trailers": (b"5\r\nhello\r\n0\r\nExpires: never\r\nX-Sum:abc \r\n\r\n", b"hello", {}),
    "trailer-empty-value": (b"1\r\nx\r\n0\r\nX-Empty:\r\n\r\n", b"x", {}),
    "size-line-exactly-max-line": (b"5;abc\r\nhello\r\n0\r\n\r\n", b"hello", {"max_line": 7}),
    "trailer-exactly-max-trailer": (b"0\r\nA: 12345\r\n\r\n", b"", {"max_trailer": 12}),
}

# (encoded, ChunkedDecoder keyword arguments); every one is 400.
BAD_CHUNKED = {
    "size-empty": (b"\r\nhello\r\n0\r\n\r\n", {}),
    "size-g": (b"g\r\nhello\r\n0\r\n\r\n", {}),
    "size-negative": (b"-1\r\nx\r\n0\r\n\r\n", {}),
    "size-0x": (b"0x5\r\nhello\r\n0\r\n\r\n", {}),
    "size-plus": (b"+5\r\nhello\r\n0\r\n\r\n", {}),
    "size-underscore": (b"1_0\r\n", {}),
    "size-17-digits": (b"00000000000000005\r\nhello\r\n0\r\n\r\n", {}),
    "size-2-pow-63": (b"8000000000000000\r\n", {}),
    "size-max-64-bit": (b"FFFFFFFFFFFFFFFF\r\n", {}),
    "size-huge": (b"123456789abcdef0123456789\r\n", {}),
    "size-leading-space": (b" 5\r\nhello\r\n0\r\n\r\n", {}),
    "size-trailing-space": (b"5 \r\nhello\r\n0\r\n\r\n", {}),
    "size-trailing-tab": (b"5\t\r\nhello\r\n0\r\n\r\n", {}),
    "size-space-then-garbage": (b"5 x\r\nhello\r\n0\r\n\r\n", {}),
    "size-bare-lf": (b"5\nhello\r\n0\r\n\r\n", {}),
    "size-bare-cr": (b"5\rhello\r\n0\r\n\r\n", {}),
    "ext-ctl": (b"5;a\x01\r\nhello\r\n0\r\n\r\n", {}),
    "ext-obs-text": (b"5;\xe9\r\nhello\r\n0\r\n\r\n", {}),
    "ext-bare-cr": (b"5;a\rb\r\nhello\r\n0\r\n\r\n", {}),
    "data-too-long": (b"5\r\nhelloX\r\n0\r\n\r\n", {}),
    "data-bare-lf": (b"5\r\nhello\n0\r\n\r\n", {}),
    "data-bare-cr": (b"5\r\nhello\r0\r\n\r\n", {}),
    "data-no-crlf-at-end": (b"5\r\nhello0\r\n\r\n", {}),
    "last-chunk-bare-lf": (b"0\n\r\n", {}),
    "end-bare-lf": (b"0\r\n\n", {}),
    "end-bare-cr": (b"0\r\n\rX", {}),
    "trailer-bad-name": (b"0\r\nBad Name: x\r\n\r\n", {}),
    "trailer-space-before-colon": (b"0\r\nX-A : x\r\n\r\n", {}),
    "trailer-no-colon": (b"0\r\nX-A\r\n\r\n", {}),
    "trailer-obs-fold": (b"0\r\nX-A: a\r\n b\r\n\r\n", {}),
    "trailer-nul": (b"0\r\nX-A: a\x00\r\n\r\n", {}),
    "trailer-bare-lf": (b"0\r\nX-A: a\n\r\n", {}),
    "trailer-bare-cr": (b"0\r\nX-A: a\rb\r\n\r\n", {}),
    "trailer-empty-name": (b"0\r\n: a\r\n\r\n", {}),
    "trailer-too-long": (b"0\r\nX-A: " + b"a" * 40 + b"\r\n\r\n", {"max_trailer": 32}),
    "trailer-too-long-many-lines": (b"0\r\n" + b"A: 1\r\n" * 20 + b"\r\n", {"max_trailer": 64}),
    "trailer-one-over-max-trailer": (b"0\r\nA: 12345\r\n\r\n", {"max_trailer": 11}),
    "size-line-too-long": (b"5;" + b"a" * 100 + b"\r\nhello\r\n0\r\n\r\n", {"max_line": 64}),
    "size-line-one-over-max-line": (b"5;abc\r\nhello\r\n0\r\n\r\n", {"max_line": 6}),
}
