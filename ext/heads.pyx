# Head rewriting, sans I/O: the proxy's own answers, the one rule for which
# response fields reach the client, and the writers of the head a backend
# gets (from a client's request) and of the head a client gets (from a
# backend's response).  They write into the scratch writer (_out) and read
# only the parser's results and the connection's settings.

cdef dict _REASONS = {
    400: b"Bad Request", 401: b"Unauthorized", 403: b"Forbidden", 404: b"Not Found",
    405: b"Method Not Allowed", 429: b"Too Many Requests",
    408: b"Request Timeout", 413: b"Content Too Large", 414: b"URI Too Long",
    417: b"Expectation Failed", 431: b"Request Header Fields Too Large",
    500: b"Internal Server Error", 501: b"Not Implemented", 502: b"Bad Gateway",
    503: b"Service Unavailable", 504: b"Gateway Timeout",
}


cdef bytes _error_response(ProxySettings cfg, int status, bint keep, bytes extra=b""):
    cdef bytes reason = _REASONS.get(status, b"Error")
    cdef bytes body = b"%d %s\n" % (status, reason)
    return (b"HTTP/1.1 %d %s\r\n%s%s%sContent-Type: text/plain; charset=utf-8\r\n"
            b"Content-Length: %d\r\n%s\r\n%s" % (
                status, reason, cfg.server_line, _date_line, extra, len(body),
                b"" if keep else b"Connection: close\r\n", body))


# How a backend's response field reaches the client (_response_field_kind).
cdef enum:
    RF_DROP = 0       # hop-by-hop, named by Connection, backend identity, configured hidden
    RF_KEEP           # end to end
    RF_FRAMING        # Content-Length, Transfer-Encoding: whoever sends the body frames it
    RF_UPGRADE        # Upgrade: only on a 101


cdef int _response_field_kind(HeadParser hp, size_t i, ProxySettings cfg) except -1:
    """The one rule for which response fields the client gets; forwarded
    heads and stored cache entries both follow it, so nothing the proxy hides
    can come back on a cache hit."""
    cdef unsigned char h = hp.hid[i]
    cdef const char *nm = hp.fields[i].name
    cdef size_t nl = hp.fields[i].name_len
    cdef bytes hidden
    if h == H_OTHER:
        if hp.ntokens and hp.is_conn_token(nm, nl):
            return RF_DROP
        for hidden in cfg.hide:
            if _ieq(nm, nl, hidden, len(hidden)):
                return RF_DROP
        return RF_KEEP
    if h == H_CONTENT_LENGTH or h == H_TRANSFER_ENCODING:
        return RF_FRAMING
    if h == H_UPGRADE:
        return RF_UPGRADE
    if h == H_DATE or h == H_HOST or h == H_EXPECT or h == H_X_FORWARDED_FOR \
            or h == H_FORWARDED or h == H_X_FORWARDED_HOST or h == H_X_FORWARDED_PROTO:
        return RF_KEEP
    return RF_DROP       # Connection, Keep-Alive, TE, Trailer, Proxy-Connection, Server, X-Powered-By...


cdef bytes _request_head(ClientConn c, HeadParser hp, Backend b):
    global _rid_seq
    cdef Scratch o = _out
    cdef size_t i
    cdef unsigned char h
    cdef bint first
    cdef const char *nm
    cdef size_t nl
    cdef size_t rid_at = 0, rid_len = 0
    cdef HeadEdits ed = c.req_edits       # compiled phases' edits (ext/toolkit.pyx), or None
    o.n = 0
    o.add(hp.method, hp.method_len)
    o.add(b" ", 1)
    if c.up_target is not None:
        o.addb(c.up_target)
    else:
        _add_target(o, c.cfg, hp)
    o.add(b" HTTP/1.1\r\n", 11)
    for i in range(hp.nfields):
        h = hp.hid[i]
        nm = hp.fields[i].name
        nl = hp.fields[i].name_len
        if ed is not None and ed.drops(nm, nl):
            continue
        if h == H_OTHER or h == H_EXPECT or h == H_DATE or h == H_SERVER:
            if hp.ntokens and hp.is_conn_token(nm, nl):
                continue
            if c.lst.subject_header is not None and nl == <size_t>len(c.lst.subject_header) \
                    and _icase_eq(nm, c.lst.subject_header, nl):
                continue      # only the proxy may say who the client is
            if nl == 12 and h == H_OTHER and _ieq(nm, nl, b"x-request-id", 12):
                # keep the first well-formed one; drop the rest
                if rid_len or not _valid_request_id(hp.fields[i].value, hp.fields[i].value_len):
                    continue
                rid_at = o.n + 14
                rid_len = hp.fields[i].value_len
        elif h == H_HOST:
            if hp.host_from_uri:
                continue
        elif h == H_UPGRADE:
            if not hp.upgrade:
                continue
        elif h >= H_X_POWERED_BY:
            pass
        else:
            # hop-by-hop, framing and the forwarding fields we rewrite
            continue
        o.field(nm, nl, hp.fields[i].value, hp.fields[i].value_len)
    if ed is not None and ed.drops(b"host", 4):
        pass                  # a rule sets it
    elif hp.host_from_uri:
        o.field(b"Host", 4, hp.host, hp.host_len)
    elif not hp.has_host:
        o.field(b"Host", 4, b.hostport, len(b.hostport))
    if hp.body == B_LENGTH:
        o.add(b"Content-Length: ", 16)
        o.add_int(hp.content_length)
        o.add(b"\r\n", 2)
    elif hp.body == B_CHUNKED:
        o.add(b"Transfer-Encoding: chunked\r\n", 28)
    if hp.upgrade:
        o.add(b"Connection: upgrade\r\n", 21)
    if c.subject is not None:
        o.field(c.lst.subject_header, len(c.lst.subject_header),
                c.subject, len(c.subject))
    if not rid_len:
        _rid_seq += 1
        o.add(b"X-Request-Id: ", 14)
        rid_at = o.n
        o.addb(_rid_prefix)
        o.add(b"-", 1)
        o.add_hex(_rid_seq)
        rid_len = o.n - rid_at
        o.add(b"\r\n", 2)
    if c.cfg.access_log is not None or c.ctx is not None or ed is not None \
            or c.resp_edits is not None:
        c.req_id = PyBytes_FromStringAndSize(o.p + rid_at, rid_len)
    # X-Forwarded-For: what came in, then this client
    o.add(b"X-Forwarded-For: ", 17)
    for i in range(hp.nfields):
        if hp.hid[i] == H_X_FORWARDED_FOR and hp.fields[i].value_len:
            o.add(hp.fields[i].value, hp.fields[i].value_len)
            o.add(b", ", 2)
    o.addb(c.hop)       # (c.peer when the request names no other client)
    o.add(b"\r\nX-Forwarded-Proto: ", 21)
    o.addb(c.lst.proto)
    o.add(b"\r\n", 2)
    if hp.has_host and hp.host_len:
        o.field(b"X-Forwarded-Host", 16, hp.host, hp.host_len)
    # RFC 7239 Forwarded: previous elements, then ours
    o.add(b"Forwarded: ", 11)
    for i in range(hp.nfields):
        if hp.hid[i] == H_FORWARDED and hp.fields[i].value_len:
            o.add(hp.fields[i].value, hp.fields[i].value_len)
            o.add(b", ", 2)
    o.addb(c.fwd_for)
    if hp.has_host and hp.host_len:
        o.add(b";host=\"", 7)
        o.add(hp.host, hp.host_len)
        o.add(b"\"", 1)
    o.add(b";proto=", 7)
    o.addb(c.lst.proto)
    o.add(b"\r\n", 2)
    if ed is not None:
        o.addb(ed.lines(c))
    o.add(b"\r\n", 2)
    return o.take()


cdef bytes _response_head(UpstreamConn u, ClientConn c, HeadParser hp, bint final):
    _response_head_into(u, c, hp, final)
    return _out.take()


cdef void _response_head_into(UpstreamConn u, ClientConn c, HeadParser hp, bint final):
    cdef Scratch o = _out
    cdef int has_date
    cdef ProxySettings cfg = c.cfg
    o.n = 0
    if final and c.ctx is not None and c.ctx.resp_changed:
        has_date = _ctx_response_into(o, c.ctx, hp, c.resp_edits)
    else:
        has_date = _response_fields_into(u, o, c, hp, final)
    if not final:
        if hp.status == 101:
            o.add(b"Connection: upgrade\r\n", 21)
        o.add(b"\r\n", 2)
        return
    if c.resp_edits is not None:      # response rules (ext/toolkit.pyx)
        o.addb(c.resp_edits.lines(c))
    o.addb(cfg.server_line)
    if not has_date:
        o.addb(_date_line)
    o.addb(c.lst.resp_extra)
    if hp.body == B_LENGTH:
        o.add(b"Content-Length: ", 16)
        o.add_int(hp.content_length)
        o.add(b"\r\n", 2)
    elif hp.body == B_CHUNKED and not u.decode:
        o.add(b"Transfer-Encoding: chunked\r\n", 28)
    if not c.resp_keep:
        o.add(b"Connection: close\r\n", 19)
    elif c.req_minor == 0:
        o.add(b"Connection: keep-alive\r\n", 24)
    o.add(b"\r\n", 2)


cdef inline int _response_fields_into(UpstreamConn u, Scratch o, ClientConn c, HeadParser hp, bint final):
    """The status line and the backend's fields the client gets; 1 when
    one of them is Date."""
    cdef size_t i
    cdef unsigned char h
    cdef int kind
    cdef int has_date = 0
    cdef ProxySettings cfg = c.cfg
    cdef HeadEdits ed = c.resp_edits if final else None
    o.add(b"HTTP/1.1 ", 9)
    o.add_int(hp.status)
    o.add(b" ", 1)
    if hp.reason_len:
        o.add(hp.reason, hp.reason_len)
    else:
        o.addb(_REASONS.get(hp.status, b"Unknown"))
    o.add(b"\r\n", 2)
    for i in range(hp.nfields):
        kind = _response_field_kind(hp, i, cfg)
        if kind == RF_DROP:
            continue
        if ed is not None and ed.drops(hp.fields[i].name, hp.fields[i].name_len):
            continue
        h = hp.hid[i]
        if kind == RF_FRAMING:
            # re-sent below when the body has a length; a bodiless final
            # response (HEAD, 304) keeps the length it announces
            if not (h == H_CONTENT_LENGTH and final and hp.body == B_NONE):
                continue
        elif kind == RF_UPGRADE:
            if hp.status != 101:
                continue
        elif h == H_DATE:
            has_date = 1
        o.field(hp.fields[i].name, hp.fields[i].name_len,
                hp.fields[i].value, hp.fields[i].value_len)
    return has_date
