# The cache as a compiled phase of its routes (Route.phase): the hot index
# answers plain hits without leaving C (_serve_hot); everything else goes to
# the Python cache phase (edgeproxy/cache/phase.py), whose per-request
# Exchange becomes the request's Stage: it sees the response head (and adds
# Cache-Status), its body as it streams, its end, and a backend's failure
# (stale-if-error).  The core knows only Phase and Stage (ext/phases.pyx).

cdef Scratch _hot_key = Scratch()    # the cache key of a request, built by _serve_hot


@cython.final
cdef class CacheRoutePhase(Phase):
    """The request hook of a route with `cache = true`."""

    cdef int request(self, ClientConn c, Route route, HeadParser hp) except -2:
        if not hp.has_host:
            return R_GO
        # a hooked route's hits go through the Python phase when hooks set the
        # key or see responses (the hot index knows neither)
        if route.hot is not None and (c.ctx is None or (
                c.ctx.cache_key is None and not c.ctx.chain.wants & (1 << PHASE_RESPONSE))) \
                and _serve_hot(c, route.hot, hp):
            return R_ANSWERED
        return _start_cached(c, route, hp)


@cython.final
cdef class CacheExchange(Stage):
    """One request's cache Exchange (edgeproxy.cache.phase), as its Stage.
    The cache fails open: an error in it is logged and the response goes
    on uncached."""
    cdef object ex

    def __cinit__(self, object ex):
        self.ex = ex

    cdef bytes response(self, ClientConn c, HeadParser hp, UpstreamConn u, bint whole):
        """The field lines to add to the client's head, or None; the phase
        may answer instead (respond: then c.up is no longer u)."""
        cdef bint framed = hp.body == B_CHUNKED and c.req_minor != 0
        cdef list fields = _response_field_list(hp, c.cfg)
        cdef long long clen = hp.content_length
        if c.added_fields is not None:     # an earlier stage's (compression's Vary)
            fields.extend(_split_lines(c.added_fields))
        if c.xform is not None:
            # an earlier stage filters the body (compression): the cache
            # stores what the client gets, with its fields and framing
            fields = c.xform.cache_fields(fields)
            framed = c.req_minor != 0
            clen = -1
            whole = 0
        try:
            r = self.ex.on_response(c, hp.status, hp.reason[:hp.reason_len] if hp.reason_len else b"",
                                    fields, framed, clen, whole)
        except Exception:
            _log.exception("cache phase failed on a response; passing it on uncached")
            return None
        if c.up is not u:
            return None
        if self.ex.hidden:
            _hide_fields(hp, self.ex.hidden)
        if r is None:
            return None
        if r[1]:
            c.tap |= TAP_STAGE
        return <bytes>r[0]

    cdef void body(self, object data):
        try:
            self.ex.feed(data)
        except Exception:
            _log.exception("cache phase failed on a response body")

    cdef void end(self, bint whole):
        try:
            if whole:
                self.ex.finished()
            else:
                self.ex.aborted()
        except Exception:
            _log.exception("cache phase failed at the end of a response")

    cdef void error(self, ClientConn c, int status):
        try:
            self.ex.on_backend_error(c, status)
        except Exception:
            _log.exception("cache phase failed on a backend error")


cdef list _split_lines(bytes lines):
    """Field lines ("Name: value" and CRLF each) as [(name, value)]."""
    cdef list out = []
    for line in lines.split(b"\r\n"):
        if line:
            name, _, value = line.partition(b":")
            out.append((name.strip(), value.strip()))
    return out


cdef void _hide_fields(HeadParser hp, tuple names):
    """Keep the fields named in names (lower-case) out of the client's head:
    the targeted cache fields (RFC 9213) this cache consumed. They are
    marked as a backend-private field, which _response_field_kind drops."""
    cdef size_t i
    cdef bytes name
    for i in range(hp.nfields):
        if hp.hid[i] != H_OTHER:
            continue
        for name in names:
            if _ieq(hp.fields[i].name, hp.fields[i].name_len, name, len(name)):
                hp.hid[i] = H_X_RUNTIME
                break


cdef list _field_list(HeadParser hp):
    """The parsed head's fields as [(name, value)] (for the cache phase only)."""
    cdef size_t i
    return [(hp.fields[i].name[:hp.fields[i].name_len],
             hp.fields[i].value[:hp.fields[i].value_len]) for i in range(hp.nfields)]


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


cdef int _start_cached(ClientConn c, Route route, HeadParser hp) except -2:
    """A request on a route with a cache phase: the phase answers it
    (respond), holds it (and later calls respond or forward), or returns
    the head to forward now (its own, e.g. a revalidation, or ours)."""
    cdef bytes head = _request_head(c, hp, None)
    cdef bint has_body = not (hp.body == B_NONE or (hp.body == B_LENGTH and hp.content_length == 0))
    cdef object ctx = None
    c.req_done = not has_body
    c.state = C_BODY if has_body else C_WAIT
    if has_body:
        c._body_wait(hp.expect_continue)
    try:
        ctx = route.cache.on_request(
            c, c.lst.proto, hp.method[:hp.method_len], hp.host[:hp.host_len],
            _target_bytes(c.cfg, hp),
            _field_list(hp), head, has_body,
            None if c.ctx is None or c.ctx.cache_key is None
            else str(c.ctx.cache_key).encode("utf-8"))
    except Exception:
        _log.exception("cache phase failed on a request; forwarding it")
        ctx = None
    if c.state != C_WAIT and c.state != C_BODY:
        return -1            # answered from the cache (and maybe closed)
    if ctx is None:
        return c._send_to_pool(route.pool, head)
    _add_stage(c, CacheExchange(ctx))
    fwd = ctx.head
    if fwd is None:
        return 0             # held: answered or forwarded later
    return c._send_to_pool(route.pool, <bytes>fwd)


cdef bint _serve_hot(ClientConn c, HotIndex hot, HeadParser hp) except -1:
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
    cdef bytes proto_b = c.lst.proto
    cdef bytes conn_line
    if hp.body != B_NONE or hp.upgrade or hp.expect_continue or c.stage is not None:
        return 0             # (an earlier compiled phase's stage wants this response)
    if c.resp_edits is not None and c.resp_edits.drop:
        return 0             # response rules remove fields: the phase's respond() edits the head
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
    _add_target(k, c.cfg, hp)
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
    c.req_done = 1
    c.state = C_WAIT
    c.upq = None
    keep = c.req_keep_alive and not c.eof and not _draining
    age = e.age_base + now
    age_i = <long long>age if age > 0 else 0
    if age_i > DELTA_SECONDS_MAX:
        age_i = DELTA_SECONDS_MAX
    if keep:
        conn_line = b"Connection: keep-alive\r\n" if c.req_minor == 0 else b""
    else:
        conn_line = b"Connection: close\r\n"
    send_body = not c.req_is_head and e.body_len > 0
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
    if c.resp_edits is not None:
        o.addb(c.resp_edits.lines(c))    # response rules that only add (ext/toolkit.pyx)
    o.addb(c.cfg.server_line)
    o.addb(c.lst.resp_extra)
    o.addb(conn_line)
    o.add(b"\r\n", 2)
    c.resp_head_len = o.n
    c.resp_status = e.status
    c.resp_started = 1
    c.resp_keep = keep
    c.resp_bytes = e.body_len if send_body else 0
    if c.cfg.log_fields & LOG_CACHE:
        c.log_cache = b"Cache-Status: edgeproxy; hit; ttl=%d" % <long long>floor(ttl)
    c._send_parts(o.p, o.n, e.parts if send_body else None)
    hot.hits += 1
    _hot_hits += 1
    c._response_done()
    return 1
