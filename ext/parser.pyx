# HTTP/1.1 head parsing: strict line checks, then picohttpparser for the
# field block (docs/parser-contract.md).
#
# The line walk is the twin of edgeproxy/http/_pure.py's _parse_head: every
# complete line is checked when its LF arrives, an unfinished last line as
# far as it goes, limits last, so any split of the input gives the same
# answer.  Once the head is complete, picohttpparser splits the fields and
# the walk's findings are cross-checked against it.  All of it works on
# pointers into the caller's buffer: no Python object is made per field.

from libc.string cimport memchr, memcmp

from pycohttpparser._pycohttpparser import ffi as _pico_ffi, lib as _pico_lib

cdef phr_parse_headers_t _phr_parse_headers = <phr_parse_headers_t><uintptr_t>int(
    _pico_ffi.cast("uintptr_t", _pico_ffi.addressof(_pico_lib, "phr_parse_headers")))


class HTTPError(Exception):
    """An HTTP-level failure with the status it maps to."""

    def __init__(self, status, message):
        super().__init__(f"{status}: {message}")
        self.status = status
        self.message = message


class ParseError(HTTPError):
    """Malformed input, or input over a limit."""


BODY_NONE = B_NONE
BODY_LENGTH = B_LENGTH
BODY_CHUNKED = B_CHUNKED
BODY_CLOSE = B_CLOSE


# ---- byte classes -------------------------------------------------------

cdef unsigned char _tchar[256]      # RFC 9110 5.6.2 token characters
cdef unsigned char _fvalue[256]     # field-value bytes: HTAB SP VCHAR obs-text
cdef unsigned char _target[256]     # request-target bytes: VCHAR only
cdef unsigned char _hostch[256]     # Host / authority bytes
cdef unsigned char _lower[256]
cdef signed char _hexval[256]

cdef void _init_tables():
    cdef int c
    for c in range(256):
        _tchar[c] = 0
        _fvalue[c] = 1 if (c == 9 or c == 32 or (0x21 <= c <= 0x7e) or c >= 0x80) else 0
        _target[c] = 1 if 0x21 <= c <= 0x7e else 0
        _hostch[c] = 0
        _lower[c] = c + 32 if 65 <= c <= 90 else c
        _hexval[c] = -1
    for c in b"!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ":
        _tchar[c] = 1
    for c in b"-._~%!$&'()*+,;=:[]0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ":
        _hostch[c] = 1
    for c in range(10):
        _hexval[48 + c] = c
    for c in range(6):
        _hexval[97 + c] = 10 + c
        _hexval[65 + c] = 10 + c

_init_tables()


cdef bint _authority_ok(const char *h, size_t n) noexcept nogil:
    """A Host value or a target's authority, its bytes already checked
    against _hostch, is a host and an optional ":" port (RFC 3986 3.2.2,
    3.2.3): "[" and "]" only around an IP literal at the start; the port
    empty (the URI grammar allows it) or digits up to 65535."""
    cdef const char *c
    cdef size_t i, end = 0
    cdef long port = 0
    if n and h[0] == b'[':
        c = <const char *>memchr(h, b']', n)
        if c == NULL or memchr(h + 1, b'[', c - h - 1) != NULL:
            return 0
        end = c - h + 1
    else:
        while end < n and h[end] != b':':
            if h[end] == b'[' or h[end] == b']':
                return 0
            end += 1
    if end == n:
        return 1
    if h[end] != b':':
        return 0
    for i in range(end + 1, n):
        if not (48 <= <unsigned char>h[i] <= 57):
            return 0
        port = port * 10 + (h[i] - 48)
        if port > 65535:
            return 0
    return 1


cdef inline bint _ieq(const char *a, size_t alen, const char *lower_b, size_t blen) noexcept nogil:
    """a (any case) equals lower_b (lower case)."""
    cdef size_t i
    if alen != blen:
        return 0
    for i in range(alen):
        if _lower[<unsigned char>a[i]] != <unsigned char>lower_b[i]:
            return 0
    return 1


cdef inline bint _icase_eq(const char *a, const char *b, size_t n) noexcept nogil:
    """a and b equal ignoring ASCII case."""
    cdef size_t i
    for i in range(n):
        if _lower[<unsigned char>a[i]] != _lower[<unsigned char>b[i]]:
            return 0
    return 1


cdef inline bint _is_ows(char c) noexcept nogil:
    return c == 32 or c == 9


cdef inline bint _next_element(const char *v, size_t vl, size_t *pos,
                               size_t *start, size_t *end) noexcept nogil:
    """The next non-empty element of a comma list (RFC 9110 5.6.1) from
    *pos, without OWS: its bounds in *start, *end.  False at the end."""
    cdef size_t j = pos[0], a, k
    while j <= vl:
        a = j
        while j < vl and v[j] != b',':
            j += 1
        k = j
        while a < k and _is_ows(v[a]):
            a += 1
        while k > a and _is_ows(v[k - 1]):
            k -= 1
        j += 1
        if k > a:
            pos[0] = j
            start[0] = a
            end[0] = k
            return 1
    pos[0] = j
    return 0


cdef int _classify(const char *n, size_t l) noexcept nogil:
    """The HeaderId of a field name."""
    cdef unsigned char c0
    if l < 2:
        return H_OTHER
    c0 = _lower[<unsigned char>n[0]]
    if l == 2:
        if _ieq(n, l, b"te", 2): return H_TE
    elif l == 4:
        if c0 == b'h' and _ieq(n, l, b"host", 4): return H_HOST
        if c0 == b'd' and _ieq(n, l, b"date", 4): return H_DATE
    elif l == 6:
        if c0 == b's' and _ieq(n, l, b"server", 6): return H_SERVER
        if c0 == b'e' and _ieq(n, l, b"expect", 6): return H_EXPECT
    elif l == 7:
        if c0 == b't' and _ieq(n, l, b"trailer", 7): return H_TRAILER
        if c0 == b'u' and _ieq(n, l, b"upgrade", 7): return H_UPGRADE
    elif l == 9:
        if c0 == b'f' and _ieq(n, l, b"forwarded", 9): return H_FORWARDED
        if c0 == b'x' and _ieq(n, l, b"x-runtime", 9): return H_X_RUNTIME
    elif l == 10:
        if c0 == b'c' and _ieq(n, l, b"connection", 10): return H_CONNECTION
        if c0 == b'k' and _ieq(n, l, b"keep-alive", 10): return H_KEEP_ALIVE
    elif l == 12:
        if c0 == b'x' and _ieq(n, l, b"x-powered-by", 12): return H_X_POWERED_BY
    elif l == 14:
        if c0 == b'c' and _ieq(n, l, b"content-length", 14): return H_CONTENT_LENGTH
    elif l == 15:
        if c0 == b'x' and _ieq(n, l, b"x-forwarded-for", 15): return H_X_FORWARDED_FOR
    elif l == 16:
        if c0 == b'p' and _ieq(n, l, b"proxy-connection", 16): return H_PROXY_CONNECTION
        if c0 == b'x' and _ieq(n, l, b"x-forwarded-host", 16): return H_X_FORWARDED_HOST
        if c0 == b'x' and _ieq(n, l, b"x-aspnet-version", 16): return H_X_ASPNET_VERSION
    elif l == 17:
        if c0 == b't' and _ieq(n, l, b"transfer-encoding", 17): return H_TRANSFER_ENCODING
        if c0 == b'x' and _ieq(n, l, b"x-forwarded-proto", 17): return H_X_FORWARDED_PROTO
    elif l == 19:
        if c0 == b'x' and _ieq(n, l, b"x-aspnetmvc-version", 19): return H_X_ASPNETMVC_VERSION
    return H_OTHER


cdef class HeadParser:
    """Parses one request or response head at a time into C fields.

    One instance per worker serves every connection: parsing is synchronous
    and the results point into the caller's buffer, valid until it changes.
    """
    cdef:
        phr_header fields[MAX_FIELDS_CAP]
        unsigned char hid[MAX_FIELDS_CAP]
        size_t nfields
        const char *method
        size_t method_len
        const char *target
        size_t target_len
        bint target_add_slash      # absolute-form "http://h?q" forwards as "/?q"
        const char *host
        size_t host_len
        bint has_host
        bint host_from_uri
        int minor
        int status
        const char *reason
        size_t reason_len
        size_t head_len
        int body
        long long content_length
        bint keep_alive
        bint expect_continue
        bint upgrade
        bint conn_close
        int ntokens
        const char *tok[MAX_CONN_TOKENS]
        size_t tok_len[MAX_CONN_TOKENS]
        int err_status
        const char *err_msg

    cdef inline int _fail(self, int status, const char *msg) noexcept:
        self.err_status = status
        self.err_msg = msg
        return -1

    cdef inline bint is_conn_token(self, const char *name, size_t l) noexcept:
        cdef int i
        for i in range(self.ntokens):
            if self.tok_len[i] == l and _icase_eq(name, self.tok[i], l):
                return 1
        return 0

    cdef int _split_fields(self, const char *buf, size_t pos, size_t end, int bad) noexcept:
        """Let picohttpparser split the (already checked) field lines
        buf[pos:end]; trim values and classify names."""
        cdef size_t i, vl
        cdef const char *v
        cdef int ret
        cdef size_t want = self.nfields
        self.nfields = MAX_FIELDS_CAP
        ret = _phr_parse_headers(buf + pos, end - pos, self.fields, &self.nfields, 0)
        if ret != <int>(end - pos) or self.nfields != want:
            return self._fail(bad, b"malformed header block")
        for i in range(self.nfields):
            if self.fields[i].name == NULL:
                return self._fail(bad, b"folded header line")
            v = self.fields[i].value
            vl = self.fields[i].value_len
            while vl > 0 and _is_ows(v[vl - 1]):
                vl -= 1
            while vl > 0 and _is_ows(v[0]):
                v += 1
                vl -= 1
            self.fields[i].value = v
            self.fields[i].value_len = vl
            self.hid[i] = <unsigned char>_classify(self.fields[i].name, self.fields[i].name_len)
        return 0

    # -- line checks: each takes a line without its CRLF when complete, or
    # -- the bytes received so far, and refuses what can never be valid

    cdef int _check_request_line(self, const char *p, size_t l, bint complete) noexcept:
        cdef const char *sp1
        cdef const char *sp2
        cdef size_t ml, i, tl, vl
        cdef const char *t
        cdef const char *ver
        sp1 = <const char *>memchr(p, b' ', l)
        ml = (sp1 - p) if sp1 != NULL else l
        for i in range(ml):
            if not _tchar[<unsigned char>p[i]]:
                return self._fail(400, b"invalid byte in the method or request line")
        if sp1 == NULL:
            return self._fail(400, b"request line has no target") if complete else 0
        if ml == 0:
            return self._fail(400, b"request line starts with a space")
        if ml == 7 and memcmp(p, b"CONNECT", 7) == 0:
            return self._fail(405, b"CONNECT is not supported")
        t = sp1 + 1
        sp2 = <const char *>memchr(t, b' ', l - ml - 1)
        tl = (sp2 - t) if sp2 != NULL else l - ml - 1
        for i in range(tl):
            if not _target[<unsigned char>t[i]]:
                return self._fail(400, b"invalid byte in the request target")
        if sp2 == NULL:
            return self._fail(400, b"request line has no HTTP version") if complete else 0
        if tl == 0:
            return self._fail(400, b"empty request target")
        ver = sp2 + 1
        vl = l - ml - tl - 2
        if complete:
            if vl != 8 or memcmp(ver, b"HTTP/1.", 7) != 0 or (ver[7] != b'0' and ver[7] != b'1'):
                return self._fail(400, b"unsupported or malformed HTTP version")
            self.method = p
            self.method_len = ml
            self.target = t
            self.target_len = tl
            self.minor = ver[7] - 48
        elif not ((vl <= 7 and memcmp(ver, b"HTTP/1.", vl) == 0)
                  or (vl == 8 and memcmp(ver, b"HTTP/1.", 7) == 0
                      and (ver[7] == b'0' or ver[7] == b'1'))):
            return self._fail(400, b"unsupported or malformed HTTP version")
        return 0

    cdef int _check_status_line(self, const char *p, size_t l, bint complete) noexcept:
        cdef size_t i, k
        if l < 8:
            if complete or memcmp(p, b"HTTP/1.", l if l < 7 else 7) != 0 or (
                    l == 8 and p[7] != b'0' and p[7] != b'1'):
                return self._fail(502, b"malformed status line")
            return 0
        if memcmp(p, b"HTTP/1.", 7) != 0 or (p[7] != b'0' and p[7] != b'1'):
            return self._fail(502, b"unsupported or malformed HTTP version")
        if l > 8 and p[8] != b' ':
            return self._fail(502, b"malformed status line")
        k = 0
        for i in range(9, l if l < 12 else 12):
            if not (48 <= <unsigned char>p[i] <= 57):
                return self._fail(502, b"status code is not 3 digits")
            k += 1
        if k < 3:
            return self._fail(502, b"status code is not 3 digits") if complete else 0
        if l > 12 and p[12] != b' ':
            return self._fail(502, b"status code is not 3 digits")
        for i in range(13, l):
            if not _fvalue[<unsigned char>p[i]]:
                return self._fail(502, b"invalid byte in the reason phrase")
        if complete:
            self.minor = p[7] - 48
            self.status = (p[9] - 48) * 100 + (p[10] - 48) * 10 + (p[11] - 48)
            self.reason = p + 13 if l > 13 else NULL
            self.reason_len = l - 13 if l > 13 else 0
        return 0

    cdef int _check_field_line(self, const char *p, size_t l, bint complete, int bad) noexcept:
        cdef const char *colon
        cdef size_t nl, i
        if l and _is_ows(p[0]):
            return self._fail(bad, b"line folding or leading whitespace in a field line")
        colon = <const char *>memchr(p, b':', l)
        nl = (colon - p) if colon != NULL else l
        for i in range(nl):
            if not _tchar[<unsigned char>p[i]]:
                return self._fail(bad, b"invalid byte in a field name")
        if colon == NULL:
            return self._fail(bad, b"field line without a colon") if complete else 0
        if nl == 0:
            return self._fail(bad, b"empty field name")
        for i in range(nl + 1, l):
            if not _fvalue[<unsigned char>p[i]]:
                return self._fail(bad, b"invalid byte in a field value")
        return 0

    cdef inline int _check_line(self, int kind, const char *p, size_t l, bint complete, int bad) noexcept:
        if kind == 0:
            return self._check_request_line(p, l, complete)
        if kind == 1:
            return self._check_status_line(p, l, complete)
        return self._check_field_line(p, l, complete, bad)

    cdef inline int _check_unfinished(self, int kind, const char *p, size_t l, int bad) noexcept:
        # once it ends in CR only LF may follow: check it as complete
        if l and p[l - 1] == b'\r':
            return self._check_line(kind, p, l - 1, 1, bad)
        return self._check_line(kind, p, l, 0, bad)

    cdef int _walk_head(self, const char *buf, size_t n, size_t last_len, bint is_req,
                        size_t max_line, size_t max_head, size_t max_fields) noexcept:
        """The twin of _pure._parse_head.  1: complete (head_len, fields
        split); 0: incomplete; -1: error."""
        cdef int bad = 400 if is_req else 502
        cdef int kind = 0 if is_req else 1
        cdef size_t pos = 0, end, lim, nf = 0, fields_start, ll
        cdef const char *lf
        if is_req:
            while pos + 1 < n and buf[pos] == b'\r' and buf[pos + 1] == b'\n':
                pos += 2
        end = pos + max_line
        if end > max_head:
            end = max_head
        lim = end if end < n else n
        lf = <const char *>memchr(buf + pos, b'\n', lim - pos) if lim > pos else NULL
        if lf == NULL:
            if not (is_req and lim == pos + 1 and buf[pos] == b'\r'):
                if self._check_unfinished(kind, buf + pos, lim - pos if lim > pos else 0, bad) < 0:
                    return -1
            if n >= end:
                if end == pos + max_line:
                    return self._fail(414 if is_req else 502, b"start line too long")
                return self._fail(431 if is_req else 502, b"head too long")
            return 0
        ll = lf - (buf + pos)
        if ll == 0 or buf[pos + ll - 1] != b'\r':
            if self._check_line(kind, buf + pos, ll, 1, bad) < 0:
                return -1
            return self._fail(bad, b"bare LF as line end (CRLF required)")
        if self._check_line(kind, buf + pos, ll - 1, 1, bad) < 0:
            return -1
        pos += ll + 1
        fields_start = pos
        lim = max_head if max_head < n else n
        while True:
            lf = <const char *>memchr(buf + pos, b'\n', lim - pos) if lim > pos else NULL
            if lf == NULL:
                if not (lim == pos + 1 and buf[pos] == b'\r'):
                    if self._check_unfinished(2, buf + pos, lim - pos if lim > pos else 0, bad) < 0:
                        return -1
                if n >= max_head:
                    return self._fail(431 if is_req else 502, b"head too long")
                return 0
            ll = lf - (buf + pos)
            if ll == 1 and buf[pos] == b'\r':
                self.head_len = pos + 2
                self.nfields = nf
                if self._split_fields(buf, fields_start, pos + 2, bad) < 0:
                    return -1
                return 1
            # a line that ended before last_len passed these checks already
            if <size_t>(lf - buf) >= last_len:
                if ll == 0 or buf[pos + ll - 1] != b'\r':
                    if self._check_field_line(buf + pos, ll, 1, bad) < 0:
                        return -1
                    return self._fail(bad, b"bare LF as line end (CRLF required)")
                if self._check_field_line(buf + pos, ll - 1, 1, bad) < 0:
                    return -1
            nf += 1
            if nf > max_fields:
                return self._fail(431 if is_req else 502, b"too many header fields")
            pos += ll + 1

    cdef int _scan_semantics(self, bint is_request) noexcept:
        """Framing and connection fields shared by requests and responses."""
        cdef size_t i, j, start, k
        cdef const char *v
        cdef size_t vl
        cdef long long cl
        cdef int ndig
        cdef int te_count = 0
        cdef bint te_chunked = 0
        cdef bint has_cl = 0
        cdef bint has_te = 0
        cdef bint has_upgrade_field = 0
        cdef bint tok_upgrade = 0
        cdef bint tok_keepalive = 0
        cdef int nhost = 0
        cdef bint has_expect = 0
        cdef unsigned char h
        self.ntokens = 0
        self.conn_close = 0
        self.expect_continue = 0
        self.content_length = -1
        self.has_host = 0
        for i in range(self.nfields):
            h = self.hid[i]
            if h == H_OTHER:
                continue
            v = self.fields[i].value
            vl = self.fields[i].value_len
            if h == H_CONTENT_LENGTH:
                # a comma list of equal digit strings (RFC 9110 8.6)
                j = 0
                while True:
                    while j < vl and _is_ows(v[j]):
                        j += 1
                    cl = 0
                    ndig = 0
                    while j < vl and 48 <= <unsigned char>v[j] <= 57:
                        cl = cl * 10 + (v[j] - 48)
                        ndig += 1
                        j += 1
                        if ndig > 18:
                            return self._fail(400 if is_request else 502, b"Content-Length too long")
                    if ndig == 0:
                        return self._fail(400 if is_request else 502, b"invalid Content-Length")
                    while j < vl and _is_ows(v[j]):
                        j += 1
                    if has_cl and cl != self.content_length:
                        return self._fail(400 if is_request else 502, b"conflicting Content-Length")
                    has_cl = 1
                    self.content_length = cl
                    if j == vl:
                        break
                    if v[j] != b',':
                        return self._fail(400 if is_request else 502, b"invalid Content-Length")
                    j += 1
            elif h == H_TRANSFER_ENCODING:
                has_te = 1
                j = 0
                while _next_element(v, vl, &j, &start, &k):
                    te_count += 1
                    te_chunked = _ieq(v + start, k - start, b"chunked", 7)
            elif h == H_CONNECTION:
                j = 0
                while _next_element(v, vl, &j, &start, &k):
                    for ndig in range(<int>(k - start)):
                        if not _tchar[<unsigned char>v[start + ndig]]:
                            return self._fail(400 if is_request else 502, b"invalid Connection token")
                    if self.ntokens == MAX_CONN_TOKENS:
                        return self._fail(400 if is_request else 502, b"too many Connection tokens")
                    self.tok[self.ntokens] = v + start
                    self.tok_len[self.ntokens] = k - start
                    self.ntokens += 1
                    if _ieq(v + start, k - start, b"close", 5):
                        self.conn_close = 1
                    elif _ieq(v + start, k - start, b"keep-alive", 10):
                        tok_keepalive = 1
                    elif _ieq(v + start, k - start, b"upgrade", 7):
                        tok_upgrade = 1
            elif h == H_UPGRADE:
                has_upgrade_field = 1
            elif is_request and h == H_HOST:
                nhost += 1
                if nhost > 1:
                    return self._fail(400, b"more than one Host")
                for j in range(vl):
                    if not _hostch[<unsigned char>v[j]]:
                        return self._fail(400, b"invalid Host")
                if not _authority_ok(v, vl):
                    return self._fail(400, b"invalid Host")
                if not self.host_from_uri:
                    self.host = v
                    self.host_len = vl
                self.has_host = 1
            elif is_request and h == H_EXPECT:
                has_expect = 1
        if self.host_from_uri:
            self.has_host = 1
        if self.minor == 1:
            self.keep_alive = not self.conn_close
        else:
            self.keep_alive = tok_keepalive and not self.conn_close
        if has_te:
            if has_cl:
                return self._fail(400 if is_request else 502, b"both Transfer-Encoding and Content-Length")
            if te_count != 1 or not te_chunked or self.minor == 0:
                return self._fail(400 if is_request else 502, b"unsupported Transfer-Encoding")
            self.body = B_CHUNKED
        elif has_cl:
            self.body = B_LENGTH
        else:
            self.body = B_NONE
        if is_request:
            if self.minor == 1 and nhost == 0:
                return self._fail(400, b"missing Host")
            self.upgrade = tok_upgrade and has_upgrade_field
            if has_expect and self._check_expect() < 0:
                return -1        # last: the only 417
        return 0

    cdef int _check_expect(self) noexcept:
        """Expect (RFC 9110 10.1.1) as a list: only 100-continue, which an
        HTTP/1.0 request's must be ignored."""
        cdef size_t i, j, start, k, vl
        cdef const char *v
        for i in range(self.nfields):
            if self.hid[i] != H_EXPECT:
                continue
            v = self.fields[i].value
            vl = self.fields[i].value_len
            j = 0
            while _next_element(v, vl, &j, &start, &k):
                if not _ieq(v + start, k - start, b"100-continue", 12):
                    return self._fail(417, b"unsupported expectation")
                self.expect_continue = self.minor == 1
        return 0

    cdef int parse_request(self, const char *buf, size_t n, size_t last_len,
                           size_t max_line, size_t max_head, size_t max_fields) noexcept:
        """1: a complete head (head_len set); 0: incomplete; -1: error
        (err_status, err_msg set).  last_len: how much of buf an earlier
        call saw incomplete, so slow senders are not checked twice."""
        cdef int r
        cdef size_t i, alen, tl
        cdef const char *t
        if max_fields > MAX_FIELDS_CAP - 1:
            max_fields = MAX_FIELDS_CAP - 1
        r = self._walk_head(buf, n, last_len, 1, max_line, max_head, max_fields)
        if r <= 0:
            return r
        # the target's form (RFC 9112 3.2)
        t = self.target
        tl = self.target_len
        self.host_from_uri = 0
        self.target_add_slash = 0
        self.host = NULL
        self.host_len = 0
        if t[0] == b'/':
            pass
        elif tl == 1 and t[0] == b'*':
            if not (self.method_len == 7 and memcmp(self.method, b"OPTIONS", 7) == 0):
                return self._fail(400, b"asterisk-form is only for OPTIONS")
        else:
            # absolute-form: converted to origin-form; its authority is the host
            if tl >= 7 and _ieq(t, 7, b"http://", 7):
                alen = 7
            elif tl >= 8 and _ieq(t, 8, b"https://", 8):
                alen = 8
            else:
                return self._fail(400, b"request target is not origin- or absolute-form")
            i = alen
            while i < tl and t[i] != b'/' and t[i] != b'?':
                if not _hostch[<unsigned char>t[i]]:
                    return self._fail(400, b"invalid authority in the request target")
                i += 1
            if i == alen or not _authority_ok(t + alen, i - alen):
                return self._fail(400, b"invalid authority in the request target")
            self.host = t + alen
            self.host_len = i - alen
            self.host_from_uri = 1
            self.target = t + i
            self.target_len = tl - i
            if self.target_len == 0 or t[i] != b'/':
                self.target_add_slash = 1
        return 1 if self._scan_semantics(1) == 0 else -1

    cdef int parse_response(self, const char *buf, size_t n, size_t last_len,
                            bint is_head, size_t max_head, size_t max_fields) noexcept:
        """Like parse_request, for a backend's response; errors are 502."""
        cdef int r
        if max_fields > MAX_FIELDS_CAP - 1:
            max_fields = MAX_FIELDS_CAP - 1
        r = self._walk_head(buf, n, last_len, 0, max_head, max_head, max_fields)
        if r <= 0:
            return r
        if self.status < 100:
            return self._fail(502, b"status code below 100")
        self.host_from_uri = 0
        if self._scan_semantics(0) < 0:
            return -1
        self.upgrade = self.status == 101
        if is_head or self.status < 200 or self.status == 204 or self.status == 304:
            self.body = B_NONE
        elif self.body == B_NONE:
            self.body = B_CLOSE
            self.keep_alive = 0
        return 1

    # Python-level views, for the wrappers and tests only.
    cdef list py_headers(self):
        cdef size_t i
        return [(self.fields[i].name[:self.fields[i].name_len],
                 self.fields[i].value[:self.fields[i].value_len])
                for i in range(self.nfields)]

    cdef list py_tokens(self):
        cdef int i
        cdef bytes b
        out = []
        for i in range(self.ntokens):
            b = self.tok[i][:self.tok_len[i]]
            out.append(b.lower())
        return out


class Request:
    """A parsed request head (Python view, for tests and tools)."""
    __slots__ = ("method", "target", "version", "headers", "head_length", "host",
                 "body", "content_length", "keep_alive", "expect_continue",
                 "upgrade", "connection_tokens")

    def __repr__(self):
        return f"<Request {self.method!r} {self.target!r} HTTP/1.{self.version}>"


class Response:
    """A parsed response head (Python view, for tests and tools)."""
    __slots__ = ("status", "reason", "version", "headers", "head_length",
                 "body", "content_length", "keep_alive", "upgrade")

    def __repr__(self):
        return f"<Response {self.status} HTTP/1.{self.version}>"


def parse_request(data, *, max_line=8192, max_head=32768, max_fields=100):
    """Parse a request head from bytes: a Request, None if incomplete, or
    ParseError/HTTPError."""
    cdef HeadParser hp = HeadParser()
    cdef bytes b = bytes(data)
    cdef int r = hp.parse_request(b, len(b), 0, max_line, max_head, max_fields)
    if r == 0:
        return None
    if r < 0:
        raise ParseError(hp.err_status, hp.err_msg.decode())
    req = Request()
    req.method = hp.method[:hp.method_len]
    target = hp.target[:hp.target_len]
    req.target = (b"/" + target) if hp.target_add_slash else target
    req.version = hp.minor
    req.headers = hp.py_headers()
    req.head_length = hp.head_len
    req.host = hp.host[:hp.host_len] if hp.has_host else None
    req.body = hp.body
    req.content_length = hp.content_length
    req.keep_alive = bool(hp.keep_alive)
    req.expect_continue = bool(hp.expect_continue)
    req.upgrade = bool(hp.upgrade)
    req.connection_tokens = hp.py_tokens()
    return req


def parse_response(data, *, method=b"GET", max_head=65536, max_fields=256):
    """Parse a response head from bytes: a Response, None if incomplete, or
    ParseError (status 502)."""
    cdef HeadParser hp = HeadParser()
    cdef bytes b = bytes(data)
    cdef int r = hp.parse_response(b, len(b), 0, method == b"HEAD", max_head, max_fields)
    if r == 0:
        return None
    if r < 0:
        raise ParseError(502, hp.err_msg.decode())
    resp = Response()
    resp.status = hp.status
    resp.reason = hp.reason[:hp.reason_len] if hp.reason_len else b""
    resp.version = hp.minor
    resp.headers = hp.py_headers()
    resp.head_length = hp.head_len
    resp.body = hp.body
    resp.content_length = hp.content_length
    resp.keep_alive = bool(hp.keep_alive)
    resp.upgrade = bool(hp.upgrade)
    return resp
