# Compression of a route's responses (route.compress): a compiled phase
# whose Stage looks at each response head and, for a compressible one
# (type, size, no Content-Encoding, no Content-Range, no no-transform, not
# HEAD, not 204/206/304), sets a BodyFilter (ClientConn.xform) that
# compresses the body as it arrives from the backend and writes it to the
# client chunked (HTTP/1.1) or close-delimited (HTTP/1.0).  Backpressure is
# the core's: the filter writes to the client's transport, whose high-water
# mark pauses the backend's reads as for any body.  Nothing is buffered
# beyond the compressor's window.  Compressible responses that go out as
# they are get `Vary: Accept-Encoding` too, so that a cache (this one, or
# one downstream) never hands an identity copy to every client, or the
# reverse.  The compressors are edgeproxy/compress/encoders.py.

cdef object _cz_log = logging.getLogger("edgeproxy.compress")
cdef object _cz_encoder = None        # edgeproxy.compress.encoders.encoder (on first use)
cdef bytes _VARY_AE = b"Vary: Accept-Encoding\r\n"


cdef inline bint _has_token(const char *v, size_t n, const char *tok, size_t tl) noexcept:
    """A comma-separated list value v[:n] has token tok (lower-case), any case."""
    cdef size_t i = 0, j, e
    while i < n:
        while i < n and (v[i] == b' ' or v[i] == b'\t' or v[i] == b','):
            i += 1
        j = i
        while j < n and v[j] != b',':
            j += 1
        e = j
        while e > i and (v[e - 1] == b' ' or v[e - 1] == b'\t'):
            e -= 1
        if e - i == tl and _ieq(v + i, tl, tok, tl):
            return 1
        i = j + 1
    return 0


cdef inline bint _vary_covers(const char *v, size_t n) noexcept:
    return _has_token(v, n, b"accept-encoding", 15) or _has_token(v, n, b"*", 1)


@cython.final
cdef class CompressPhase(Phase):
    """A route's `compress = [...]`: leaves a CompressStage on every GET."""
    cdef readonly tuple offer         # codings, by the route's preference
    cdef frozenset types              # compressible media types (lower-case bytes)
    cdef readonly long long min_size

    def __init__(self, tuple offer, types, long long min_size):
        self.offer = offer
        self.types = frozenset(t.lower().encode("latin-1") for t in types)
        self.min_size = min_size

    cdef int request(self, ClientConn c, Route route, HeadParser hp) except -2:
        cdef size_t i
        cdef bytes ae = None
        cdef tuple ranked
        cdef CompressStage st
        for i in range(hp.nfields):
            if hp.hid[i] == H_OTHER and hp.fields[i].name_len == 15 \
                    and _ieq(hp.fields[i].name, 15, b"accept-encoding", 15):
                v = hp.fields[i].value[:hp.fields[i].value_len]
                ae = v if ae is None else ae + b", " + v
        st = CompressStage.__new__(CompressStage)
        st.ph = self
        if ae is not None and not c.req_is_head:
            ranked = _ranked(ae, self.offer)
            if ranked:
                st.coding = ranked[0]
        _add_stage(c, st)
        return R_GO


@cython.final
cdef class CompressStage(Stage):
    """One request's part: decides at the response head."""
    cdef CompressPhase ph
    cdef str coding                   # what the client takes best, or None (identity)

    cdef bytes response(self, ClientConn c, HeadParser hp, UpstreamConn u, bint whole):
        cdef size_t i, nl, vl, j
        cdef const char *nm
        cdef const char *v
        cdef bint typed = 0, vary_ok = 0, skip = 0
        cdef int s = hp.status
        cdef Compressing f
        if not (200 <= s <= 203):
            return None               # (204, 206, 304 and errors go as they are)
        for i in range(hp.nfields):
            if hp.hid[i] != H_OTHER:
                continue
            nm = hp.fields[i].name
            nl = hp.fields[i].name_len
            v = hp.fields[i].value
            vl = hp.fields[i].value_len
            if nl == 12 and _ieq(nm, nl, b"content-type", 12):
                j = 0
                while j < vl and v[j] != b';' and v[j] != b' ' and v[j] != b'\t':
                    j += 1
                typed = v[:j].lower() in self.ph.types
            elif nl == 16 and _ieq(nm, nl, b"content-encoding", 16):
                return None           # already encoded (even "identity": left alone)
            elif nl == 13:
                if _ieq(nm, nl, b"content-range", 13):
                    return None
                if _ieq(nm, nl, b"cache-control", 13) and _has_token(v, vl, b"no-transform", 12):
                    skip = 1
            elif nl == 4 and _ieq(nm, nl, b"vary", 4):
                if _vary_covers(v, vl):
                    vary_ok = 1
        if not typed or skip:
            return None
        if self.coding is None or hp.body == B_NONE or (
                hp.body == B_LENGTH and hp.content_length < max(self.ph.min_size, 1)):
            # goes as it is, but another client would get it compressed
            return None if vary_ok else _VARY_AE
        f = Compressing.__new__(Compressing)
        try:
            f.start(self.coding, c.req_minor != 0, vary_ok)
        except Exception:
            _cz_log.exception("compress: cannot start a %s compressor; sending as it is",
                              self.coding)
            return None if vary_ok else _VARY_AE
        c.xform = f
        return None


@cython.final
cdef class Compressing(BodyFilter):
    """The body filter of one compressed response."""
    cdef object enc
    cdef bytes coding
    cdef bint chunked                 # frame as chunks (HTTP/1.1), else close-delimited
    cdef bint vary_ok                 # the backend's Vary already covers Accept-Encoding

    cdef void start(self, str coding, bint chunked, bint vary_ok) except *:
        global _cz_encoder
        if _cz_encoder is None:
            from edgeproxy.compress.encoders import encoder
            _cz_encoder = encoder
        self.enc = _cz_encoder(coding)
        self.coding = coding.encode("ascii")
        self.chunked = chunked
        self.vary_ok = vary_ok

    cdef void head(self, ClientConn c):
        """Edit the client's head in _out: no Content-Length, a weak ETag,
        Content-Encoding, Vary, and the framing."""
        cdef bytes h = _out.p[:_out.n]
        cdef list lines = h[:len(h) - 4].split(b"\r\n")
        cdef list out = [lines[0]]
        for line in lines[1:]:
            name = line[:line.find(b":")].strip().lower()
            if name == b"content-length" or name == b"transfer-encoding":
                continue
            if name == b"etag":
                out.append(_weak_etag_line(line))
                continue
            out.append(line)
        out.append(b"Content-Encoding: " + self.coding)
        if not self.vary_ok:
            out.append(b"Vary: Accept-Encoding")
        if self.chunked:
            out.append(b"Transfer-Encoding: chunked")
        out.append(b"\r\n")
        _out.n = 0
        _out.addb(b"\r\n".join(out))

    cdef list cache_fields(self, list fields):
        cdef list out = []
        for name, value in fields:
            low = name.lower()
            if low == b"content-length" or low == b"transfer-encoding":
                continue
            if low == b"etag":
                out.append((name, _weak_etag(value)))
                continue
            out.append((name, value))
        out.append((b"Content-Encoding", self.coding))
        if not self.vary_ok:
            out.append((b"Vary", b"Accept-Encoding"))
        return out

    cdef void _emit(self, ClientConn c, bytes data):
        cdef bytes framed
        if not data or c.transport is None or c.state == C_CLOSED:
            return
        framed = (b"%x\r\n%s\r\n" % (len(data), data)) if self.chunked else data
        c.transport.write(framed)
        c.resp_bytes += len(framed)
        if c.tap:
            c._tap(framed)

    cdef void data(self, ClientConn c, const char *p, size_t n):
        if n == 0:
            return
        try:
            out = self.enc.compress(p[:n])
        except Exception:
            _cz_log.exception("compress: the %s compressor failed; closing the connection",
                              self.coding.decode())
            c.close()
            return
        self._emit(c, out)

    cdef void end(self, ClientConn c):
        try:
            out = self.enc.finish()
        except Exception:
            _cz_log.exception("compress: the %s compressor failed at the end",
                              self.coding.decode())
            c.close()
            return
        self._emit(c, out)
        if self.chunked and c.transport is not None and c.state != C_CLOSED:
            c.transport.write(b"0\r\n\r\n")
            c.resp_bytes += 5
            if c.tap:
                c._tap(b"0\r\n\r\n")


cdef bytes _weak_etag(bytes value):
    """A strong ETag made weak (the compressed bytes differ from the
    identity ones; RFC 9110 §8.8.3): "x" -> W/"x"."""
    value = value.strip()
    if value.startswith(b'"'):
        return b"W/" + value
    return value


cdef bytes _weak_etag_line(bytes line):
    cdef Py_ssize_t k = line.find(b":")
    return line[:k + 1] + b" " + _weak_etag(line[k + 1:])
