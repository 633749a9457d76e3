# A backend: its address, counters and health, its keep-alive pool of
# UpstreamConn, the connect, and the errors of this host (out of descriptors
# or ports) that must never count against a backend.  Choosing one is
# ext/balance.pyx.

cdef class Backend:
    """One backend server of a pool, with its idle keep-alive connections."""
    cdef public str host
    cdef public int port
    cdef public str path             # a unix socket's path ("unix:/run/app.sock" backends), or None
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
    cdef public int proxy_protocol   # 1, 2: send a PROXY header of that version on each connection
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
                 backup=False, path=None):
        self.host = host
        self.port = port
        self.scheme = scheme
        self.path = path
        if path is not None:
            if ssl is not None:
                raise ValueError("a unix socket backend does not speak TLS")
            self.name = "unix:" + path
            self.hostport = b"localhost"     # the Host for a client that sent none (as nginx)
        else:
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
        # a PROXY header named one client: its connection serves no other
        if len(self.idle) >= self.idle_max or _draining or self.proxy_protocol:
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
    cdef bytes pp = _proxy_header_for(b, c) if b.proxy_protocol else None
    loop = asyncio.get_running_loop()
    limit = c.cfg.t_connect      # the route's timeout.connect, or the global one
    try:
        if b.path is not None:
            coro = loop.create_unix_connection(b._new_conn, b.path)
        elif pp is not None and b.ssl is not None:
            coro = _connect_after_proxy_header(loop, b, pp)
        elif b.ssl is not None:
            coro = loop.create_connection(b._new_conn, b.host, b.port, ssl=b.ssl,
                                          server_hostname=b.server_hostname or b.host)
        else:
            coro = loop.create_connection(b._new_conn, b.host, b.port)
        _, up = await asyncio.wait_for(coro, limit)
        if pp is not None and b.ssl is None and (<UpstreamConn>up).transport is not None:
            (<UpstreamConn>up).transport.write(pp)     # before the request: _upstream_ready
    except asyncio.TimeoutError:
        _log.warning("backend %s: connect timed out after %.1fs", b.name, limit)
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
