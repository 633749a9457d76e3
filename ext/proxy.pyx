# The data plane: client and backend protocols and the splice between them.
#
# One worker process runs one event loop; everything here is driven by its
# callbacks and never blocks.  Reads land in one receive buffer owned by the
# worker (_rbuf); a read is parsed, routed and forwarded before the callback
# returns, so only leftovers (a partial head, a pipelined request) are copied
# into per-connection storage.  Bytes are forwarded as memoryview slices of
# that buffer; when the kernel does not take all of a write at once, the
# transport keeps the slice, so the worker switches to a fresh buffer.
#
# Request flow (the phases of docs/architecture.md):
#   ClientConn.buffer_updated -> parse head -> route -> pick backend ->
#   build upstream head -> pooled or new UpstreamConn -> stream body ->
#   UpstreamConn.buffer_updated -> parse response head -> filter headers ->
#   stream body to the client -> release the backend connection -> log.

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
            "gauges": M_GAUGES, "duration_buckets": M_DURATION_BUCKETS,
            "duration_bounds_us": [_dur_bounds_us[i] for i in range(DUR_NBUCKETS - 1)],
            "routes": M_ROUTES, "route_max": M_ROUTE_MAX, "backends": M_BACKENDS,
            "backend_max": M_BACKEND_MAX}


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
cdef Scratch _hot_key = Scratch()    # the cache key of a request, built by ClientConn._serve_hot


# The routing path of the request _start_request is on (ext/normalize.pyx),
# valid as long as the parser's results: the path in the target when it is
# already normal (the common case: no copy), else its normal form in _npath.
cdef Scratch _npath = Scratch()
cdef const char *_rpath = NULL
cdef size_t _rpath_len = 0
cdef size_t _tpath_len = 0        # how much of the target is its path (the query follows)
cdef bint _rpath_changed = 0      # _rpath is in _npath: differs from the path received


cdef int _set_route_path(HeadParser hp) except -2:
    """Find the routing path of hp's request: 0, or -1 with hp's error set
    when the path is refused (400)."""
    global _rpath, _rpath_len, _tpath_len, _rpath_changed
    cdef Py_ssize_t r
    cdef const char *err = NULL
    _rpath_changed = 0
    if hp.target_add_slash:
        # absolute-form without a path ("http://h" or "http://h?q"): "/"
        _rpath = b"/"
        _rpath_len = 1
        _tpath_len = 0
        return 0
    _rpath = hp.target
    if hp.target[0] != b'/':
        _rpath_len = _tpath_len = hp.target_len      # asterisk-form
        return 0
    _rpath_len = _tpath_len = _path_length(hp.target, hp.target_len)
    if _path_is_normal(hp.target, _rpath_len):
        return 0
    if _npath.cap < _rpath_len:
        _npath.n = 0
        _npath.grow(_rpath_len)
    r = _normalize_path(hp.target, _rpath_len, _npath.p, &err)
    if r < 0:
        return hp._fail(400, err)
    _rpath = _npath.p
    _rpath_len = <size_t>r
    _rpath_changed = 1
    return 0


cdef bytes _target_bytes(ProxySettings cfg, HeadParser hp):
    """What _add_target appends, as bytes (for the cache phase)."""
    if _rpath_changed and cfg.normalize_target:
        return _rpath[:_rpath_len] + hp.target[_tpath_len:hp.target_len]
    return (b"/" if hp.target_add_slash else b"") + hp.target[:hp.target_len]


cdef inline int _add_target(Scratch o, ProxySettings cfg, HeadParser hp) except -1:
    """Append the target to forward (and to key the cache on): as received
    (an absolute-form one in origin-form), or its routing path and query
    when normalize_target is on and the two paths differ."""
    if _rpath_changed and cfg.normalize_target:
        o.add(_rpath, _rpath_len)
        o.add(hp.target + _tpath_len, hp.target_len - _tpath_len)
        return 0
    if hp.target_add_slash:
        o.add(b"/", 1)
    o.add(hp.target, hp.target_len)
    return 0


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


# ---- settings, routes, pools ----------------------------------------------

cdef class ProxySettings:
    """The C-level limits and switches the hot path reads (built once from
    the config by edgeproxy.server)."""
    cdef public size_t max_line, max_head, max_fields, resp_max_head, resp_max_fields
    cdef public long long max_body
    cdef public double t_connect, t_read, t_send, t_header, t_keepalive, t_body
    cdef public bytes server_line          # b"Server: x\r\n" or b""
    cdef public tuple hide                 # extra lower-case field names to drop
    cdef public object access_log          # object with .log(...) or None
    cdef public bint normalize_target      # forward the routing path, not the path as received

    def __init__(self, *, max_line=8192, max_head=32768, max_fields=100,
                 max_body=100 * 1024 * 1024, resp_max_head=65536, resp_max_fields=256,
                 t_connect=5.0, t_read=60.0, t_send=60.0, t_header=10.0, t_keepalive=75.0,
                 t_body=60.0, server_header="", hide=(), access_log=None, normalize_target=False):
        self.max_line = max_line
        self.max_head = max_head
        self.max_fields = max_fields
        self.max_body = max_body
        self.resp_max_head = resp_max_head
        self.resp_max_fields = resp_max_fields
        self.t_connect = t_connect
        self.t_read = t_read
        self.t_send = t_send
        self.t_header = t_header
        self.t_keepalive = t_keepalive
        self.t_body = t_body
        if "\r" in server_header or "\n" in server_header:
            raise ValueError("server_header must not contain CR or LF")
        self.server_line = (b"Server: " + server_header.encode("latin-1") + b"\r\n") if server_header else b""
        self.hide = tuple(h.lower().encode("latin-1") for h in hide)
        self.access_log = access_log
        self.normalize_target = normalize_target


cdef class Backend:
    """One backend server of a pool, with its idle keep-alive connections."""
    cdef public str host
    cdef public int port
    cdef public str scheme
    cdef public str name             # "127.0.0.1:5000", for logs
    cdef public bytes hostport       # Host value when the client sent none
    cdef public object ssl           # ssl.SSLContext for https backends, or None
    cdef public str server_hostname
    cdef public int weight
    cdef public bint up
    cdef public int idle_max
    cdef public double idle_timeout
    cdef public double t_connect
    cdef public long long requests
    cdef public int active           # outstanding requests (this worker)
    cdef public int connects
    cdef list idle
    # balancing and health (ext/balance.pyx)
    cdef public bint backup          # only used when no primary is up
    cdef public Pool pool
    cdef public int index            # its place in the pool: a bit of ClientConn.tried
    cdef HealthSlot *health          # the active checks' verdict, shared with the prober
    cdef object health_mem           # keeps that shared memory mapped
    cdef public int fails            # consecutive passive failures
    cdef public long long failures_total
    cdef public str last_error
    cdef public bint ejected
    cdef public double eject_until
    cdef public int ejections        # in a row: the ejection time doubles
    cdef bint close_seen             # a fresh connection closed before answering since its last answer
    cdef unsigned long long close_sig  # ... for this request (balance.pyx _request_sig)
    cdef public double up_since      # when it last became available (slow start)
    cdef bint seen_up
    cdef long long cw                # smooth weighted round-robin's current weight
    cdef unsigned long long seed     # its identity for rendezvous hashing

    def __init__(self, host, port, *, scheme="http", weight=1, idle_max=1024,
                 idle_timeout=60.0, t_connect=5.0, ssl=None, server_hostname=None,
                 backup=False):
        self.host = host
        self.port = port
        self.scheme = scheme
        self.name = (f"[{host}]:{port}" if ":" in host else f"{host}:{port}")
        self.hostport = self.name.encode("latin-1")
        self.ssl = ssl
        self.server_hostname = server_hostname
        self.weight = weight
        self.up = 1
        self.idle_max = idle_max
        self.idle_timeout = idle_timeout
        self.t_connect = t_connect
        self.requests = 0
        self.active = 0
        self.connects = 0
        self.idle = []
        self.backup = backup
        self.health = &_always_up
        self.seen_up = 1
        self.last_error = ""

    def attach_health(self, SharedMemory mem, Py_ssize_t offset):
        """Read the active checks' verdict from this slot of shared memory."""
        self.health = mem.slot_at(offset)
        self.health_mem = mem

    @property
    def healthy(self):
        """What the active checks say (True without checks)."""
        return bool(self.health.up)

    @property
    def available(self):
        """Whether pick() may choose it: up, healthy and not ejected."""
        return _available(self)

    cdef inline void release(self):
        """A request on this backend is over: give its room to a queued one."""
        self.active -= 1
        if self.pool is not None and self.pool.waiting:
            self.pool.wake()
    @property
    def idle_count(self):
        return len(self.idle)

    cdef UpstreamConn take_idle(self):
        cdef UpstreamConn u
        while self.idle:
            u = <UpstreamConn>self.idle.pop()
            if u.state == U_IDLE and u.transport is not None and not u.transport.is_closing():
                return u
        return None

    cdef void put_idle(self, UpstreamConn u):
        if len(self.idle) >= self.idle_max or _draining:
            u.close()
            return
        # a response can end while its client's backpressure has reading from
        # u paused: an idle connection must read (to see the backend close it),
        # and the next request must not wait on a pause nobody will lift
        u._resume()
        u.state = U_IDLE
        u.deadline = _now + self.idle_timeout
        self.idle.append(u)

    cdef void forget_idle(self, UpstreamConn u):
        try:
            self.idle.remove(u)
        except ValueError:
            pass

    def _new_conn(self):
        if self.ssl is not None:
            return TLSUpstreamConn(self)
        return UpstreamConn(self)

    cdef void connect(self, ClientConn c):
        self.connects += 1
        asyncio.get_running_loop().create_task(_connect(self, c))


# Errors that say this host is out of something (descriptors, ports,
# buffers, memory), not that the backend is sick: they never count against
# it, and no other backend would do better.
RESOURCE_ERRNOS = frozenset((errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.EADDRNOTAVAIL,
                             errno.ENOMEM))
cdef dict _resource_logged = {}      # kind -> [when it last logged (_mono), errors not logged since]


def resource_error(str kind, str what):
    """Log that this host ran out of a resource, at error level and at most
    once a second per kind ("connect", "accept"): when descriptors run out,
    every connection meets it."""
    cdef double now = _mono()
    cdef list seen = _resource_logged.get(kind)
    if seen is None:
        seen = _resource_logged[kind] = [-1e9, 0]
    if now - <double>seen[0] < 1.0:
        seen[1] += 1
        return
    _log.error("%s: this host is out of descriptors, ports or memory (see Limits in "
               "docs/operations.md)%s", what,
               f"; {seen[1]} more in the last second" if seen[1] else "")
    seen[0] = now
    seen[1] = 0


async def _connect(Backend b, ClientConn c):
    loop = asyncio.get_running_loop()
    try:
        if b.ssl is not None:
            coro = loop.create_connection(b._new_conn, b.host, b.port, ssl=b.ssl,
                                          server_hostname=b.server_hostname or b.host)
        else:
            coro = loop.create_connection(b._new_conn, b.host, b.port)
        _, up = await asyncio.wait_for(coro, b.t_connect)
    except asyncio.TimeoutError:
        _log.warning("backend %s: connect timed out after %.1fs", b.name, b.t_connect)
        _note_failure(b, "connect timeout")
        c._upstream_failed(b, 504)
        return
    except ssl.SSLError as exc:
        _log.error("backend %s: TLS handshake failed: %s", b.name, exc)
        c._upstream_failed(b, 502)
        return
    except Exception as exc:
        if isinstance(exc, MemoryError) or (isinstance(exc, OSError) and exc.errno in RESOURCE_ERRNOS):
            resource_error("connect", f"backend {b.name}: connect failed: {exc}")
            c._upstream_failed(b, 503, 0)
            return
        _log.warning("backend %s: connect failed: %s", b.name, exc)
        _note_failure(b, "connect: " + (exc.strerror if isinstance(exc, OSError) and exc.strerror
                                        else type(exc).__name__))
        c._upstream_failed(b, 502)
        return
    c._upstream_ready(<UpstreamConn>up, b)


cdef inline bint _is_idempotent(const char *m, size_t n) noexcept:
    if n == 3:
        return memcmp(m, b"GET", 3) == 0 or memcmp(m, b"PUT", 3) == 0
    if n == 4:
        return memcmp(m, b"HEAD", 4) == 0
    if n == 5:
        return memcmp(m, b"TRACE", 5) == 0
    if n == 6:
        return memcmp(m, b"DELETE", 6) == 0
    if n == 7:
        return memcmp(m, b"OPTIONS", 7) == 0
    return 0


cdef class Route:
    cdef public object host          # None, b"a.example.com" or b".example.com" (wildcard suffix)
    cdef public bint wildcard
    cdef public bytes path
    cdef public Pool pool
    cdef public int index            # its row in the metrics slot (1..M_ROUTE_MAX-1; 0 = no route)
    cdef public object cache         # the cache phase (edgeproxy.cache.phase.CachePhase) or None
    cdef public HotIndex hot         # the worker's hot index of cache hits (ext/hotcache.pyx) or None

    def __init__(self, host, path, pool, index=0, cache=None):
        self.index = index if 0 <= index < M_ROUTE_MAX else M_ROUTE_MAX - 1
        self.wildcard = bool(host) and host.startswith("*.")
        if host is None:
            self.host = None
        elif self.wildcard:
            self.host = host[1:].lower().encode("ascii")
        else:
            self.host = host.lower().encode("ascii")
        self.path = path.encode("latin-1")
        self.pool = pool
        self.cache = cache


cdef class Router:
    """Requests to pools: exact host, then the longest wildcard, then routes
    without a host (as nginx picks a server block); within those, the
    longest path prefix."""
    cdef list exact, wild, default

    def __init__(self, routes):
        self.exact = [r for r in routes if r.host is not None and not r.wildcard]
        self.wild = [r for r in routes if r.wildcard]
        self.default = [r for r in routes if r.host is None]
        key = lambda r: (-len(r.host or b""), -len(r.path))
        self.exact.sort(key=key)
        self.wild.sort(key=key)
        self.default.sort(key=key)

    cdef Route _in(self, list routes, int kind, const char *h, size_t hl,
                   const char *p, size_t pl):
        cdef Route r
        cdef size_t rl, i
        cdef const char *rh
        cdef bint host_seen = 0
        for r in routes:
            if kind == 1:
                rl = len(<bytes>r.host)
                if rl != hl or not _ieq(h, hl, <bytes>r.host, rl):
                    continue
            elif kind == 2:
                rl = len(<bytes>r.host)
                if rl >= hl or not _ieq(h + hl - rl, rl, <bytes>r.host, rl):
                    continue
            rl = len(r.path)
            if rl <= pl and memcmp(p, <const char *>r.path, rl) == 0:
                return r
        return None

    cdef Route route(self, const char *host, size_t hl, const char *path, size_t pl):
        cdef Route r
        cdef size_t i
        # strip the port and a trailing dot
        if hl and host[0] == b'[':
            i = 0
            while i < hl and host[i] != b']':
                i += 1
            hl = i + 1 if i < hl else hl
        else:
            for i in range(hl):
                if host[i] == b':':
                    hl = i
                    break
        if hl and host[hl - 1] == b'.':
            hl -= 1
        if hl:
            if self.exact:
                r = self._in(self.exact, 1, host, hl, path, pl)
                if r is not None:
                    return r
            if self.wild:
                r = self._in(self.wild, 2, host, hl, path, pl)
                if r is not None:
                    return r
        return self._in(self.default, 0, host, hl, path, pl)

    def route_for(self, host, path):
        """The pool name for a host and path (normalised as a request's
        is, or ParseError), or None (for tests and tools)."""
        cdef bytes h = host.encode("latin-1") if isinstance(host, str) else host
        cdef bytes p = path.encode("latin-1") if isinstance(path, str) else path
        if p.startswith(b"/"):
            p = normalize_path(p)
        r = self.route(h, len(h), p, len(p))
        return None if r is None else r.pool.name


cdef class Listener:
    """What the connections accepted on one listening socket share; calling
    it makes the protocol for a new connection."""
    cdef public ProxySettings cfg
    cdef public Router router
    cdef public bytes proto          # b"http" or b"https"
    cdef public bytes resp_extra     # fields added to every response (HSTS, ...)
    cdef public int redirect_port    # > 0: answer every request 308 to https on this port
    cdef public bytes subject_header # the field carrying a verified client certificate's subject
    cdef public object subject_of    # transport -> verified client subject (str) or None
    cdef public object tls_context   # https: the ssl.SSLContext TLSServerConn runs

    def __init__(self, cfg, router, proto="http", resp_extra=b"", redirect_port=0,
                 subject_header=None, subject_of=None, tls_context=None):
        if proto == "https" and tls_context is None:
            raise ValueError("an https listener needs its SSLContext (tls_context)")
        self.tls_context = tls_context
        self.cfg = cfg
        self.router = router
        self.proto = proto.encode()
        self.resp_extra = resp_extra
        self.redirect_port = redirect_port
        self.subject_header = subject_header.encode("latin-1") if subject_header else None
        self.subject_of = subject_of

    def __call__(self):
        if self.proto == b"https":
            return TLSServerConn(self)
        return ClientConn(self)


# ---- canned responses -----------------------------------------------------

cdef dict _REASONS = {
    400: b"Bad Request", 404: b"Not Found", 405: b"Method Not Allowed",
    408: b"Request Timeout", 413: b"Content Too Large", 414: b"URI Too Long",
    417: b"Expectation Failed", 431: b"Request Header Fields Too Large",
    500: b"Internal Server Error", 501: b"Not Implemented", 502: b"Bad Gateway",
    503: b"Service Unavailable", 504: b"Gateway Timeout",
}


cdef bytes _error_response(ProxySettings cfg, int status, bint keep, bytes extra=b""):
    cdef bytes reason = _REASONS.get(status, b"Error")
    cdef bytes body = b"%d %s\n" % (status, reason)
    return (b"HTTP/1.1 %d %s\r\n%s%s%sContent-Type: text/plain; charset=utf-8\r\n"
            b"Content-Length: %d\r\n%s\r\n%s" % (
                status, reason, cfg.server_line, _date_line, extra, len(body),
                b"" if keep else b"Connection: close\r\n", body))


cdef list _field_list(HeadParser hp):
    """The parsed head's fields as [(name, value)] (for the cache phase only)."""
    cdef size_t i
    return [(hp.fields[i].name[:hp.fields[i].name_len],
             hp.fields[i].value[:hp.fields[i].value_len]) for i in range(hp.nfields)]


# How a backend's response field reaches the client (_response_field_kind).
cdef enum:
    RF_DROP = 0       # hop-by-hop, named by Connection, backend identity, configured hidden
    RF_KEEP           # end to end
    RF_FRAMING        # Content-Length, Transfer-Encoding: whoever sends the body frames it
    RF_UPGRADE        # Upgrade: only on a 101


cdef int _response_field_kind(HeadParser hp, size_t i, ProxySettings cfg) except -1:
    """The one rule for which response fields the client gets; forwarded
    heads and stored cache entries both follow it, so nothing the proxy hides
    can come back on a cache hit."""
    cdef unsigned char h = hp.hid[i]
    cdef const char *nm = hp.fields[i].name
    cdef size_t nl = hp.fields[i].name_len
    cdef bytes hidden
    if h == H_OTHER:
        if hp.ntokens and hp.is_conn_token(nm, nl):
            return RF_DROP
        for hidden in cfg.hide:
            if _ieq(nm, nl, hidden, len(hidden)):
                return RF_DROP
        return RF_KEEP
    if h == H_CONTENT_LENGTH or h == H_TRANSFER_ENCODING:
        return RF_FRAMING
    if h == H_UPGRADE:
        return RF_UPGRADE
    if h == H_DATE or h == H_HOST or h == H_EXPECT or h == H_X_FORWARDED_FOR \
            or h == H_FORWARDED or h == H_X_FORWARDED_HOST or h == H_X_FORWARDED_PROTO:
        return RF_KEEP
    return RF_DROP       # Connection, Keep-Alive, TE, Trailer, Proxy-Connection, Server, X-Powered-By...


cdef list _response_field_list(HeadParser hp, ProxySettings cfg):
    """The response fields to store in the cache: what the client gets, with
    the framing fields (the store needs the length)."""
    cdef size_t i
    cdef int kind
    cdef list out = []
    for i in range(hp.nfields):
        kind = _response_field_kind(hp, i, cfg)
        if kind == RF_KEEP or kind == RF_FRAMING:
            out.append((hp.fields[i].name[:hp.fields[i].name_len],
                        hp.fields[i].value[:hp.fields[i].value_len]))
    return out


# ---- the client side ------------------------------------------------------

@cython.no_gc_clear
cdef class Stream:
    """What both sides of a proxied exchange share: reads land in the
    worker's receive buffer (uvloop, get_buffer/buffer_updated) or arrive as
    bytes (the standard asyncio loop, data_received); bytes a read leaves
    unparsed wait in `pending`.  Subclasses say whether they take a read
    (_reading) and parse it (_feed)."""
    cdef:
        object transport
        bytearray pending
        size_t pending_seen      # bytes of pending already seen incomplete

    cdef bint _reading(self):
        return 1

    cdef void _feed(self, object owner, const char *base, size_t n):
        pass

    def get_buffer(self, Py_ssize_t hint):
        return _rbuf

    def buffer_updated(self, Py_ssize_t n):
        self._take(n)

    cdef void _take(self, Py_ssize_t n):
        # n bytes were read into _rbuf (by the loop, or decrypted there by TLSServerConn)
        cdef object owner
        if not self._reading():
            return
        if self.pending is not None:
            self.pending.extend(_rbuf_view[:n])
            owner = self.pending
            self.pending = None
            self._feed(owner, PyByteArray_AS_STRING(owner), len(owner))
        else:
            owner = _rbuf        # held here: _feed may switch buffers
            self._feed(owner, _rbuf_ptr, <size_t>n)

    def data_received(self, bytes data):
        """The standard asyncio loop's path (it calls get_buffer only on
        BufferedProtocol subclasses, which a compiled class cannot be)."""
        cdef object owner
        if not self._reading():
            return
        if self.pending is not None:
            self.pending.extend(data)
            owner = self.pending
            self.pending = None
            self._feed(owner, PyByteArray_AS_STRING(owner), len(owner))
        else:
            self._feed(data, PyBytes_AS_STRING(data), len(data))


@cython.no_gc_clear
cdef class ClientConn(Stream):
    """A connection from a client: reads requests, forwards them, and owns
    the request's state until its response is complete."""
    cdef:
        Listener lst
        ProxySettings cfg
        public int state
        UpstreamConn up
        Backend backend
        list upq
        bytes up_head
        bint retried
        # balancing (ext/balance.pyx)
        Pool pool
        unsigned long long hkey     # the request's hash key (hash pools)
        unsigned long long tried    # a bit per Backend.index already tried
        int attempts                # other backends tried so far
        bint req_idem               # an idempotent method without a body
        bint queued                 # waiting in pool.waiting for max_conns
        double qdeadline
        int body_kind
        long long body_left
        ChunkState chunk
        bint req_keep_alive
        bint req_is_head
        int req_minor
        bint req_upgrade
        bint req_done
        bint expect_wait            # the client waits for 100 (Continue) before its body
        bint resp_started
        bint resp_keep
        int paused
        bint writing_paused
        bint eof
        public double deadline
        int nreq
        double t_idle             # _mono() when it last had no request (accepted, or one ended)
        bytes peer
        bytes fwd_for
        bytes subject             # verified client certificate subject (mTLS), or None
        # access log, filled only when it is on
        # the request in progress, for metrics and the access log
        bint in_req
        int route_id
        double t_start
        long long req_bytes
        long long resp_head_len
        # access log, filled only when it is on
        bytes log_req
        bytes log_ref
        bytes log_ua
        bytes req_id
        int resp_status
        long long resp_bytes
        # the cache phase's object for this request (routes with cache only)
        object cache
        bint tee            # pass the response body bytes to cache.feed()
        int fd              # the socket, for writes straight from cache memory (-1: TLS
                            # or unknown, -2: not looked up yet)

    def __init__(self, Listener lst):
        self.lst = lst
        self.cfg = lst.cfg
        self.state = C_HEAD
        self.fd = -1 if lst.proto == b"https" else -2
        self.peer = b"-"
        self.fwd_for = b"for=unknown"

    # -- asyncio protocol interface --

    def connection_made(self, transport):
        self.transport = transport
        transport.set_write_buffer_limits(HIGH_WATER, LOW_WATER)
        peer = transport.get_extra_info("peername")
        if peer:
            ip = peer[0]
            self.peer = ip.encode("latin-1")
            self.fwd_for = (b'for="[%s]"' % self.peer) if ":" in ip else (b"for=" + self.peer)
        if self.lst.subject_of is not None:
            subj = self.lst.subject_of(transport)
            if subj:
                self.subject = subj.encode("utf-8")
        self.deadline = _now + self.cfg.t_header
        self.t_idle = _mono()
        _conns.add(self)
        _m[M_CONNECTIONS] += 1

    def connection_lost(self, exc):
        self._teardown()

    cdef bint _reading(self):
        return self.state < C_LINGER       # after an error answer, input is discarded

    def eof_received(self):
        self.eof = 1
        if self.state == C_LINGER:
            return False
        if self.state == C_WAIT:
            return True          # half-closed: still send the response
        if self.state == C_TUNNEL and self.up is not None and self.up.transport is not None:
            if self.up.transport.can_write_eof():
                self.up.transport.write_eof()
                return True
        return False

    def pause_writing(self):
        self.writing_paused = 1
        self.deadline = _now + self.cfg.t_send
        if self.up is not None:
            self.up._pause()

    def resume_writing(self):
        self.writing_paused = 0
        if self.state == C_BODY and self.paused == 0:
            self.deadline = _now + self.cfg.t_body
        elif self.state != C_HEAD:
            self.deadline = 0
        if self.up is not None:
            self.up._resume()

    # -- reading --

    cdef void _pause(self, int why):
        if self.paused == 0 and self.transport is not None:
            self.transport.pause_reading()
            if self.state == C_BODY and not self.writing_paused:
                # the body waits on the backend side now (connect, max_conns
                # queue, a backend not taking it): those timeouts run, the
                # client's body timeout does not
                self.deadline = 0
        self.paused |= why

    cdef void _resume(self, int why):
        if self.paused == 0:
            return
        self.paused &= ~why
        if self.paused == 0 and self.transport is not None and self.state != C_CLOSED:
            self.transport.resume_reading()
            if self.state == C_BODY and not self.writing_paused:
                self.deadline = _now + self.cfg.t_body

    cdef void _stash(self, object owner, const char *base, size_t off, size_t n):
        """Keep base[off:n] for later, without sharing the owner's memory."""
        if off == 0 and type(owner) is bytearray and owner is not _rbuf:
            self.pending = <bytearray>owner
        else:
            self.pending = bytearray(base[off:n])

    cdef void _feed(self, object owner, const char *base, size_t n):
        cdef size_t off = 0
        cdef int r
        cdef long long k
        cdef Py_ssize_t m
        while off < n and self.state < C_LINGER:
            if self.state == C_HEAD:
                if self.nreq and self.pending_seen == 0 and self.deadline != 0:
                    self.deadline = _now + self.cfg.t_header   # a new request began
                r = _parser.parse_request(base + off, n - off, self.pending_seen,
                                          self.cfg.max_line, self.cfg.max_head,
                                          self.cfg.max_fields)
                if r == 0:
                    self.pending_seen = n - off
                    self._stash(owner, base, off, n)
                    return
                self.pending_seen = 0
                if r < 0:
                    self._reply_error(_parser.err_status, 0)
                    return
                if self._start_request(owner, base, off) < 0:
                    if self.state != C_HEAD:
                        return
                    # answered here and kept alive: go on after this head
                    # (the request had no body)
                off += _parser.head_len
            elif self.state == C_BODY:
                self.deadline = _now + self.cfg.t_body
                self.expect_wait = 0
                if self.body_kind == B_LENGTH:
                    k = n - off
                    if k > self.body_left:
                        k = self.body_left
                    self._send_up(owner, base, off, <size_t>k)
                    self.req_bytes += k
                    off += <size_t>k
                    self.body_left -= k
                    if self.body_left == 0:
                        self._body_done()
                else:
                    m = chunk_skip(&self.chunk, base + off, n - off)
                    if m < 0:
                        self._abort_request(400)
                        return
                    if self.cfg.max_body and self.chunk.data_total > self.cfg.max_body:
                        self._abort_request(413)
                        return
                    self._send_up(owner, base, off, <size_t>m)
                    self.req_bytes += m
                    off += <size_t>m
                    if self.chunk.phase == CS_DONE:
                        self._body_done()
            elif self.state == C_TUNNEL:
                self._send_up(owner, base, off, n - off)
                self.req_bytes += n - off
                return
            else:   # C_WAIT: a pipelined request waits for the current response
                self._stash(owner, base, off, n)
                self._pause(P_PIPELINE)
                return

    cdef void _send_up(self, object owner, const char *base, size_t off, size_t k):
        if k == 0:
            return
        if self.up is None:
            if self.upq is not None:
                self.upq.append(base[off:off + k])
                self._pause(P_CONNECT)
            return
        t = self.up.transport
        if t is None:
            return
        t.write(_view(owner, off, off + k))
        _written_from_rbuf(t, owner)

    cdef void _body_done(self):
        self.req_done = 1
        self.state = C_WAIT
        self.deadline = 0
        # the wait for the final response head starts (an interim 100 may
        # have come already: it does not count)
        if self.up is not None and self.up.state == U_HEAD and not self.up.paused:
            self.up.deadline = _now + self.cfg.t_read

    cdef inline void _body_wait(self, bint expect):
        """The request has a body to come: time the client's first body
        byte, or first (with "Expect: 100-continue") the backend's 100."""
        self.expect_wait = expect
        self.deadline = _now + (CONTINUE_WAIT if expect else self.cfg.t_body)

    # -- one request --

    cdef int _start_request(self, object owner, const char *base, size_t off) except -2:
        global _total_requests
        cdef HeadParser hp = _parser
        cdef Pool pool
        cdef Backend b
        cdef UpstreamConn u
        cdef bytes head
        cdef ProxySettings cfg = self.cfg
        cdef Route route
        _total_requests += 1
        self.nreq += 1
        self.deadline = 0
        self.in_req = 1
        self.t_start = _mono()
        self.route_id = 0
        self.req_bytes = hp.head_len
        self.resp_head_len = 0
        self.req_keep_alive = hp.keep_alive and not _draining
        self.req_minor = hp.minor
        self.req_is_head = hp.method_len == 4 and memcmp(hp.method, b"HEAD", 4) == 0
        self.req_upgrade = hp.upgrade
        self.body_kind = hp.body
        self.resp_started = 0
        self.expect_wait = 0
        self.retried = 0
        self.attempts = 0
        self.tried = 0
        self.resp_bytes = 0
        self.resp_status = 0
        if cfg.access_log is not None:
            self._log_capture(base + off)
            self.req_id = None
        if hp.body == B_LENGTH:
            if cfg.max_body and hp.content_length > cfg.max_body:
                self._reply_error(413, 0)
                return -1
            self.body_left = hp.content_length
        elif hp.body == B_CHUNKED:
            chunk_init(&self.chunk, CHUNK_LINE_MAX, cfg.max_head)
        if self.lst.redirect_port:
            self._redirect_https(hp)
            return -1
        if _set_route_path(hp) < 0:
            self._reply_error(hp.err_status, 0)
            return -1
        if hp.has_host:
            route = self.lst.router.route(hp.host, hp.host_len, _rpath, _rpath_len)
        else:
            route = self.lst.router.route(b"", 0, _rpath, _rpath_len)
        if route is None:
            self._reply_error(404, hp.body == B_NONE)
            return -1
        self.route_id = route.index
        pool = route.pool
        self.hkey = pool.key_of(self, hp) if pool.algo == BAL_HASH else 0
        self.req_idem = hp.body == B_NONE and _is_idempotent(hp.method, hp.method_len)
        if route.cache is not None and hp.has_host:
            if route.hot is not None and self._serve_hot(route.hot, hp):
                return -1
            return self._start_cached(route, hp)
        self.pool = pool
        _budget_note_request()
        b = pool.pick(self.hkey, 0)
        if b is None and not pool.busy:
            self._reply_unavailable(1, hp.body == B_NONE)
            return -1
        head = self._build_request_head(hp, b if b is not None else <Backend>pool.backends[0])
        if hp.body == B_NONE or (hp.body == B_LENGTH and hp.content_length == 0):
            self.req_done = 1
            self.state = C_WAIT
        else:
            self.req_done = 0
            self.state = C_BODY
            self._body_wait(hp.expect_continue)
        return self._send_picked(pool, b, head)

    cdef int _send_to_pool(self, Pool pool, bytes head) except -2:
        """Pick a backend of pool and send it head (the request's state is set)."""
        cdef Backend b
        self.pool = pool
        _budget_note_request()
        b = pool.pick(self.hkey, 0)
        if b is None and not pool.busy:
            self._reply_unavailable(1, self.req_done)
            return -1
        return self._send_picked(pool, b, head)

    cdef int _send_picked(self, Pool pool, Backend b, bytes head) except -2:
        """Send head to b, or queue it when every backend is at max_conns (b None)."""
        cdef UpstreamConn u
        self.up_head = head
        self.up = None
        if b is None:
            self.upq = [head]
            pool.enqueue(self)
            return 0
        self.backend = b
        self.tried |= 1ULL << (b.index & 63)
        b.requests += 1
        b.active += 1
        u = b.take_idle()
        if u is not None:
            self.upq = None
            self._attach(u, 1)
            u.transport.write(head)
        else:
            self.upq = [head]
            b.connect(self)
        return 0

    cdef int _start_cached(self, Route route, HeadParser hp) except -2:
        """A request on a route with a cache phase: the phase answers it
        (respond), holds it (and later calls respond or forward), or returns
        the head to forward now (its own, e.g. a revalidation, or ours)."""
        cdef bytes head = self._build_request_head(hp, None)
        cdef bint has_body = not (hp.body == B_NONE or (hp.body == B_LENGTH and hp.content_length == 0))
        cdef object ctx = None
        self.req_done = not has_body
        self.state = C_BODY if has_body else C_WAIT
        if has_body:
            self._body_wait(hp.expect_continue)
        self.cache = None
        self.tee = 0
        try:
            ctx = route.cache.on_request(
                self, self.lst.proto, hp.method[:hp.method_len], hp.host[:hp.host_len],
                _target_bytes(self.cfg, hp),
                _field_list(hp), head, has_body)
        except Exception:
            _log.exception("cache phase failed on a request; forwarding it")
            ctx = None
        if self.state != C_WAIT and self.state != C_BODY:
            return -1            # answered from the cache (and maybe closed)
        if ctx is None:
            return self._send_to_pool(route.pool, head)
        self.cache = ctx
        fwd = ctx.head
        if fwd is None:
            return 0             # held: answered or forwarded later
        return self._send_to_pool(route.pool, <bytes>fwd)

    cdef bint _serve_hot(self, HotIndex hot, HeadParser hp) except -1:
        """Answer from the hot index when the request cannot change the
        answer the cache phase would give (GET/HEAD, no body, none of the
        fields the phase looks at) and the entry is fresh for more than
        hot.margin; 0 leaves the request to the phase."""
        global _hot_hits
        cdef size_t i, nl, hl, tl
        cdef const char *nm
        cdef const char *host = hp.host
        cdef const char *proto
        cdef size_t pl
        cdef unsigned long long h
        cdef HotEntry e
        cdef double now, ttl, age
        cdef long long age_i
        cdef bint keep, send_body
        cdef Scratch k = _hot_key
        cdef Scratch o
        cdef bytes proto_b = self.lst.proto
        cdef bytes conn_line
        if hp.body != B_NONE or hp.upgrade or hp.expect_continue:
            return 0
        if hot.gen != NULL and hot.gen[0] != hot.synced:
            return 0             # another process changed the store: the phase syncs first
        if not ((hp.method_len == 3 and memcmp(hp.method, b"GET", 3) == 0)
                or (hp.method_len == 4 and memcmp(hp.method, b"HEAD", 4) == 0)):
            return 0
        for i in range(hp.nfields):
            if hp.hid[i] != H_OTHER:
                continue
            nm = hp.fields[i].name
            nl = hp.fields[i].name_len
            if nl == 5:
                if _ieq(nm, nl, b"range", 5):
                    return 0
            elif nl == 6:
                if _ieq(nm, nl, b"pragma", 6):
                    return 0
            elif nl == 8:
                if _ieq(nm, nl, b"if-range", 8) or _ieq(nm, nl, b"if-match", 8):
                    return 0
            elif nl == 13:
                if _ieq(nm, nl, b"if-none-match", 13) or _ieq(nm, nl, b"cache-control", 13) \
                        or _ieq(nm, nl, b"authorization", 13):
                    return 0
            elif nl == 17:
                if _ieq(nm, nl, b"if-modified-since", 17):
                    return 0
            elif nl == 19:
                if _ieq(nm, nl, b"if-unmodified-since", 19):
                    return 0
        # the key as keys.cache_key builds it: scheme://host(lower, no default port)target
        hl = hp.host_len
        proto = proto_b
        pl = len(proto_b)
        if pl == 4 and hl >= 3 and memcmp(host + hl - 3, b":80", 3) == 0:
            hl -= 3
        elif pl == 5 and hl >= 4 and memcmp(host + hl - 4, b":443", 4) == 0:
            hl -= 4
        k.n = 0
        k.add(proto, pl)
        k.add(b"://", 3)
        if k.n + hl > k.cap:
            k.grow(hl)
        for i in range(hl):
            k.p[k.n + i] = <char>_lower[<unsigned char>host[i]]
        k.n += hl
        _add_target(k, self.cfg, hp)
        h = _fnv(FNV_BASIS, k.p, k.n)
        e = hot.find(h, k.p, k.n)
        if e is None:
            return 0
        now = _wall()
        ttl = e.expires - now
        if ttl <= hot.margin:
            hot.drop(e.key)          # the phase revalidates or refetches it
            return 0
        # answer as ClientConn.respond after CachePhase.on_request would
        self.req_done = 1
        self.state = C_WAIT
        self.cache = None
        self.tee = 0
        self.upq = None
        keep = self.req_keep_alive and not self.eof and not _draining
        age = e.age_base + now
        age_i = <long long>age if age > 0 else 0
        if age_i > DELTA_SECONDS_MAX:
            age_i = DELTA_SECONDS_MAX
        if keep:
            conn_line = b"Connection: keep-alive\r\n" if self.req_minor == 0 else b""
        else:
            conn_line = b"Connection: close\r\n"
        send_body = not self.req_is_head and e.body_len > 0
        o = _out
        o.n = 0
        o.addb(e.head)
        o.add(b"Age: ", 5)
        o.add_int(age_i)
        o.add(b"\r\nCache-Status: edgeproxy; hit; ttl=", 36)
        o.add_int(<long long>floor(ttl))
        o.add(b"\r\n", 2)
        if not e.has_date:
            o.addb(_date_line)
        o.addb(self.cfg.server_line)
        o.addb(self.lst.resp_extra)
        o.addb(conn_line)
        o.add(b"\r\n", 2)
        self.resp_head_len = o.n
        self.resp_status = e.status
        self.resp_started = 1
        self.resp_keep = keep
        self.resp_bytes = e.body_len if send_body else 0
        self._send_parts(o.p, o.n, e.parts if send_body else None)
        hot.hits += 1
        _hot_hits += 1
        self._response_done()
        return 1

    def forward(self, Pool pool, bytes head):
        """Forward a request the cache phase held (a collapsed miss released
        to the backend, a hit whose body vanished)."""
        if self.state != C_WAIT or self.backend is not None or self.up is not None \
                or self.transport is None:
            return
        self._send_to_pool(pool, head)

    def refetch(self, Pool pool, bytes head):
        """From the cache phase's on_response only: drop the backend's
        response, whose head the phase has just seen and which has no body
        (a 304 that does not select the stored entry: RFC 9111 §4.3.4 has
        the request repeated without its conditions), and send head in its
        place.  Nothing of it has reached the client.  False when the
        connection is past that point."""
        cdef UpstreamConn u = self.up
        if self.transport is None or self.state >= C_LINGER or self.resp_started or u is None:
            return False
        u.client = None          # the caller pools or closes it
        self.up = None
        if self.backend is not None:
            self.backend.release()
            self.backend = None
        self._send_to_pool(pool, head)
        return True

    def respond(self, bytes head, object body, int status):
        """Answer the current request from here (a cache hit, a stale answer):
        head is the status line and fields, each ending in CRLF, without the
        blank line; the core adds its own fields.  body is bytes, or a tuple
        of buffers that need to stay valid only during this call (slices of
        the cache's map: see _send_parts).  Then go on as after a forwarded
        response (access log, keep-alive, pipelining)."""
        cdef bint keep
        cdef Scratch o
        cdef UpstreamConn u = self.up
        if self.transport is None or self.state >= C_LINGER or self.state == C_HEAD \
                or self.resp_started:
            return
        if u is not None:        # the caller pools or closes it
            u.client = None
            self.up = None
        self.upq = None
        keep = self.req_keep_alive and self.req_done and not self.eof and not _draining
        self.resp_status = status
        self.resp_started = 1
        self.resp_keep = keep
        if isinstance(body, bytes):
            self.resp_bytes = len(<bytes>body)
            parts = (body,) if body else None
        else:
            parts = body
            self.resp_bytes = sum([len(b) for b in parts])
        o = _out
        o.n = 0
        o.addb(head)
        o.addb(self.cfg.server_line)
        o.addb(self.lst.resp_extra)
        if keep:
            if self.req_minor == 0:
                o.add(b"Connection: keep-alive\r\n", 24)
        else:
            o.add(b"Connection: close\r\n", 19)
        o.add(b"\r\n", 2)
        self._send_parts(o.p, o.n, parts)
        self._response_done()

    cdef int _send_parts(self, const char *head, size_t hl, object parts) except -1:
        """Write head, then the buffers in parts (a tuple or list, or None).
        On a plain TCP connection with nothing queued in its transport they
        go from their own memory (a cache entry in the LMDB map) to the
        socket in one writev; only what the kernel does not take at once
        is copied, into one bytes object for the transport.  TLS, or a
        transport with data queued: all of it is copied.  So the buffers
        need to stay valid only during this call."""
        cdef Py_buffer views[SEND_PARTS_MAX]
        cdef iovec iov[SEND_PARTS_MAX + 1]
        cdef Py_ssize_t n = len(parts) if parts is not None else 0
        cdef Py_ssize_t nv = 0, i, sent = 0, total = <Py_ssize_t>hl, skip, take
        cdef bytes rest
        cdef char *q
        if n > SEND_PARTS_MAX:
            self.transport.write(PyBytes_FromStringAndSize(head, hl))
            self.transport.write(b"".join(parts))
            return 0
        if self.fd == -2:
            self.fd = self._socket_fd()
        iov[0].iov_base = <void *>head
        iov[0].iov_len = hl
        try:
            for i in range(n):
                PyObject_GetBuffer(parts[i], &views[i], PyBUF_SIMPLE)
                nv += 1
                iov[i + 1].iov_base = views[i].buf
                iov[i + 1].iov_len = <size_t>views[i].len
                total += views[i].len
            # not once the transport is closing: libuv closes the fd at
            # once, and its number may already belong to a new connection
            if self.fd >= 0 and self.transport.get_write_buffer_size() == 0 \
                    and not self.transport.is_closing():
                sent = writev(self.fd, iov, <int>(n + 1))
                if sent < 0:
                    sent = 0     # EAGAIN; or an error the transport meets and reports next
            if sent < total:
                rest = PyBytes_FromStringAndSize(NULL, total - sent)
                q = PyBytes_AS_STRING(rest)
                skip = sent
                for i in range(n + 1):
                    take = <Py_ssize_t>iov[i].iov_len
                    if skip >= take:
                        skip -= take
                        continue
                    memcpy(q, <char *>iov[i].iov_base + skip, take - skip)
                    q += take - skip
                    skip = 0
                self.transport.write(rest)
        finally:
            for i in range(nv):
                PyBuffer_Release(&views[i])
        return 0

    cdef int _socket_fd(self):
        # the transport's socket; -1 where writing to it directly is not safe
        try:
            sock = self.transport.get_extra_info("socket")
            return sock.fileno() if sock is not None else -1
        except Exception:
            return -1

    cdef bytes _cache_response(self, HeadParser hp, UpstreamConn u, bint whole):
        """Show the response head to the cache phase: the field lines to add
        to the client's head, or None.  The phase may answer instead
        (respond: then self.up is no longer u).  `whole`: the body arrived
        with the head, complete and well framed."""
        cdef object ctx = self.cache
        cdef bint framed = hp.body == B_CHUNKED and self.req_minor != 0
        try:
            r = ctx.on_response(self, hp.status, hp.reason[:hp.reason_len] if hp.reason_len else b"",
                                _response_field_list(hp, self.cfg), framed,
                                hp.content_length, whole)
        except Exception:
            _log.exception("cache phase failed on a response; passing it on uncached")
            return None
        if r is None or self.up is not u:
            return None
        self.tee = r[1]
        return <bytes>r[0]

    cdef void _attach(self, UpstreamConn u, bint reused):
        self.up = u
        u.client = self
        u.state = U_HEAD
        u.reused = reused
        u.got_bytes = 0
        u.interim = 0
        u.pending = None
        u.pending_seen = 0
        # the read timeout runs once the request is sent whole; while its
        # body streams, only a backend that stops taking it times out
        u.deadline = (_now + self.cfg.t_read) if self.req_done else 0
        if self.writing_paused:
            u._pause()

    cdef _upstream_ready(self, UpstreamConn u, Backend b):
        if u.transport is None:
            # closed or reset between the connect and now: nothing was sent
            _log.warning("backend %s: connection lost right after connecting", b.name)
            _note_failure(b, "reset after connect")
            self._upstream_failed(b, 502)
            return
        if self.state >= C_LINGER or self.backend is not b or self.up is not None or self.upq is None:
            b.put_idle(u)        # the client went away meanwhile: keep the connection
            return
        self._attach(u, 0)
        q = self.upq
        self.upq = None
        if len(q) == 1:
            u.transport.write(q[0])
        else:
            u.transport.writelines(q)
        self._resume(P_CONNECT)

    cdef void _redirect_https(self, HeadParser hp):
        """A plain listener with redirect_http: 308 to the same URL on https."""
        cdef size_t hl = hp.host_len if hp.has_host else 0
        cdef size_t i
        cdef bint keep = hp.body == B_NONE and self.req_keep_alive and not self.eof
        cdef bytes loc, target
        if hl and hp.host[0] != b'[':
            for i in range(hl):
                if hp.host[i] == b':':
                    hl = i
                    break
        elif hl:
            for i in range(hl):
                if hp.host[i] == b']':
                    hl = i + 1
                    break
        if hl == 0:
            self._reply_error(400, 0)
            return
        target = (b"/" if hp.target_add_slash else b"") + hp.target[:hp.target_len]
        loc = b"https://" + hp.host[:hl] + (
            b"" if self.lst.redirect_port == 443 else b":%d" % self.lst.redirect_port) + target
        self.resp_status = 308
        self.transport.write(
            b"HTTP/1.1 308 Permanent Redirect\r\n%s%sLocation: %s\r\nContent-Length: 0\r\n%s\r\n"
            % (self.cfg.server_line, _date_line, loc, b"" if keep else b"Connection: close\r\n"))
        self._request_end(308)
        if keep:
            self.state = C_HEAD
            self.deadline = _now + self.cfg.t_keepalive
        else:
            self._linger()

    cdef _upstream_failed(self, Backend b, int status, bint retry=1):
        if self.state >= C_LINGER or self.backend is not b or self.upq is None:
            return
        # nothing reached the backend: any request may go to another one
        if retry and self._try_other():
            return
        self.upq = None
        self._resume(P_CONNECT)
        self._reply_error(status, self.req_done)

    cdef bint _try_other(self):
        """Send the request (self.upq) to another backend of the pool, within
        the pool's retries and the worker's retry budget."""
        cdef Pool pool = self.pool
        cdef Backend b
        if pool is None or self.attempts >= pool.retries or self.resp_started:
            return 0
        b = pool.pick(self.hkey, self.tried)
        if b is None or not _budget_take():
            return 0
        self.attempts += 1
        _log.info("pool %s: retrying on backend %s (%s failed)", pool.name, b.name,
                  self.backend.name if self.backend is not None else "-")
        if self.backend is not None:
            self.backend.release()
            self.backend = None
        self._dispatch(b)
        return 1

    cdef bint _retry_sent(self):
        """The request may have reached a backend that then failed before
        answering: only an idempotent request without a body goes again."""
        if not self.req_idem or self.upq is not None or self.up_head is None:
            return 0
        self.upq = [self.up_head]
        self.up = None
        if self._try_other():
            return 1
        self.upq = None
        return 0

    cdef void _dispatch(self, Backend b):
        """Send the request held in self.upq to b (after a queue or a failure)."""
        cdef UpstreamConn u
        self.backend = b
        self.tried |= 1ULL << (b.index & 63)
        b.requests += 1
        b.active += 1
        u = b.take_idle()
        if u is None:
            b.connect(self)
            return
        q = self.upq
        self.upq = None
        self._attach(u, 1)
        u.transport.writelines(q)
        self._resume(P_CONNECT)

    cdef void _reply_unavailable(self, int retry_after, bint keep):
        """503: no backend can take the request now."""
        if self.transport is None or self.state >= C_LINGER or self.resp_started:
            self.close()
            return
        keep = keep and self.req_keep_alive and not self.eof and not _draining
        self.resp_status = 503
        resp = _error_response(self.cfg, 503, keep, b"Retry-After: %d\r\n" % retry_after)
        self.transport.write(resp)
        if self.in_req:
            self.resp_head_len = len(resp)
            self._request_end(503)
        self.upq = None
        self.queued = 0
        if keep:
            self._resume(P_CONNECT)
            self._next_request()
        else:
            self._linger()

    cdef void _retry(self):
        """The pooled connection died before answering: send the request on
        a fresh connection (only for requests without a body)."""
        self.retried = 1
        self.up = None
        self.upq = [self.up_head]
        self.backend.connect(self)

    cdef bytes _build_request_head(self, HeadParser hp, Backend b):
        global _rid_seq
        cdef Scratch o = _out
        cdef size_t i
        cdef unsigned char h
        cdef bint first
        cdef const char *nm
        cdef size_t nl
        cdef size_t rid_at = 0, rid_len = 0
        o.n = 0
        o.add(hp.method, hp.method_len)
        o.add(b" ", 1)
        _add_target(o, self.cfg, hp)
        o.add(b" HTTP/1.1\r\n", 11)
        for i in range(hp.nfields):
            h = hp.hid[i]
            nm = hp.fields[i].name
            nl = hp.fields[i].name_len
            if h == H_OTHER or h == H_EXPECT or h == H_DATE or h == H_SERVER:
                if hp.ntokens and hp.is_conn_token(nm, nl):
                    continue
                if self.lst.subject_header is not None and nl == <size_t>len(self.lst.subject_header) \
                        and _icase_eq(nm, self.lst.subject_header, nl):
                    continue      # only the proxy may say who the client is
                if nl == 12 and h == H_OTHER and _ieq(nm, nl, b"x-request-id", 12):
                    # keep the first well-formed one; drop the rest
                    if rid_len or not _valid_request_id(hp.fields[i].value, hp.fields[i].value_len):
                        continue
                    rid_at = o.n + 14
                    rid_len = hp.fields[i].value_len
            elif h == H_HOST:
                if hp.host_from_uri:
                    continue
            elif h == H_UPGRADE:
                if not hp.upgrade:
                    continue
            elif h >= H_X_POWERED_BY:
                pass
            else:
                # hop-by-hop, framing and the forwarding fields we rewrite
                continue
            o.field(nm, nl, hp.fields[i].value, hp.fields[i].value_len)
        if hp.host_from_uri:
            o.field(b"Host", 4, hp.host, hp.host_len)
        elif not hp.has_host:
            o.field(b"Host", 4, b.hostport, len(b.hostport))
        if hp.body == B_LENGTH:
            o.add(b"Content-Length: ", 16)
            o.add_int(hp.content_length)
            o.add(b"\r\n", 2)
        elif hp.body == B_CHUNKED:
            o.add(b"Transfer-Encoding: chunked\r\n", 28)
        if hp.upgrade:
            o.add(b"Connection: upgrade\r\n", 21)
        if self.subject is not None:
            o.field(self.lst.subject_header, len(self.lst.subject_header),
                    self.subject, len(self.subject))
        if not rid_len:
            _rid_seq += 1
            o.add(b"X-Request-Id: ", 14)
            rid_at = o.n
            o.addb(_rid_prefix)
            o.add(b"-", 1)
            o.add_hex(_rid_seq)
            rid_len = o.n - rid_at
            o.add(b"\r\n", 2)
        if self.cfg.access_log is not None:
            self.req_id = PyBytes_FromStringAndSize(o.p + rid_at, rid_len)
        # X-Forwarded-For: what came in, then this client
        o.add(b"X-Forwarded-For: ", 17)
        for i in range(hp.nfields):
            if hp.hid[i] == H_X_FORWARDED_FOR and hp.fields[i].value_len:
                o.add(hp.fields[i].value, hp.fields[i].value_len)
                o.add(b", ", 2)
        o.addb(self.peer)
        o.add(b"\r\nX-Forwarded-Proto: ", 21)
        o.addb(self.lst.proto)
        o.add(b"\r\n", 2)
        if hp.has_host and hp.host_len:
            o.field(b"X-Forwarded-Host", 16, hp.host, hp.host_len)
        # RFC 7239 Forwarded: previous elements, then ours
        o.add(b"Forwarded: ", 11)
        for i in range(hp.nfields):
            if hp.hid[i] == H_FORWARDED and hp.fields[i].value_len:
                o.add(hp.fields[i].value, hp.fields[i].value_len)
                o.add(b", ", 2)
        o.addb(self.fwd_for)
        if hp.has_host and hp.host_len:
            o.add(b";host=\"", 7)
            o.add(hp.host, hp.host_len)
            o.add(b"\"", 1)
        o.add(b";proto=", 7)
        o.addb(self.lst.proto)
        o.add(b"\r\n\r\n", 4)
        return o.take()

    cdef void _log_capture(self, const char *line):
        cdef HeadParser hp = _parser
        cdef size_t i
        cdef const char *lf = <const char *>memchr(line, b'\r', hp.head_len)
        self.log_req = line[:lf - line] if lf != NULL else b""
        self.log_ref = b"-"
        self.log_ua = b"-"
        for i in range(hp.nfields):
            if _ieq(hp.fields[i].name, hp.fields[i].name_len, b"referer", 7):
                self.log_ref = hp.fields[i].value[:hp.fields[i].value_len]
            elif _ieq(hp.fields[i].name, hp.fields[i].name_len, b"user-agent", 10):
                self.log_ua = hp.fields[i].value[:hp.fields[i].value_len]

    # -- the end of a request --

    cdef void _response_done(self):
        """The backend's response has been passed on whole."""
        cdef object ctx = self.cache
        if self.in_req:
            self._request_end(self.resp_status)
        if ctx is not None:
            self.cache = None
            self.tee = 0
            try:
                ctx.finished()
            except Exception:
                _log.exception("cache phase failed at the end of a response")
        if self.backend is not None:
            self.backend.release()
        self.up = None
        self.up_head = None
        self.backend = None
        if self.state >= C_LINGER:
            return
        if not self.resp_keep or self.eof or _draining:
            self.close()
            return
        self._next_request()

    cdef void _next_request(self):
        """The request is answered and the connection stays: wait for the
        next one, and take at once any the client pipelined meanwhile
        (every keep-alive answer comes here, a forwarded response or one
        of our own errors)."""
        cdef object owner
        self.state = C_HEAD
        self.deadline = _now + self.cfg.t_keepalive
        # reading resumes first, so that a pipelined request that now waits
        # for its own response pauses it again
        self._resume(P_PIPELINE)
        if self.pending is not None:
            owner = self.pending
            self.pending = None
            self._feed(owner, PyByteArray_AS_STRING(owner), len(owner))

    cdef void _request_end(self, int status):
        """Count the request that ends here and log it; every way a request
        ends (response done, error answered, connection closed) comes here."""
        cdef double t = _mono()
        cdef double d = t - self.t_start
        cdef long long us = <long long>(d * 1e6)
        cdef int i = 0
        self.in_req = 0
        self.t_idle = t
        if us < 0:
            us = 0
        _m[M_ROUTES + self.route_id * 6 + (status // 100 if 100 <= status < 600 else 0)] += 1
        _m[M_DURATION_SUM_US] += us
        while i < DUR_NBUCKETS - 1 and us > _dur_bounds_us[i]:
            i += 1
        _m[M_DURATION_BUCKETS + i] += 1
        _m[M_BYTES_IN] += self.req_bytes
        _m[M_BYTES_OUT] += self.resp_head_len + self.resp_bytes
        if self.cfg.access_log is not None:
            self._log_request(status, d)

    cdef void _begin_unrouted(self):
        """A request that failed before it was parsed (400, 408, 431...)."""
        self.in_req = 1
        self.route_id = 0
        self.t_start = _mono()
        self.req_bytes = 0
        self.resp_bytes = 0
        self.log_req = b"-"
        self.log_ref = b"-"
        self.log_ua = b"-"
        self.req_id = None

    cdef void _log_request(self, int status, double duration):
        try:
            self.cfg.access_log.log(self.peer, self.log_req, status,
                                    self.resp_bytes, duration, self.log_ref, self.log_ua,
                                    self.backend.name if self.backend is not None else "-",
                                    self.req_id or b"-")
        except Exception:
            _log.exception("access log failed")

    cdef void _reply_error(self, int status, bint keep):
        """Answer a request ourselves (no response of the backend has started)."""
        cdef Backend b
        if self.transport is None or self.state >= C_LINGER:
            return
        if self.cache is not None:
            if not self.resp_started and 502 <= status <= 504 and self._cache_on_error(status):
                return
            self._cache_drop()
        if self.resp_started:
            self.close()
            return
        keep = keep and self.req_keep_alive and not self.eof and not _draining
        self.resp_status = status
        resp = _error_response(self.cfg, status, keep)
        self.transport.write(resp)
        if not self.in_req and (status != 408 or self.pending is not None):
            self._begin_unrouted()
        if self.in_req:
            self.resp_head_len = len(resp)
            self._request_end(status)
        if self.backend is not None:
            b = self.backend
            self.backend = None
            b.release()
        if self.up is not None:
            self.up.client = None
            self.up.close()
            self.up = None
        self.upq = None
        if keep:
            self._next_request()
        else:
            self._linger()

    cdef bint _cache_on_error(self, int status):
        """The backend failed before answering: the cache phase may answer
        (stale-if-error)."""
        if self.up is not None:
            self.up.client = None
            self.up.close()
            self.up = None
        self.upq = None
        try:
            self.cache.on_backend_error(self, status)
        except Exception:
            _log.exception("cache phase failed on a backend error")
        return self.state != C_WAIT and self.state != C_BODY

    cdef void _cache_drop(self):
        """The request ends without a complete response: tell the phase."""
        cdef object ctx = self.cache
        self.cache = None
        self.tee = 0
        try:
            ctx.aborted()
        except Exception:
            _log.exception("cache phase failed on a cut response")

    cdef void _linger(self):
        """Close after an error answer without losing it: a close with unread
        input makes the kernel send a reset that can destroy the answer
        before the client reads it, so half-close and drain input first (as
        nginx's lingering close does)."""
        self.pending = None
        if self.transport.can_write_eof() and not self.eof:
            self.state = C_LINGER
            self.deadline = _now + LINGER_SECONDS
            self._resume(P_PIPELINE | P_CONNECT | P_BACKPRESSURE)
            self.transport.write_eof()
        else:
            self.close()

    cdef void _abort_request(self, int status):
        """The request body was bad or too large mid-stream."""
        if not self.resp_started:
            self._reply_error(status, 0)
        else:
            self.close()

    def _on_timeout(self):
        if self.state == C_LINGER:
            self.close()
        elif self.state == C_HEAD:
            if self.pending is not None or self.nreq == 0:
                self._reply_error(408, 0)
            else:
                self.close()       # idle keep-alive connection
        elif self.state == C_BODY and not self.writing_paused and not self.resp_started:
            if self.expect_wait:
                # no 100 (Continue) from the backend in time: let the body
                # come anyway; the backend was told to expect it
                self.expect_wait = 0
                self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")
                self.deadline = _now + self.cfg.t_body
                return
            _log.info("client %s: no request body for %.1fs", self.peer.decode("latin-1"),
                      self.cfg.t_body)
            self._reply_error(408, 0)
        else:
            _log.info("client %s: timed out (state %d)", self.peer.decode("latin-1"), self.state)
            self.close()

    cpdef close(self):
        if self.transport is not None and self.state != C_CLOSED:
            self.state = C_CLOSED
            self.transport.close()
        self._teardown()

    cdef void _teardown(self):
        cdef UpstreamConn u
        cdef Backend b
        if self.in_req:
            # cut before its response ended: 499 when none had started (as nginx logs)
            self._request_end(self.resp_status if self.resp_started else 499)
        self.state = C_CLOSED
        self.deadline = 0
        _conns.discard(self)
        if self.cache is not None:
            self._cache_drop()
        u = self.up
        self.up = None
        self.upq = None
        self.pending = None
        self.queued = 0
        if u is not None:
            u.client = None
            u.close()
        if self.backend is not None:
            b = self.backend
            self.backend = None
            b.release()


def _absent(self):
    raise AttributeError("connections over uvloop's TLS take their reads as bytes (data_received)")


# uvloop's TLS layer uses a protocol's get_buffer when it has one, and that
# path leaks memory (~700 bytes per connection on uvloop 0.23; a bare uvloop
# TLS server with a BufferedProtocol shows it too).  Connections to https
# backends, the one place that layer still runs (clients' TLS is
# TLSServerConn), hide both methods (hasattr is False) and take their reads
# as bytes (data_received); decrypted reads are copies anyway.
_NO_BUFFER = property(_absent)


# ---- the backend side -----------------------------------------------------

cdef bint _arrived_whole(HeadParser hp, const char *p, size_t n, ProxySettings cfg):
    """Whether p[:n], what came with a response head, holds its whole body,
    well framed: only then can the cache phase's Cache-Status say `stored`
    (a body that streams on may still be cut off or badly framed)."""
    cdef ChunkState st
    if hp.body == B_NONE:
        return 1
    if hp.body == B_LENGTH:
        return n >= <size_t>hp.content_length
    if hp.body == B_CHUNKED:
        chunk_init(&st, CHUNK_LINE_MAX, cfg.resp_max_head)
        return chunk_skip(&st, p, n) >= 0 and st.phase == CS_DONE
    return 0                     # B_CLOSE: complete only when the backend closes


@cython.no_gc_clear
cdef class UpstreamConn(Stream):
    """A connection to a backend: carries one request at a time and sits in
    its backend's keep-alive pool between them."""
    cdef:
        Backend backend
        ClientConn client
        public int state
        int body_kind
        long long body_left
        ChunkState chunk
        bint decode
        bint keep_alive
        bint reused
        bint got_bytes
        bint paused
        int interim              # 1xx responses to the current request
        public double deadline

    def __init__(self, Backend backend):
        self.backend = backend
        self.state = U_CONNECTING

    def connection_made(self, transport):
        self.transport = transport
        transport.set_write_buffer_limits(HIGH_WATER, LOW_WATER)
        _upconns.add(self)

    def connection_lost(self, exc):
        cdef int was = self.state
        cdef ClientConn c = self.client
        self.state = U_CLOSED
        self.transport = None
        self.deadline = 0
        self.pending = None
        _upconns.discard(self)
        if was == U_IDLE:
            self.backend.forget_idle(self)
        self.client = None
        if c is None or c.up is not self:
            return
        if was == U_HEAD and not self.got_bytes:
            if self.reused and c.body_kind == B_NONE and not c.retried:
                c._retry()
            else:
                _log.warning("backend %s: closed the connection before answering", self.backend.name)
                if not self.reused:    # a reused one may have met the backend's idle close
                    _note_closed_before_answer(self.backend, c.up_head)
                c.up = None
                if not c._retry_sent():
                    c._reply_error(502, c.req_done)
        elif was == U_BODY and self.body_kind == B_CLOSE:
            self._finish(c)
        elif was == U_HEAD:
            _log.warning("backend %s: closed the connection inside the response head", self.backend.name)
            c._reply_error(502, 0)
        else:
            c.close()

    cdef bint _reading(self):
        if self.client is None or self.state == U_IDLE:
            self.close()         # a backend must not talk out of turn
            return 0
        self.got_bytes = 1
        # between two reads of a response body; the wait for the final
        # response head is one timeout, however many 1xx come first
        if not self.paused and self.state != U_HEAD:
            self.deadline = _now + self.client.cfg.t_read
        return 1

    def eof_received(self):
        return False

    def pause_writing(self):
        if self.client is not None:
            self.client._pause(P_BACKPRESSURE)
            if self.deadline == 0:
                self.deadline = _now + self.client.cfg.t_send

    def resume_writing(self):
        if self.client is not None:
            self.client._resume(P_BACKPRESSURE)
            if not self.client.req_done and self.state == U_HEAD:
                self.deadline = 0

    cdef void _pause(self):
        if not self.paused and self.transport is not None:
            self.paused = 1
            self.deadline = 0
            self.transport.pause_reading()

    cdef void _resume(self):
        if self.paused and self.transport is not None:
            self.paused = 0
            if self.client is not None:
                self.deadline = _now + self.client.cfg.t_read
            self.transport.resume_reading()

    def _on_timeout(self):
        cdef ClientConn c = self.client
        if self.state == U_IDLE:
            self.close()
        elif c is not None and self.state == U_HEAD:
            _log.warning("backend %s: no response within %.1fs", self.backend.name, c.cfg.t_read)
            _note_failure(self.backend, "read timeout")
            if not self.got_bytes and c.req_done:
                self.client = None
                self.close()
                c.up = None
                if c._retry_sent():
                    return
            c._reply_error(504, 0)
        elif c is not None:
            _log.warning("backend %s: response stalled", self.backend.name)
            c.close()
        else:
            self.close()

    cpdef close(self):
        cdef int was = self.state
        self.state = U_CLOSED
        self.deadline = 0
        self.client = None
        if was == U_IDLE:
            self.backend.forget_idle(self)
        if self.transport is not None:
            self.transport.close()

    cdef void _feed(self, object owner, const char *base, size_t n):
        cdef size_t off = 0
        cdef ClientConn c
        cdef int r
        cdef long long k
        cdef Py_ssize_t m
        cdef size_t so, sl
        while off < n:
            c = self.client
            if c is None or c.state >= C_LINGER:
                self.close()
                return
            if self.state == U_HEAD:
                r = _parser.parse_response(base + off, n - off, self.pending_seen, c.req_is_head,
                                           c.cfg.resp_max_head, c.cfg.resp_max_fields)
                if r == 0:
                    self.pending_seen = n - off
                    if off == 0 and type(owner) is bytearray and owner is not _rbuf:
                        self.pending = <bytearray>owner
                    else:
                        self.pending = bytearray(base[off:n])
                    return
                self.pending_seen = 0
                if r < 0:
                    _log.warning("backend %s: invalid response: %s", self.backend.name,
                                 (<bytes>_parser.err_msg).decode())
                    c._reply_error(502, 0)
                    return
                off += _parser.head_len
                if _parser.status < 200 and _parser.status != 101:
                    self.interim += 1
                    if self.interim > INTERIM_MAX:
                        _log.warning("backend %s: more than %d interim responses", self.backend.name,
                                     INTERIM_MAX)
                        c._reply_error(502, 0)
                        return
                    if _parser.status == 100 and c.expect_wait:
                        c.expect_wait = 0
                        c.deadline = _now + c.cfg.t_body
                    # interim response: pass it on to HTTP/1.1 clients
                    if c.req_minor == 1:
                        c.transport.write(self._build_head(c, _parser, 0))
                    continue
                if _parser.status == 101:
                    if not c.req_upgrade:
                        _log.warning("backend %s: 101 to a request without Upgrade", self.backend.name)
                        c._reply_error(502, 0)
                        return
                    c.resp_keep = 0
                    c.resp_status = 101
                    c.resp_started = 1
                    head = self._build_head(c, _parser, 0)
                    c.resp_head_len = len(head)
                    c.transport.write(head)
                    self.state = U_TUNNEL
                    c.state = C_TUNNEL
                    c.deadline = 0
                    self.deadline = 0
                    c._resume(P_PIPELINE)
                    if c.pending is not None:   # bytes the client sent after its request
                        q = c.pending
                        c.pending = None
                        self.transport.write(bytes(q))
                    continue
                self._start_body(c, base + off, n - off)
                if self.client is not c:
                    return
                if self.state == U_BODY and self.body_kind == B_LENGTH and self.body_left <= INLINE_BODY:
                    # small response: head and body in one write
                    k = n - off
                    if k > self.body_left:
                        k = self.body_left
                    if c.tee:
                        c.cache.feed(base[off:off + <size_t>k])
                    _out.add(base + off, <size_t>k)
                    c.transport.write(_out.take())
                    off += <size_t>k
                    self.body_left -= k
                    c.resp_bytes += k
                    if self.body_left == 0:
                        self._finish(c)
                else:
                    c.transport.write(_out.take())
                    if self.state != U_BODY:
                        self._finish(c)
            elif self.state == U_BODY:
                if self.body_kind == B_LENGTH:
                    k = n - off
                    if k > self.body_left:
                        k = self.body_left
                    if c.tee:
                        c.cache.feed(base[off:off + <size_t>k])
                    c.transport.write(_view(owner, off, off + <size_t>k))
                    _written_from_rbuf(c.transport, owner)
                    off += <size_t>k
                    self.body_left -= k
                    c.resp_bytes += k
                    if self.body_left == 0:
                        self._finish(c)
                elif self.body_kind == B_CHUNKED and not self.decode:
                    m = chunk_skip(&self.chunk, base + off, n - off)
                    if m < 0:
                        _log.warning("backend %s: bad chunked body: %s", self.backend.name,
                                     (<bytes>self.chunk.err).decode())
                        c.close()
                        self.close()
                        return
                    if c.tee:
                        c.cache.feed(base[off:off + <size_t>m])
                    c.transport.write(_view(owner, off, off + <size_t>m))
                    _written_from_rbuf(c.transport, owner)
                    off += <size_t>m
                    c.resp_bytes += m
                    if self.chunk.phase == CS_DONE:
                        self._finish(c)
                elif self.body_kind == B_CHUNKED:
                    # an HTTP/1.0 client: send the data alone, end by closing
                    m = chunk_step(&self.chunk, base + off, n - off, &so, &sl)
                    if m < 0:
                        c.close()
                        self.close()
                        return
                    if sl:
                        if c.tee:
                            c.cache.feed(base[off + so:off + so + sl])
                        c.transport.write(_view(owner, off + so, off + so + sl))
                        _written_from_rbuf(c.transport, owner)
                        c.resp_bytes += sl
                    off += <size_t>m
                    if self.chunk.phase == CS_DONE:
                        self._finish(c)
                else:   # B_CLOSE: everything until the backend closes
                    if c.tee:
                        c.cache.feed(base[off:n])
                    c.transport.write(_view(owner, off, n))
                    _written_from_rbuf(c.transport, owner)
                    c.resp_bytes += n - off
                    return
            elif self.state == U_TUNNEL:
                c.transport.write(_view(owner, off, n))
                _written_from_rbuf(c.transport, owner)
                c.resp_bytes += n - off
                return
            else:
                # bytes after the end of a response: this connection cannot be trusted
                _log.warning("backend %s: sent data after its response", self.backend.name)
                self.close()
                return

    cdef void _start_body(self, ClientConn c, const char *body, size_t avail):
        """Decide the framing toward the client and build its head into _out.
        body[:avail] is what arrived of the body with the head."""
        cdef HeadParser hp = _parser
        cdef bytes extra = None
        if self.backend.fails or self.backend.ejections or self.backend.close_seen:
            _note_success(self.backend)
        if c.cache is not None:
            extra = c._cache_response(hp, self, _arrived_whole(hp, body, avail, c.cfg))
            if self.client is not c:
                # answered from the cache instead (revalidated, stale-if-error)
                if hp.keep_alive and c.req_done and (hp.body == B_NONE or (
                        hp.body == B_LENGTH and hp.content_length == 0)):
                    self.backend.put_idle(self)
                else:
                    self.close()
                return
        self.keep_alive = hp.keep_alive
        self.body_kind = hp.body
        self.decode = hp.body == B_CHUNKED and c.req_minor == 0
        c.resp_status = hp.status
        c.resp_started = 1
        c.resp_keep = (c.req_keep_alive and c.req_done and not c.eof
                       and hp.body != B_CLOSE and not self.decode and not _draining)
        if hp.body == B_LENGTH:
            self.body_left = hp.content_length
            self.state = U_BODY if hp.content_length > 0 else U_HEAD
        elif hp.body == B_CHUNKED:
            chunk_init(&self.chunk, CHUNK_LINE_MAX, c.cfg.resp_max_head)
            self.state = U_BODY
        elif hp.body == B_CLOSE:
            self.state = U_BODY
        if self.state == U_BODY and not self.paused:
            self.deadline = _now + c.cfg.t_read    # from now on, between two reads
        self._build_head_into(c, hp, 1)
        if extra:                # the cache phase's fields (Cache-Status)
            _out.n -= 2
            _out.addb(extra)
            _out.add(b"\r\n", 2)
        c.resp_head_len = _out.n

    cdef bytes _build_head(self, ClientConn c, HeadParser hp, bint final):
        self._build_head_into(c, hp, final)
        return _out.take()

    cdef void _build_head_into(self, ClientConn c, HeadParser hp, bint final):
        cdef Scratch o = _out
        cdef size_t i
        cdef unsigned char h
        cdef int kind
        cdef bint has_date = 0
        cdef ProxySettings cfg = c.cfg
        o.n = 0
        o.add(b"HTTP/1.1 ", 9)
        o.add_int(hp.status)
        o.add(b" ", 1)
        if hp.reason_len:
            o.add(hp.reason, hp.reason_len)
        else:
            o.addb(_REASONS.get(hp.status, b"Unknown"))
        o.add(b"\r\n", 2)
        for i in range(hp.nfields):
            kind = _response_field_kind(hp, i, cfg)
            if kind == RF_DROP:
                continue
            h = hp.hid[i]
            if kind == RF_FRAMING:
                # re-sent below when the body has a length; a bodiless final
                # response (HEAD, 304) keeps the length it announces
                if not (h == H_CONTENT_LENGTH and final and hp.body == B_NONE):
                    continue
            elif kind == RF_UPGRADE:
                if hp.status != 101:
                    continue
            elif h == H_DATE:
                has_date = 1
            o.field(hp.fields[i].name, hp.fields[i].name_len,
                    hp.fields[i].value, hp.fields[i].value_len)
        if not final:
            if hp.status == 101:
                o.add(b"Connection: upgrade\r\n", 21)
            o.add(b"\r\n", 2)
            return
        o.addb(cfg.server_line)
        if not has_date:
            o.addb(_date_line)
        o.addb(c.lst.resp_extra)
        if hp.body == B_LENGTH:
            o.add(b"Content-Length: ", 16)
            o.add_int(hp.content_length)
            o.add(b"\r\n", 2)
        elif hp.body == B_CHUNKED and not self.decode:
            o.add(b"Transfer-Encoding: chunked\r\n", 28)
        if not c.resp_keep:
            o.add(b"Connection: close\r\n", 19)
        elif c.req_minor == 0:
            o.add(b"Connection: keep-alive\r\n", 24)
        o.add(b"\r\n", 2)

    cdef void _finish(self, ClientConn c):
        """The response is complete: pool or close this connection, then let
        the client go on."""
        if self.keep_alive and c.req_done and self.transport is not None \
                and self.state != U_CLOSED and self.body_kind != B_CLOSE:
            self.client = None
            self.backend.put_idle(self)
        else:
            self.close()
        c._response_done()


@cython.final
cdef class TLSUpstreamConn(UpstreamConn):
    """A connection to an https backend, without get_buffer (see _NO_BUFFER)."""
    get_buffer = _NO_BUFFER
    buffer_updated = _NO_BUFFER

    cpdef close(self):
        # The loop's TLS transport sends close_notify on close() and then waits
        # for the backend's, up to 30 s: a backend that stalled would keep the
        # connection, its descriptor and buffers that long after the proxy gave
        # up on it.  Nothing more is wanted from it, so, as nginx does, send
        # close_notify and close without waiting.
        cdef object t = self.transport
        UpstreamConn.close(self)
        if t is not None:
            t.abort()
