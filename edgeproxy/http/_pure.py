"""The pure-Python HTTP/1.1 parser: the readable twin of the compiled one.

It implements docs/parser-contract.md rule by rule and is what the Cython
parser in ext/ must agree with byte for byte.  Parsing is sans-I/O: the
functions take the bytes received so far and return a parsed head, None
("feed more bytes") or raise ParseError.

How incomplete input is treated (the same everywhere): every complete line is
checked as soon as its LF has arrived, the unfinished last line is checked
for bytes that could never become valid (all of it once it ends in CR), and
the limits are checked last.  So an error raised for a prefix of some input is the error the whole
input raises too, whichever way it is split.

Every scan is linear: `bytes.find` for line ends and `bytes.translate` to
test "made only of these bytes"; no regular expressions.
"""
from __future__ import annotations

__all__ = [
    "BODY_CHUNKED", "BODY_CLOSE", "BODY_LENGTH", "BODY_NONE",
    "ChunkedDecoder", "HTTPError", "ParseError", "Request", "Response",
    "parse_request", "parse_response",
]

BODY_NONE, BODY_LENGTH, BODY_CHUNKED, BODY_CLOSE = 0, 1, 2, 3

# --- byte tables ----------------------------------------------------------

_DIGIT = b"0123456789"
_HEXDIG = b"0123456789abcdefABCDEF"
_ALPHA = bytes(range(0x41, 0x5B)) + bytes(range(0x61, 0x7B))

# tchar, RFC 9110 §5.6.2: what methods, field names and list tokens are made of.
TCHAR = b"!#$%&'*+-.^_`|~" + _DIGIT + _ALPHA
# VCHAR: the bytes of a request-target (the contract allows exactly 0x21-0x7E).
VCHAR = bytes(range(0x21, 0x7F))
# field-value bytes, RFC 9110 §5.5: HTAB, SP, VCHAR, obs-text.  Everything
# else (NUL, CR, LF, the other controls, DEL) is refused.
FIELD_VALUE_CHAR = b"\t " + VCHAR + bytes(range(0x80, 0x100))
# reason-phrase, RFC 9112 §4: HTAB, SP, VCHAR, obs-text.
REASON_CHAR = FIELD_VALUE_CHAR
# chunk-ext bytes allowed by the contract: HTAB and 0x20-0x7E.
CHUNK_EXT_CHAR = b"\t" + bytes(range(0x20, 0x7F))
# Host field / authority, RFC 9110 §7.2 and RFC 3986 §3.2.2 (reg-name,
# IP-literal in brackets, port): unreserved, pct-encoded, sub-delims, ":".
HOST_CHAR = _ALPHA + _DIGIT + b"-._~%!$&'()*+,;=:[]"
# OWS, RFC 9110 §5.6.3.
OWS = b" \t"

_VERSIONS = {b"HTTP/1.0": 0, b"HTTP/1.1": 1}
# The digits of the largest chunk size we accept (2**63 - 1).
_MAX_CHUNK_SIZE = (1 << 63) - 1
_MAX_LENGTH_DIGITS = 18
_MAX_CHUNK_SIZE_DIGITS = 16
# Connection options a proxy keeps track of (it removes the fields they name).
_MAX_CONNECTION_OPTIONS = 64


def _made_of(data: bytes, allowed: bytes) -> bool:
    """True when every byte of data is one of allowed (True for b"")."""
    # translate(None, allowed) deletes the allowed bytes: nothing may be left.
    return not data.translate(None, allowed)


def _is_prefix_of_version(data: bytes) -> bool:
    return b"HTTP/1.0".startswith(data) or b"HTTP/1.1".startswith(data)


# --- errors ---------------------------------------------------------------

class HTTPError(Exception):
    """An HTTP-level failure carrying the status to answer with."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(status, message)
        self.status = status
        self.message = message

    def __str__(self) -> str:
        return f"{self.status}: {self.message}"


class ParseError(HTTPError):
    """Malformed input, or input over a limit."""


# --- parsed heads ---------------------------------------------------------

class Request:
    """A parsed request head."""

    __slots__ = ("method", "target", "version", "headers", "head_length",
                 "host", "body", "content_length", "keep_alive",
                 "expect_continue", "upgrade", "connection_tokens")

    def __init__(self, method: bytes, target: bytes, version: int,
                 headers: list[tuple[bytes, bytes]], head_length: int,
                 host: bytes | None, body: int, content_length: int,
                 keep_alive: bool, expect_continue: bool, upgrade: bool,
                 connection_tokens: list[bytes]) -> None:
        self.method = method
        self.target = target
        self.version = version
        self.headers = headers
        self.head_length = head_length
        self.host = host
        self.body = body
        self.content_length = content_length
        self.keep_alive = keep_alive
        self.expect_continue = expect_continue
        self.upgrade = upgrade
        self.connection_tokens = connection_tokens

    def __repr__(self) -> str:
        return (f"<Request {self.method.decode('latin-1')} "
                f"{self.target.decode('latin-1')} HTTP/1.{self.version}>")


class Response:
    """A parsed response head."""

    __slots__ = ("status", "reason", "version", "headers", "head_length",
                 "body", "content_length", "keep_alive", "upgrade")

    def __init__(self, status: int, reason: bytes, version: int,
                 headers: list[tuple[bytes, bytes]], head_length: int,
                 body: int, content_length: int, keep_alive: bool,
                 upgrade: bool) -> None:
        self.status = status
        self.reason = reason
        self.version = version
        self.headers = headers
        self.head_length = head_length
        self.body = body
        self.content_length = content_length
        self.keep_alive = keep_alive
        self.upgrade = upgrade

    def __repr__(self) -> str:
        return f"<Response HTTP/1.{self.version} {self.status}>"


# --- lines ----------------------------------------------------------------

def _line_body(line: bytes) -> bytes:
    """The line without the CR of its CRLF (it stays if it is not the last byte)."""
    return line[:-1] if line.endswith(b"\r") else line


def _check_unfinished(check, line: bytes, *args) -> None:
    """Check the last line of the input, whose LF has not arrived yet.

    Once it ends in CR only LF may follow, so it is checked as complete;
    otherwise only the bytes that are there are checked.
    """
    if line.endswith(b"\r"):
        check(line[:-1], True, *args)
    else:
        check(line, False, *args)


def _check_request_line(line: bytes, complete: bool):
    """Check a request line, RFC 9112 §3: method SP request-target SP HTTP-version.

    line is the line without its CRLF when complete, else the bytes received
    so far; then only what is there is checked, in the same order, so a
    refused prefix is refused the same way once complete.  Returns (method,
    target, minor version) for a complete line.
    """
    sp1 = line.find(b" ")
    method = line if sp1 < 0 else line[:sp1]
    if not _made_of(method, TCHAR):
        raise ParseError(400, "invalid byte in the method or request line")
    if sp1 < 0:
        if complete:
            raise ParseError(400, "request line has no target")
        return None
    if not method:
        raise ParseError(400, "request line starts with a space")
    if method == b"CONNECT":
        # authority-form is a tunnel, which an edge proxy does not offer.
        raise ParseError(405, "CONNECT is not supported")
    rest = line[sp1 + 1:]
    sp2 = rest.find(b" ")
    target = rest if sp2 < 0 else rest[:sp2]
    if not _made_of(target, VCHAR):
        raise ParseError(400, "invalid byte in the request target")
    if sp2 < 0:
        if complete:
            raise ParseError(400, "request line has no HTTP version")
        return None
    if not target:
        raise ParseError(400, "empty request target (two spaces?)")
    version = rest[sp2 + 1:]
    if complete:
        minor = _VERSIONS.get(version)
        if minor is None:
            raise ParseError(400, "unsupported or malformed HTTP version")
        return method, target, minor
    if not _is_prefix_of_version(version):
        raise ParseError(400, "unsupported or malformed HTTP version")
    return None


def _check_status_line(line: bytes, complete: bool):
    """Check a status line, RFC 9112 §4: HTTP-version SP 3DIGIT [SP reason].

    Same conventions as _check_request_line.  Returns (minor, status, reason).
    """
    version = line[:8]
    if len(line) < 8:
        if complete or not _is_prefix_of_version(version):
            raise ParseError(502, "malformed status line")
        return None
    minor = _VERSIONS.get(version)
    if minor is None:
        raise ParseError(502, "unsupported or malformed HTTP version")
    rest = line[8:]
    if rest[:1] not in (b" ", b""):
        raise ParseError(502, "malformed status line")
    code = rest[1:4]
    if not _made_of(code, _DIGIT):
        raise ParseError(502, "status code is not 3 digits")
    if len(code) < 3:
        if complete:
            raise ParseError(502, "status code is not 3 digits")
        return None
    after = rest[4:]
    if after[:1] not in (b" ", b""):
        raise ParseError(502, "status code is not 3 digits")
    reason = after[1:]
    if not _made_of(reason, REASON_CHAR):
        raise ParseError(502, "invalid byte in the reason phrase")
    if complete:
        return minor, int(code), reason
    return None


def _check_field_line(line: bytes, complete: bool, status: int):
    """Check a field line, RFC 9112 §5: field-name ":" OWS field-value OWS.

    Same conventions as _check_request_line.  Returns (name, value) for a
    complete line, the value without its leading and trailing OWS.
    """
    if line[:1] in (b" ", b"\t"):
        # RFC 9112 §5.2 obs-fold, or whitespace before the first field
        # (RFC 9112 §2.2): both refused.
        raise ParseError(status, "line folding or leading whitespace in a field line")
    colon = line.find(b":")
    name = line if colon < 0 else line[:colon]
    if not _made_of(name, TCHAR):
        # also covers whitespace between name and colon (RFC 9112 §5.1)
        raise ParseError(status, "invalid byte in a field name")
    if colon < 0:
        if complete:
            raise ParseError(status, "field line without a colon")
        return None
    if not name:
        raise ParseError(status, "empty field name")
    value = line[colon + 1:]
    if not _made_of(value, FIELD_VALUE_CHAR):
        raise ParseError(status, "invalid byte in a field value")
    if complete:
        return name, value.strip(OWS)
    return None


# The statuses of a malformed head, an over-long start line and a head over
# max_head or max_fields: a client's request gets RFC 9112's own, a backend's
# bad response is always a 502 for the client.
_REQUEST_STATUSES = (400, 414, 431)
_RESPONSE_STATUSES = (502, 502, 502)


def _parse_head(data: bytes, first_line, max_line: int, max_head: int,
                max_fields: int, statuses: tuple[int, int, int]):
    """Split data into a checked start line and field lines.

    Returns (start line result, headers, head length) or None when more
    bytes are needed.  max_head counts the whole head, from the first byte
    of data (leading empty lines included) to the LF of its empty line.
    """
    malformed, line_too_long, too_large = statuses
    skip_empty_lines = first_line is _check_request_line
    n = len(data)
    pos = 0
    if skip_empty_lines:
        # RFC 9112 §2.2: ignore empty lines (CRLF) before the request line.
        while data.startswith(b"\r\n", pos):
            pos += 2
    # The start line: its LF must come within max_line bytes (and the head's).
    end = min(pos + max_line, max_head)
    lf = data.find(b"\n", pos, end)
    if lf < 0:
        unfinished = data[pos:end]
        if not (skip_empty_lines and unfinished == b"\r"):   # maybe one more CRLF
            _check_unfinished(first_line, unfinished)
        if n >= end:
            if end == pos + max_line:
                raise ParseError(line_too_long, "start line too long")
            raise ParseError(too_large, "head too long")
        return None
    line = data[pos:lf]
    start = first_line(_line_body(line), True)
    if not line.endswith(b"\r"):
        raise ParseError(malformed, "bare LF as line end (CRLF required)")
    pos = lf + 1

    headers: list[tuple[bytes, bytes]] = []
    while True:
        lf = data.find(b"\n", pos, max_head)
        if lf < 0:
            unfinished = data[pos:max_head]
            if unfinished != b"\r":                # maybe the end of the head
                _check_unfinished(_check_field_line, unfinished, malformed)
            if n >= max_head:
                raise ParseError(too_large, "head too long")
            return None
        line = data[pos:lf]
        pos = lf + 1
        if line == b"\r":
            return start, headers, pos
        field = _check_field_line(_line_body(line), True, malformed)
        if not line.endswith(b"\r"):
            raise ParseError(malformed, "bare LF as line end (CRLF required)")
        headers.append(field)
        if len(headers) > max_fields:
            raise ParseError(too_large, "too many header fields")


# --- field semantics ------------------------------------------------------

def _list_elements(values: list[bytes]) -> list[bytes]:
    """The elements of a comma-separated list field, RFC 9110 §5.6.1.

    All field lines are joined; OWS around elements is removed and empty
    elements are dropped.
    """
    elements = []
    for value in values:
        for element in value.split(b","):
            element = element.strip(OWS)
            if element:
                elements.append(element)
    return elements


def _content_length(values: list[bytes], status: int) -> int:
    """The one length that every Content-Length element states, RFC 9110 §8.6.

    A list of equal lengths ("5, 5") is accepted as that length; anything
    else (empty elements, signs, hex, different lengths) is refused.
    """
    length = -1
    for value in values:
        for element in value.split(b","):
            element = element.strip(OWS)
            if (not element or not _made_of(element, _DIGIT)
                    or len(element) > _MAX_LENGTH_DIGITS):
                raise ParseError(status, "invalid Content-Length")
            if length >= 0 and int(element) != length:
                raise ParseError(status, "differing Content-Length values")
            length = int(element)
    return length


def _only_chunked(values: list[bytes]) -> bool:
    """True when the Transfer-Encoding list is exactly `chunked`, RFC 9112 §6.1."""
    codings = _list_elements(values)
    return len(codings) == 1 and codings[0].lower() == b"chunked"


def _connection_tokens(values: list[bytes], status: int) -> list[bytes]:
    """The lower-cased Connection options, RFC 9110 §7.6.1."""
    tokens = _list_elements(values)
    if len(tokens) > _MAX_CONNECTION_OPTIONS:
        raise ParseError(status, "too many Connection options")
    for token in tokens:
        if not _made_of(token, TCHAR):
            raise ParseError(status, "invalid Connection option")
    return [token.lower() for token in tokens]


def _keep_alive(version: int, tokens: list[bytes]) -> bool:
    """Whether the connection persists after this message, RFC 9112 §9.3."""
    if b"close" in tokens:
        return False
    return version == 1 or b"keep-alive" in tokens


def _fields_by_name(headers: list[tuple[bytes, bytes]], *names: bytes):
    """The values of the named fields (lower-case names), in order received."""
    found: dict[bytes, list[bytes]] = {name: [] for name in names}
    for name, value in headers:
        values = found.get(name.lower())
        if values is not None:
            values.append(value)
    return found


def _valid_authority(host: bytes) -> bool:
    """A Host value or a target's authority (its bytes already HOST_CHAR) is
    a host and an optional ":" port, RFC 3986 §3.2.2-3.2.3: "[" and "]"
    only around an IP literal at the start; the port empty (the URI grammar
    allows it) or digits up to 65535."""
    if host.startswith(b"["):
        close = host.find(b"]")
        if close < 0 or b"[" in host[1:close]:
            return False
        rest = host[close + 1:]
    else:
        colon = host.find(b":")
        name, rest = (host, b"") if colon < 0 else (host[:colon], host[colon:])
        if b"[" in name or b"]" in name:
            return False
    if not rest:
        return True
    port = rest[1:]
    return rest.startswith(b":") and _made_of(port, _DIGIT) and (
        not port or (len(port.lstrip(b"0")) <= 5 and int(port) <= 65535))


def _split_target(method: bytes, target: bytes):
    """The origin-form target and the host it names, RFC 9112 §3.2.

    Returns (target, host or None).  absolute-form is converted to
    origin-form ("/" when the path is empty); "*" is OPTIONS only.
    """
    if target.startswith(b"/"):
        return target, None                               # §3.2.1 origin-form
    if target == b"*":
        if method != b"OPTIONS":
            raise ParseError(400, "asterisk-form is only for OPTIONS")
        return target, None                               # §3.2.4
    scheme_end = target.find(b"://")
    if scheme_end < 0 or target[:scheme_end].lower() not in (b"http", b"https"):
        raise ParseError(400, "request target is not origin- or absolute-form")
    rest = target[scheme_end + 3:]                        # §3.2.2 absolute-form
    path_start = len(rest)
    for delimiter in (b"/", b"?"):
        found = rest.find(delimiter)
        if 0 <= found < path_start:
            path_start = found
    host = rest[:path_start]
    # RFC 9110 §4.2.1: an http(s) URI with an empty host is invalid; the
    # host characters also exclude userinfo ("@") and fragments ("#").
    if not host or not _made_of(host, HOST_CHAR) or not _valid_authority(host):
        raise ParseError(400, "invalid authority in the request target")
    path = rest[path_start:]
    if not path.startswith(b"/"):
        path = b"/" + path
    return path, host


# --- public API -----------------------------------------------------------

def parse_request(data: bytes, *, max_line: int = 8192, max_head: int = 32768,
                  max_fields: int = 100) -> Request | None:
    """Parse a request head from the start of data; None when incomplete."""
    head = _parse_head(data, _check_request_line, max_line, max_head,
                       max_fields, _REQUEST_STATUSES)
    if head is None:
        return None
    (method, target, version), headers, head_length = head
    target, host = _split_target(method, target)
    fields = _fields_by_name(headers, b"host", b"content-length",
                             b"transfer-encoding", b"connection", b"expect",
                             b"upgrade")

    # Host, RFC 9112 §3.2: exactly one on HTTP/1.1, at most one on HTTP/1.0.
    hosts = fields[b"host"]
    if len(hosts) > 1:
        raise ParseError(400, "more than one Host field")
    if not hosts and version == 1:
        raise ParseError(400, "HTTP/1.1 request without Host")
    if hosts and not (_made_of(hosts[0], HOST_CHAR) and _valid_authority(hosts[0])):
        raise ParseError(400, "invalid Host")
    if host is None and hosts:
        host = hosts[0]             # the target's authority wins, §3.2.2

    # Framing, RFC 9112 §6.1-6.3.
    lengths = fields[b"content-length"]
    codings = fields[b"transfer-encoding"]
    content_length = _content_length(lengths, 400) if lengths else -1
    if codings:
        if lengths:
            # §6.1: a smuggling vector; refuse rather than guess.
            raise ParseError(400, "both Transfer-Encoding and Content-Length")
        if version == 0:
            raise ParseError(400, "Transfer-Encoding on an HTTP/1.0 request")
        if not _only_chunked(codings):
            raise ParseError(400, "Transfer-Encoding other than chunked")
        body = BODY_CHUNKED
    elif lengths:
        body = BODY_LENGTH
    else:
        body = BODY_NONE             # §6.3 rule 7: no body

    # Connection, RFC 9110 §7.6.1; persistence, RFC 9112 §9.3.
    tokens = _connection_tokens(fields[b"connection"], 400)
    keep_alive = _keep_alive(version, tokens)
    upgrade = b"upgrade" in tokens and bool(fields[b"upgrade"])

    # Expect, RFC 9110 §10.1.1 (checked last: its status is 417).  A
    # 100-continue from an HTTP/1.0 client "MUST" be ignored (same section).
    expect_continue = False
    for expectation in _list_elements(fields[b"expect"]):
        if expectation.lower() != b"100-continue":
            raise ParseError(417, "unsupported expectation")
        expect_continue = version == 1

    return Request(method, target, version, headers, head_length, host, body,
                   content_length, keep_alive, expect_continue, upgrade, tokens)


def parse_response(data: bytes, *, method: bytes = b"GET", max_head: int = 65536,
                   max_fields: int = 256) -> Response | None:
    """Parse a response head from the start of data; None when incomplete.

    method is the method of the request it answers (HEAD has no body).
    """
    head = _parse_head(data, _check_status_line, max_head, max_head,
                       max_fields, _RESPONSE_STATUSES)
    if head is None:
        return None
    (version, status, reason), headers, head_length = head
    if status < 100:
        # RFC 9110 §15: every valid status code is within 100-599.
        raise ParseError(502, "status code below 100")
    fields = _fields_by_name(headers, b"content-length", b"transfer-encoding",
                             b"connection")
    tokens = _connection_tokens(fields[b"connection"], 502)
    keep_alive = _keep_alive(version, tokens)

    # The framing fields are checked on every response, even those that
    # cannot have a body: they are forwarded to the client as they are.
    lengths = fields[b"content-length"]
    codings = fields[b"transfer-encoding"]
    content_length = _content_length(lengths, 502) if lengths else -1
    if codings:
        if lengths:
            raise ParseError(502, "both Transfer-Encoding and Content-Length")
        if version == 0:
            # RFC 9112 §6.1: HTTP/1.0 has no transfer codings, such framing
            # is faulty.
            raise ParseError(502, "Transfer-Encoding on an HTTP/1.0 response")
        if not _only_chunked(codings):
            raise ParseError(502, "Transfer-Encoding other than chunked")

    # Framing, RFC 9112 §6.3, in its order.
    if method == b"HEAD" or status < 200 or status in (204, 304):
        body = BODY_NONE                                  # rule 1
    elif codings:
        body = BODY_CHUNKED                               # rule 4
    elif lengths:
        body = BODY_LENGTH                                # rule 6
    else:
        body = BODY_CLOSE                                 # rule 8
        keep_alive = False
    return Response(status, reason, version, headers, head_length, body,
                    content_length, keep_alive, status == 101)


# --- chunked transfer coding ----------------------------------------------

# ChunkedDecoder states (RFC 9112 §7.1).
_SIZE_LINE, _DATA, _DATA_CRLF, _TRAILER, _DONE = range(5)


def _check_size_line(line: bytes, complete: bool) -> int | None:
    """Check a chunk-size line, RFC 9112 §7.1: chunk-size [chunk-ext].

    Same conventions as _check_request_line.  Returns the size when complete.
    """
    digits = line[:len(line) - len(line.lstrip(_HEXDIG))]
    rest = line[len(digits):]
    if len(digits) > _MAX_CHUNK_SIZE_DIGITS:
        raise ParseError(400, "chunk size has more than 16 hex digits")
    if not digits and (rest or complete):
        raise ParseError(400, "missing or invalid chunk size")
    # More digits can only make it larger, so this is checked at once.
    size = int(digits, 16) if digits else 0   # only hex digits: no sign, no 0x
    if size > _MAX_CHUNK_SIZE:
        raise ParseError(400, "chunk size too large")
    ext = rest.lstrip(OWS)           # BWS before ";", RFC 9112 §7.1.1
    if ext:
        if ext[:1] != b";":
            raise ParseError(400, "invalid byte after the chunk size")
        if not _made_of(ext, CHUNK_EXT_CHAR):
            raise ParseError(400, "invalid byte in a chunk extension")
    elif rest and complete:
        raise ParseError(400, "whitespace after the chunk size without extension")
    return size if complete else None


class ChunkedDecoder:
    """Decodes one chunked body, fed in pieces of any size (RFC 9112 §7.1)."""

    def __init__(self, *, max_line: int = 4096, max_trailer: int = 32768) -> None:
        self.max_line = max_line
        self.max_trailer = max_trailer
        self.done = False
        self._state = _SIZE_LINE
        self._line = b""          # unfinished size or trailer line, as received
        self._remaining = 0       # data bytes still due in this chunk
        self._cr_seen = False     # the CR of the CRLF after chunk data
        self._trailer_length = 0  # bytes of the trailer section so far

    def feed(self, data: bytes) -> tuple[list[bytes], int]:
        """Decoded data pieces found in data, and how many bytes were consumed.

        Fewer than len(data) bytes are consumed only once done is true: the
        rest belongs to the next message.
        """
        pieces: list[bytes] = []
        pos = 0
        n = len(data)
        while pos < n and self._state != _DONE:
            if self._state == _DATA:
                take = min(self._remaining, n - pos)
                pieces.append(data[pos:pos + take])
                pos += take
                self._remaining -= take
                if not self._remaining:
                    self._state = _DATA_CRLF
            elif self._state == _DATA_CRLF:
                pos = self._read_data_crlf(data, pos)
            elif self._state == _SIZE_LINE:
                pos = self._read_size_line(data, pos)
            else:
                pos = self._read_trailer_line(data, pos)
        return pieces, pos

    def _read_data_crlf(self, data: bytes, pos: int) -> int:
        # Chunk data is followed by exactly CRLF.
        byte = data[pos]
        if not self._cr_seen:
            if byte != 0x0D:
                raise ParseError(400, "chunk data not followed by CRLF")
            self._cr_seen = True
        else:
            if byte != 0x0A:
                raise ParseError(400, "chunk data not followed by CRLF")
            self._cr_seen = False
            self._state = _SIZE_LINE
        return pos + 1

    def _take_line(self, data: bytes, pos: int, room: int):
        """Add the bytes of the current line; return (line or None, new pos).

        room is how many more bytes the line may take, LF included.
        """
        end = min(len(data), pos + room)
        lf = data.find(b"\n", pos, end)
        if lf < 0:
            self._line += data[pos:end]
            return None, end
        line = self._line + data[pos:lf + 1]
        self._line = b""
        return line, lf + 1

    def _read_size_line(self, data: bytes, pos: int) -> int:
        room = self.max_line - len(self._line)
        line, new_pos = self._take_line(data, pos, room)
        if line is None:
            _check_unfinished(_check_size_line, self._line)
            if new_pos - pos == room:
                raise ParseError(400, "chunk size line too long")
            return new_pos
        body = line[:-1]
        size = _check_size_line(_line_body(body), True)
        if not body.endswith(b"\r"):
            raise ParseError(400, "bare LF in chunked framing")
        if size:
            self._remaining = size
            self._state = _DATA
        else:
            self._state = _TRAILER   # last-chunk: the trailer section follows
        return new_pos

    def _read_trailer_line(self, data: bytes, pos: int) -> int:
        room = self.max_trailer - self._trailer_length
        line, new_pos = self._take_line(data, pos, room)
        self._trailer_length += new_pos - pos
        if line is None:
            if self._line != b"\r":                # maybe the end of the trailers
                _check_unfinished(_check_field_line, self._line, 400)
            if new_pos - pos == room:
                raise ParseError(400, "trailer section too long")
            return new_pos
        if line == b"\r\n":
            self._state = _DONE
            self.done = True
            return new_pos
        body = line[:-1]
        _check_field_line(_line_body(body), True, 400)
        if not body.endswith(b"\r"):
            raise ParseError(400, "bare LF in chunked framing")
        return new_pos
