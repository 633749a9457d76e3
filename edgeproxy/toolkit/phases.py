"""The toolkit's makers (edgeproxy.proxy.compiled.MAKERS): each builds one
compiled phase (ext/toolkit.pyx) for a route that uses its feature, or
None.  Global ([server]) rules and error pages are merged into each route's
here, and the listener-wide defaults (for answers no route made: 404, 400)
come from `defaults`."""

from __future__ import annotations

from edgeproxy._ext import (
    Answers,
    AnswersPhase,
    AuthBasicPhase,
    HeadEdits,
    HeaderRulesPhase,
    RedirectPhase,
    RewritePhase,
)
from edgeproxy.config.model import HeaderRules
from edgeproxy.toolkit.config import compile_rewrite, rewrite_parts, template_parts

# a rule value's variables: the core renders these per request (ext/toolkit.pyx V_*)
_VARS = {"client_ip": 1, "host": 2, "scheme": 3, "request_id": 4}


def route_label(rc) -> str:
    """{route}: the route's host and path, as its metrics label."""
    return f"{rc.host or ''}{rc.path}"


def merged_rules(glob: HeaderRules | None, own: HeaderRules | None) -> HeaderRules | None:
    """The global rules, then the route's: a field the route sets or
    removes drops the global rules for it; `always` is the route's when it
    has rules of its own."""
    if glob is None:
        return own
    if own is None:
        return glob
    mine = {n.lower() for n, _ in own.set} | set(own.remove)
    return HeaderRules(
        set=tuple((n, v) for n, v in glob.set if n.lower() not in mine) + own.set,
        add=tuple((n, v) for n, v in glob.add if n.lower() not in mine) + own.add,
        remove=tuple(n for n in glob.remove if n not in mine) + own.remove,
        always=own.always,
    )


def edits_of(rules: HeaderRules | None, route: str) -> HeadEdits | None:
    """The core's HeadEdits for rules: {route} is filled in now, the other
    variables when the head is written."""
    if rules is None or not (rules.set or rules.add or rules.remove):
        return None
    static = []
    tmpl = []
    for name, value in rules.set + rules.add:
        parts = []
        for p in template_parts(value):
            if isinstance(p, bytes):
                parts.append(p)
            elif p == "route":
                parts.append(route.encode("latin-1"))
            else:
                parts.append(_VARS[p])
        if all(isinstance(p, bytes) for p in parts):
            static.append(name.encode("latin-1") + b": " + b"".join(parts) + b"\r\n")
        else:
            tmpl.append((name.encode("latin-1"), tuple(parts)))
    drop = tuple(n.lower().encode() for n, _ in rules.set) + tuple(n.encode() for n in rules.remove)
    return HeadEdits(drop=drop, add=b"".join(static), tmpl=tmpl or None, always=rules.always)


def pages_of(*tables) -> dict:
    pages: dict = {}
    for table in tables:
        for status, page in table:
            pages[status] = (page.content_type.encode("latin-1"), page.body)
    return pages


def defaults(config):
    """(resp_edits, answers) for answers no route shapes (ProxySettings):
    the global response rules with `always`, the global error pages."""
    s = config.server
    rules = s.response_headers
    edits = edits_of(rules, "") if rules is not None and rules.always else None
    pages = pages_of(s.error_pages)
    return edits, (Answers(pages) if pages else None)


def make_answers(env, rc, index):
    s = env.config.server
    resp = edits_of(merged_rules(s.response_headers, rc.response_headers), route_label(rc))
    pages = pages_of(s.error_pages, rc.error_pages)
    if resp is None and not pages:
        return None
    backend = rc.error_pages_backend or s.error_pages_backend
    return AnswersPhase(resp, Answers(pages, backend) if pages else None)


def make_auth_basic(env, rc, index):
    from edgeproxy.toolkit.auth import Checker

    a = rc.auth_basic
    if a is None:
        return None
    return AuthBasicPhase(Checker(a.entries), a.realm, a.forward)


def make_redirect(env, rc, index):
    r = rc.redirect
    if r is None:
        return None
    return RedirectPhase(r.status, template_parts(r.to))


def make_rewrite(env, rc, index):
    if rc.strip_prefix:
        return RewritePhase(prefix=rc.path.encode("latin-1"))
    if rc.rewrite is not None:
        return RewritePhase(rx=compile_rewrite(rc.rewrite.pattern), to=rewrite_parts(rc.rewrite.to))
    return None


def make_request_headers(env, rc, index):
    s = env.config.server
    req = edits_of(merged_rules(s.request_headers, rc.request_headers), route_label(rc))
    return None if req is None else HeaderRulesPhase(req)
