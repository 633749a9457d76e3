# The routing path: the normal form of a request path that routes (and any
# rule matching on the path) are compared with, so that no other spelling
# of a path reaches a route other than the one its normal form takes
# (docs/parser-contract.md, "The routing path").  The twin of
# edgeproxy/http/_path.py, which must give the same bytes or error.
#
# _path_is_normal is the common case: one pass, no writes.  Only a path it
# rejects goes through _normalize_path, also one pass, into a buffer the
# caller owns (normalising never makes a path longer).

cdef unsigned char _unreserved[256]    # RFC 3986 2.3: ALPHA DIGIT - . _ ~
cdef unsigned char _path_plain[256]    # bytes _path_is_normal passes over without a look

cdef void _init_path_tables():
    cdef int c
    for c in range(256):
        _unreserved[c] = 0
        _path_plain[c] = 1
    for c in b"-._~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ":
        _unreserved[c] = 1
    for c in b"/%#":
        _path_plain[c] = 0

_init_path_tables()

cdef const char *_HEX_UPPER = b"0123456789ABCDEF"


cdef inline size_t _path_length(const char *t, size_t n) noexcept nogil:
    """How much of an origin-form target is its path: up to the first '?'."""
    cdef const char *q = <const char *>memchr(t, b'?', n)
    return (q - t) if q != NULL else n


cdef bint _path_is_normal(const char *p, size_t n) noexcept nogil:
    """p[:n], a path starting with '/', is its own normal form (so also no
    error): no escape of an unreserved byte, of '/' or NUL, none with
    lower-case hex or cut short, no '#', no empty, '.' or '..' segment
    other than an empty last one."""
    cdef size_t i = 0
    cdef unsigned char c
    cdef signed char hi, lo
    while i < n:
        c = <unsigned char>p[i]
        if _path_plain[c]:
            i += 1
        elif c == b'/':
            i += 1
            if i < n and p[i] == b'/':
                return 0
            if i < n and p[i] == b'.':
                if i + 1 == n or p[i + 1] == b'/':
                    return 0
                if p[i + 1] == b'.' and (i + 2 == n or p[i + 2] == b'/'):
                    return 0
        elif c == b'%':
            if i + 2 >= n:
                return 0
            hi = _hexval[<unsigned char>p[i + 1]]
            lo = _hexval[<unsigned char>p[i + 2]]
            if hi < 0 or lo < 0 or <unsigned char>p[i + 1] >= 97 or <unsigned char>p[i + 2] >= 97:
                return 0
            c = <unsigned char>(hi * 16 + lo)
            if _unreserved[c] or c == b'/' or c == 0:
                return 0
            i += 3
        else:
            return 0                        # '#'
    return 1


cdef Py_ssize_t _normalize_path(const char *p, size_t n, char *out, const char **err) noexcept nogil:
    """Write the normal form of p[:n] (a path starting with '/') to out,
    which has room for n bytes: escapes of unreserved bytes decoded, the
    other escapes in upper-case hex, duplicate slashes merged, '.' and '..'
    segments removed (RFC 3986 5.2.4).  Its length, or -1 with *err set for
    a path that is refused (400): a malformed escape, an escaped '/' (never
    decoded into a separator) or NUL, a '#', a '..' above the root."""
    cdef size_t i = 0, o = 0, seg
    cdef unsigned char c
    cdef signed char hi, lo
    while i < n:
        # here p[i] == '/': one slash however many there are
        while i < n and p[i] == b'/':
            i += 1
        if o == 0 or out[o - 1] != b'/':
            out[o] = b'/'
            o += 1
        seg = o
        while i < n and p[i] != b'/':
            c = <unsigned char>p[i]
            if c == b'%':
                hi = _hexval[<unsigned char>p[i + 1]] if i + 1 < n else -1
                lo = _hexval[<unsigned char>p[i + 2]] if i + 2 < n else -1
                if hi < 0 or lo < 0:
                    err[0] = b"malformed percent-encoding in the path"
                    return -1
                c = <unsigned char>(hi * 16 + lo)
                if c == b'/':
                    err[0] = b"encoded slash (%2F) in the path"
                    return -1
                if c == 0:
                    err[0] = b"encoded NUL (%00) in the path"
                    return -1
                if _unreserved[c]:
                    out[o] = <char>c
                    o += 1
                else:
                    out[o] = b'%'
                    out[o + 1] = _HEX_UPPER[hi]
                    out[o + 2] = _HEX_UPPER[lo]
                    o += 3
                i += 3
            elif c == b'#':
                err[0] = b"fragment (#) in the request target"
                return -1
            else:
                out[o] = <char>c
                o += 1
                i += 1
        if o - seg == 1 and out[seg] == b'.':
            o = seg
        elif o - seg == 2 and out[seg] == b'.' and out[seg + 1] == b'.':
            # drop this segment and the one before it, keeping its '/'
            o = seg - 1
            if o == 0:
                err[0] = b"the path climbs above the root (..)"
                return -1
            o -= 1
            while out[o] != b'/':
                o -= 1
            o += 1
    return o


def normalize_path(target):
    """The routing path of an origin-form target (bytes starting with '/';
    the query is not part of it): the bytes, or ParseError(400)."""
    cdef bytes t = bytes(target)
    cdef size_t n
    cdef const char *err = NULL
    cdef Py_ssize_t r
    cdef bytearray out
    if not t.startswith(b"/"):
        raise ValueError("not an origin-form target")
    n = _path_length(t, len(t))
    if _path_is_normal(t, n):
        return t[:n]
    out = bytearray(n)
    r = _normalize_path(t, n, out, &err)
    if r < 0:
        raise ParseError(400, err.decode())
    return bytes(out[:r])


def path_is_normal(target):
    """The target's path is its own normal form (the case that costs one
    pass and no copy)."""
    cdef bytes t = bytes(target)
    if not t.startswith(b"/"):
        raise ValueError("not an origin-form target")
    return bool(_path_is_normal(t, _path_length(t, len(t))))
