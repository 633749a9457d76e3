# The backend side: UpstreamConn carries one request at a time to a backend,
# parses its response head, streams the body to the client and goes back to
# its backend's keep-alive pool.

def _absent(self):
    raise AttributeError("connections over uvloop's TLS take their reads as bytes (data_received)")


# uvloop's TLS layer uses a protocol's get_buffer when it has one, and that
# path leaks memory (~700 bytes per connection on uvloop 0.23; a bare uvloop
# TLS server with a BufferedProtocol shows it too).  Connections to https
# backends, the one place that layer still runs (clients' TLS is
# TLSServerConn), hide both methods (hasattr is False) and take their reads
# as bytes (data_received); decrypted reads are copies anyway.
_NO_BUFFER = property(_absent)


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
                        c.transport.write(_response_head(self, c, _parser, 0))
                    continue
                if _parser.status == 101:
                    if not c.req_upgrade:
                        _log.warning("backend %s: 101 to a request without Upgrade", self.backend.name)
                        c._reply_error(502, 0)
                        return
                    c.resp_keep = 0
                    c.resp_status = 101
                    c.resp_started = 1
                    head = _response_head(self, c, _parser, 0)
                    c.resp_head_len = len(head)
                    c.transport.write(head)
                    self.state = U_TUNNEL
                    c.state = C_TUNNEL
                    c.deadline = 0
                    # a tunnel whose backend stays silent for timeout.read is
                    # closed, from the 101 on (nginx's proxy_read_timeout)
                    self.deadline = _now + c.cfg.t_read
                    c._resume(P_PIPELINE)
                    if c.pending is not None:   # bytes the client sent after its request
                        q = c.pending
                        c.pending = None
                        self.transport.write(bytes(q))
                    continue
                self._start_body(c, base + off, n - off)
                if self.client is not c:
                    return
                if self.state == U_BODY and self.body_kind == B_LENGTH and self.body_left <= INLINE_BODY \
                        and c.xform is None:
                    # small response: head and body in one write
                    k = n - off
                    if k > self.body_left:
                        k = self.body_left
                    if c.tap:
                        c._tap(base[off:off + <size_t>k])
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
                if c.xform is not None:
                    # a body filter (compression) writes what the client gets
                    if self._filter_body(c, base, &off, n) < 0:
                        return
                elif self.body_kind == B_LENGTH:
                    k = n - off
                    if k > self.body_left:
                        k = self.body_left
                    if c.tap:
                        c._tap(base[off:off + <size_t>k])
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
                    if c.tap:
                        c._tap(base[off:off + <size_t>m])
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
                        if c.tap:
                            c._tap(base[off + so:off + so + sl])
                        c.transport.write(_view(owner, off + so, off + so + sl))
                        _written_from_rbuf(c.transport, owner)
                        c.resp_bytes += sl
                    off += <size_t>m
                    if self.chunk.phase == CS_DONE:
                        self._finish(c)
                else:   # B_CLOSE: everything until the backend closes
                    if c.tap:
                        c._tap(base[off:n])
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
        if c.stage is not None:
            extra = c.stage.response(c, hp, self, _arrived_whole(hp, body, avail, c.cfg))
            if self.client is not c:
                # answered by the stage instead (the cache: revalidated, stale-if-error)
                if hp.keep_alive and c.req_done and (hp.body == B_NONE or (
                        hp.body == B_LENGTH and hp.content_length == 0)):
                    self.backend.put_idle(self)
                else:
                    self.close()
                return
        if c.ctx is not None and c.ctx.chain.wants & (1 << PHASE_RESPONSE):
            if _response_phase(c, hp, self):
                return
        self.keep_alive = hp.keep_alive
        self.body_kind = hp.body
        # chunks are decoded for an HTTP/1.0 client, and for a body filter
        self.decode = hp.body == B_CHUNKED and (c.req_minor == 0 or c.xform is not None)
        c.resp_status = hp.status
        c.resp_started = 1
        # an HTTP/1.0 client's body ends with the connection unless its length is known
        c.resp_keep = (c.req_keep_alive and c.req_done and not c.eof
                       and hp.body != B_CLOSE and not _draining
                       and not (c.req_minor == 0 and (self.decode or c.xform is not None)))
        if hp.body == B_LENGTH:
            self.body_left = hp.content_length
            self.state = U_BODY if hp.content_length > 0 else U_HEAD
        elif hp.body == B_CHUNKED:
            chunk_init(&self.chunk, CHUNK_LINE_MAX, c.cfg.resp_max_head)
            self.state = U_BODY
        elif hp.body == B_CLOSE:
            self.state = U_BODY
        if c.ctx is not None and c.ctx.chain.wants & (1 << PHASE_RESPONSE_BODY):
            _hooks_body_start(c, (hp.body == B_CHUNKED and not self.decode)
                              or (c.xform is not None and c.req_minor != 0))
        if self.state == U_BODY and not self.paused:
            self.deadline = _now + c.cfg.t_read    # from now on, between two reads
        _response_head_into(self, c, hp, 1)
        if extra:                # the stage's fields (the cache's Cache-Status)
            _out.n -= 2
            _out.addb(extra)
            _out.add(b"\r\n", 2)
            if c.cfg.log_fields & LOG_CACHE:
                c.log_cache = extra
        if c.xform is not None:  # its framing and fields (Content-Encoding...)
            c.xform.head(c)
        c.resp_head_len = _out.n

    cdef int _filter_body(self, ClientConn c, const char *base, size_t *offp,
                          size_t n) except -2:
        """Body bytes base[offp[0]:n] to c.xform, framing removed; -1 when
        the connection was closed."""
        cdef size_t off = offp[0]
        cdef long long k
        cdef Py_ssize_t m
        cdef size_t so, sl
        cdef BodyFilter f = c.xform
        if self.body_kind == B_LENGTH:
            k = n - off
            if k > self.body_left:
                k = self.body_left
            f.data(c, base + off, <size_t>k)
            offp[0] = off + <size_t>k
            self.body_left -= k
            if self.body_left == 0:
                self._finish(c)
        elif self.body_kind == B_CHUNKED:
            m = chunk_step(&self.chunk, base + off, n - off, &so, &sl)
            if m < 0:
                _log.warning("backend %s: bad chunked body: %s", self.backend.name,
                             (<bytes>self.chunk.err).decode())
                c.close()
                self.close()
                return -1
            if sl:
                f.data(c, base + off + so, sl)
            offp[0] = off + <size_t>m
            if self.chunk.phase == CS_DONE:
                self._finish(c)
        else:   # B_CLOSE: everything until the backend closes
            f.data(c, base + off, n - off)
            offp[0] = n
        return 0

    cdef void _finish(self, ClientConn c):
        """The response is complete: pool or close this connection, then let
        the client go on."""
        cdef BodyFilter f = c.xform
        if f is not None:        # the filter's last bytes
            c.xform = None
            f.end(c)
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
