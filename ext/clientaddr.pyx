# The client's address and what is counted per address: the trusted
# proxies (CIDR sets), the real client address taken from X-Forwarded-For or
# Forwarded when the connection comes from one of them, and the per-address
# and per-listener connection counts (limit_conn), with the cap on unfinished
# request heads per address (slowloris).  Only configs that use one of them
# get a ClientAddr (ProxySettings.addr) or a listener limit; the others pay a
# pointer test per connection.

from libc.stdint cimport uint32_t


cdef enum:
    # the refused-connection counters (M_CLIENT_REFUSED + reason) and slow clients
    M_CLIENT_REFUSED = 7200   # after the backend table (M_BACKENDS + 4 * M_BACKEND_MAX)
    REFUSED_MAX_CONNS = 0     # listener's max_connections
    REFUSED_PER_IP = 1        # server.max_connections_per_ip
    REFUSED_PENDING_HEADS = 2 # server.max_pending_heads_per_ip
    REFUSED_PROXY = 3         # PROXY header missing, malformed, late or from an untrusted source
    M_CLIENT_SLOW = 7204      # + 0: request heads not whole within timeout.header, + 1: bodies too slow
    XF_MAX_ELEMENTS = 64      # list elements looked at in one X-Forwarded-For/Forwarded field


cdef class AddrSet:
    """A set of CIDR blocks (IPv4 and IPv6) to test addresses against; an
    IPv4-mapped IPv6 address is tested as the IPv4 one."""
    cdef uint32_t *net4
    cdef uint32_t *mask4
    cdef unsigned char *net6     # 16 bytes per block
    cdef unsigned char *mask6
    cdef int n4, n6
    cdef readonly tuple blocks

    def __cinit__(self, blocks=()):
        import ipaddress
        nets = [ipaddress.ip_network(b, strict=True) for b in blocks]
        self.blocks = tuple(str(n) for n in nets)
        v4 = [n for n in nets if n.version == 4]
        v6 = [n for n in nets if n.version == 6]
        self.net4 = <uint32_t *>malloc(sizeof(uint32_t) * (len(v4) + 1))
        self.mask4 = <uint32_t *>malloc(sizeof(uint32_t) * (len(v4) + 1))
        self.net6 = <unsigned char *>malloc(16 * (len(v6) + 1))
        self.mask6 = <unsigned char *>malloc(16 * (len(v6) + 1))
        if self.net4 == NULL or self.mask4 == NULL or self.net6 == NULL or self.mask6 == NULL:
            raise MemoryError()
        for n in v4:
            self.net4[self.n4] = int(n.network_address)
            self.mask4[self.n4] = int(n.netmask)
            self.n4 += 1
        for n in v6:
            memcpy(self.net6 + 16 * self.n6, <const char *>n.network_address.packed, 16)
            memcpy(self.mask6 + 16 * self.n6, <const char *>n.netmask.packed, 16)
            self.n6 += 1

    def __dealloc__(self):
        free(self.net4)
        free(self.mask4)
        free(self.net6)
        free(self.mask6)

    cdef bint has4(self, const unsigned char *a) noexcept:
        cdef uint32_t v = (<uint32_t>a[0] << 24) | (<uint32_t>a[1] << 16) | (<uint32_t>a[2] << 8) | a[3]
        cdef int i
        for i in range(self.n4):
            if (v & self.mask4[i]) == self.net4[i]:
                return 1
        return 0

    cdef bint has6(self, const unsigned char *a) noexcept:
        cdef int i, j
        cdef const unsigned char *net
        cdef const unsigned char *mask
        if memcmp(a, b"\0\0\0\0\0\0\0\0\0\0\xff\xff", 12) == 0:
            return self.has4(a + 12)
        for i in range(self.n6):
            net = self.net6 + 16 * i
            mask = self.mask6 + 16 * i
            for j in range(16):
                if (a[j] & mask[j]) != net[j]:
                    break
            else:
                return 1
        return 0

    cdef bint has_text(self, bytes ip) noexcept:
        cdef unsigned char a[16]
        cdef const char *p = ip
        cdef size_t n = len(ip)
        if _pton(AF_INET, p, n, a):
            return self.has4(a)
        if _pton(AF_INET6, p, n, a):
            return self.has6(a)
        return 0

    def __contains__(self, ip):
        return self.has_text(ip.encode("latin-1") if isinstance(ip, str) else ip)


cdef class ClientAddr:
    """What the config says about client addresses (built once per worker
    start or reload; ProxySettings.addr)."""
    cdef public AddrSet trusted            # None: no trusted proxies
    cdef public bint forwarded             # take the address from Forwarded, not X-Forwarded-For
    cdef public int max_per_ip             # concurrent connections per address; 0 = no limit
    cdef public int max_heads_per_ip       # unfinished request heads per address; 0 = no limit

    def __init__(self, trusted=(), real_ip_header="X-Forwarded-For", max_connections_per_ip=0,
                 max_pending_heads_per_ip=0):
        self.trusted = AddrSet(trusted) if trusted else None
        if real_ip_header.lower() not in ("x-forwarded-for", "forwarded"):
            raise ValueError("real_ip_header: X-Forwarded-For or Forwarded")
        self.forwarded = real_ip_header.lower() == "forwarded"
        self.max_per_ip = max_connections_per_ip
        self.max_heads_per_ip = max_pending_heads_per_ip


@cython.freelist(64)
@cython.final
cdef class IpCount:
    """The connections of one client address in this worker."""
    cdef bytes key
    cdef int conns          # open
    cdef int heads          # with a request head not yet whole


cdef dict _ip_table = {}            # bytes address -> IpCount, while it has connections
cdef double _refused_logged[4]


def client_addr_stats():
    """For the tests: {address: (connections, pending heads)} of this worker."""
    return {k.decode(): ((<IpCount>v).conns, (<IpCount>v).heads) for k, v in _ip_table.items()}


cdef void _client_addr_given(ClientConn c, bytes tcp, bytes real, int port, object dst):
    """The PROXY header named the client (ProxyHeaderConn): before connection_made."""
    c.tcp_peer = tcp
    c.hop = real
    c.src_port = port
    c.pp_dst = dst


cdef void _note_refused(bytes addr, int reason):
    cdef double now = _mono()
    _m[M_CLIENT_REFUSED + reason] += 1
    if now - _refused_logged[reason] >= 1.0:
        # at most once a second per reason: a flood must not become a log flood
        _refused_logged[reason] = now
        _log.warning("client %s: connection refused (%s)", addr.decode("latin-1"),
                     ("listener max_connections reached", "server.max_connections_per_ip reached",
                      "server.max_pending_heads_per_ip reached")[reason])


cdef int _conn_admit(ClientConn c) except -1:
    """Count a new connection (listener, address) and refuse it beyond a
    limit: 1 when refused (answered 503 and closing, or closed at once)."""
    cdef ClientAddr a = c.cfg.addr
    cdef Listener lst = c.lst
    cdef IpCount e
    if lst.max_conns:
        lst.nconns += 1
        c.lst_counted = 1
        if lst.nconns > lst.max_conns:
            _note_refused(c.hop, REFUSED_MAX_CONNS)
            _refuse_503(c)
            return 1
    if a is None:
        return 0
    if a.trusted is not None:
        c.hop_trusted = a.trusted.has_text(c.hop)
    if a.max_per_ip or a.max_heads_per_ip:
        e = _ip_entry(c.hop)
        e.conns += 1
        c.ipc = e
        if a.max_per_ip and e.conns > a.max_per_ip:
            _note_refused(c.hop, REFUSED_PER_IP)
            _refuse_503(c)
            return 1
        if _head_begin(c):
            return 1
    return 0


cdef void _refuse_503(ClientConn c):
    c.transport.write(_error_response(c.cfg, 503, 0, b"Retry-After: 1\r\n"))
    c._linger()


cdef int _head_begin(ClientConn c) except -1:
    """A request head begins (the connection opened, or the first bytes of
    a later one came): 1 when that is one unfinished head too many for the
    address (the connection is closed at once)."""
    cdef IpCount e = c.ipc
    cdef int cap = c.cfg.addr.max_heads_per_ip
    if c.in_head or not cap:
        return 0
    c.in_head = 1
    e.heads += 1
    if e.heads > cap:
        _note_refused(c.hop, REFUSED_PENDING_HEADS)
        c.close()
        return 1
    return 0


cdef inline void _head_end(ClientConn c) noexcept:
    c.in_head = 0
    if c.ipc is not None:
        c.ipc.heads -= 1


cdef void _conn_release(ClientConn c) noexcept:
    """The connection is gone (from _teardown, which may run twice)."""
    cdef IpCount e = c.ipc
    if c.lst_counted:
        c.lst_counted = 0
        c.lst.nconns -= 1
    if e is not None:
        c.ipc = None
        if c.in_head:
            c.in_head = 0
            e.heads -= 1
        e.conns -= 1
        if e.conns <= 0 and e.heads <= 0:
            _ip_table.pop(e.key, None)


cdef IpCount _ip_entry(bytes addr):
    cdef IpCount e = _ip_table.get(addr)
    if e is None:
        e = IpCount()
        e.key = addr
        _ip_table[addr] = e
    return e


cdef bint _tls_head_begin(TLSServerConn t, bytes addr):
    """A TLS handshake begins: it counts as an unfinished head of its
    address (a slow handshake is a slowloris too).  1 when one too many
    (the connection is aborted)."""
    cdef IpCount e = _ip_entry(addr)
    e.heads += 1
    t.ipc = e
    if e.heads > t.lst.cfg.addr.max_heads_per_ip:
        _note_refused(addr, REFUSED_PENDING_HEADS)
        t.abort()
        return 1
    return 0


cdef void _tls_head_end(TLSServerConn t) noexcept:
    """The handshake ended (done, failed, or the connection is gone)."""
    cdef IpCount e = t.ipc
    t.ipc = None
    e.heads -= 1
    if e.conns <= 0 and e.heads <= 0:
        _ip_table.pop(e.key, None)


# ---- the real client address from X-Forwarded-For / Forwarded -----------------

cdef inline bint _ows(unsigned char ch) noexcept:
    return ch == b' ' or ch == b'\t'


cdef int _node(const unsigned char *p, size_t n, unsigned char *out) noexcept:
    """A node as these fields write it: "1.2.3.4", "1.2.3.4:80", "[v6]",
    "[v6]:80" or a bare IPv6 address.  4 or 6 (the family), 0 when it is
    not an address (unknown, an obfuscated name, garbage)."""
    cdef size_t i, colons = 0, end = 0
    if n == 0:
        return 0
    if p[0] == b'[':
        end = 1
        while end < n and p[end] != b']':
            end += 1
        if end >= n:
            return 0
        if end + 1 < n:
            if p[end + 1] != b':' or _port(p + end + 2, n - end - 2) < 0:
                return 0
        return 6 if _pton(AF_INET6, <const char *>p + 1, end - 1, out) else 0
    for i in range(n):
        if p[i] == b':':
            colons += 1
            end = i
    if colons == 1:
        if _port(p + end + 1, n - end - 1) < 0:
            return 0
        return 4 if _pton(AF_INET, <const char *>p, end, out) else 0
    if colons == 0:
        return 4 if _pton(AF_INET, <const char *>p, n, out) else 0
    return 6 if _pton(AF_INET6, <const char *>p, n, out) else 0


cdef int _for_of(const unsigned char *p, size_t n, unsigned char *out) noexcept:
    """The `for` node of one Forwarded element (RFC 7239 §4: pairs split by
    ';', a value a token or a quoted string): its family, or 0."""
    cdef size_t i = 0, a, b, vs, ve
    cdef bint quoted
    while i <= n:
        a = i
        quoted = 0
        while i < n and (quoted or p[i] != b';'):
            if p[i] == b'"':
                quoted = not quoted
            elif p[i] == b'\\':
                return 0             # quoted-pair: no address needs one
            i += 1
        if quoted:
            return 0
        # p[a:i] is one pair
        while a < i and _ows(p[a]):
            a += 1
        b = i
        while b > a and _ows(p[b - 1]):
            b -= 1
        if b - a > 4 and _ieq(<const char *>p + a, 4, b"for=", 4):
            vs = a + 4
            ve = b
            if ve - vs >= 2 and p[vs] == b'"' and p[ve - 1] == b'"':
                vs += 1
                ve -= 1
            return _node(p + vs, ve - vs, out)
        i += 1
    return 0


cdef int _walk_field(AddrSet trusted, bint forwarded, const unsigned char *p, size_t n,
                     unsigned char *out, int *fam) noexcept:
    """One field's list, from its right end: 1 with the rightmost address not
    trusted in out/fam; 0 when every element is trusted (out/fam: the
    leftmost, or fam 0 for an empty list); -1 when an element is not an
    address (the field is then not used at all)."""
    cdef size_t starts[XF_MAX_ELEMENTS]
    cdef size_t ends[XF_MAX_ELEMENTS]
    cdef int k = 0, j, f
    cdef size_t i = 0, a, b
    cdef bint quoted = 0
    cdef unsigned char tmp[16]
    while i <= n:
        a = i
        while i < n and (quoted or p[i] != b','):
            if p[i] == b'"' and forwarded:
                quoted = not quoted
            i += 1
        b = i
        while a < b and _ows(p[a]):
            a += 1
        while b > a and _ows(p[b - 1]):
            b -= 1
        if b > a:                        # empty list elements are allowed (RFC 9110 §5.6.1)
            if k == XF_MAX_ELEMENTS:
                return -1
            starts[k] = a
            ends[k] = b
            k += 1
        i += 1
    if quoted:
        return -1
    j = k - 1
    while j >= 0:
        if forwarded:
            f = _for_of(p + starts[j], ends[j] - starts[j], tmp)
        else:
            f = _node(p + starts[j], ends[j] - starts[j], tmp)
        if f == 0:
            return -1
        memcpy(out, tmp, 16 if f == 6 else 4)
        fam[0] = f
        if not (trusted.has4(tmp) if f == 4 else trusted.has6(tmp)):
            return 1
        j -= 1
    return 0


cdef void _real_ip(ClientConn c, HeadParser hp):
    """The connection comes from a trusted proxy: this request's client is
    the rightmost address of X-Forwarded-For (or Forwarded's `for`) that is
    not a trusted proxy, as nginx's real_ip_recursive picks it; every
    element trusted: the leftmost.  A field with anything but addresses is
    ignored, and the connection's own address stands."""
    cdef ClientAddr a = c.cfg.addr
    cdef unsigned char want = H_FORWARDED if a.forwarded else H_X_FORWARDED_FOR
    cdef unsigned char ip[16]
    cdef int fam = 0, r = 0
    cdef Py_ssize_t i = hp.nfields - 1
    cdef bytes real
    while i >= 0:
        if hp.hid[i] == want:
            r = _walk_field(a.trusted, a.forwarded, <const unsigned char *>hp.fields[i].value,
                            hp.fields[i].value_len, ip, &fam)
            if r != 0:
                break
        i -= 1
    if r < 0 or fam == 0:
        real = c.hop
    else:
        real = _ntop(PPF_INET if fam == 4 else PPF_INET6, ip)
    if real != c.peer:
        c.peer = real
        c.peer_str = None
