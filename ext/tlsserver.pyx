# TLS for client connections, driven here rather than by the event loop.
#
# uvloop's SSL protocol costs ~70 us of Python-level work per handshake on
# top of OpenSSL's (a timer, futures, Python wrappers around every SSLObject
# call, extra-info lookups; perf, docs/bench.md).  TLSServerConn is the
# protocol of the plain TCP connection: it feeds what it reads to OpenSSL
# through Python's own ssl objects (two MemoryBIOs and the C-level object
# behind ssl.SSLObject), decrypts straight into the worker's receive buffer
# and hands that to a ClientConn, to which it is also the transport.  The
# SSLContext is the listener's own (edgeproxy.tls.ServerTLS), so SNI,
# certificates, client verification, tickets and reloads are unchanged.

cdef set _tls_handshaking = set()     # TLSServerConn before their handshake ends
cdef object _SSLWantRead = ssl.SSLWantReadError
cdef object _SSLZeroReturn = ssl.SSLZeroReturnError
cdef object _MemoryBIO = ssl.MemoryBIO
cdef bytearray _tls_rbuf = bytearray(RBUF_SIZE)   # ciphertext, copied into the BIO at once
cdef object _tls_rview = memoryview(_tls_rbuf)
cdef enum:
    # plaintext encrypted at a time: one record.  OpenSSL's memory BIO keeps
    # the largest size it ever held for as long as the connection lives, so
    # encrypting a whole 256 KiB read at once left every connection that had
    # a large response holding 256 KiB more, idle or slow (200: +54 MiB)
    TLS_SLICE = 16384

cdef bytes _PLAIN_HTTP_BODY = b"400 The plain HTTP request was sent to HTTPS port\n"


def _tls_expire():
    """Abort handshakes that have passed their deadline (the ticker), and
    the lingering closes after a plain-HTTP answer (counted already)."""
    cdef TLSServerConn t
    for t in list(_tls_handshaking):
        if _now >= t.deadline:
            if not t.closing:
                _m[M_TLS_HANDSHAKE_FAILURES] += 1
                t._debug("TLS handshake", "timed out")
            t.abort()


cdef bint _http_request_line(const char *p, Py_ssize_t n) noexcept:
    """Whether p[:n] starts like an HTTP request line: an upper-case method,
    one space, and the start of a target (origin, asterisk, absolute or
    authority form)."""
    cdef Py_ssize_t i = 0
    while i < n and i < 20 and b'A' <= p[i] <= b'Z':
        i += 1
    if i == 0 or i + 1 >= n or p[i] != b' ':
        return 0
    i += 1
    return p[i] == b'/' or p[i] == b'*' or (b'a' <= p[i] <= b'z') or (b'A' <= p[i] <= b'Z') \
        or (b'0' <= p[i] <= b'9') or p[i] == b'['


@cython.final
@cython.no_gc_clear
cdef class TLSServerConn:
    """One TLS client connection: the protocol of its TCP transport and the
    transport of its ClientConn (write, close, flow control, extra info)."""
    cdef:
        Listener lst
        object raw            # the TCP transport
        ClientConn app        # set when the handshake has ended
        object sock           # the C-level SSL object behind ssl.SSLObject
        object sslobj         # an ssl.SSLObject over it, made on request (get_extra_info)
        object inc, out       # MemoryBIOs: ciphertext read, ciphertext to send
        double deadline       # of the handshake
        bint app_paused       # the ClientConn paused reading
        bint fed              # OpenSSL has been given input before the current read
        bint resume_queued    # _resumed is scheduled
        bint closing
        public object pp_addr # what a PROXY header said (ProxyHeaderConn), or None
        IpCount ipc           # its address's counts while the handshake runs (clientaddr.pyx)

    def __init__(self, Listener lst):
        self.lst = lst

    cdef void _debug(self, str what, object exc):
        # failure paths only, but a scanner can make them frequent: format nothing
        # unless debug logging is on
        if not _log.isEnabledFor(10):
            return
        try:
            peer = self.raw.get_extra_info("peername")
            peer = str(peer[0]) if peer else "-"
        except Exception:
            peer = "-"
        _log.debug("client %s: %s: %s", peer, what, exc)

    # -- the TCP side (protocol) --

    def connection_made(self, transport):
        ctx = self.lst.tls_context
        self.raw = transport
        self.inc = _MemoryBIO()
        self.out = _MemoryBIO()
        try:
            # what SSLContext.wrap_bio makes ssl.SSLObject around, without that
            # Python layer (CPython's _ssl; get_extra_info wraps it on request)
            self.sock = ctx._wrap_bio(self.inc, self.out, True, None)
        except Exception:
            _log.exception("TLS: cannot start a connection")
            self.closing = 1
            transport.abort()
            return
        self.deadline = _now + self.lst.cfg.t_header
        _tls_handshaking.add(self)
        if self.lst.cfg.addr is not None and self.lst.cfg.addr.max_heads_per_ip:
            if self.pp_addr is not None:
                _tls_head_begin(self, self.pp_addr[1])
            else:
                peer = transport.get_extra_info("peername")
                _tls_head_begin(self, peer[0].encode("latin-1") if peer else b"-")

    def get_buffer(self, Py_ssize_t hint):
        return _tls_rbuf

    def buffer_updated(self, Py_ssize_t n):
        if self.closing:
            return
        self.inc.write(_tls_rview[:n])
        self._advance(_tls_rbuf, n)

    def data_received(self, bytes data):
        """The standard asyncio loop's path (no get_buffer there)."""
        if self.closing:
            return
        self.inc.write(data)
        self._advance(data, len(data))

    def eof_received(self):
        # TCP end without close_notify: the ClientConn decides, as on plain TCP
        # (records already read stay readable; the BIO is not marked ended, so
        # a later read waits instead of failing)
        if self.app is not None and not self.closing:
            return self.app.eof_received()
        return False

    def connection_lost(self, exc):
        self.closing = 1
        _tls_handshaking.discard(self)
        if self.ipc is not None:
            _tls_head_end(self)
        app = self.app
        # break the ClientConn <-> TLSServerConn cycle (neither class clears
        # itself in the cycle collector) and free the SSL object now
        self.app = None
        self.sslobj = None
        self.sock = None
        if app is not None:
            app.connection_lost(exc)

    def pause_writing(self):
        if self.app is not None:
            self.app.pause_writing()

    def resume_writing(self):
        if self.app is not None:
            self.app.resume_writing()

    cdef void _advance(self, object read, Py_ssize_t n):
        # read[:n]: the bytes just given to OpenSSL
        if self.app is None:
            self._handshake(read, n)
        else:
            self._decrypt()

    cdef void _handshake(self, object read, Py_ssize_t n):
        cdef const char *p
        try:
            self.sock.do_handshake()
        except _SSLWantRead:
            self.fed = 1
            self._flush()
            return
        except Exception as exc:
            _m[M_TLS_HANDSHAKE_FAILURES] += 1
            self._debug("TLS handshake failed", exc)
            p = PyByteArray_AS_STRING(read) if type(read) is bytearray else PyBytes_AS_STRING(read)
            if not self.fed and _http_request_line(p, n):
                self._refuse_plain_http()
                return
            # a bad or foreign ClientHello, a failed client certificate, ...:
            # send the alert OpenSSL queued and drop the connection
            self._flush()
            _tls_handshaking.discard(self)
            self.closing = 1
            self.raw.close()
            return
        _tls_handshaking.discard(self)
        if self.ipc is not None:
            _tls_head_end(self)
        self._flush()                  # the server's last flight and session tickets
        self.app = ClientConn(self.lst)
        if self.pp_addr is not None:
            _client_addr_given(self.app, self.pp_addr[0], self.pp_addr[1], self.pp_addr[2],
                               self.pp_addr[3])
        self.app.connection_made(self)
        self._decrypt()                # a request sent along with the Finished

    cdef void _refuse_plain_http(self):
        """The connection began with an HTTP request, not a ClientHello:
        answer 400 in plain text, as nginx does, then close lingering (see
        ClientConn._linger: the rest of the request is read and dropped, at
        most LINGER_SECONDS, so that the close does not reset the answer
        away).  OpenSSL's output, if any, is not for an HTTP client."""
        cdef ProxySettings cfg = self.lst.cfg
        self.closing = 1
        self.raw.write(b"HTTP/1.1 400 Bad Request\r\n%s%sContent-Type: text/plain; charset=utf-8\r\n"
                       b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (
                           cfg.server_line, _date_line, len(_PLAIN_HTTP_BODY), _PLAIN_HTTP_BODY))
        if self.raw.can_write_eof():
            self.raw.write_eof()
            self.deadline = _now + LINGER_SECONDS    # _tls_expire aborts it then
        else:
            _tls_handshaking.discard(self)
            self.raw.close()

    cdef void _decrypt(self):
        cdef object n
        while not self.app_paused and not self.closing:
            try:
                n = self.sock.read(RBUF_SIZE, _rbuf)
            except _SSLWantRead:
                break
            except _SSLZeroReturn:
                n = 0
            except Exception as exc:
                self._debug("TLS error", exc)
                self.abort()
                return
            if not n:
                # close_notify (CPython reads it as 0 bytes): the client sends
                # no more; the ClientConn decides, as for a TCP half-close
                self._flush()
                if not self.app.eof_received():
                    self.close()
                return
            self.app._take(n)
            if self.inc.pending == 0 and self.sock.pending() == 0:
                # all input decrypted and handed over: skip the read that would
                # only raise SSLWantReadError (an exception per request).
                # OpenSSL reads a memory BIO record by record (no read-ahead),
                # so a record not yet processed is still in inc.pending
                break
        self._flush()                  # anything OpenSSL answered (key updates, alerts)

    cdef void _flush(self):
        if self.out.pending:
            self.raw.write(self.out.read())

    # -- the ClientConn side (transport) --

    cdef bint _encrypt(self, object data):
        """Encrypt data into `out`; False (and the connection aborted) when
        the TLS session has failed."""
        try:
            self.sock.write(data)
            return 1
        except Exception as exc:
            self._debug("TLS write failed", exc)
            self.abort()
            return 0

    cdef void _send(self, object data, list records):
        """Encrypt data a slice at a time, collecting the ciphertext in
        records (sent in one write by the caller)."""
        cdef Py_ssize_t n = len(data), i = 0
        cdef object view
        if n <= TLS_SLICE:
            if self._encrypt(data):
                records.append(self.out.read())
            return
        view = memoryview(data)
        while i < n and not self.closing:
            if not self._encrypt(view[i:i + TLS_SLICE]):
                return
            records.append(self.out.read())
            i += TLS_SLICE

    def write(self, data):
        cdef list records
        if self.closing or not data:
            return
        if len(data) <= TLS_SLICE:
            if self._encrypt(data):
                self.raw.write(self.out.read())
            return
        records = []
        self._send(data, records)
        if records and not self.closing:
            self.raw.writelines(records)

    def writelines(self, list_of_data):
        cdef list records = []
        if self.closing:
            return
        for data in list_of_data:
            if data:
                self._send(data, records)
            if self.closing:
                return
        if records:
            self.raw.writelines(records)

    def can_write_eof(self):
        return False                   # no half-close under TLS: ClientConn closes instead

    def is_closing(self):
        return self.closing or self.raw.is_closing()

    def close(self):
        """close_notify, then close the TCP connection once its buffer is sent."""
        if self.closing:
            return
        self.closing = 1
        if self.app is not None:
            try:
                self.sock.shutdown()
            except Exception:
                pass                   # not waiting for the client's close_notify
            self._flush()
        self.raw.close()

    def abort(self):
        self.closing = 1
        _tls_handshaking.discard(self)
        self.raw.abort()

    def pause_reading(self):
        if not self.app_paused:
            self.app_paused = 1
            self.raw.pause_reading()

    def resume_reading(self):
        if self.app_paused:
            self.app_paused = 0
            self.raw.resume_reading()
            if self.app is not None and not self.closing and not self.resume_queued:
                # records that arrived before the pause are decrypted from the
                # loop, never from inside the ClientConn call that resumed us
                # (its _feed is not re-entrant; a TCP transport defers too)
                self.resume_queued = 1
                asyncio.get_running_loop().call_soon(self._resumed)

    def _resumed(self):
        self.resume_queued = 0
        if self.app is not None and not self.closing:
            self._decrypt()

    def get_write_buffer_size(self):
        return self.raw.get_write_buffer_size()

    def set_write_buffer_limits(self, high=None, low=None):
        self.raw.set_write_buffer_limits(high, low)

    def get_extra_info(self, name, default=None):
        if self.sock is None:          # after connection_lost
            return self.raw.get_extra_info(name, default) if self.raw is not None else default
        if name == "ssl_object":       # what edgeproxy.tls.client_subject reads
            if self.sslobj is None:
                self.sslobj = ssl.SSLObject.__new__(ssl.SSLObject)
                self.sslobj._sslobj = self.sock
            return self.sslobj
        return self.raw.get_extra_info(name, default)
