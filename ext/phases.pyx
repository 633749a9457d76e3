# The phase pipeline: the named points of a request at which hooks run.
#
# The core (client.pyx, upstream.pyx) owns all I/O and calls the phases in a fixed order:
#   connect -> request -> request_body -> upstream_request -> response ->
#   error (instead of a backend's answer) -> log.
# A PhaseChain holds, per phase, the hooks that define it (global hooks
# first, then the route's), and a bitmask `wants` of the phases anyone
# defines: a call site tests one bit, so a phase nobody defines costs
# nothing, and a route without hooks has no chain at all (Route.phases is
# None).  Hooks see one RequestCtx per request, made of names and values and
# body chunks, never HTTP/1.1 framing.  The Python side (edgeproxy/phases/)
# imports hooks and defines what they may return; docs/hooks.md is the API.

import functools

cdef object _hook_log = logging.getLogger("edgeproxy.hooks")
cdef object _Headers = None      # edgeproxy.phases.headers.Headers (imported on first use)
cdef object _Response = None     # edgeproxy.phases.load.Response

cdef enum PhaseId:
    PHASE_CONNECT = 0
    PHASE_REQUEST
    PHASE_REQUEST_BODY
    PHASE_UPSTREAM_REQUEST
    PHASE_RESPONSE
    PHASE_RESPONSE_BODY
    PHASE_ERROR
    PHASE_LOG
    PHASE_COUNT

# who sees a response body as it streams (ClientConn.tap)
cdef enum:
    TAP_STAGE = 1      # the request's compiled Stage (the cache)
    TAP_HOOKS = 2      # Python response_body hooks

# what running one phase's hooks came to
cdef enum Verdict:
    PH_GO = 0          # every hook let the request go on
    PH_ANSWERED        # a hook answered (or failed): ctx.answer is the Response
    PH_HELD            # an async hook runs; the core resumes when it ends

# what a compiled Phase's request hook came to (ClientConn._start_request
# returns the first two as they are)
cdef enum:
    R_ANSWERED = -1    # answered (or closed)
    R_TAKEN = 0        # sent on, or held: the phase goes on with it
    R_GO = 1           # nothing to do: the core forwards the request as usual


cdef class Phase:
    """A compiled phase of a route (Route.phase): its request hook runs after
    the Python hooks', and may make the request's Stage."""

    cdef int request(self, ClientConn c, Route route, HeadParser hp) except -2:
        return R_GO


cdef class Stage:
    """A compiled phase's part in one request, made by its request hook
    (Envoy's per-request filter): the core calls it at the response's
    points.  body() gets the response body while ClientConn.tap is set."""

    cdef bytes response(self, ClientConn c, HeadParser hp, UpstreamConn u, bint whole):
        """The backend's head arrived (`whole`: with all of its body, well
        framed): field lines to add to the client's head (or None).  It may
        answer instead (then c.up is not u)."""
        return None

    cdef void body(self, object data):
        pass

    cdef void end(self, bint whole):
        """The response ended whole, or broke off (or never came)."""
        pass

    cdef void error(self, ClientConn c, int status):
        """The backend failed (502/503/504) before answering: may answer."""
        pass


cdef class BodyFilter:
    """Replaces the response body the core splices to the client (the
    compression phase's): a Stage's response() sets it as ClientConn.xform
    for the response whose head it sees.  The core then calls head() once
    the client's head is in _out (to edit it there), data() with the
    backend's body bytes (framing removed) instead of writing them, and
    end() when the backend's body is complete; the filter writes what the
    client gets, framed (chunked for HTTP/1.1; close-delimited for 1.0)."""

    cdef void head(self, ClientConn c):
        pass

    cdef void data(self, ClientConn c, const char *p, size_t n):
        pass

    cdef void end(self, ClientConn c):
        pass

    cdef list cache_fields(self, list fields):
        """The fields (name, value) a cache stage stores for this response."""
        return fields


cdef class PhaseSeq(Phase):
    """Several compiled phases of one route, run in order (built by
    edgeproxy.proxy.compiled): the first that does not return R_GO decides;
    the cache, which always takes the request, comes last."""
    cdef readonly tuple items

    def __init__(self, items):
        self.items = tuple(items)
        for p in self.items:
            if not isinstance(p, Phase):
                raise TypeError(f"not a compiled Phase: {p!r}")

    cdef int request(self, ClientConn c, Route route, HeadParser hp) except -2:
        cdef Phase p
        cdef int r
        for p in self.items:
            r = p.request(c, route, hp)
            if r != R_GO:
                return r
        return R_GO


cdef class StageSeq(Stage):
    """The stages several compiled phases left on one request, called in
    the order they were added (see _add_stage)."""
    cdef list items

    def __init__(self, items):
        self.items = list(items)

    cdef bytes response(self, ClientConn c, HeadParser hp, UpstreamConn u, bint whole):
        cdef Stage st
        cdef bytes extra
        cdef list out = None
        for st in self.items:
            extra = st.response(c, hp, u, whole)
            if c.up is not u:
                return None          # that stage answered instead
            if extra:
                if out is None:
                    out = []
                out.append(extra)
                # the stages after it (the cache) see what the client will get
                c.added_fields = b"".join(out)
        return b"".join(out) if out is not None else None

    cdef void body(self, object data):
        cdef Stage st
        for st in self.items:
            st.body(data)

    cdef void end(self, bint whole):
        cdef Stage st
        for st in self.items:
            st.end(whole)

    cdef void error(self, ClientConn c, int status):
        cdef Stage st
        for st in self.items:
            st.error(c, status)
            if c.state != C_WAIT and c.state != C_BODY:
                return               # that stage answered


cdef void _add_stage(ClientConn c, Stage st):
    """Leave st on c's current request beside the stages already there
    (a compiled phase's request hook calls this; the cache's does)."""
    if c.stage is None:
        c.stage = st
    elif type(c.stage) is StageSeq:
        (<StageSeq>c.stage).items.append(st)
    else:
        c.stage = StageSeq([c.stage, st])


_PHASE_NAMES = ("connect", "request", "request_body", "upstream_request", "response",
                "response_body", "error", "log")
# the core's own fields: hooks see the framing as the core will write it
_PROTECTED_UP = frozenset(("content-length", "transfer-encoding", "connection"))
_PROTECTED_RESP = frozenset(("content-length", "transfer-encoding", "connection"))


cdef inline void _import_api():
    global _Headers, _Response
    if _Headers is None:
        from edgeproxy.phases.headers import Headers
        from edgeproxy.phases.load import Response
        _Headers = Headers
        _Response = Response


@cython.final
cdef class HookCall:
    """One phase method of one hook object."""
    cdef readonly str name          # "myapp.edge:RequireToken.request", for logs
    cdef readonly object fn
    cdef readonly bint is_async

    def __init__(self, str name, object fn, bint is_async):
        self.name = name
        self.fn = fn
        self.is_async = is_async


@cython.final
cdef class PhaseChain:
    """The hooks of one route (or of the listeners' connect phase), by phase."""
    cdef readonly int wants           # a bit per phase with at least one hook
    cdef readonly tuple by_phase      # PHASE_COUNT lists of HookCall
    cdef readonly dict pools          # name -> Pool, for ctx.pool
    cdef readonly double timeout      # seconds per hook call
    cdef readonly long long body_limit
    cdef readonly object loop

    def __init__(self, hooks, dict pools, double timeout=1.0, long long body_limit=1 << 20,
                 loop=None):
        """hooks: [(spec, object)] in order; each object's phase methods are
        wired (only those it defines)."""
        cdef list lists = [[] for _ in range(PHASE_COUNT)]
        cdef int i
        self.wants = 0
        for spec, obj in hooks:
            for i in range(<int>PHASE_COUNT):
                fn = getattr(obj, _PHASE_NAMES[i], None)
                if fn is None or not callable(fn):
                    continue
                lists[i].append(HookCall(f"{spec}.{_PHASE_NAMES[i]}", fn,
                                         asyncio.iscoroutinefunction(fn)))
                self.wants |= 1 << i
        # the response side runs in reverse: the hooks nearest the backend first
        for i in (PHASE_RESPONSE, PHASE_RESPONSE_BODY, PHASE_ERROR):
            lists[i].reverse()
        self.by_phase = tuple(lists)
        self.pools = pools
        self.timeout = timeout
        self.body_limit = body_limit
        self.loop = loop

    def wants_phase(self, str name):
        return bool(self.wants & (1 << _PHASE_NAMES.index(name)))


@cython.freelist(64)
@cython.final
cdef class RequestCtx:
    """What every phase of one request sees (docs/hooks.md)."""
    cdef readonly str client_ip
    cdef readonly str scheme          # "http" or "https"
    cdef readonly object route        # the route's index in the config (0-based), or None
    cdef readonly object connection   # the connect phase's ctx (same connection), or None
    cdef readonly object request_id
    cdef dict _vars                   # free for the hooks of this request (made on first use)
    cdef dict _log                    # fields added to this request's access log line
    cdef public object cache_key      # str: the key the cache stores this request under
    cdef public object backend        # "host:port" of the pool's backend to use, or None
    # the request as the hooks see it and may change it
    cdef str _method
    cdef str _target
    cdef str _path                    # the normal form of the target's path, made on first use
    cdef str _host
    cdef str _pool
    cdef object _headers              # Headers, built on first use
    cdef bint changed                 # method, target or pool set by a hook
    # the response, in the response/error/log phases
    cdef public int status
    cdef public object response_headers
    cdef readonly double duration
    cdef readonly long long bytes_in
    cdef readonly long long bytes_out
    cdef readonly str upstream        # the backend that answered, or None
    # the core's bookkeeping
    cdef PhaseChain chain
    cdef bytes raw_head               # the client's head, parsed into headers on first use
    cdef object task                  # the async hook in progress
    cdef object timer
    cdef bint timed_out
    cdef HookCall held                # the async hook in progress
    cdef int phase                    # where a held chain resumes
    cdef Py_ssize_t index
    cdef object answer                # the Response a hook answered with
    cdef object arg                   # the second argument of the held phase (request_body)
    cdef int error_status             # the 502/503/504 the error phase is about
    cdef bint error_keep
    cdef bint in_error
    cdef bint body_wait               # the request phase is done; request_body waits for the body
    cdef long long clen               # the request's Content-Length (B_LENGTH)
    cdef bint drop_expect             # the proxy answered "Expect: 100-continue" itself
    cdef public object upstream_headers  # Headers of the head the backend gets (upstream_request)
    cdef bint resp_changed            # the response hooks changed the status or fields
    cdef bint resp_seen               # the response phase ran (once per request)
    cdef bint body_chunked            # the body the hooks see comes chunk-framed: decode it
    cdef ChunkState bchunk            # that decoding
    cdef bint body_ended              # response_body hooks had their last call

    @property
    def vars(self):
        """A dict free for the hooks of this request."""
        if self._vars is None:
            self._vars = {}
        return self._vars

    @property
    def log(self):
        """Fields added to this request's access log line."""
        if self._log is None:
            self._log = {}
        return self._log

    @property
    def method(self):
        return self._method

    @method.setter
    def method(self, str value):
        if not value or not all(c in _TCHARS for c in value):
            raise ValueError(f"invalid method {value!r}")
        self._method = value
        self.changed = 1

    @property
    def target(self):
        """The request target as the client sent it (path and query)."""
        return self._target

    @target.setter
    def target(self, str value):
        if not value.startswith("/") or any(c <= " " or c == "\x7f" for c in value):
            raise ValueError(f"invalid request target {value!r} (must start with / and "
                             "have no spaces or control characters)")
        value.encode("latin-1")
        self._target = value
        self._path = None
        self.changed = 1

    @property
    def path(self):
        """The path in its normal form, as routing saw it (docs/parser-contract.md:
        `/x/../admin/` and `/%61dmin/` are `/admin/`): match rules on this."""
        if self._path is None:
            raw = self._target.partition("?")[0]
            try:
                self._path = normalize_path(raw.encode("latin-1")).decode("latin-1")
            except Exception:    # no normal form: routing would have refused it
                self._path = raw
        return self._path

    @property
    def query(self):
        return self._target.partition("?")[2]

    @property
    def host(self):
        return self._host

    @property
    def pool(self):
        """The pool the request goes to; set it to another pool's name."""
        return self._pool

    @pool.setter
    def pool(self, str value):
        if self.chain is None or value not in self.chain.pools:
            raise ValueError(f"no pool named {value!r}")
        self._pool = value
        self.changed = 1

    @property
    def headers(self):
        """The request's fields (Headers): the client's, in order."""
        if self._headers is None:
            _import_api()
            self._headers = _Headers(_split_head_fields(self.raw_head) if self.raw_head else (),
                                     _PROTECTED_UP)
        return self._headers

    cdef inline bint modified(self):
        return self.changed or (self._headers is not None and self._headers.changed)

    def __repr__(self):
        return f"<RequestCtx {self._method} {self._host}{self._target}>"


cdef HeadParser _hook_parser = HeadParser()   # re-checks heads the hooks changed


cdef void _cancel_held(RequestCtx ctx):
    if ctx.timer is not None:
        ctx.timer.cancel()
        ctx.timer = None
    if ctx.task is not None:
        ctx.task.cancel()
        ctx.task = None


def _log_task_done(HookCall h, object timer, object task):
    timer.cancel()
    if task.cancelled():
        _m[M_HOOK_TIMEOUTS] += 1
        _hook_log.error("hook %s: no answer within its time budget", h.name)
        return
    exc = task.exception()
    if exc is not None:
        _m[M_HOOK_ERRORS] += 1
        _hook_log.error("hook %s failed: %s: %s", h.name, type(exc).__name__, exc,
                        exc_info=(type(exc), exc, exc.__traceback__))


cdef void _log_task(RequestCtx ctx, HookCall h, object coro):
    """An async log hook runs on its own, within the time budget; nothing waits for it."""
    loop = ctx.chain.loop
    task = loop.create_task(coro)
    timer = loop.call_later(ctx.chain.timeout, task.cancel)
    task.add_done_callback(functools.partial(_log_task_done, h, timer))


cdef str _TCHARS = "!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"


cdef void _hook_failed(RequestCtx ctx, HookCall h, object exc):
    """A hook raised or returned nonsense: 500 to the client, the traceback to the log."""
    _m[M_HOOK_ERRORS] += 1
    _hook_log.error("hook %s failed: %s: %s", h.name, type(exc).__name__, exc,
                    exc_info=(type(exc), exc, exc.__traceback__))
    ctx.answer = _Response(500, b"500 Internal Server Error\n",
                           {"Content-Type": "text/plain; charset=utf-8"})


cdef int _verdict(RequestCtx ctx, HookCall h, object r) except -1:
    """PH_GO for None, PH_ANSWERED for a Response (or a failure)."""
    if r is None:
        return PH_GO
    _import_api()
    if type(r) is _Response or isinstance(r, _Response):
        ctx.answer = r
        return PH_ANSWERED
    if ctx.phase == PHASE_CONNECT and r is False:
        ctx.answer = False
        return PH_ANSWERED
    _hook_failed(ctx, h, TypeError(f"returned {r!r}; a hook returns None or a Response"))
    return PH_ANSWERED


cdef int _run_phase(RequestCtx ctx, int phase, Py_ssize_t start, object arg, object done) except -1:
    """Call the phase's hooks from `start` on, in order, until one answers
    or is async (then `done(task)` runs when it ends: see ClientConn._hook_done)."""
    cdef list hooks = <list>ctx.chain.by_phase[phase]
    cdef HookCall h
    cdef Py_ssize_t i
    cdef int v
    ctx.phase = phase
    for i in range(start, len(hooks)):
        h = <HookCall>hooks[i]
        try:
            r = h.fn(ctx) if arg is None else h.fn(ctx, arg)
        except Exception as exc:
            _import_api()
            _hook_failed(ctx, h, exc)
            return PH_ANSWERED
        if h.is_async:
            ctx.index = i
            ctx.held = h
            ctx.arg = arg
            ctx.timed_out = 0
            ctx.task = ctx.chain.loop.create_task(r)
            ctx.timer = ctx.chain.loop.call_later(ctx.chain.timeout, _hook_timeout, ctx)
            ctx.task.add_done_callback(done)
            return PH_HELD
        v = _verdict(ctx, h, r)
        if v != PH_GO:
            return v
    return PH_GO


def _hook_timeout(RequestCtx ctx):
    if ctx.task is not None and not ctx.task.done():
        ctx.timed_out = 1
        ctx.task.cancel()


cdef int _held_result(RequestCtx ctx, object task) except -1:
    """The verdict of the async hook that just ended (the chain goes on
    from the next hook when it is PH_GO)."""
    cdef HookCall h = ctx.held
    if ctx.timer is not None:
        ctx.timer.cancel()
        ctx.timer = None
    ctx.task = None
    ctx.held = None
    _import_api()
    if task.cancelled():
        _m[M_HOOK_TIMEOUTS] += 1
        _hook_log.error("hook %s: no answer within %.3gs", h.name, ctx.chain.timeout)
        ctx.answer = _Response(503, b"503 Service Unavailable\n",
                               {"Content-Type": "text/plain; charset=utf-8"})
        return PH_ANSWERED
    exc = task.exception()
    if exc is not None:
        _hook_failed(ctx, h, exc)
        return PH_ANSWERED
    return _verdict(ctx, h, task.result())


cdef bytes _answer_head(object r, bint has_date):
    """The status line and fields of a hook's Response (without the blank
    line; respond() adds the core's fields and the framing)."""
    cdef int status = r.status
    cdef list out = [b"HTTP/1.1 %d %s\r\n" % (status, _REASONS.get(status, b"Unknown"))]
    for name, value in r.headers:
        out.append(b"%s: %s\r\n" % (name.encode("latin-1"), value.encode("latin-1")))
    if has_date:
        out.append(_date_line)
    out.append(b"Content-Length: %d\r\n" % len(r.body))
    return b"".join(out)


cdef bytes _ctx_request_head(RequestCtx ctx, int minor, int body_kind, long long clen):
    """The request as the hooks left it, as an HTTP/1.x head for the
    strict parser (it goes through the same checks and rewriting as a
    client's): the framing is the client's, whatever the hooks did."""
    cdef list out = [b"%s %s HTTP/1.%d\r\n" % (ctx._method.encode("latin-1"),
                                              ctx._target.encode("latin-1"), minor)]
    cdef bint has_host = 0
    for name, value in ctx.headers:
        low = name.lower()
        if low in _PROTECTED_UP:
            if low != "connection":
                continue
        elif low == "host":
            has_host = 1
        elif low == "expect" and ctx.drop_expect:
            continue
        out.append(b"%s: %s\r\n" % (name.encode("latin-1"), value.encode("latin-1")))
    if not has_host and ctx._host:
        out.append(b"Host: %s\r\n" % ctx._host.encode("latin-1"))
    if body_kind == B_LENGTH:
        out.append(b"Content-Length: %d\r\n" % clen)
    elif body_kind == B_CHUNKED:
        out.append(b"Transfer-Encoding: chunked\r\n")
    out.append(b"\r\n")
    return b"".join(out)


cdef int _ctx_response_into(Scratch o, RequestCtx ctx, HeadParser hp, HeadEdits ed) except -1:
    """The status line and fields of a response as the response hooks left
    them; 1 when they have a Date.  A bodiless response (HEAD, 304) keeps
    the Content-Length the backend announced."""
    cdef size_t i
    cdef int has_date = 0
    cdef bytes b
    o.add(b"HTTP/1.1 ", 9)
    o.add_int(ctx.status)
    o.add(b" ", 1)
    if ctx.status == hp.status and hp.reason_len:
        o.add(hp.reason, hp.reason_len)
    else:
        o.addb(_REASONS.get(ctx.status, b"Unknown"))
    o.add(b"\r\n", 2)
    for name, value in ctx.response_headers:
        if name.lower() == "date":
            has_date = 1
        b = name.encode("latin-1")
        if ed is not None and ed.drops(b, len(b)):
            continue           # a response rule's (ext/toolkit.pyx)
        b = b"%s: %s\r\n" % (b, value.encode("latin-1"))
        o.addb(b)
    if hp.body == B_NONE:
        for i in range(hp.nfields):
            if hp.hid[i] == H_CONTENT_LENGTH:
                o.field(hp.fields[i].name, hp.fields[i].name_len,
                        hp.fields[i].value, hp.fields[i].value_len)
    return has_date


cdef object _own_answer_phase(ClientConn c, bytes head, object body, int status):
    """The response phase for an answer the proxy makes itself (the cache's,
    a hook's, an error): head is its status line and fields.  None when the
    hooks changed nothing, else (head, body, status, answered): answered
    when a hook gave a Response in its place."""
    cdef RequestCtx ctx = c.ctx
    cdef int v
    cdef list out
    _import_api()
    ctx.resp_seen = 1
    ctx.status = status
    hdrs = _Headers(_split_head_fields(head), _PROTECTED_RESP)
    ctx.response_headers = hdrs
    v = _run_phase(ctx, PHASE_RESPONSE, 0, None, None)
    if v == PH_GO and not (200 <= ctx.status <= 599):
        _m[M_HOOK_ERRORS] += 1
        _hook_log.error("a response hook set status %r (200-599 only)", ctx.status)
        ctx.answer = _Response(500, b"500 Internal Server Error\n")
        v = PH_ANSWERED
    if v == PH_ANSWERED:
        r = ctx.answer
        ctx.answer = None
        return (_answer_head(r, 1), b"" if c.req_is_head else <bytes>r.body, r.status, True)
    if not hdrs.changed and ctx.status == status:
        return None
    out = [head[:head.index(b"\r\n") + 2] if ctx.status == status else
           b"HTTP/1.1 %d %s\r\n" % (ctx.status, _REASONS.get(ctx.status, b"Unknown"))]
    for name, value in hdrs:
        out.append(b"%s: %s\r\n" % (name.encode("latin-1"), value.encode("latin-1")))
    return (b"".join(out), body, ctx.status, False)


cdef bytes _own_error_bytes(ClientConn c, bytes resp, tuple t, bint keep):
    """A canned error (resp, from _error_response) as the response hooks
    changed it (t, from _own_answer_phase)."""
    cdef bytes body = resp[resp.index(b"\r\n\r\n") + 4:]
    if not t[3]:
        return <bytes>t[0] + b"\r\n" + body
    return b"".join((<bytes>t[0], c.cfg.server_line, c.lst.resp_extra,
                     b"" if keep else b"Connection: close\r\n", b"\r\n", <bytes>t[1]))


cdef object _split_head_fields(bytes head):
    """The fields of a head the core built ([(name, value)] as str)."""
    cdef list items = []
    for line in head.split(b"\r\n")[1:]:
        if not line:
            break
        name, _, value = line.partition(b":")
        items.append((name.decode("latin-1"), value.strip().decode("latin-1")))
    return items


cdef bytes _decoded_body(bytes raw, int body_kind):
    """The data of a request body as it came (chunk framing removed)."""
    cdef ChunkState st
    cdef Py_ssize_t m
    cdef size_t off = 0, so, sl, n = len(raw)
    cdef const char *p = raw
    cdef list parts
    if body_kind != B_CHUNKED:
        return raw
    parts = []
    chunk_init(&st, CHUNK_LINE_MAX, 1 << 20)
    while off < n:
        m = chunk_step(&st, p + off, n - off, &so, &sl)
        if m <= 0:
            break
        if sl:
            parts.append(p[off + so:off + so + sl])
        off += <size_t>m
        if st.phase == CS_DONE:
            break
    return b"".join(parts)


# ---- the core's side of the phases (called from ClientConn) ----------------

cdef RequestCtx _new_ctx(ClientConn c, PhaseChain ch):
    cdef RequestCtx ctx = RequestCtx.__new__(RequestCtx)
    ctx.chain = ch
    if c.peer_str is None:
        c.peer_str = c.peer.decode("latin-1")
    ctx.client_ip = c.peer_str
    ctx.scheme = "https" if c.lst.proto == b"https" else "http"
    return ctx


cdef void _connect_phase(ClientConn c):
    cdef RequestCtx ctx = _new_ctx(c, c.lst.phases)
    cdef int v
    c.conn_ctx = ctx
    v = _run_phase(ctx, PHASE_CONNECT, 0, None, c._hook_done)
    if v == PH_HELD:
        c._pause(P_HOLD)
    elif v == PH_ANSWERED:
        _phase_went(c, ctx, PHASE_CONNECT, v)


cdef int _start_phased(ClientConn c, Route route, HeadParser hp, const char *head) except -2:
    """A request on a route with hooks: the request phase, then (after
    the body, for request_body hooks) the forward."""
    cdef PhaseChain ch = route.phases
    cdef RequestCtx ctx = _new_ctx(c, ch)
    cdef bint has_body = not (hp.body == B_NONE or (hp.body == B_LENGTH and hp.content_length == 0))
    cdef int v = PH_GO
    ctx.route = route.index - 1
    ctx.connection = c.conn_ctx
    ctx._method = hp.method[:hp.method_len].decode("latin-1")
    ctx._target = ("/" if hp.target_add_slash else "") + hp.target[:hp.target_len].decode("latin-1")
    ctx._host = hp.host[:hp.host_len].decode("latin-1") if hp.has_host else ""
    ctx._pool = route.pool.name
    ctx.clen = hp.content_length if hp.body == B_LENGTH else 0
    ctx.raw_head = PyBytes_FromStringAndSize(head, hp.head_len)
    if _rpath_changed:       # rules match on the path routing used
        ctx._path = _rpath[:_rpath_len].decode("latin-1")
    c.ctx = ctx
    c.route = route
    c.req_done = not has_body
    c.state = C_BODY if has_body else C_WAIT
    if has_body:
        c._body_wait(hp.expect_continue)
    c.upq = []              # body bytes wait here while the hooks decide
    if has_body and ch.wants & (1 << PHASE_REQUEST_BODY):
        c.body_buf = bytearray()
        if hp.expect_continue and c.req_minor == 1:
            # the body is read here before a backend is asked: say so now
            # (as nginx does when it reads the body itself)
            c.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            c.expect_wait = 0
            c.deadline = _now + c.cfg.t_body
            ctx.drop_expect = 1
    if ch.wants & (1 << PHASE_REQUEST):
        v = _run_phase(ctx, PHASE_REQUEST, 0, None, c._hook_done)
    if v == PH_HELD:
        return 0
    if v == PH_ANSWERED:
        _phase_answer(c, ctx)
        return -1
    return _after_request_phase(c, ctx, hp)


cdef int _after_request_phase(ClientConn c, RequestCtx ctx, HeadParser hp) except -2:
    """The request hooks let it go on: wait for the body when request_body
    hooks want it, then forward.  hp: the live head, or None (rebuilt
    from the context)."""
    if c.body_buf is not None:
        if not c.req_done:
            ctx.body_wait = 1      # _body_done goes on
            return 0
        return _request_body_phase(c)
    return _forward_phased(c, ctx, hp)


cdef int _request_body_phase(ClientConn c) except -2:
    cdef RequestCtx ctx = c.ctx
    cdef bytes raw = bytes(c.body_buf)
    cdef int v
    ctx.body_wait = 0
    c.body_buf = None
    c.upq = [raw] if raw else []
    v = _run_phase(ctx, PHASE_REQUEST_BODY, 0, _decoded_body(raw, c.body_kind), c._hook_done)
    if v == PH_HELD:
        return 0
    if v == PH_ANSWERED:
        _phase_answer(c, ctx)
        return -1
    return _forward_phased(c, ctx, None)


cdef int _forward_phased(ClientConn c, RequestCtx ctx, HeadParser hp) except -2:
    """Send the request as the hooks left it to its pool (or the cache)."""
    cdef Route route = c.route
    cdef Pool pool
    cdef Backend b = None
    cdef bytes src = None
    cdef bytes head
    cdef list rest = c.upq
    cdef int r
    if hp is None or ctx.modified():
        # the strict parser checks what the hooks made, as it checks clients
        src = _ctx_request_head(ctx, c.req_minor, c.body_kind, ctx.clen)
        hp = _hook_parser
        if hp.parse_request(src, len(src), 0, 1 << 16, 1 << 18, MAX_FIELDS_CAP) <= 0:
            _m[M_HOOK_ERRORS] += 1
            _hook_log.error("hooks made an invalid request head (%s): %r",
                            (<bytes>hp.err_msg).decode() if hp.err_msg != NULL else "incomplete",
                            src[:200])
            ctx.answer = _Response(500, b"500 Internal Server Error\n")
            _phase_answer(c, ctx)
            return -1
        c.req_is_head = hp.method_len == 4 and memcmp(hp.method, b"HEAD", 4) == 0
        if _set_route_path(hp) < 0:
            # the target a hook set has no normal form (an escaped slash, ..)
            _m[M_HOOK_ERRORS] += 1
            _hook_log.error("hooks set a target that is refused: %s", (<bytes>hp.err_msg).decode())
            ctx.answer = _Response(500, b"500 Internal Server Error\n")
            _phase_answer(c, ctx)
            return -1
    pool = <Pool>ctx.chain.pools.get(ctx._pool, route.pool)
    c.hkey = pool.key_of(c, hp) if pool.algo == BAL_HASH else 0
    c.req_idem = hp.body == B_NONE and _is_idempotent(hp.method, hp.method_len)
    if route.phase is not None and pool is route.pool:
        c.upq = None
        r = route.phase.request(c, route, hp)
        if r != R_GO:
            _append_rest(c, rest)
            return r
        c.upq = rest
    c.pool = pool
    _budget_note_request()
    if ctx.backend is not None:
        b = pool.backend_named(ctx.backend)
        if b is None or not _available(b):
            c._reply_unavailable(1, c.req_done)
            return -1
    else:
        b = pool.pick(c.hkey, 0)
        if b is None and not pool.busy:
            c._reply_unavailable(1, c.req_done)
            return -1
    head = _request_head(c, hp, b if b is not None else <Backend>pool.backends[0])
    ctx.request_id = c.req_id.decode("latin-1") if c.req_id is not None else None
    if ctx.chain.wants & (1 << PHASE_UPSTREAM_REQUEST):
        head = _upstream_phase(c, ctx, head)
        if head is None:
            return -1
    c.upq = None
    r = c._send_picked(pool, b, head)
    _append_rest(c, rest)
    return r


cdef void _append_rest(ClientConn c, list rest):
    """Body bytes that arrived while the hooks ran go after the head."""
    if not rest:
        return
    if c.up is not None and c.up.transport is not None:
        c.up.transport.writelines(rest)
        c._resume(P_CONNECT)
    elif c.upq is not None:
        c.upq.extend(rest)


cdef bytes _upstream_phase(ClientConn c, RequestCtx ctx, bytes head):
    """upstream_request hooks edit the fields of the head the backend gets."""
    cdef int v
    cdef list out
    _import_api()
    hdrs = _Headers(_split_head_fields(head), _PROTECTED_UP)
    ctx.upstream_headers = hdrs
    v = _run_phase(ctx, PHASE_UPSTREAM_REQUEST, 0, None, None)
    if v == PH_ANSWERED:
        _phase_answer(c, ctx)
        return None
    if not hdrs.changed:
        return head
    out = [head[:head.index(b"\r\n") + 2]]
    for name, value in hdrs:
        out.append(b"%s: %s\r\n" % (name.encode("latin-1"), value.encode("latin-1")))
    out.append(b"\r\n")
    return b"".join(out)


cdef bint _response_phase(ClientConn c, HeadParser hp, UpstreamConn u) except -1:
    """response hooks see the status and the fields the client would get;
    1 when one answered instead (u is closed)."""
    cdef RequestCtx ctx = c.ctx
    cdef size_t i
    cdef int v
    cdef list items = []
    _import_api()
    for i in range(hp.nfields):
        if _response_field_kind(hp, i, c.cfg) == RF_KEEP:
            items.append((hp.fields[i].name[:hp.fields[i].name_len].decode("latin-1"),
                          hp.fields[i].value[:hp.fields[i].value_len].decode("latin-1")))
    ctx.resp_seen = 1
    ctx.status = hp.status
    ctx.response_headers = _Headers(items, _PROTECTED_RESP)
    v = _run_phase(ctx, PHASE_RESPONSE, 0, None, None)
    if v == PH_GO and not (200 <= ctx.status <= 599):
        _m[M_HOOK_ERRORS] += 1
        _hook_log.error("a response hook set status %r (200-599 only)", ctx.status)
        ctx.answer = _Response(500, b"500 Internal Server Error\n")
        v = PH_ANSWERED
    if v == PH_ANSWERED:
        u.client = None
        u.close()
        c.up = None
        _phase_answer(c, ctx)
        return 1
    ctx.resp_changed = ctx.response_headers.changed or ctx.status != hp.status
    return 0


cdef bint _error_phase(ClientConn c, int status, bint keep, object retry_after) except -1:
    """error hooks may answer a 502/503/504; 1 when answered or held."""
    cdef RequestCtx ctx = c.ctx
    cdef int v
    ctx.in_error = 1
    ctx.error_status = status
    ctx.error_keep = keep
    ctx.status = status
    if c.up is not None:
        c.up.client = None
        c.up.close()
        c.up = None
    c.upq = None
    c.body_buf = None
    c.queued = 0
    v = _run_phase(ctx, PHASE_ERROR, 0, None, c._hook_done)
    ctx.arg = retry_after
    if v == PH_GO:
        return 0
    if v == PH_ANSWERED:
        _phase_answer(c, ctx)
    return 1


cdef void _phase_went(ClientConn c, RequestCtx ctx, int phase, int v):
    """Go on after an async hook's phase ended with v (PH_GO, PH_ANSWERED)."""
    cdef object owner
    if phase == PHASE_CONNECT:
        if v == PH_GO:
            c._resume(P_HOLD)
            if c.pending is not None:
                owner = c.pending
                c.pending = None
                c._feed(owner, PyByteArray_AS_STRING(owner), len(owner))
        else:
            c.conn_ctx = None
            c.close()     # refused: nothing was asked yet, nothing to answer
        return
    if v == PH_ANSWERED:
        _phase_answer(c, ctx)
    elif phase == PHASE_REQUEST:
        _after_request_phase(c, ctx, None)
    elif phase == PHASE_REQUEST_BODY:
        _forward_phased(c, ctx, None)
    elif phase == PHASE_ERROR:
        if ctx.error_status == 503 and ctx.arg is not None:
            c._reply_unavailable(<int>ctx.arg, ctx.error_keep)
        else:
            c._reply_error(ctx.error_status, ctx.error_keep)


cdef void _phase_answer(ClientConn c, RequestCtx ctx):
    """Answer with the Response a hook gave (or the 500/503 of one that failed)."""
    cdef object r = ctx.answer
    cdef bytes head, body
    cdef int status
    cdef Backend b
    cdef Scratch o
    ctx.answer = None
    c.body_buf = None
    if c.up is not None:
        c.up.client = None
        c.up.close()
        c.up = None
    if c.backend is not None:
        b = c.backend
        c.backend = None
        b.release()
    c.upq = None
    c.queued = 0
    if c.stage is not None:
        c._stage_end(0)
    head = _answer_head(r, 1)
    body = b"" if c.req_is_head else <bytes>r.body
    status = r.status
    if c.req_done:
        c.respond(head, body, r.status)
        return
    # the body is unread: answer, then close without losing the answer
    if c.transport is None or c.state >= C_LINGER or c.resp_started:
        c.close()
        return
    if ctx.chain.wants & (1 << PHASE_RESPONSE) and not ctx.resp_seen:
        t = _own_answer_phase(c, head, body, r.status)
        if t is not None:
            head, body, status = t[0], t[1], t[2]
    o = _out
    o.n = 0
    o.addb(head)
    o.addb(c.cfg.server_line)
    o.addb(c.lst.resp_extra)
    o.add(b"Connection: close\r\n\r\n", 21)
    c.resp_status = status
    c.resp_started = 1
    c.resp_head_len = o.n
    c.resp_bytes = len(body)
    o.addb(body)
    c.transport.write(o.take())
    if c.in_req:
        c._request_end(status)
    c._linger()


cdef void _log_phase(ClientConn c, RequestCtx ctx, int status, double d):
    cdef HookCall h
    ctx.status = status
    ctx.duration = d
    ctx.bytes_in = c.req_bytes
    ctx.bytes_out = c.resp_head_len + c.resp_bytes
    ctx.upstream = c.backend.name if c.backend is not None else None
    for h in <list>ctx.chain.by_phase[PHASE_LOG]:
        try:
            r = h.fn(ctx)
            if h.is_async:
                _log_task(ctx, h, r)
        except Exception as exc:
            _m[M_HOOK_ERRORS] += 1
            _hook_log.error("hook %s failed: %s: %s", h.name, type(exc).__name__, exc,
                            exc_info=(type(exc), exc, exc.__traceback__))


cdef void _drop_ctx(ClientConn c):
    """The request ends: an async hook still running is cancelled."""
    cdef RequestCtx ctx = c.ctx
    c.ctx = None
    c.body_buf = None
    if ctx is not None and ctx.task is not None:
        _cancel_held(ctx)


# ---- response_body: Python hooks see the body as it streams ------------------

cdef void _hooks_body_start(ClientConn c, bint chunked):
    cdef RequestCtx ctx = c.ctx
    ctx.body_chunked = chunked
    ctx.body_ended = 0
    if chunked:
        chunk_init(&ctx.bchunk, CHUNK_LINE_MAX, c.cfg.resp_max_head)
    c.tap |= TAP_HOOKS


cdef void _hooks_body_call(ClientConn c, bytes data, bint last):
    """response_body(ctx, chunk, last) of every hook, in the response order.
    The body is already on its way: a hook observes it (an error is logged
    and counted, and the response goes on)."""
    cdef RequestCtx ctx = c.ctx
    cdef HookCall h
    if ctx is None or ctx.body_ended:
        return
    if last:
        ctx.body_ended = 1
    for h in <list>ctx.chain.by_phase[PHASE_RESPONSE_BODY]:
        try:
            r = h.fn(ctx, data, last)
            if r is not None:
                raise TypeError(f"returned {r!r}; response_body only observes (None)")
        except Exception as exc:
            _m[M_HOOK_ERRORS] += 1
            _hook_log.error("hook %s failed: %s: %s", h.name, type(exc).__name__, exc,
                            exc_info=(type(exc), exc, exc.__traceback__))


cdef void _hooks_body(ClientConn c, object data):
    """Body bytes as framed on the wire: the hooks get the data alone."""
    cdef RequestCtx ctx = c.ctx
    cdef bytes b = bytes(data)
    cdef const char *p = b
    cdef size_t off = 0, so, sl, n = len(b)
    cdef Py_ssize_t m
    if ctx is None:
        return
    if not ctx.body_chunked:
        if n:
            _hooks_body_call(c, b, 0)
        return
    while off < n and ctx.bchunk.phase != CS_DONE:
        m = chunk_step(&ctx.bchunk, p + off, n - off, &so, &sl)
        if m <= 0:
            return           # the core refuses bad framing on its own path
        if sl:
            _hooks_body_call(c, p[off + so:off + so + sl], 0)
        off += <size_t>m


cdef void _hooks_body_end(ClientConn c):
    c.tap &= ~TAP_HOOKS
    _hooks_body_call(c, b"", 1)


cdef void _hooks_whole_body(ClientConn c, object body):
    """An answer of the proxy's own (a cache hit, a hook's, an error): its
    body in one call."""
    cdef bytes b
    if body is None:
        b = b""
    elif isinstance(body, bytes):
        b = <bytes>body
    else:
        b = b"".join([bytes(x) for x in body])
    if b:
        _hooks_body_call(c, b, 0)
    _hooks_body_call(c, b"", 1)
