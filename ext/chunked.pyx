# Chunked transfer coding (RFC 9112 7.1): a strict framing scanner.
#
# The proxy passes chunked bodies through unchanged, so the scanner only
# validates and finds chunk data; it never rewrites the buffer.  It keeps its
# state in a C struct so it resumes at any byte boundary.

cdef struct ChunkState:
    int phase
    long long size          # bytes left in the current chunk (CS_DATA)
    int ndigits
    size_t line_len         # bytes of the current size line
    size_t trailer_len
    size_t max_line
    size_t max_trailer
    long long data_total    # data bytes seen so far
    const char *err


cdef inline void chunk_init(ChunkState *st, size_t max_line, size_t max_trailer) noexcept nogil:
    st.phase = CS_SIZE
    st.size = 0
    st.ndigits = 0
    st.line_len = 0
    st.trailer_len = 0
    st.max_line = max_line
    st.max_trailer = max_trailer
    st.data_total = 0
    st.err = NULL


cdef inline Py_ssize_t _chunk_error(ChunkState *st, const char *msg) noexcept nogil:
    st.phase = CS_ERROR
    st.err = msg
    return -1


cdef Py_ssize_t chunk_step(ChunkState *st, const char *p, size_t n,
                           size_t *seg_off, size_t *seg_len) noexcept nogil:
    """Scan framing from p; stop after the first data segment.

    Returns the bytes consumed (including the data segment reported in
    seg_off/seg_len, which is 0 long when none), or -1 on an error.  Stops at
    CS_DONE without consuming what follows the message."""
    cdef size_t i = 0
    cdef unsigned char c
    cdef int hv
    cdef size_t take
    seg_len[0] = 0
    while i < n:
        c = <unsigned char>p[i]
        if st.phase == CS_DATA:
            take = n - i
            if <long long>take > st.size:
                take = <size_t>st.size
            seg_off[0] = i
            seg_len[0] = take
            st.size -= take
            st.data_total += take
            if st.size == 0:
                st.phase = CS_DATA_CR
            return i + take
        elif st.phase == CS_SIZE:
            hv = _hexval[c]
            if hv >= 0:
                if st.ndigits == 16 or st.size > (<long long>0x7fffffffffffffffLL >> 4):
                    return _chunk_error(st, b"chunk size too large")
                st.size = st.size * 16 + hv
                st.ndigits += 1
            elif st.ndigits == 0:
                return _chunk_error(st, b"invalid chunk size")
            elif c == b';':
                st.phase = CS_EXT
            elif c == b' ' or c == b'\t':
                st.phase = CS_SIZE_WS
            elif c == b'\r':
                st.phase = CS_SIZE_LF
            else:
                return _chunk_error(st, b"invalid chunk size")
            st.line_len += 1
        elif st.phase == CS_SIZE_WS:
            if c == b';':
                st.phase = CS_EXT
            elif c != b' ' and c != b'\t':
                return _chunk_error(st, b"invalid chunk size line")
            st.line_len += 1
        elif st.phase == CS_EXT:
            if c == b'\r':
                st.phase = CS_SIZE_LF
            elif not (c == 9 or 0x20 <= c <= 0x7e):
                return _chunk_error(st, b"invalid chunk extension")
            st.line_len += 1
        elif st.phase == CS_SIZE_LF:
            if c != b'\n':
                return _chunk_error(st, b"chunk size line does not end in CRLF")
            st.line_len = 0
            st.ndigits = 0
            if st.size == 0:
                st.phase = CS_TR_START
            else:
                st.phase = CS_DATA
        elif st.phase == CS_DATA_CR:
            if c != b'\r':
                return _chunk_error(st, b"chunk data not followed by CRLF")
            st.phase = CS_DATA_LF
        elif st.phase == CS_DATA_LF:
            if c != b'\n':
                return _chunk_error(st, b"chunk data not followed by CRLF")
            st.phase = CS_SIZE
        elif CS_TR_START <= st.phase <= CS_TR_END_LF and st.trailer_len >= st.max_trailer:
            return _chunk_error(st, b"trailer section too long")
        elif st.phase == CS_TR_START:
            if c == b'\r':
                st.phase = CS_TR_END_LF
            elif _tchar[c]:
                st.phase = CS_TR_NAME
            else:
                return _chunk_error(st, b"invalid trailer field")
            st.trailer_len += 1
        elif st.phase == CS_TR_NAME:
            if c == b':':
                st.phase = CS_TR_VALUE
            elif not _tchar[c]:
                return _chunk_error(st, b"invalid trailer field")
            st.trailer_len += 1
        elif st.phase == CS_TR_VALUE:
            if c == b'\r':
                st.phase = CS_TR_LINE_LF
            elif not _fvalue[c]:
                return _chunk_error(st, b"invalid trailer field")
            st.trailer_len += 1
        elif st.phase == CS_TR_LINE_LF:
            if c != b'\n':
                return _chunk_error(st, b"trailer line does not end in CRLF")
            st.phase = CS_TR_START
            st.trailer_len += 1
        elif st.phase == CS_TR_END_LF:
            if c != b'\n':
                return _chunk_error(st, b"trailer section does not end in CRLF")
            st.phase = CS_DONE
            return i + 1
        else:   # CS_DONE or CS_ERROR
            return i if st.phase == CS_DONE else -1
        # limits as the pure twin counts them: a line's LF must come within
        # max_line bytes; the trailer section, final CRLF included, within
        # max_trailer bytes
        if st.line_len >= st.max_line:
            return _chunk_error(st, b"chunk size line too long")
        if st.trailer_len >= st.max_trailer and c != b'\n':
            return _chunk_error(st, b"trailer section too long")
        i += 1
    return i


cdef Py_ssize_t chunk_skip(ChunkState *st, const char *p, size_t n) noexcept nogil:
    """Validate framing over p[0:n], ignoring where data lies; return the
    bytes that belong to this message (n unless it ended), or -1."""
    cdef size_t off = 0, so, sl
    cdef Py_ssize_t r
    while off < n and st.phase != CS_DONE:
        r = chunk_step(st, p + off, n - off, &so, &sl)
        if r < 0:
            return -1
        off += <size_t>r
    return off


cdef class ChunkedDecoder:
    """Decode a chunked body fed in pieces (Python API; the proxy core uses
    chunk_step directly)."""
    cdef ChunkState st

    def __init__(self, *, max_line=4096, max_trailer=32768):
        chunk_init(&self.st, max_line, max_trailer)

    @property
    def done(self):
        return self.st.phase == CS_DONE

    def feed(self, data):
        """(decoded data pieces, bytes of data consumed)."""
        cdef bytes b = bytes(data)
        cdef const char *p = b
        cdef size_t n = len(b), off = 0, so, sl
        cdef Py_ssize_t r
        pieces = []
        if self.st.phase == CS_ERROR:
            raise ParseError(400, self.st.err.decode())
        while off < n and self.st.phase != CS_DONE:
            r = chunk_step(&self.st, p + off, n - off, &so, &sl)
            if r < 0:
                raise ParseError(400, self.st.err.decode())
            if sl:
                pieces.append(b[off + so:off + so + sl])
            off += <size_t>r
        return pieces, off
