# The PROXY protocol (haproxy's proxy-protocol.txt, versions 1 and 2): the
# header a load balancer in front writes before anything else on a
# connection, naming the client it relays.  Here: the parser (sans I/O, with
# a pure-Python twin in edgeproxy/clientaddr/proxyproto.py), the writers of
# the header sent to backends, and ProxyHeaderConn, the protocol a listener
# with `proxy_protocol = true` starts each connection with: it reads the
# header under a deadline, then hands the connection to a ClientConn (or a
# TLSServerConn: the header precedes the TLS handshake).

import socket

from libc.string cimport memset

cdef extern from "<arpa/inet.h>" nogil:
    int inet_pton(int af, const char *src, void *dst)
    const char *inet_ntop(int af, const void *src, char *dst, unsigned int size)

cdef extern from "<sys/socket.h>" nogil:
    enum:
        AF_INET
        AF_INET6

cdef enum:
    PP_V1_MAX = 107              # the longest v1 line, CRLF included (the spec's bound)
    PP_V2_FIXED = 16
    PP_MAX = PP_V2_FIXED + 4096  # the largest v2 header taken (addresses and TLVs); refused beyond
    PP_LOCAL = 0                 # command: the proxy's own connection (health checks)
    PP_PROXY = 1
    # families: what the header says about the client
    PPF_UNSPEC = 0               # unknown (v1 UNKNOWN, v2 UNSPEC): keep the TCP peer
    PPF_INET = 4
    PPF_INET6 = 6
    PPF_UNIX = 1                 # a unix socket path: no IP, keep the TCP peer

cdef const unsigned char *_PP2_SIG = b"\r\n\r\n\x00\r\nQUIT\n"


class ProxyProtocolError(ValueError):
    """A malformed, unsupported or oversize PROXY protocol header."""


@cython.final
cdef class ProxyHeaderParser:
    """One PROXY header, parsed from the start of a connection's bytes:
    parse() says how many bytes it took (> 0), that more are needed (0), or
    that it is bad (-1, `err` says why).  After a success: version (1, 2),
    command (PP_LOCAL, PP_PROXY), family (PPF_*) and, for PPF_INET and
    PPF_INET6, the source and destination in network order and their ports."""
    cdef:
        public int version, command, family
        unsigned char src[16]
        unsigned char dst[16]
        public int sport, dport
        const char *err

    cdef inline Py_ssize_t _fail(self, const char *why) noexcept:
        self.err = why
        return -1

    cdef Py_ssize_t parse(self, const unsigned char *p, size_t n) noexcept:
        cdef size_t i, k
        self.err = NULL
        self.family = PPF_UNSPEC
        self.command = PP_PROXY
        self.sport = self.dport = 0
        if n == 0:
            return 0
        if p[0] == b'P':
            # "PROXY " must come first, as far as it has come
            k = n if n < 6 else 6
            if memcmp(p, b"PROXY ", k) != 0:
                return self._fail("not a PROXY protocol header")
            return self._v1(p, n)
        if p[0] == b'\r':
            k = n if n < 12 else 12
            if memcmp(p, _PP2_SIG, k) != 0:
                return self._fail("not a PROXY protocol header")
            if n < PP_V2_FIXED:
                return 0
            return self._v2(p, n)
        return self._fail("not a PROXY protocol header")

    cdef Py_ssize_t _v1(self, const unsigned char *p, size_t n) noexcept:
        # "PROXY TCP4 1.2.3.4 5.6.7.8 1111 2222\r\n", "PROXY UNKNOWN...\r\n"
        cdef size_t end = 0, i, a, b
        cdef int fam, af
        cdef int f
        cdef long port
        cdef const unsigned char *q
        self.version = 1
        while end < n and end < PP_V1_MAX:
            if p[end] == b'\n':
                break
            end += 1
        if end >= n:
            if n >= PP_V1_MAX:
                return self._fail("v1 header longer than 107 bytes")
            return 0
        if p[end] != b'\n':
            return self._fail("v1 header longer than 107 bytes")
        if end < 1 or p[end - 1] != b'\r':
            return self._fail("v1 header not ended by CRLF")
        # p[6:end - 1]: the protocol and the addresses
        q = p + 6
        k = end - 1 - 6
        if k >= 7 and memcmp(q, b"UNKNOWN", 7) == 0 and (k == 7 or q[7] == b' '):
            # the rest of the line is ignored (the spec)
            for i in range(k):
                if q[i] < 32 or q[i] > 126:
                    return self._fail("v1 header: control byte")
            self.family = PPF_UNSPEC
            return <Py_ssize_t>(end + 1)
        if k < 5 or memcmp(q, b"TCP", 3) != 0 or q[4] != b' ' or (q[3] != b'4' and q[3] != b'6'):
            return self._fail("v1 header: protocol is not TCP4, TCP6 or UNKNOWN")
        fam = PPF_INET if q[3] == b'4' else PPF_INET6
        af = AF_INET if fam == PPF_INET else AF_INET6
        i = 5
        # four fields, each ended by one space (the last by the CR)
        for f in range(4):
            a = i
            while i < k and q[i] != b' ':
                i += 1
            if i == a or (f < 3 and i >= k) or (f == 3 and i != k):
                return self._fail("v1 header: expected source, destination and two ports")
            if f < 2:
                if not _pton(af, <const char *>q + a, i - a, &self.src[0] if f == 0 else &self.dst[0]):
                    return self._fail("v1 header: bad address")
            else:
                port = _port(q + a, i - a)
                if port < 0:
                    return self._fail("v1 header: bad port")
                if f == 2:
                    self.sport = <int>port
                else:
                    self.dport = <int>port
            i += 1
        self.family = fam
        return <Py_ssize_t>(end + 1)

    cdef Py_ssize_t _v2(self, const unsigned char *p, size_t n) noexcept:
        cdef size_t length = (<size_t>p[14] << 8) | p[15]
        cdef size_t total = PP_V2_FIXED + length
        cdef size_t need, i, tl
        cdef int ver = p[12] >> 4, cmd = p[12] & 15
        cdef int fam = p[13] >> 4, proto = p[13] & 15
        self.version = 2
        if ver != 2:
            return self._fail("v2 header: version is not 2")
        if cmd > 1:
            return self._fail("v2 header: unknown command")
        if total > PP_MAX:
            return self._fail("v2 header larger than 4112 bytes")
        if fam > 3 or proto > 2:
            return self._fail("v2 header: unknown address family or transport")
        if n < total:
            return 0
        self.command = cmd
        need = 12 if fam == 1 else 36 if fam == 2 else 216 if fam == 3 else 0
        if length < need:
            return self._fail("v2 header: address block shorter than its family needs")
        # the TLVs after the addresses: each must fit (they are skipped)
        i = PP_V2_FIXED + need
        while i < total:
            if total - i < 3:
                return self._fail("v2 header: truncated TLV")
            tl = (<size_t>p[i + 1] << 8) | p[i + 2]
            if tl > total - i - 3:
                return self._fail("v2 header: TLV longer than the header")
            i += 3 + tl
        if cmd == PP_LOCAL:
            self.family = PPF_UNSPEC     # the proxy's own connection: the real endpoints stand
            return <Py_ssize_t>total
        if fam == 0:
            self.family = PPF_UNSPEC
            return <Py_ssize_t>total
        if proto != 1:
            return self._fail("v2 header: not a stream (TCP) connection")
        if fam == 1:
            memcpy(self.src, p + 16, 4)
            memcpy(self.dst, p + 20, 4)
            self.sport = (p[24] << 8) | p[25]
            self.dport = (p[26] << 8) | p[27]
            self.family = PPF_INET
        elif fam == 2:
            memcpy(self.src, p + 16, 16)
            memcpy(self.dst, p + 32, 16)
            self.sport = (p[48] << 8) | p[49]
            self.dport = (p[50] << 8) | p[51]
            self.family = PPF_INET6
        else:
            self.family = PPF_UNIX
        return <Py_ssize_t>total

    cdef bytes src_text(self):
        return _ntop(self.family, self.src)

    cdef bytes dst_text(self):
        return _ntop(self.family, self.dst)


cdef inline long _port(const unsigned char *p, size_t n) noexcept:
    # 0..65535 in decimal, no sign, no leading zero
    cdef long v = 0
    cdef size_t i
    if n == 0 or n > 5 or (n > 1 and p[0] == b'0'):
        return -1
    for i in range(n):
        if p[i] < b'0' or p[i] > b'9':
            return -1
        v = v * 10 + (p[i] - 48)
    return v if v <= 65535 else -1


cdef bint _pton(int af, const char *p, size_t n, unsigned char *out) noexcept:
    """An IPv4 (dotted quad) or IPv6 address in text into out (4 or 16 bytes)."""
    cdef char tmp[48]
    if n == 0 or n > 45:
        return 0
    memcpy(tmp, p, n)
    tmp[n] = 0
    return inet_pton(af, tmp, out) == 1


cdef bytes _ntop(int family, const unsigned char *a):
    cdef char tmp[48]
    if family == PPF_INET:
        inet_ntop(AF_INET, a, tmp, 48)
    elif family == PPF_INET6:
        inet_ntop(AF_INET6, a, tmp, 48)
    else:
        return None
    return <bytes>tmp


cdef ProxyHeaderParser _pp = ProxyHeaderParser()


def parse_proxy_header(data):
    """Parse a PROXY header at the start of data (bytes-like): None when
    more bytes are needed, else (length, version, command, family, source,
    source port, destination, destination port), with command "LOCAL" or
    "PROXY", family "UNSPEC", "INET", "INET6" or "UNIX", and the addresses
    as str (None unless INET or INET6); ProxyProtocolError when it is bad.
    The pure twin is edgeproxy.clientaddr.proxyproto.parse."""
    cdef const unsigned char[:] v = memoryview(data).cast("B") if len(data) else b"\0"
    cdef Py_ssize_t r = _pp.parse(&v[0], len(data))
    if r == 0:
        return None
    if r < 0:
        raise ProxyProtocolError(_pp.err.decode())
    fam = {PPF_UNSPEC: "UNSPEC", PPF_INET: "INET", PPF_INET6: "INET6", PPF_UNIX: "UNIX"}[_pp.family]
    ip = fam in ("INET", "INET6")
    return (r, _pp.version, "PROXY" if _pp.command == PP_PROXY else "LOCAL", fam,
            _pp.src_text().decode() if ip else None, _pp.sport if ip else 0,
            _pp.dst_text().decode() if ip else None, _pp.dport if ip else 0)


# ---- the header sent to backends ---------------------------------------------

def proxy_header(int version, str src, int sport, str dst, int dport):
    """The PROXY header (version 1 or 2) for a connection from src:sport to
    dst:dport.  When the two families differ, the IPv4 one is written as an
    IPv4-mapped IPv6 address; an address that is not an IP (None, "-") gives
    v1's UNKNOWN and v2's UNSPEC family (the receiver keeps its TCP peer)."""
    cdef unsigned char a[16]
    cdef unsigned char b[16]
    cdef bint s6, d6
    cdef bytes sb, db
    s_ok, s6 = _addr_of(src, a)
    d_ok, d6 = _addr_of(dst, b)
    if not (s_ok and d_ok) or not (0 <= sport <= 65535 and 0 <= dport <= 65535):
        if version == 1:
            return b"PROXY UNKNOWN\r\n"
        return PyBytes_FromStringAndSize(<const char *>_PP2_SIG, 12) + b"\x21\x00\x00\x00"
    if s6 != d6:
        if not s6:
            _map6(a)
        else:
            _map6(b)
        s6 = d6 = 1
    if version == 1:
        sb = _ntop(PPF_INET6 if s6 else PPF_INET, a)
        db = _ntop(PPF_INET6 if s6 else PPF_INET, b)
        return b"PROXY %s %s %s %d %d\r\n" % (b"TCP6" if s6 else b"TCP4", sb, db, sport, dport)
    n = 16 if s6 else 4
    return (PyBytes_FromStringAndSize(<const char *>_PP2_SIG, 12)
            + (b"\x21\x21\x00\x24" if s6 else b"\x21\x11\x00\x0c")
            + PyBytes_FromStringAndSize(<const char *>a, n)
            + PyBytes_FromStringAndSize(<const char *>b, n)
            + bytes(((sport >> 8) & 255, sport & 255, (dport >> 8) & 255, dport & 255)))


cdef tuple _addr_of(str text, unsigned char *out):
    """(is an IP, is IPv6), the address into out."""
    cdef bytes t
    if not text:
        return (False, False)
    t = text.encode("latin-1")
    if _pton(AF_INET, t, len(t), out):
        return (True, False)
    if _pton(AF_INET6, t, len(t), out):
        return (True, True)
    return (False, False)


cdef void _map6(unsigned char *a) noexcept:
    # a (4 bytes of IPv4) into ::ffff:a.b.c.d
    memcpy(a + 12, a, 4)
    memset(a, 0, 10)
    a[10] = 0xff
    a[11] = 0xff


cdef bytes _proxy_header_for(Backend b, ClientConn c):
    """The header that tells backend b about c's client: this request's
    client address (with its port when it is the connection's own), and the
    address the client reached (the PROXY header's, else this socket's)."""
    cdef int sport = c.src_port if c.peer == c.hop else 0
    try:
        if c.pp_dst is not None:
            dst, dport = (<tuple>c.pp_dst)[0].decode("latin-1"), (<tuple>c.pp_dst)[1]
        else:
            sn = c.transport.get_extra_info("sockname") if c.transport is not None else None
            dst, dport = (sn[0], sn[1]) if sn else (None, 0)
        return proxy_header(b.proxy_protocol, c.peer.decode("latin-1"), sport, dst, dport)
    except Exception:
        _log.exception("backend %s: cannot build the PROXY header", b.name)
        return proxy_header(b.proxy_protocol, None, 0, None, 0)


async def _connect_after_proxy_header(loop, Backend b, bytes pp):
    """A TLS backend: the PROXY header goes on the TCP connection before
    the handshake, so connect, write it, then start TLS over the socket."""
    infos = await loop.getaddrinfo(b.host, b.port, type=socket.SOCK_STREAM)
    family, kind, proto, _, addr = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setblocking(False)
        await loop.sock_connect(sock, addr)
        await loop.sock_sendall(sock, pp)
        return await loop.create_connection(b._new_conn, sock=sock, ssl=b.ssl,
                                            server_hostname=b.server_hostname or b.host)
    except BaseException:
        sock.close()
        raise


# ---- reading the header before the connection's own protocol -----------------

cdef set _pp_waiting = set()       # ProxyHeaderConn whose header has not come whole


def _pp_expire():
    """Close connections whose PROXY header did not come in time (the ticker)."""
    cdef ProxyHeaderConn h
    for h in list(_pp_waiting):
        if _now >= h.deadline:
            h._refuse("no complete PROXY header within timeout.header")


@cython.final
@cython.no_gc_clear
cdef class ProxyHeaderConn:
    """The first protocol of a connection on a listener with
    `proxy_protocol = true`: it takes the PROXY header (only from a source in
    the listener's proxy_protocol_from), then gives the transport to the
    listener's real protocol, with the client the header names.  Anything
    else (another source, a malformed or missing header, none within
    timeout.header) closes the connection."""
    cdef:
        Listener lst
        object transport
        bytearray buf
        double deadline
        bytes tcp_peer
        int tcp_port

    def __init__(self, Listener lst):
        self.lst = lst

    def connection_made(self, transport):
        cdef unsigned char a[16]
        cdef int fam
        self.transport = transport
        peer = transport.get_extra_info("peername")
        self.tcp_peer = peer[0].encode("latin-1") if peer else b"-"
        self.tcp_port = peer[1] if peer else 0
        if self.lst.pp_from is not None and not self.lst.pp_from.has_text(self.tcp_peer):
            self._refuse("PROXY header from a source not in proxy_protocol_from")
            return
        self.deadline = _now + self.lst.cfg.t_header
        _pp_waiting.add(self)

    def get_buffer(self, Py_ssize_t hint):
        return _rbuf

    def buffer_updated(self, Py_ssize_t n):
        self._got(<const unsigned char *>_rbuf_ptr, <size_t>n)

    def data_received(self, bytes data):
        self._got(<const unsigned char *>PyBytes_AS_STRING(data), len(data))

    def eof_received(self):
        self._refuse("closed before its PROXY header ended")
        return False

    def connection_lost(self, exc):
        _pp_waiting.discard(self)
        self.transport = None

    def pause_writing(self):
        pass

    def resume_writing(self):
        pass

    cdef void _refuse(self, str why):
        _pp_waiting.discard(self)
        _m[M_CLIENT_REFUSED + REFUSED_PROXY] += 1
        if _log.isEnabledFor(10):
            _log.debug("client %s: %s", self.tcp_peer.decode("latin-1"), why)
        if self.transport is not None:
            self.transport.abort()
            self.transport = None

    cdef void _got(self, const unsigned char *p, size_t n):
        cdef Py_ssize_t r
        cdef bytearray buf = self.buf
        if self.transport is None:
            return
        if buf is not None:
            buf.extend(p[:n])
            p = <const unsigned char *>PyByteArray_AS_STRING(buf)
            n = len(buf)
        r = _pp.parse(p, n)
        if r < 0:
            self._refuse("bad PROXY header: " + _pp.err.decode())
            return
        if r == 0:
            if buf is None:
                self.buf = bytearray(p[:n])
            return
        self._hand_over(p + r, n - <size_t>r)

    cdef void _hand_over(self, const unsigned char *rest, size_t n):
        """The header is whole (in _pp): start the listener's own protocol."""
        cdef ClientConn c
        cdef TLSServerConn t
        cdef bytes left = PyBytes_FromStringAndSize(<const char *>rest, n) if n else None
        cdef bytes real
        cdef int port
        transport = self.transport
        _pp_waiting.discard(self)
        self.buf = None
        self.transport = None
        if _pp.family == PPF_INET or _pp.family == PPF_INET6:
            real = _pp.src_text()
            port = _pp.sport
            dst = (_pp.dst_text(), _pp.dport)
        else:                        # LOCAL, UNSPEC, UNKNOWN, unix: the TCP peer stands
            real = self.tcp_peer
            port = self.tcp_port
            dst = None
        if self.lst.proto == b"https":
            t = TLSServerConn(self.lst)
            t.pp_addr = (self.tcp_peer, real, port, dst)
            transport.set_protocol(t)
            t.connection_made(transport)
            if left is not None:
                t.data_received(left)
        else:
            c = ClientConn(self.lst)
            _client_addr_given(c, self.tcp_peer, real, port, dst)
            transport.set_protocol(c)
            c.connection_made(transport)
            if left is not None and c.state < C_LINGER:
                c.data_received(left)
