# The client side: Stream (what both sides share: reads into the worker's
# buffer) and ClientConn, which reads requests, routes them, sends them to a
# backend and owns the request until its response is complete.  Phases
# (ext/phases.pyx) and the head writers (ext/heads.pyx) are called from here.
#
# Request flow (docs/architecture.md):
#   ClientConn.buffer_updated -> parse head -> route -> [phases] -> pick backend ->
#   build upstream head -> pooled or new UpstreamConn -> stream body ->
#   UpstreamConn.buffer_updated -> parse response head -> filter headers ->
#   stream body to the client -> release the backend connection -> log.

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
        bytes peer                # the client's address (this request's: see clientaddr.pyx)
        str peer_str              # peer as str, made for the first hook that asks
        bytes fwd_for             # the Forwarded element for hop
        # the client's address (ext/clientaddr.pyx, ext/proxyproto.pyx)
        bytes tcp_peer            # the TCP peer
        bytes hop                 # the connection's client: the PROXY header's, else tcp_peer
        int src_port              # hop's port
        object pp_dst             # (address, port) the PROXY header says the client reached, or None
        IpCount ipc               # this address's counts, when a per-address limit is on
        bint hop_trusted          # hop is a trusted proxy: requests may name the client
        bint in_head              # counted in ipc.heads
        bint lst_counted          # counted in lst.nconns
        object peer_parsed        # the peer bytes peer_bin was parsed from (ext/limits.pyx)
        unsigned char peer_bin[16]  # peer as 4 or 16 bytes, for access lists
        int peer_fam              # 4, 6, or 0: peer is no IP address
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
        bytes log_host            # LOG_HOST: the Host the client sent, or None
        bytes log_cache           # LOG_CACHE: the response's Cache-Status line, or None
        bytes req_id
        int resp_status
        long long resp_bytes
        # the compiled phase's part in this request (the cache's exchange), or None
        Stage stage
        int tap             # who sees the response body as it streams: TAP_STAGE, TAP_HOOKS
        int fd              # the socket, for writes straight from cache memory (-1: TLS
                            # or unknown, -2: not looked up yet)
        # phases (routes with hooks only; ext/phases.pyx)
        RequestCtx ctx      # the request's context while it runs
        RequestCtx conn_ctx # the connect phase's
        Route route
        bytearray body_buf  # the request body, kept for request_body hooks
        # a static file's body still to go (ext/static.pyx FileSender), or None
        object sender
        # the response's body filter (compression, ext/compress.pyx), or None
        BodyFilter xform
        bytes added_fields  # field lines the request's stages added to the client's head
        # head edits of compiled phases (ext/toolkit.pyx), reset when a request ends
        HeadEdits req_edits   # toward the backend (_request_head), or None
        HeadEdits resp_edits  # toward the client (a backend's answer, a cache hit;
                              # with .always the proxy's own answers too), or None
        bytes up_target       # the target to forward instead of the client's, or None
        Answers answers       # error pages for the proxy's own answers, or None

    def __init__(self, Listener lst):
        self.lst = lst
        self.cfg = lst.cfg
        self.state = C_HEAD
        self.fd = -1 if lst.proto == b"https" else -2
        self.peer = b"-"
        self.fwd_for = b"for=unknown"
        self.resp_edits = lst.cfg.resp_edits
        self.answers = lst.cfg.answers

    # -- asyncio protocol interface --

    def connection_made(self, transport):
        self.transport = transport
        transport.set_write_buffer_limits(HIGH_WATER, LOW_WATER)
        if self.hop is None:         # else a PROXY header named the client
            peer = transport.get_extra_info("peername")
            if peer:
                self.tcp_peer = peer[0].encode("latin-1")
                self.src_port = peer[1]
            else:
                self.tcp_peer = b"-"
            self.hop = self.tcp_peer
        self.peer = self.hop
        if self.hop != b"-":
            self.fwd_for = (b'for="[%s]"' % self.hop) if b":" in self.hop else (b"for=" + self.hop)
        if self.lst.subject_of is not None:
            subj = self.lst.subject_of(transport)
            if subj:
                self.subject = subj.encode("utf-8")
        self.deadline = _now + self.cfg.t_header
        self.t_idle = _mono()
        _conns.add(self)
        _m[M_CONNECTIONS] += 1
        if (self.cfg.addr is not None or self.lst.max_conns) and _conn_admit(self):
            return
        if self.lst.phases is not None and self.lst.phases.wants & (1 << PHASE_CONNECT):
            _connect_phase(self)

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
        elif self.sender is not None:     # a static file goes on (ext/static.pyx)
            self.sender.resume()

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
        if self.paused & P_HOLD:
            # a connect hook is deciding (reads may come before the pause takes)
            self._stash(owner, base, 0, n)
            return
        while off < n and self.state < C_LINGER:
            if self.state == C_HEAD:
                if self.nreq and self.pending_seen == 0 and self.deadline != 0:
                    self.deadline = _now + self.cfg.t_header   # a new request began
                r = _parser.parse_request(base + off, n - off, self.pending_seen,
                                          self.cfg.max_line, self.cfg.max_head,
                                          self.cfg.max_fields)
                if r == 0:
                    if self.ipc is not None and not self.in_head and _head_begin(self):
                        return
                    self.pending_seen = n - off
                    self._stash(owner, base, off, n)
                    return
                self.pending_seen = 0
                if self.in_head:
                    _head_end(self)
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
        if self.body_buf is not None:
            # kept whole for the request_body hooks
            if <long long>(len(self.body_buf) + k) > self.ctx.chain.body_limit:
                self.body_buf = None
                self._abort_request(413)
                return
            self.body_buf.extend(base[off:off + k])
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
        if self.state >= C_LINGER:
            return               # answered meanwhile (a body over a limit)
        self.req_done = 1
        self.state = C_WAIT
        self.deadline = 0
        if self.body_buf is not None and self.ctx is not None and self.ctx.body_wait:
            _request_body_phase(self)
            return
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
        cdef ProxySettings cfg = self.lst.cfg
        cdef Route route
        cdef int r
        _total_requests += 1
        if self.hop_trusted:
            _real_ip(self, hp)
        if self.cfg is not cfg:         # the last request ran on its route's own settings
            self.cfg = cfg
        if self.stage is not None:      # (never expected: each request's stage ends with it)
            self._stage_end(0)
        self.xform = None
        self.added_fields = None
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
            self.body_left = hp.content_length
        elif hp.body == B_CHUNKED:
            chunk_init(&self.chunk, CHUNK_LINE_MAX, cfg.max_head)
        if self.lst.access is not None and _access_refused(self, self.lst.access):
            return -1
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
        if route.cfg is not None:
            # the route's own max_body and timeouts, up to the end of this request
            self.cfg = cfg = route.cfg
        if hp.body == B_LENGTH and cfg.max_body and hp.content_length > cfg.max_body:
            self._reply_error(413, 0)
            return -1
        if route.phases is not None:
            return _start_phased(self, route, hp, base + off)
        pool = route.pool
        self.hkey = pool.key_of(self, hp) if pool.algo == BAL_HASH else 0
        self.req_idem = hp.body == B_NONE and _is_idempotent(hp.method, hp.method_len)
        if route.phase is not None:
            r = route.phase.request(self, route, hp)
            if r != R_GO:
                return r
        self.pool = pool
        _budget_note_request()
        b = pool.pick(self.hkey, 0)
        if b is None and not pool.busy:
            self._reply_unavailable(1, hp.body == B_NONE)
            return -1
        head = _request_head(self, hp, b if b is not None else <Backend>pool.backends[0])
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

    # -- phases (ext/phases.pyx): only routes and listeners with hooks come here --

    def _hook_done(self, task):
        """An async hook ended: go on with its phase."""
        cdef RequestCtx ctx
        cdef int v, phase
        if self.conn_ctx is not None and self.conn_ctx.task is task:
            ctx = self.conn_ctx
        elif self.ctx is not None and self.ctx.task is task:
            ctx = self.ctx
        else:
            return               # its request or connection has ended
        if self.state >= C_LINGER or self.transport is None:
            return
        phase = ctx.phase
        v = _held_result(ctx, task)
        if v == PH_GO:
            v = _run_phase(ctx, phase, ctx.index + 1, ctx.arg, self._hook_done)
        if v != PH_HELD:
            _phase_went(self, ctx, phase, v)

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
        if self.resp_edits is not None:     # response rules (ext/toolkit.pyx)
            head = _edited_head(head, self.resp_edits, self)
        if self.ctx is not None and not self.ctx.resp_seen \
                and self.ctx.chain.wants & (1 << PHASE_RESPONSE):
            t = _own_answer_phase(self, head, body, status)
            if t is not None:
                head, body, status = t[0], t[1], t[2]
        if self.ctx is not None and self.ctx.chain.wants & (1 << PHASE_RESPONSE_BODY):
            _hooks_whole_body(self, body)
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
        self.resp_head_len = o.n
        if self.cfg.log_fields & LOG_CACHE:
            self.log_cache = _cache_status_of(head)
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
        resp = (b"HTTP/1.1 308 Permanent Redirect\r\n%s%sLocation: %s\r\nContent-Length: 0\r\n%s\r\n"
                % (self.cfg.server_line, _date_line, loc, b"" if keep else b"Connection: close\r\n"))
        self.transport.write(resp)
        self.resp_head_len = len(resp)
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
        if self.ctx is not None and self.ctx.chain.wants & (1 << PHASE_ERROR) \
                and not self.ctx.in_error:
            if _error_phase(self, 503, keep, retry_after):
                return
        keep = keep and self.req_keep_alive and not self.eof and not _draining
        self.resp_status = 503
        if self.answers is None and self.resp_edits is None:
            resp = _error_response(self.cfg, 503, keep, b"Retry-After: %d\r\n" % retry_after)
        else:
            resp = _own_error(self, 503, keep, b"Retry-After: %d\r\n" % retry_after)
        self.transport.write(resp)
        if self.in_req:
            self._own_answer_sent(resp)
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

    cdef void _own_answer_sent(self, bytes resp):
        """Count an answer of the proxy's own (head, then body) for the
        metrics and the access log's bytes."""
        cdef Py_ssize_t hl = resp.find(b"\r\n\r\n") + 4
        if hl < 4:
            hl = len(resp)
        self.resp_head_len = hl
        self.resp_bytes = len(resp) - hl

    cdef void _log_capture(self, const char *line):
        """Keep what the access log's format prints of this request (and
        only that: ProxySettings.log_fields)."""
        cdef HeadParser hp = _parser
        cdef size_t i
        cdef int want = self.cfg.log_fields
        cdef const char *lf
        if want & LOG_LINE:
            lf = <const char *>memchr(line, b'\r', hp.head_len)
            self.log_req = line[:lf - line] if lf != NULL else b""
        else:
            self.log_req = b"-"
        self.log_ref = b"-"
        self.log_ua = b"-"
        self.log_cache = None
        if want & LOG_HOST:
            self.log_host = hp.host[:hp.host_len] if hp.has_host else None
        if want & (LOG_REFERER | LOG_AGENT):
            for i in range(hp.nfields):
                if _ieq(hp.fields[i].name, hp.fields[i].name_len, b"referer", 7):
                    self.log_ref = hp.fields[i].value[:hp.fields[i].value_len]
                elif _ieq(hp.fields[i].name, hp.fields[i].name_len, b"user-agent", 10):
                    self.log_ua = hp.fields[i].value[:hp.fields[i].value_len]

    # -- the end of a request --

    cdef void _response_done(self):
        """The backend's response has been passed on whole."""
        if self.tap & TAP_HOOKS:
            _hooks_body_end(self)
        if self.in_req:
            self._request_end(self.resp_status)
        if self.stage is not None:
            self._stage_end(1)
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
        if self.ctx is not None and self.ctx.chain.wants & (1 << PHASE_LOG):
            _log_phase(self, self.ctx, status, d)
        if self.cfg.access_log is not None:
            self._log_request(status, d)
        if self.ctx is not None:
            _drop_ctx(self)
        self.req_edits = None
        self.up_target = None
        self.req_id = None       # (a later answer's {request_id} must not show this one's)
        self.resp_edits = self.cfg.resp_edits
        self.answers = self.cfg.answers

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
        self.log_host = None
        self.log_cache = None
        self.req_id = None

    cdef void _log_request(self, int status, double duration):
        try:
            self.cfg.access_log.record(
                self.peer, self.log_req, status, self.resp_bytes, self.resp_head_len, duration,
                self.log_ref, self.log_ua,
                self.backend.name if self.backend is not None else "-",
                self.req_id or b"-", self.log_cache, self.log_host, self.route_id, self.lst,
                self.ctx._log if self.ctx is not None and self.ctx._log else None)
        except Exception:
            _log.exception("access log failed")

    cdef void _reply_error(self, int status, bint keep, bytes extra=b""):
        """Answer a request ourselves (no response of the backend has started);
        extra: field lines to add (a 429's Retry-After and RateLimit fields)."""
        cdef Backend b
        if self.transport is None or self.state >= C_LINGER:
            return
        if self.stage is not None:
            if not self.resp_started and 502 <= status <= 504 and self._stage_error(status):
                return
            self._stage_end(0)
        if self.ctx is not None and 502 <= status <= 504 and not self.resp_started \
                and self.ctx.chain.wants & (1 << PHASE_ERROR) and not self.ctx.in_error:
            if _error_phase(self, status, keep, None):
                return
        if self.resp_started:
            self.close()
            return
        keep = keep and self.req_keep_alive and not self.eof and not _draining
        if self.answers is None and self.resp_edits is None:
            resp = _error_response(self.cfg, status, keep, extra)
        else:
            resp = _own_error(self, status, keep, extra)     # error pages, `always` rules
        if self.ctx is not None and not self.ctx.resp_seen \
                and self.ctx.chain.wants & (1 << PHASE_RESPONSE):
            t = _own_answer_phase(self, resp[:resp.index(b"\r\n\r\n") + 2], None, status)
            if t is not None:    # the response hooks changed it: same framing, same Connection
                resp, status = _own_error_bytes(self, resp, t, keep), t[2]
        if self.ctx is not None and self.ctx.chain.wants & (1 << PHASE_RESPONSE_BODY):
            _hooks_whole_body(self, resp[resp.index(b"\r\n\r\n") + 4:])
        self.resp_status = status
        self.transport.write(resp)
        if not self.in_req and (status != 408 or self.pending is not None):
            self._begin_unrouted()
        if self.in_req:
            self._own_answer_sent(resp)
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

    cdef void _stage_end(self, bint whole):
        """The request's response ended whole, or broke off: tell its stage."""
        cdef Stage st = self.stage
        self.stage = None
        self.tap &= ~TAP_STAGE
        st.end(whole)

    cdef void _tap(self, object data):
        """Response body bytes on their way to the client (as framed on the wire)."""
        if self.tap & TAP_STAGE:
            self.stage.body(data)
        if self.tap & TAP_HOOKS:
            _hooks_body(self, data)

    cdef bint _stage_error(self, int status):
        """The backend failed before answering: the stage may answer
        (the cache: stale-if-error)."""
        if self.up is not None:
            self.up.client = None
            self.up.close()
            self.up = None
        self.upq = None
        self.stage.error(self, status)
        return self.state != C_WAIT and self.state != C_BODY

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
                _m[M_CLIENT_SLOW] += 1
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
            _m[M_CLIENT_SLOW + 1] += 1
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
        if self.ipc is not None or self.lst_counted:
            _conn_release(self)
        if self.ctx is not None:
            _drop_ctx(self)
        if self.conn_ctx is not None:
            _cancel_held(self.conn_ctx)
            self.conn_ctx = None
        if self.stage is not None:
            self._stage_end(0)
        if self.sender is not None:       # a static file's body was cut off
            s = self.sender
            self.sender = None
            s.abort()
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


cdef bytes _cache_status_of(bytes head):
    """The Cache-Status line of an answer's head (for the access log), or None."""
    cdef Py_ssize_t i = head.find(b"\r\nCache-Status:")
    cdef Py_ssize_t j
    if i < 0:
        return None
    i += 2
    j = head.find(b"\r\n", i)
    return head[i:j if j >= 0 else len(head)]
