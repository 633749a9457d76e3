# The operator's toolkit as compiled phases (issue 15): header rules, error
# pages, rewrites and strip_prefix, redirect routes and basic auth.  Each is
# a Phase that edgeproxy/toolkit/phases.py builds for the routes that use it
# (edgeproxy/proxy/compiled.py MAKERS), so a route without them runs none of
# this.  They act through the core's per-request head edits:
#   ClientConn.req_edits   HeadEdits applied by _request_head (toward the backend)
#   ClientConn.resp_edits  HeadEdits applied where the client's head is written
#                          (a backend's answer, a cache hit; with `always`, the
#                          proxy's own answers too)
#   ClientConn.up_target   the target forwarded instead of the client's
#   ClientConn.answers     Answers: the error pages of the proxy's own errors
# all reset to the listener's defaults (ProxySettings) when a request ends.
# docs/architecture.md describes the mechanism; other compiled phases
# (compression) use the same fields.

cdef object _tk_log = logging.getLogger("edgeproxy.toolkit")

# variables of header rule values (edgeproxy/toolkit/rules.py compiles them)
cdef enum:
    V_CLIENT_IP = 1
    V_HOST = 2
    V_SCHEME = 3
    V_REQUEST_ID = 4


@cython.final
cdef class HeadEdits:
    """Field edits of one head: names to drop (lower-case bytes, also the
    names `set` replaces) and field lines to add.  `add` is the lines
    without variables, ready to write; `tmpl` those with variables
    ((name, parts): parts are bytes or V_* ints), rendered when the head
    is written; `host` is the request's host for {host} (a per-request
    copy made by bind()).  `always`: response edits also apply to the
    proxy's own answers."""
    cdef readonly tuple drop
    cdef readonly bytes add
    cdef readonly tuple tmpl
    cdef readonly bint always
    cdef readonly bint wants_host
    cdef readonly bytes host

    def __init__(self, drop=(), bytes add=b"", tmpl=None, bint always=False):
        self.drop = tuple(bytes(d).lower() for d in drop)
        self.add = add
        self.tmpl = tuple(tmpl) if tmpl else None
        self.always = always
        self.wants_host = False
        if self.tmpl:
            for _, parts in self.tmpl:
                for p in parts:
                    if p == V_HOST:
                        self.wants_host = True

    cdef inline bint drops(self, const char *nm, size_t nl):
        cdef bytes d
        for d in self.drop:
            if _ieq(nm, nl, d, len(d)):
                return 1
        return 0

    cdef HeadEdits bind(self, HeadParser hp):
        """A copy that knows the request's host (for {host}); self when no
        value needs it."""
        cdef HeadEdits e
        if not self.wants_host:
            return self
        e = HeadEdits.__new__(HeadEdits)
        e.drop = self.drop
        e.add = self.add
        e.tmpl = self.tmpl
        e.always = self.always
        e.wants_host = 1
        e.host = _host_only(hp) if hp.has_host else b""
        return e

    cdef bytes lines(self, ClientConn c):
        """The field lines to add, variables rendered."""
        cdef list out
        if self.tmpl is None:
            return self.add
        out = [self.add]
        for name, parts in self.tmpl:
            out.append(name)
            out.append(b": ")
            for p in parts:
                if type(p) is bytes:
                    out.append(p)
                elif p == V_CLIENT_IP:
                    out.append(c.peer)
                elif p == V_HOST:
                    out.append(self.host or b"")
                elif p == V_SCHEME:
                    out.append(c.lst.proto)
                else:
                    out.append(c.req_id if c.req_id is not None else b"-")
            out.append(b"\r\n")
        return b"".join(out)

    def merged(self, HeadEdits other):
        return _merge_edits(self, other)


cdef HeadEdits _merge_edits(HeadEdits a, HeadEdits b):
    """a's edits, then b's (two features editing one request)."""
    cdef HeadEdits e = HeadEdits.__new__(HeadEdits)
    e.drop = a.drop + b.drop
    e.add = a.add + b.add
    e.tmpl = ((a.tmpl or ()) + (b.tmpl or ())) or None
    e.always = a.always or b.always
    e.wants_host = a.wants_host or b.wants_host
    e.host = a.host if a.host is not None else b.host
    return e


cdef void _add_req_edits(ClientConn c, HeadEdits e):
    """Add e to the edits of the head the backend gets (beside those of
    the compiled phases before)."""
    c.req_edits = e if c.req_edits is None else _merge_edits(c.req_edits, e)


cdef void _add_resp_edits(ClientConn c, HeadEdits e):
    c.resp_edits = e if c.resp_edits is None else _merge_edits(c.resp_edits, e)


cdef bytes _host_only(HeadParser hp):
    """The request's host without its port (nginx's $host)."""
    cdef size_t hl = hp.host_len
    cdef size_t i
    if hl and hp.host[0] == b'[':
        for i in range(hl):
            if hp.host[i] == b']':
                hl = i + 1
                break
    else:
        for i in range(hl):
            if hp.host[i] == b':':
                hl = i
                break
    return hp.host[:hl].lower()


cdef bytes _edited_head(bytes head, HeadEdits e, ClientConn c):
    """A head the proxy made (status line and field lines, each ending in
    CRLF, no blank line) with e's edits."""
    cdef list out
    cdef bytes line
    cdef Py_ssize_t k
    cdef const char *p
    if e.drop:
        lines = head.split(b"\r\n")
        out = [lines[0]]
        for line in lines[1:]:
            if not line:
                continue
            k = line.find(b":")
            p = line
            if k > 0 and e.drops(p, <size_t>k):
                continue
            out.append(line)
        out.append(b"")
        head = b"\r\n".join(out)
    return head + e.lines(c)


@cython.final
cdef class Answers:
    """The error pages of a route (or the listener's default): status ->
    (Content-Type value, body), read at load.  `backend`: they replace a
    backend's own 5xx answers too."""
    cdef readonly dict pages
    cdef readonly bint backend

    def __init__(self, dict pages, bint backend=False):
        self.pages = {int(k): (bytes(v[0]), bytes(v[1])) for k, v in pages.items()}
        self.backend = backend


cdef bytes _own_error(ClientConn c, int status, bint keep, bytes extra):
    """The proxy's own error answer (what _error_response makes) with the
    request's error page and, with `always`, its response edits."""
    cdef bytes reason = _REASONS.get(status, b"Error")
    cdef tuple page = None
    cdef bytes head, body, ctype
    if c.answers is not None:
        page = (<Answers>c.answers).pages.get(status)
    if page is None:
        ctype = b"text/plain; charset=utf-8"
        body = b"%d %s\n" % (status, reason)
    else:
        ctype, body = page
    head = b"HTTP/1.1 %d %s\r\n%s%s%sContent-Type: %s\r\n" % (
        status, reason, c.cfg.server_line, _date_line, extra, ctype)
    if c.resp_edits is not None and c.resp_edits.always:
        head = _edited_head(head, c.resp_edits, c)
    return b"%sContent-Length: %d\r\n%s\r\n%s" % (
        head, len(body), b"" if keep else b"Connection: close\r\n",
        b"" if c.req_is_head and c.in_req else body)   # (not in_req: an unparsed request)


cdef bytes _own_head(int status, bytes reason, bytes fields, bytes body):
    """The status line and fields of an answer a toolkit phase makes (a
    redirect, a 401); respond() adds the core's fields."""
    return b"HTTP/1.1 %d %s\r\n%s%sContent-Length: %d\r\n" % (
        status, reason, fields, _date_line, len(body))


cdef int _answer(ClientConn c, HeadParser hp, int status, bytes reason, bytes fields,
                 bytes body) except -2:
    """Answer the request from a toolkit phase (a redirect, a 401): the
    route's error page for the status if it has one, its response edits
    with `always`.  An unread request body: answer, then close without
    losing the answer (as _phase_answer does)."""
    cdef bint unread
    cdef tuple page = None
    cdef bytes head
    cdef Scratch o
    if c.state == C_HEAD:        # from _start_request (with hooks, the state is set already)
        unread = not (hp.body == B_NONE or (hp.body == B_LENGTH and hp.content_length == 0))
    else:
        unread = not c.req_done
    if c.answers is not None:
        page = (<Answers>c.answers).pages.get(status)
    if page is not None:
        fields += b"Content-Type: " + <bytes>page[0] + b"\r\n"
        body = <bytes>page[1]
    elif body:
        fields += b"Content-Type: text/plain; charset=utf-8\r\n"
    if c.resp_edits is not None and not c.resp_edits.always:
        c.resp_edits = None       # rules without `always` are for the backend's answers
    c.upq = None
    head = _own_head(status, reason, fields, body)
    if not unread:
        c.req_done = 1
        c.state = C_WAIT
        c.respond(head, b"" if c.req_is_head else body, status)
        return R_ANSWERED
    if c.resp_edits is not None:
        head = _edited_head(head, c.resp_edits, c)
    o = _out
    o.n = 0
    o.addb(head)
    o.addb(c.cfg.server_line)
    o.addb(c.lst.resp_extra)
    o.add(b"Connection: close\r\n\r\n", 21)
    c.resp_status = status
    c.resp_started = 1
    c.resp_head_len = o.n
    if not c.req_is_head:
        c.resp_bytes = len(body)
        o.addb(body)
    c.transport.write(o.take())
    if c.in_req:
        c._request_end(status)
    c._linger()
    return R_ANSWERED


cdef int _run_after(ClientConn c, Route route, Phase me, HeadParser hp) except -2:
    """The route's compiled phases after `me` (a phase that held the request
    and now lets it go on)."""
    cdef Phase p
    cdef int r
    cdef bint after = 0
    if type(route.phase) is not PhaseSeq:
        return R_GO
    for p in (<PhaseSeq>route.phase).items:
        if after:
            r = p.request(c, route, hp)
            if r != R_GO:
                return r
        elif p is me:
            after = 1
    return R_GO


# ---- answers: response rules and error pages --------------------------------

@cython.final
cdef class PageStage(Stage):
    """With error_pages_backend: a backend's 5xx whose status has a page
    is answered with the page instead (its body is dropped: the connection
    to the backend is pooled when it had none, else closed)."""

    cdef bytes response(self, ClientConn c, HeadParser hp, UpstreamConn u, bint whole):
        cdef tuple page = None
        cdef bytes head
        if hp.status < 500 or hp.status > 599 or c.answers is None:
            return None
        page = (<Answers>c.answers).pages.get(hp.status)
        if page is None:
            return None
        head = b"HTTP/1.1 %d %s\r\nContent-Type: %s\r\n%sContent-Length: %d\r\n" % (
            hp.status, _REASONS.get(hp.status, b"Error"), <bytes>page[0], _date_line,
            len(<bytes>page[1]))
        c._stage_end(0)           # the other stages (the cache) see no response
        c.respond(head, b"" if c.req_is_head else <bytes>page[1], hp.status)
        return None


@cython.final
cdef class AnswersPhase(Phase):
    """First of a route's compiled phases: sets what shapes every answer
    of the request, before any phase can answer: the response rules
    (resp_edits) and the error pages (answers)."""
    cdef readonly HeadEdits resp
    cdef readonly Answers answers
    cdef Stage pages_stage

    def __init__(self, HeadEdits resp=None, Answers answers=None):
        self.resp = resp
        self.answers = answers
        self.pages_stage = PageStage() if answers is not None and answers.backend else None

    cdef int request(self, ClientConn c, Route route, HeadParser hp) except -2:
        if self.resp is not None:
            c.resp_edits = self.resp.bind(hp)
        if self.answers is not None:
            c.answers = self.answers
        if self.pages_stage is not None:
            _add_stage(c, self.pages_stage)
        return R_GO


@cython.final
cdef class HeaderRulesPhase(Phase):
    """The request rules (toward the backend): last before the cache."""
    cdef readonly HeadEdits req

    def __init__(self, HeadEdits req):
        self.req = req

    cdef int request(self, ClientConn c, Route route, HeadParser hp) except -2:
        _add_req_edits(c, self.req.bind(hp))
        return R_GO


# ---- rewrites and redirects ---------------------------------------------------

@cython.final
cdef class RewritePhase(Phase):
    """strip_prefix (the route's path off the routing path) and/or a re2
    rewrite of the routing path; the query is kept.  The result is the
    target forwarded (c.up_target); routing and the cache key keep the
    client's."""
    cdef readonly bytes prefix       # strip_prefix: the route's path, or None
    cdef readonly object rx          # re2 pattern (str) or None
    cdef readonly tuple to           # its replacement: str parts and group ints

    def __init__(self, prefix=None, rx=None, to=()):
        self.prefix = prefix
        self.rx = rx
        self.to = tuple(to)

    cdef int request(self, ClientConn c, Route route, HeadParser hp) except -2:
        cdef bytes path = _rpath[:_rpath_len]
        if _rpath_len == 0 or _rpath[0] != b'/':
            return R_GO                   # asterisk-form: nothing to rewrite
        if self.prefix is not None:       # (the router matched it: path starts with it)
            path = path[len(self.prefix):]
            if not path.startswith(b"/"):
                path = b"/" + path
        else:
            path = self._rewrite(path)
            if path is None:
                return R_GO
        return self._set(c, hp, path)

    cdef int _set(self, ClientConn c, HeadParser hp, bytes path) except -2:
        cdef bytes query = hp.target[_tpath_len:hp.target_len]   # "" or "?..."
        if query and b"?" in path:
            query = b"&" + query[1:]
        c.up_target = path + query
        return R_GO

    cdef bytes _rewrite(self, bytes path):
        """The path the rewrite makes of path, or None when it does not match."""
        cdef str s = path.decode("latin-1")
        cdef list out
        m = self.rx.search(s)
        if m is None:
            return None
        out = []
        for part in self.to:
            if type(part) is str:
                out.append(part)
            else:
                out.append(m.group(part) or "")
        s = "".join(out)
        # a group may hold anything the path held; the result must still be a path
        if not s.startswith("/"):
            s = "/" + s
        return s.encode("latin-1")


@cython.final
cdef class RedirectPhase(Phase):
    """A redirect route: every request is answered with `status` to the
    target rendered from `to` (str parts and variable names)."""
    cdef readonly int status
    cdef readonly bytes reason
    cdef readonly tuple to

    def __init__(self, int status, tuple to):
        self.status = status
        self.reason = _REDIRECT_REASONS[status]
        self.to = to

    cdef int request(self, ClientConn c, Route route, HeadParser hp) except -2:
        cdef list out = []
        cdef bytes query = hp.target[_tpath_len:hp.target_len]   # "" or "?..."
        for part in self.to:
            if type(part) is bytes:
                out.append(part)
            elif part == "path":
                out.append(_rpath[:_rpath_len])
            elif part == "query":
                out.append(query[1:])
            elif part == "request_uri":
                out.append(_rpath[:_rpath_len])
                out.append(query)
            elif part == "host":
                out.append(_host_only(hp) if hp.has_host else b"")
            elif part == "scheme":
                out.append(c.lst.proto)
        return _answer(c, hp, self.status, self.reason,
                       b"Location: " + b"".join(out) + b"\r\n", b"")


cdef dict _REDIRECT_REASONS = {301: b"Moved Permanently", 302: b"Found", 303: b"See Other",
                               307: b"Temporary Redirect", 308: b"Permanent Redirect"}


# ---- basic auth ------------------------------------------------------------------

cdef HeadParser _auth_parser = HeadParser()   # re-parses a held request's head


@cython.final
cdef class AuthBasicPhase(Phase):
    """HTTP Basic authentication (RFC 7617) against an htpasswd file.  A
    password check (bcrypt, SHA-crypt) runs in the loop's executor while
    the request is held; successes are remembered (by a keyed hash of the
    credentials, bounded), so a browser sending the same header on every
    request costs one check.  The Authorization field is removed toward
    the backend unless `forward`."""
    cdef readonly object checker     # edgeproxy.toolkit.auth.Checker
    cdef readonly bytes challenge    # the WWW-Authenticate line
    cdef readonly bint forward
    cdef HeadEdits strip
    cdef int inflight
    cdef readonly int max_inflight

    def __init__(self, checker, str realm, bint forward=False, int max_inflight=32):
        self.checker = checker
        self.challenge = b'WWW-Authenticate: Basic realm="%s", charset="UTF-8"\r\n' % (
            realm.encode("utf-8"))
        self.forward = forward
        self.strip = None if forward else HeadEdits(drop=(b"authorization",))
        self.max_inflight = max_inflight

    cdef int request(self, ClientConn c, Route route, HeadParser hp) except -2:
        cdef size_t i
        cdef bytes value = None
        cdef int seen = 0
        for i in range(hp.nfields):
            if hp.hid[i] == H_OTHER and _ieq(hp.fields[i].name, hp.fields[i].name_len,
                                             b"authorization", 13):
                seen += 1
                value = hp.fields[i].value[:hp.fields[i].value_len]
        if seen != 1:
            return self._deny(c, hp)
        known = self.checker.known(value)
        if known is None:
            return self._deny(c, hp)     # not Basic, or malformed
        if known:
            if self.strip is not None:
                _add_req_edits(c, self.strip)
            return R_GO
        if self.inflight >= self.max_inflight:
            # too many checks at once (a guessing client): do not queue more
            _tk_log.warning("auth_basic: %d password checks in progress; answering 503",
                            self.inflight)
            return _answer(c, hp, 503, b"Service Unavailable", b"Retry-After: 1\r\n",
                           b"503 Service Unavailable\n")
        return self._hold(c, route, hp, value)

    cdef int _deny(self, ClientConn c, HeadParser hp) except -2:
        return _answer(c, hp, 401, b"Unauthorized", self.challenge, b"401 Unauthorized\n")

    cdef int _hold(self, ClientConn c, Route route, HeadParser hp, bytes value) except -2:
        cdef bint has_body = not (hp.body == B_NONE or (hp.body == B_LENGTH and hp.content_length == 0))
        cdef bytes head = _rebuilt_head(hp)
        if c.state == C_HEAD:    # from _start_request (with hooks, the state is set already)
            c.req_done = not has_body
            c.state = C_BODY if has_body else C_WAIT
            if has_body:
                c._body_wait(hp.expect_continue)
        c.upq = []                 # body bytes wait here until the check ends
        self.inflight += 1
        fut = asyncio.get_event_loop().run_in_executor(None, self.checker.check, value)
        fut.add_done_callback(functools.partial(self._checked, c, route, c.nreq, head, value))
        return R_TAKEN

    def _checked(self, ClientConn c, Route route, int nreq, bytes head, bytes value, fut):
        cdef HeadParser hp = _auth_parser
        cdef list rest
        cdef Pool pool
        cdef int r
        self.inflight -= 1
        if c.nreq != nreq or c.transport is None or c.up is not None or c.backend is not None \
                or (c.state != C_WAIT and c.state != C_BODY) or c.resp_started:
            return                 # the request ended meanwhile (the client went away)
        ok = False
        if not fut.cancelled():
            if fut.exception() is not None:
                _tk_log.error("auth_basic: password check failed: %r", fut.exception())
            else:
                ok = fut.result()
        if hp.parse_request(head, len(head), 0, 1 << 16, 1 << 18, MAX_FIELDS_CAP) <= 0 \
                or _set_route_path(hp) < 0:
            c._reply_error(500, 0)     # (never expected: it parsed before)
            return
        if not ok:
            self._deny(c, hp)
            return
        self.checker.remember(value)
        if self.strip is not None:
            _add_req_edits(c, self.strip)
        rest = c.upq
        c.upq = None
        r = _run_after(c, route, self, hp)
        if r != R_GO:
            _append_rest(c, rest)
            return
        pool = route.pool
        if c.ctx is not None:
            pool = <Pool>c.ctx.chain.pools.get(c.ctx._pool, route.pool)
        c._send_to_pool(pool, _request_head(c, hp, <Backend>pool.backends[0]))
        _append_rest(c, rest)


cdef bytes _rebuilt_head(HeadParser hp):
    """The request head hp parsed, as bytes (for a held request)."""
    cdef Scratch o = Scratch()
    cdef size_t i
    o.add(hp.method, hp.method_len)
    o.add(b" ", 1)
    if hp.target_add_slash:
        o.add(b"/", 1)
    o.add(hp.target, hp.target_len)
    o.add(b" HTTP/1.", 8)
    o.add_int(hp.minor)
    o.add(b"\r\n", 2)
    for i in range(hp.nfields):
        if hp.hid[i] == H_HOST and hp.host_from_uri:
            continue
        o.field(hp.fields[i].name, hp.fields[i].name_len, hp.fields[i].value, hp.fields[i].value_len)
    if hp.host_from_uri:
        o.field(b"Host", 4, hp.host, hp.host_len)
    o.add(b"\r\n", 2)
    return o.take()
