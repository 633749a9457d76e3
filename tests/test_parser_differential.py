"""Our parsers against h11 and httptools on a generated corpus of requests.

Every request is built from labelled parts (a method, a target, header sets,
a body framing, and at most one deliberate anomaly), seeded so the corpus is
the same on every run.  Where both sides accept a request they must agree on
the method, target, headers and decoded body; where one accepts and the other
refuses, one of the request's labels must be in the allow-list below, which
records every intentional difference and why.  Allow-list entries that no
request needs any more fail too, so the list cannot go stale.
"""
from __future__ import annotations

import random
from urllib.parse import urlsplit

import h11
import httptools
import pytest
from parser_cases import PARSER_IDS, load_parser

SEED = 9112          # RFC 9112
CORPUS_SIZE = 400

# --- the allow-list -------------------------------------------------------
# label -> why.  "we_refuse": we refuse, the reference accepts (we are
# stricter on purpose: a proxy must not forward what the server behind it
# could read differently).  "we_accept": we accept, the reference refuses.
ALLOWED = {
    "h11": {
        "we_refuse": {
            "bare-lf": "RFC 9112 §2.2 allows it, but CRLF-only closes a smuggling gap",
            "obs-fold": "RFC 9112 §5.2: a server may refuse obs-fold; we do",
            "http-1.2": "h11 takes any HTTP/x.y; we speak 1.0 and 1.1 only",
            "http-2.0": "same: an HTTP/2.0 request line on HTTP/1 is an error here",
            "connect": "CONNECT tunnels are not offered: 405",
            "host-bad-chars": "h11 does not check Host characters (RFC 9110 §7.2)",
            "target-relative": "h11 does not check the request-target form",
            "target-userinfo": "h11 does not check the request-target form",
            "asterisk-not-options": "RFC 9112 §3.2.4: '*' is for OPTIONS only",
            "expect-other": "unknown expectations get 417 (RFC 9110 §10.1.1)",
            "connection-non-token": "Connection is a token list (RFC 9110 §7.6.1)",
            "value-ctl": "h11 keeps control bytes in field values",
            "value-del": "h11 keeps DEL in field values",
            "te-http10": "RFC 9112 §6.1: Transfer-Encoding on HTTP/1.0 is faulty framing",
            "cl-19-digits": "Content-Length is limited to 18 digits (fits int64)",
            "cl-and-te": "h11 lets chunked win (RFC 9112 §6.3 rule 3 allows that); "
                         "we refuse: the classic request smuggling vector",
            "chunk-size-ws": "h11 allows whitespace after the chunk size (BWS)",
            "chunk-17-digits": "chunk sizes are limited to 16 hex digits / 2**63",
        },
        "we_accept": {
            "leading-crlf": "RFC 9112 §2.2: empty lines before a request are ignored",
            "chunk-ext-bws": "RFC 9112 §7.1.1 allows BWS before ';' of a chunk extension",
        },
    },
    "httptools": {
        "we_refuse": {
            "double-space": "llhttp skips extra spaces in the request line",
            "http-2.0": "llhttp takes HTTP/2.0 on an HTTP/1 connection",
            "two-hosts": "llhttp does not check Host (RFC 9112 §3.2: exactly one)",
            "no-host": "llhttp does not require Host on HTTP/1.1",
            "host-bad-chars": "llhttp does not check Host characters",
            "connect": "CONNECT tunnels are not offered: 405",
            "target-userinfo": "userinfo is deprecated in http URIs (RFC 9110 §4.2.4)",
            "asterisk-not-options": "RFC 9112 §3.2.4: '*' is for OPTIONS only",
            "expect-other": "unknown expectations get 417 (RFC 9110 §10.1.1)",
            "connection-non-token": "Connection is a token list (RFC 9110 §7.6.1)",
            "te-http10": "RFC 9112 §6.1: Transfer-Encoding on HTTP/1.0 is faulty framing",
            "te-gzip-chunked": "llhttp takes any codings ending in chunked; we only "
                               "forward a body whose framing the backend reads alike",
            "cl-19-digits": "Content-Length is limited to 18 digits (fits int64)",
            "chunk-17-digits": "chunk sizes are limited to 16 hex digits / 2**63",
        },
        "we_accept": {
            "cl-list": "RFC 9110 §8.6 lets a recipient accept a list of equal lengths",
            "cl-repeated": "RFC 9110 §8.6 lets a recipient accept repeated equal lengths",
            "chunk-ext-bws": "RFC 9112 §7.1.1 allows BWS before ';' of a chunk extension",
        },
    },
}

# --- the corpus -----------------------------------------------------------

METHODS = [b"GET", b"GET", b"POST", b"PUT", b"DELETE", b"PATCH", b"HEAD", b"OPTIONS"]
TARGETS = [(b"/", None), (b"/a/b?c=d&e=%20", None), (b"/~user/index.html", None),
           (b"//double//slash", None), (b"http://example.com/abs?q=1", "absolute-form"),
           (b"HTTP://Example.COM:8080", "absolute-form"), (b"*", "asterisk")]
PLAIN_HEADERS = [([(b"User-Agent", b"corpus/1.0")], None), ([(b"Accept", b"*/*")], None),
                 ([(b"X-Empty", b"")], None), ([(b"X-Spaces", b"  a  b  ")], None),
                 ([(b"X-Obs-Text", b"caf\xc3\xa9")], None),
                 ([(b"Connection", b"close")], None),
                 ([(b"Connection", b"keep-alive")], None),
                 ([(b"Accept-Encoding", b"gzip, br")], None),
                 ([(b"Connection", b"Upgrade"), (b"Upgrade", b"websocket")], "upgrade"),
                 ([(b"Expect", b"100-continue")], None), ([(b"Cookie", b"a=b; c=d")], None)]


def chunked(rng: random.Random, body: bytes, labels: set) -> bytes:
    """body in chunks of random sizes, maybe with extensions and trailers."""
    out = []
    pos = 0
    while pos < len(body):
        size = rng.randint(1, 9)
        ext = b""
        if rng.random() < 0.2:
            ext = b";name=value"
            labels.add("chunk-ext")
        elif rng.random() < 0.05:
            ext = b" \t;bws"
            labels.add("chunk-ext-bws")
        out.append(b"%x%s\r\n%s\r\n" % (size if pos + size <= len(body) else len(body) - pos,
                                        ext, body[pos:pos + size]))
        pos += size
    out.append(b"0\r\n")
    if rng.random() < 0.2:
        out.append(b"X-Checksum: abc\r\n")
        labels.add("trailers")
    out.append(b"\r\n")
    return b"".join(out)


def build_request(rng: random.Random, anomaly: str | None):
    """One labelled request with the given anomaly (or none): (raw bytes, labels)."""
    labels: set[str] = set()
    method = rng.choice(METHODS)
    target, label = rng.choice(TARGETS)
    if label == "asterisk":
        method = b"OPTIONS"
    if label:
        labels.add(label)
    version = b"1.0" if rng.random() < 0.15 else b"1.1"
    headers = [(b"Host", b"example.com")]
    needs, change = ANOMALIES.get(anomaly, (None, None))
    body = bytes(rng.randrange(256) for _ in range(rng.choice([0, 1, 5, 17])))
    framing = rng.choice(["none", "length", "length", "chunked", "chunked", "list",
                          "repeated"])
    if method in (b"GET", b"HEAD", b"OPTIONS", b"DELETE") and framing != "none":
        framing = rng.choice([framing, "none"])
    if framing == "chunked" and version == b"1.0":
        framing = "length"
    if needs:
        framing = needs
        body = body or b"x"
    for extra, label in rng.sample(PLAIN_HEADERS, rng.randint(0, 3)):
        # llhttp hands what follows an Upgrade request to the new protocol,
        # so a body there would not be compared.
        if label == "upgrade" and framing != "none":
            continue
        headers.extend(extra)
        if label:
            labels.add(label)
    payload = b""
    if framing == "length":
        headers.append((b"Content-Length", b"%d" % len(body)))
        payload = body
    elif framing == "list":
        headers.append((b"Content-Length", b"%d, %d" % (len(body), len(body))))
        labels.add("cl-list")
        payload = body
    elif framing == "repeated":
        headers += [(b"Content-Length", b"%d" % len(body))] * 2
        labels.add("cl-repeated")
        payload = body
    elif framing == "chunked":
        coding = b"Chunked" if rng.random() < 0.2 else b"chunked"
        headers.append((b"Transfer-Encoding", coding))
        payload = chunked(rng, body, labels)
    request = dict(method=method, target=target, version=version, headers=headers,
                   payload=payload, framing=framing, prefix=b"", eol=b"\r\n", sp=b" ",
                   version_text=b"HTTP/" + version, extra_lines=[])
    if anomaly:
        change(request, rng)
        labels.add(anomaly)
    return render(request), frozenset(labels)


def render(r: dict) -> bytes:
    eol = r["eol"]
    lines = [r["method"] + r["sp"] + r["target"] + r["sp"] + r["version_text"]]
    lines += [name + b": " + value for name, value in r["headers"]]
    lines += r["extra_lines"]
    return r["prefix"] + eol.join(lines) + eol + eol + r["payload"]


def _set(**changes):
    def apply(r, rng):
        r.update(changes)
    return apply


def _header(name, value):
    def apply(r, rng):
        r["headers"].insert(rng.randint(1, len(r["headers"])), (name, value))
    return apply


def _no_host(r, rng):
    r["headers"] = [h for h in r["headers"] if h[0] != b"Host"]
    r["version_text"] = b"HTTP/1.1"


def _te_http10(r, rng):
    r["version_text"] = b"HTTP/1.0"


def _replace_payload(old: bytes, new: bytes):
    def change(r, rng):
        r["payload"] = r["payload"].replace(old, new, 1)
    return change


def _first_chunk_size(size):
    """Rewrite the size of the first chunk (its extension dropped)."""
    def change(r, rng):
        line_end = r["payload"].index(b"\r\n")
        digits = r["payload"][:line_end].split(b";")[0].rstrip(b" \t")
        r["payload"] = size(digits) + r["payload"][line_end:]
    return change


def _missing_crlf_after_data(r, rng):
    line_end = r["payload"].index(b"\r\n")
    data_end = line_end + 2 + int(r["payload"][:line_end].split(b";")[0], 16)
    r["payload"] = r["payload"][:data_end] + b"X" + r["payload"][data_end + 2:]


# label -> (the framing it needs or None, how it changes the request)
ANOMALIES = {
    "bare-lf": (None, _set(eol=b"\n")),
    "obs-fold": (None, lambda r, rng: r["extra_lines"].append(b"X-Folded: a\r\n b")),
    "space-before-colon": (None, _header(b"X-A ", b"1")),
    "name-bad-char": (None, _header(b"X@A", b"1")),
    "value-ctl": (None, _header(b"X-Ctl", b"a\x01b")),
    "value-del": (None, _header(b"X-Del", b"a\x7fb")),
    "value-nul": (None, _header(b"X-Nul", b"a\x00b")),
    "no-host": (None, _no_host),
    "two-hosts": (None, _header(b"Host", b"example.org")),
    "host-bad-chars": (None, lambda r, rng: r["headers"].__setitem__(
        0, (b"Host", b"exa mple.com"))),
    "cl-and-te": ("chunked", _header(b"Content-Length", b"3")),
    "cl-differ": ("length", _header(b"Content-Length", b"99")),
    "cl-nondigit": ("length", lambda r, rng: r["headers"].__setitem__(
        -1, (b"Content-Length", b"+%d" % len(r["payload"])))),
    "cl-19-digits": ("length", lambda r, rng: r["headers"].__setitem__(
        -1, (b"Content-Length", b"%019d" % len(r["payload"])))),
    "te-gzip-chunked": ("chunked", lambda r, rng: r["headers"].__setitem__(
        -1, (b"Transfer-Encoding", b"gzip, chunked"))),
    "te-identity": ("chunked", lambda r, rng: r["headers"].__setitem__(
        -1, (b"Transfer-Encoding", b"identity"))),
    "te-http10": ("chunked", _te_http10),
    "connect": (None, _set(method=b"CONNECT", target=b"example.com:443")),
    "http-1.2": (None, _set(version_text=b"HTTP/1.2")),
    "http-2.0": (None, _set(version_text=b"HTTP/2.0")),
    "version-lower-case": (None, _set(version_text=b"http/1.1")),
    "double-space": (None, _set(sp=b"  ")),
    "trailing-space": (None, lambda r, rng: r.update(version_text=r["version_text"] + b" ")),
    "leading-crlf": (None, _set(prefix=b"\r\n")),
    "target-relative": (None, _set(target=b"foo/bar")),
    "target-userinfo": (None, _set(target=b"http://user@example.com/")),
    "asterisk-not-options": (None, _set(method=b"GET", target=b"*")),
    "expect-other": (None, _header(b"Expect", b"bogus")),
    "connection-non-token": (None, _header(b"Connection", b"a b")),
    "chunk-size-ws": ("chunked", _first_chunk_size(lambda d: d + b" ")),
    "chunk-size-0x": ("chunked", _first_chunk_size(lambda d: b"0x" + d)),
    "chunk-17-digits": ("chunked", _first_chunk_size(lambda d: d.rjust(17, b"0"))),
    "chunk-bare-lf": ("chunked", _replace_payload(b"\r\n", b"\n")),
    "chunk-missing-crlf": ("chunked", _missing_crlf_after_data),
    "trailer-bad": ("chunked", _replace_payload(b"0\r\n\r\n", b"0\r\nBad Name: x\r\n\r\n")),
}


def corpus():
    """Every other request has an anomaly, taking each in turn."""
    rng = random.Random(SEED)
    anomalies = list(ANOMALIES)
    return [build_request(rng, anomalies[i // 2 % len(anomalies)] if i % 2 else None)
            for i in range(CORPUS_SIZE)]


CORPUS = corpus()

# --- running each parser --------------------------------------------------


def ours(parser, raw: bytes):
    """("ok", method, target, host, version, headers, body) or ("refused", why)."""
    try:
        head = parser.parse_request(raw)
        if head is None:
            return ("refused", "incomplete")
        rest = raw[head.head_length:]
        if head.body == parser.BODY_CHUNKED:
            decoder = parser.ChunkedDecoder()
            pieces, _ = decoder.feed(rest)
            if not decoder.done:
                return ("refused", "incomplete body")
            body = b"".join(pieces)
        elif head.body == parser.BODY_LENGTH:
            body = rest[:head.content_length]
        else:
            body = b""
    except parser.HTTPError as exc:
        return ("refused", exc.status)
    return ("ok", head.method, head.target, head.host, head.version, head.headers, body)


def by_h11(raw: bytes):
    connection = h11.Connection(h11.SERVER)
    connection.receive_data(raw)
    try:
        event = connection.next_event()
        if not isinstance(event, h11.Request):
            return ("refused", "incomplete")
        body = b""
        trailers = []
        while True:
            part = connection.next_event()
            if isinstance(part, h11.Data):
                body += part.data
            elif isinstance(part, h11.EndOfMessage):
                trailers = list(part.headers)
                break
            else:
                return ("refused", "incomplete body")
    except h11.RemoteProtocolError as exc:
        return ("refused", str(exc))
    return ("ok", event, body, trailers)


class _Collector:
    def __init__(self):
        self.url = b""
        self.headers = []
        self.body = b""
        self.complete = False

    def on_url(self, url):
        self.url += url

    def on_header(self, name, value):
        self.headers.append((name, value))

    def on_body(self, body):
        self.body += body

    def on_message_complete(self):
        self.complete = True


def by_httptools(raw: bytes):
    collector = _Collector()
    parser = httptools.HttpRequestParser(collector)
    try:
        parser.feed_data(raw)
    except httptools.HttpParserUpgrade:
        pass
    except httptools.HttpParserError as exc:
        return ("refused", str(exc))
    if not collector.complete:
        return ("refused", "incomplete")
    return ("ok", parser.get_method(), collector.url, parser.get_http_version(),
            collector.headers, collector.body)


def split_absolute(target: bytes):
    """(origin-form target, authority) of an absolute-form target, else (target, None)."""
    if b"://" not in target:
        return target, None
    parts = urlsplit(target)
    return (parts.path or b"/") + (b"?" + parts.query if parts.query else b""), parts.netloc


def without_length(headers):
    return [(name, value) for name, value in headers if name.lower() != b"content-length"]


def h11_differences(mine, theirs, labels) -> list[str]:
    """How two accepted readings differ (empty when they agree)."""
    _, method, target, host, version, headers, body = mine
    _, event, their_body, _ = theirs
    their_target, authority = split_absolute(event.target)
    differences = []
    if (method, target, version) != (event.method, their_target,
                                     int(event.http_version.split(b".")[1])):
        differences.append(f"request line: {(method, target, version)} vs {event}")
    if authority is not None and authority != host:
        differences.append(f"host: {host} vs {authority}")
    # h11 lower-cases names and Transfer-Encoding, and replaces every
    # Content-Length field by one: compare those by meaning (the body), the
    # rest as they are.
    normal = [(n.lower(), v.lower() if n.lower() == b"transfer-encoding" else v)
              for n, v in without_length(headers)]
    if normal != without_length(event.headers):
        differences.append(f"headers: {normal} vs {list(event.headers)}")
    if body != their_body:
        differences.append(f"body: {body!r} vs {their_body!r}")
    return differences


def httptools_differences(mine, theirs, labels) -> list[str]:
    _, method, target, host, version, headers, body = mine
    _, their_method, url, their_version, their_headers, their_body = theirs
    their_target, authority = split_absolute(url)
    differences = []
    if (method, target, b"1.%d" % version) != (their_method, their_target,
                                              their_version.encode()):
        differences.append(f"request line: {(method, target, version)} vs "
                           f"{(their_method, url, their_version)}")
    if authority is not None and authority != host:
        differences.append(f"host: {host} vs {authority}")
    # llhttp reports trailer fields after the header fields, and keeps the
    # trailing whitespace of values.
    their_headers = [(n, v.rstrip(b" \t")) for n, v in their_headers[:len(headers)]]
    if their_headers != headers:
        differences.append(f"headers: {headers} vs {their_headers}")
    if body != their_body:
        differences.append(f"body: {body!r} vs {their_body!r}")
    return differences


REFERENCES = {"h11": (by_h11, h11_differences),
              "httptools": (by_httptools, httptools_differences)}


@pytest.fixture(params=PARSER_IDS)
def parser(request):
    return load_parser(request.param)


def test_corpus_is_varied():
    labels = [label for _, case_labels in CORPUS for label in case_labels]
    without_anomaly = sum(1 for _, case_labels in CORPUS if not case_labels & set(ANOMALIES))
    assert without_anomaly == CORPUS_SIZE // 2
    assert set(ANOMALIES) <= set(labels), set(ANOMALIES) - set(labels)


@pytest.mark.parametrize("reference", REFERENCES)
def test_agrees_with_reference(parser, reference):
    parse, differences_of = REFERENCES[reference]
    allowed = ALLOWED[reference]
    unexplained = []
    used = set()
    agreed = 0
    for raw, labels in CORPUS:
        mine, theirs = ours(parser, raw), parse(raw)
        if mine[0] == "ok" and theirs[0] == "ok":
            differences = differences_of(mine, theirs, labels)
            if differences:
                unexplained.append((raw, sorted(labels), differences))
            agreed += not differences
            continue
        if mine[0] == theirs[0]:
            continue                    # both refuse
        direction = "we_refuse" if mine[0] == "refused" else "we_accept"
        reasons = labels & set(allowed[direction])
        used |= reasons
        if not reasons:
            unexplained.append((raw, sorted(labels), [f"{direction}: {mine[1:]} / {theirs[1:]}"]))
    assert not unexplained, "\n".join(map(repr, unexplained[:10]))
    assert agreed > 150
    stale = {label for direction in allowed.values() for label in direction} - used
    assert not stale, f"allow-list entries no longer needed: {stale}"
