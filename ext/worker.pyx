# The worker's state and the compiled core's module-level API.
#
# One worker process runs one event loop; everything in ext/ is driven by its
# callbacks and never blocks.  Reads land in one receive buffer owned by the
# worker (_rbuf); a read is parsed, routed and forwarded before the callback
# returns, so only leftovers (a partial head, a pipelined request) are copied
# into per-connection storage.  Bytes are forwarded as memoryview slices of
# that buffer; when the kernel does not take all of a write at once, the
# transport keeps the slice, so the worker switches to a fresh buffer.
#
# Here: that buffer, the clock, the live connections, the metrics slot,
# request ids, the scratch writer (Scratch) and the functions the worker's
# ticker calls.  docs/architecture.md draws a request's path through the
# other files.

import asyncio
import errno
import logging
import ssl
import os

cimport cython
from cpython.bytearray cimport PyByteArray_AS_STRING
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize
from libc.stdlib cimport malloc, realloc, free
from libc.math cimport floor
from libc.string cimport memcpy, memchr
from cpython.buffer cimport PyObject_GetBuffer, PyBuffer_Release, PyBUF_SIMPLE
from posix.uio cimport iovec, writev
from posix.time cimport clock_gettime, timespec, CLOCK_MONOTONIC

cdef object _log = logging.getLogger("edgeproxy.proxy")

cdef enum:
    RBUF_SIZE = 256 * 1024
    INLINE_BODY = 32 * 1024      # body bytes copied into the head's write below this
    LINGER_SECONDS = 2
    # a transport's write buffer: the other side stops reading above HIGH_WATER
    # and goes on below LOW_WATER.  What a slow reader holds is that plus one
    # read (RBUF_SIZE), so keep it small: the kernel's socket buffers do the
    # bulk of the buffering (512 KiB here cost ~800 KiB a slow reader)
    HIGH_WATER = 64 * 1024
    LOW_WATER = 16 * 1024
    CHUNK_LINE_MAX = 4096
    INTERIM_MAX = 10             # 1xx responses a backend may send before its final one (then 502)

# How long a request with "Expect: 100-continue" waits for its backend's
# 100 (Continue) before the proxy sends its own and the body goes anyway
# (RFC 9110 §10.1.1; curl waits as long before sending it regardless).
cdef double CONTINUE_WAIT = 1.0

# reasons a client transport's reading is paused (a bit each)
cdef enum:
    P_PIPELINE = 1
    P_CONNECT = 2
    P_BACKPRESSURE = 4
    P_HOLD = 8            # an async connect hook runs

# what ClientConn captures of a request for the access log (ProxySettings.log_fields):
# only what the configured format prints (edgeproxy/server/accesslog.py)
cdef enum:
    LOG_LINE = 1          # the request line (method, target, protocol)
    LOG_REFERER = 2
    LOG_AGENT = 4
    LOG_HOST = 8
    LOG_CACHE = 16        # the response's Cache-Status
    LOG_ALL = 31

ACCESS_LOG_CAPTURE = {"line": LOG_LINE, "referer": LOG_REFERER, "agent": LOG_AGENT,
                      "host": LOG_HOST, "cache": LOG_CACHE}

cdef enum CState:
    C_HEAD = 0        # waiting for / reading a request head
    C_BODY            # streaming the request body to the backend
    C_WAIT            # request sent whole; its response is in progress
    C_TUNNEL          # after 101: bytes both ways
    C_LINGER          # answered with an error: discard input until EOF, then close
    C_CLOSED

cdef enum UState:
    U_CONNECTING = 0
    U_IDLE            # in its backend's keep-alive pool
    U_HEAD            # request sent (or being sent); waiting for the response head
    U_BODY            # streaming the response body
    U_TUNNEL
    U_CLOSED


# ---- worker-wide state ----------------------------------------------------

cdef bytearray _rbuf = None
cdef char *_rbuf_ptr = NULL
cdef object _rbuf_view = None

cdef void _new_rbuf():
    global _rbuf, _rbuf_ptr, _rbuf_view
    _rbuf = bytearray(RBUF_SIZE)
    _rbuf_ptr = PyByteArray_AS_STRING(_rbuf)
    _rbuf_view = memoryview(_rbuf)

_new_rbuf()

cdef HeadParser _parser = HeadParser()
cdef double _now = 0.0
cdef bytes _date_line = b""
cdef set _conns = set()        # live ClientConn
cdef set _upconns = set()      # live UpstreamConn
cdef bint _draining = 0
cdef long long _total_requests = 0


# ---- metrics: this worker's counters ----------------------------------------
#
# Plain int64 counters in one slot of a region the supervisor mapped
# (MAP_SHARED) before forking; the supervisor sums the slots on a scrape.
# One writer per slot, so counting is an increment: no lock, no syscall.
# Without a supervisor they land in _m_local.  The layout is exported by
# metrics_layout() so that edgeproxy.metrics reads the same offsets.
cdef enum:
    M_BYTES_IN = 0            # from clients: heads, bodies, tunnelled bytes
    M_BYTES_OUT = 1           # to clients: heads, bodies, tunnelled bytes
    M_CONNECTIONS = 2         # client connections accepted
    M_DURATION_SUM_US = 3
    M_TLS_HANDSHAKE_FAILURES = 4  # TLS handshakes that failed or timed out (TLSServerConn)
    M_HOOK_ERRORS = 5         # phase hooks that raised or returned nonsense (ext/phases.pyx)
    M_HOOK_TIMEOUTS = 6       # phase hooks that did not end within hooks_timeout
    M_GAUGES = 8              # 8 values the worker's ticker writes (Python side)
    M_DURATION_BUCKETS = 16   # DUR_NBUCKETS counts, the last one is +Inf
    DUR_NBUCKETS = 14
    M_ROUTES = 32             # M_ROUTE_MAX routes x 6 status classes (0 = none, 1..5 = 1xx..5xx)
    M_ROUTE_MAX = 512         # route 0: requests no route took (404, bad requests)
    M_BACKENDS = 3104         # M_ROUTES + M_ROUTE_MAX * 6; then 4 values per backend (Python side)
    M_BACKEND_MAX = 1024
    M_SLOT_LEN = 8192         # int64 values per slot (64 KiB)

cdef long long _dur_bounds_us[DUR_NBUCKETS - 1]
_dur_bounds_us[:] = [1000, 2500, 5000, 10000, 25000, 50000, 100000, 250000, 500000,
                     1000000, 2500000, 5000000, 10000000]
cdef long long _m_local[M_SLOT_LEN]
cdef long long *_m = _m_local
cdef object _m_view = None     # keeps the shared region's buffer exported while _m points into it


def metrics_layout():
    """The offsets (in int64 values) of a worker's metrics slot."""
    return {"slot_len": M_SLOT_LEN, "bytes_in": M_BYTES_IN, "bytes_out": M_BYTES_OUT,
            "connections": M_CONNECTIONS, "duration_sum_us": M_DURATION_SUM_US,
            "tls_handshake_failures": M_TLS_HANDSHAKE_FAILURES,
            "hook_errors": M_HOOK_ERRORS, "hook_timeouts": M_HOOK_TIMEOUTS,
            "gauges": M_GAUGES, "duration_buckets": M_DURATION_BUCKETS,
            "duration_bounds_us": [_dur_bounds_us[i] for i in range(DUR_NBUCKETS - 1)],
            "routes": M_ROUTES, "route_max": M_ROUTE_MAX, "backends": M_BACKENDS,
            "backend_max": M_BACKEND_MAX, "client_refused": M_CLIENT_REFUSED,
            "client_slow": M_CLIENT_SLOW}


def attach_metrics(object region, Py_ssize_t offset):
    """Count into region[offset:offset + 8 * slot_len] (a writable buffer,
    normally this worker's slot of the shared mmap) from now on."""
    global _m, _m_view
    cdef unsigned char[::1] mv = region
    if offset < 0 or offset % 8 or offset + M_SLOT_LEN * 8 > mv.shape[0]:
        raise ValueError("metrics slot out of the region")
    _m_view = mv
    _m = <long long *>&mv[offset]


cdef inline double _mono() noexcept nogil:
    # vDSO on Linux: no syscall
    cdef timespec ts
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return ts.tv_sec + ts.tv_nsec * 1e-9


# ---- request ids --------------------------------------------------------------
# A well-formed X-Request-Id from the client is kept; otherwise one is made
# of this worker's random prefix and a counter.

cdef bytes _rid_prefix = b""
cdef unsigned long long _rid_seq = 0


def set_request_id_prefix(bytes prefix):
    """Set per worker (after fork), so ids from different workers differ."""
    global _rid_prefix, _rid_seq
    if not _valid_request_id(prefix, len(prefix)) or len(prefix) > 64:
        raise ValueError("request id prefix: 1-64 characters of [A-Za-z0-9._-]")
    _rid_prefix = prefix
    _rid_seq = 0


cdef inline bint _valid_request_id(const char *v, size_t n) noexcept nogil:
    cdef size_t i
    cdef char ch
    if n == 0 or n > 200:
        return 0
    for i in range(n):
        ch = v[i]
        if not ((b'a' <= ch <= b'z') or (b'A' <= ch <= b'Z') or (b'0' <= ch <= b'9')
                or ch == b'.' or ch == b'_' or ch == b'-'):
            return 0
    return 1


set_request_id_prefix(os.urandom(6).hex().encode())

cdef const char *_hexdigits = b"0123456789abcdef"


cdef class Scratch:
    """A growable byte area where heads are built before one bytes object is
    made of them."""
    cdef char *p
    cdef size_t n
    cdef size_t cap

    def __cinit__(self):
        self.cap = 16384
        self.p = <char *>malloc(self.cap)
        if self.p == NULL:
            raise MemoryError()
        self.n = 0

    def __dealloc__(self):
        free(self.p)

    cdef int grow(self, size_t extra) except -1:
        cdef size_t cap = self.cap
        cdef char *q
        while self.n + extra > cap:
            cap *= 2
        q = <char *>realloc(self.p, cap)
        if q == NULL:
            raise MemoryError()
        self.p = q
        self.cap = cap
        return 0

    cdef inline int add(self, const char *s, size_t l) except -1:
        if self.n + l > self.cap:
            self.grow(l)
        memcpy(self.p + self.n, s, l)
        self.n += l
        return 0

    cdef inline int addb(self, bytes b) except -1:
        return self.add(b, len(b))

    cdef inline int add_int(self, long long v) except -1:
        # decimal digits written backwards into tmp (snprintf cost ~1% of a
        # proxied 1 KiB request in its format parsing)
        cdef char tmp[24]
        cdef int i = 24
        cdef unsigned long long u = <unsigned long long>v
        if v < 0:
            u = <unsigned long long>0 - u
        while True:
            i -= 1
            tmp[i] = <char>(48 + u % 10)
            u //= 10
            if u == 0:
                break
        if v < 0:
            i -= 1
            tmp[i] = b'-'
        return self.add(tmp + i, 24 - i)

    cdef inline int add_hex(self, unsigned long long v) except -1:
        cdef char tmp[24]
        cdef int i = 24
        while True:
            i -= 1
            tmp[i] = _hexdigits[v & 15]
            v >>= 4
            if v == 0:
                break
        return self.add(tmp + i, 24 - i)

    cdef inline int field(self, const char *name, size_t nl, const char *val, size_t vl) except -1:
        if self.n + nl + vl + 4 > self.cap:
            self.grow(nl + vl + 4)
        memcpy(self.p + self.n, name, nl)
        self.n += nl
        self.p[self.n] = b':'
        self.p[self.n + 1] = b' '
        self.n += 2
        memcpy(self.p + self.n, val, vl)
        self.n += vl
        self.p[self.n] = b'\r'
        self.p[self.n + 1] = b'\n'
        self.n += 2
        return 0

    cdef inline bytes take(self):
        cdef bytes b = PyBytes_FromStringAndSize(self.p, self.n)
        self.n = 0
        return b


cdef Scratch _out = Scratch()
cdef long long DELTA_SECONDS_MAX = 2147483648   # RFC 9111 §1.2.2 (policy.DELTA_SECONDS_MAX)


def set_clock(double now, bytes date_line=None):
    """Called by the worker's ticker: the loop time, and the Date line when
    the second changed."""
    global _now, _date_line
    _now = now
    if date_line is not None:
        _date_line = date_line


def set_draining(bint on):
    """While draining, responses close their client connection."""
    global _draining
    _draining = on


def stats():
    """Live object counts, checked by the tests to return to zero."""
    cdef Py_ssize_t idle = 0
    for u in _upconns:
        if (<UpstreamConn>u).state == U_IDLE:
            idle += 1
    return {"client_connections": len(_conns), "upstream_connections": len(_upconns),
            "upstream_idle": idle, "requests": _total_requests, "hot_hits": _hot_hits}


def expire_timeouts():
    """Close what has passed its deadline (called by the worker's ticker)."""
    cdef ClientConn c
    cdef UpstreamConn u
    for c in list(_conns):
        if c.deadline != 0 and _now >= c.deadline:
            c._on_timeout()
    for u in list(_upconns):
        if u.deadline != 0 and _now >= u.deadline:
            u._on_timeout()
    if _tls_handshaking:
        _tls_expire()
    if _pp_waiting:
        _pp_expire()


def close_idle_clients(double min_idle=0.0):
    """Close client connections that have no request in flight (shutdown)
    and have been idle for at least min_idle seconds; returns how many.  A
    draining worker passes a min_idle so that a connection a client is
    about to reuse gets its next request answered with "Connection: close"
    instead of being cut under it.  Idle time is measured on the monotonic
    clock itself: the ticker's _now lags it by up to a tick (a second with
    default timeouts), which would make a connection idle for 20 ms look
    idle for a second."""
    cdef ClientConn c
    cdef double now = _mono()
    cdef int n = 0
    for c in list(_conns):
        if c.state == C_HEAD and c.pending is None:
            if min_idle > 0 and now - c.t_idle < min_idle:
                continue
            c.close()
            n += 1
    return n


cdef inline bint _wrote_all(object transport):
    return transport.get_write_buffer_size() == 0


cdef inline void _written_from_rbuf(object transport, object owner):
    # A slice of the shared buffer is still queued in the transport: leave
    # that buffer to it and read into a fresh one from now on.  TLSServerConn
    # encrypts what it is given at once and keeps no slice.
    if owner is _rbuf and type(transport) is not TLSServerConn and not _wrote_all(transport):
        _new_rbuf()


cdef inline object _view(object owner, size_t a, size_t b):
    if owner is _rbuf:
        return _rbuf_view[a:b]
    return memoryview(owner)[a:b]
