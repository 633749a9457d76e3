# Settings, routes and listeners: what the config becomes in the core
# (built once per worker start or reload by edgeproxy/proxy/build.py), and the
# routing path a request is routed by (ext/normalize.pyx finds its normal form).

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
    cdef public ClientAddr addr            # trusted proxies, per-address limits (clientaddr.pyx), or None
    cdef public int log_fields             # what the access log's format needs captured (LOG_*)
    # what shapes answers no route's phases set (ext/toolkit.pyx): the global
    # response rules (HeadEdits) and error pages (Answers), or None
    cdef public HeadEdits resp_edits
    cdef public Answers answers

    def __init__(self, *, max_line=8192, max_head=32768, max_fields=100,
                 max_body=100 * 1024 * 1024, resp_max_head=65536, resp_max_fields=256,
                 t_connect=5.0, t_read=60.0, t_send=60.0, t_header=10.0, t_keepalive=75.0,
                 t_body=60.0, server_header="", hide=(), access_log=None, normalize_target=False,
                 log_fields=-1):
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
        # -1: what the log object asks for (its `fields`), everything without one
        self.log_fields = log_fields if log_fields >= 0 else (
            getattr(access_log, "fields", LOG_ALL) if access_log is not None else 0)

    def derive(self, *, max_body=None, t_connect=None, t_read=None, t_send=None, t_body=None):
        """A copy with a route's own limits (None: keep this one's); a route
        with one runs on it from routing to the end of its request."""
        cdef ProxySettings s = ProxySettings.__new__(ProxySettings)
        s.max_line, s.max_head, s.max_fields = self.max_line, self.max_head, self.max_fields
        s.resp_max_head, s.resp_max_fields = self.resp_max_head, self.resp_max_fields
        s.max_body = self.max_body if max_body is None else max_body
        s.t_connect = self.t_connect if t_connect is None else t_connect
        s.t_read = self.t_read if t_read is None else t_read
        s.t_send = self.t_send if t_send is None else t_send
        s.t_body = self.t_body if t_body is None else t_body
        s.t_header, s.t_keepalive = self.t_header, self.t_keepalive
        s.server_line, s.hide = self.server_line, self.hide
        s.access_log, s.log_fields = self.access_log, self.log_fields
        s.normalize_target = self.normalize_target
        s.addr = self.addr
        s.resp_edits, s.answers = self.resp_edits, self.answers
        return s


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
    cdef public Phase phase          # the compiled phase of the route (the cache's), or None
    cdef public PhaseChain phases    # the route's hooks (ext/phases.pyx), or None: no hook, no cost
    cdef public ProxySettings cfg    # the route's own limits and timeouts (ProxySettings.derive), or None

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
        self.phase = CacheRoutePhase() if cache is not None else None


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
    cdef public PhaseChain phases    # hooks with a connect phase, or None
    cdef public int max_conns        # open connections at most (this worker); 0 = no limit
    cdef public int nconns           # open connections, counted when max_conns is set
    cdef public bint proxy_protocol  # each connection starts with a PROXY header (proxyproto.pyx)
    cdef public AddrSet pp_from      # the sources that may send it; None = any
    cdef public str name             # its bind address as configured, for the access log
    cdef public AccessList access    # allow/deny by client address (ext/limits.pyx), or None

    def __init__(self, cfg, router, proto="http", resp_extra=b"", redirect_port=0,
                 subject_header=None, subject_of=None, tls_context=None, name="-"):
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
        self.name = name

    def __call__(self):
        if self.proxy_protocol:
            return ProxyHeaderConn(self)
        if self.proto == b"https":
            return TLSServerConn(self)
        return ClientConn(self)
