"""Reads and checks the toolkit's config values: header rules, rewrites,
redirects, error pages and basic auth.  Each reader is
`read(value, path, base_dir, errors) -> value | None`: it appends
(key path, message) to `errors` for every problem and returns None when
there was one (edgeproxy.config.load wraps them as kinds)."""

from __future__ import annotations

import json
import mimetypes
import os
import re

from edgeproxy.config.model import (
    AuthBasicConfig,
    ErrorPage,
    HeaderRules,
    RedirectConfig,
    RewriteConfig,
)
from edgeproxy.toolkit.auth import HtpasswdError, read_htpasswd

TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
VARIABLE = re.compile(r"\{([^{}]*)\}")
RULE_VARIABLES = ("client_ip", "host", "scheme", "request_id", "route")
REDIRECT_VARIABLES = ("path", "query", "request_uri", "host", "scheme")
REDIRECT_STATUSES = (301, 302, 303, 307, 308)
ERROR_PAGE_MAX = 1 << 20          # bytes; pages are kept in every worker's memory

# fields the core itself writes or frames with: a rule may not touch them
_FRAMING = {"content-length", "transfer-encoding", "connection", "keep-alive", "te",
            "trailer", "upgrade", "proxy-connection"}
_CORE_REQUEST = {"x-forwarded-for": "the proxy writes it (the client's, then this hop)",
                 "x-forwarded-proto": "the proxy writes it", "x-forwarded-host": "the proxy writes it",
                 "forwarded": "the proxy writes it (RFC 7239)",
                 "x-request-id": "the proxy keeps the client's or makes one",
                 "expect": "the proxy handles 100-continue"}
_CORE_RESPONSE = {"date": "the proxy keeps the backend's or writes one",
                  "server": "set server.server_header instead"}


def _key(path: str, name: str) -> str:
    if not re.fullmatch(r"[A-Za-z0-9_-]+", name):
        name = json.dumps(name)
    return f"{path}.{name}"


def _text(value, path, errors, what="a string") -> str | None:
    if not isinstance(value, str):
        errors.append((path, f"expected {what}, got {_show(value)}"))
        return None
    return value


def _show(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, dict):
        return "a table"
    if isinstance(value, list):
        return "an array"
    return repr(value)


def _unknown(value: dict, known: tuple, path: str, errors: list) -> None:
    for name in value:
        if name not in known:
            errors.append((_key(path, name), "unknown key (expected one of "
                           + ", ".join(known) + ")"))


# --- header rules -------------------------------------------------------------

def check_template(text: str, allowed: tuple, path: str, errors: list) -> bool:
    """{name} variables must be known ones; {{ and }} are literal braces."""
    ok = True
    for m in VARIABLE.finditer(text.replace("{{", "").replace("}}", "")):
        if m.group(1) not in allowed:
            errors.append((path, f"unknown variable {{{m.group(1)}}} (known: "
                           + ", ".join("{" + v + "}" for v in allowed) + ")"))
            ok = False
    rest = VARIABLE.sub("", text.replace("{{", "").replace("}}", ""))
    if "{" in rest or "}" in rest:
        errors.append((path, f"{_show(text)} has an unmatched brace (write {{{{ or }}}} for one)"))
        ok = False
    return ok


def _field_name(name, path, errors, side: str, op: str) -> str | None:
    if not isinstance(name, str) or not TOKEN.fullmatch(name):
        errors.append((path, f"{_show(name)} is not a valid field name"))
        return None
    low = name.lower()
    if low in _FRAMING:
        errors.append((path, f"{name} frames the message or the connection: the proxy "
                       "writes it and rules cannot change it"))
        return None
    core = _CORE_REQUEST if side == "request" else _CORE_RESPONSE
    if low in core:
        errors.append((path, f"{name}: {core[low]}"))
        return None
    if low == "host" and (side != "request" or op != "set"):
        errors.append((path, "Host can only be set (toward the backend): "
                       "request_headers.set.Host"))
        return None
    return name


def _field_value(value, path, errors) -> str | None:
    value = _text(value, path, errors)
    if value is None:
        return None
    if re.search(r"[\x00-\x08\x0a-\x1f\x7f]", value):
        errors.append((path, f"{_show(value)} contains CR, LF, NUL or another control character"))
        return None
    if value != value.strip(" \t"):
        errors.append((path, f"{_show(value)} starts or ends with white space"))
        return None
    try:
        value.encode("latin-1")
    except UnicodeEncodeError:
        errors.append((path, f"{_show(value)} is not ISO-8859-1 text (percent-encode it)"))
        return None
    if not check_template(value, RULE_VARIABLES, path, errors):
        return None
    return value


def header_rules(side: str):
    """request_headers / response_headers = { set, add, remove[, always] }."""
    known = ("set", "add", "remove") + (("always",) if side == "response" else ())

    def read(value, path, base_dir, errors):
        if not isinstance(value, dict):
            errors.append((path, f"expected a table {{ {', '.join(known)} }}, got {_show(value)}"))
            return None
        n = len(errors)
        _unknown(value, known, path, errors)
        out = {}
        for op in ("set", "add"):
            items = []
            table = value.get(op, {})
            where = _key(path, op)
            if not isinstance(table, dict):
                errors.append((where, f"expected a table of field = \"value\", got {_show(table)}"))
                continue
            for name, v in table.items():
                at = _key(where, name)
                name = _field_name(name, at, errors, side, op)
                v = _field_value(v, at, errors)
                if name is not None and v is not None:
                    items.append((name, v))
            out[op] = tuple(items)
        removed = []
        rm = value.get("remove", [])
        where = _key(path, "remove")
        if not isinstance(rm, list):
            errors.append((where, f"expected an array of field names, got {_show(rm)}"))
        else:
            for i, name in enumerate(rm):
                name = _field_name(name, f"{where}[{i}]", errors, side, "remove")
                if name is not None:
                    removed.append(name.lower())
        for name, _ in out.get("set", ()) + out.get("add", ()):
            if name.lower() in removed:
                errors.append((where, f"{name} is both removed and set or added"))
        always = value.get("always", False)
        if not isinstance(always, bool):
            errors.append((_key(path, "always"), f"expected true or false, got {_show(always)}"))
        if len(errors) > n:
            return None
        return HeaderRules(set=out["set"], add=out["add"], remove=tuple(removed),
                           always=always)
    return read


# --- rewrites and redirects ----------------------------------------------------

def rewrite(value, path, base_dir, errors):
    """rewrite = { from = "^/api/(.*)", to = "/$1" } (re2 on the routing path)."""
    import re2

    if not isinstance(value, dict):
        errors.append((path, f"expected a table {{ from = \"regex\", to = \"/path\" }}, got {_show(value)}"))
        return None
    n = len(errors)
    _unknown(value, ("from", "to"), path, errors)
    pattern = _text(value.get("from"), _key(path, "from"), errors, "a regular expression")
    to = _text(value.get("to"), _key(path, "to"), errors, "a path with $1..$9")
    rx = None
    if pattern is not None:
        try:
            rx = compile_rewrite(pattern)
        except re2.error as exc:
            why = exc.args[0].decode(errors="replace") if exc.args and isinstance(
                exc.args[0], bytes) else str(exc)
            errors.append((_key(path, "from"), f"{_show(pattern)} is not an RE2 expression: {why}"))
    if to is not None:
        where = _key(path, "to")
        if not to.startswith("/"):
            errors.append((where, f"{_show(to)} must start with \"/\""))
        elif re.search(r"[\x00-\x20\x7f#]", to) or not to.isascii():
            errors.append((where, f"{_show(to)} must be a path (ASCII, no spaces, no fragment)"))
        elif rx is not None:
            for m in re.finditer(r"\$(\$|\d|.?)", to):
                g = m.group(1)
                if g == "$":
                    continue
                if not g.isdigit():
                    errors.append((where, f"{_show(to)}: \"$\" is followed by a group number "
                                   "1-9 (write $$ for a dollar sign)"))
                elif int(g) > rx.groups:
                    errors.append((where, f"{_show(to)} uses ${g} but the expression has "
                                   f"{rx.groups} group{'' if rx.groups == 1 else 's'}"))
    if len(errors) > n or pattern is None or to is None:
        return None
    return RewriteConfig(pattern=pattern, to=to)


def compile_rewrite(pattern: str):
    """The re2 pattern of a rewrite (linear time: never backtracks on a
    client's path); its errors are raised, not logged by re2."""
    import re2

    options = re2.Options()
    options.log_errors = False
    return re2.compile(pattern, options)


def rewrite_parts(to: str) -> tuple:
    """"/x/$1$$" -> ("/x/", 1, "$"): literal strs and group numbers."""
    parts: list = []
    for i, piece in enumerate(re.split(r"\$(\$|\d)", to)):
        if i % 2 == 0:
            if piece:
                parts.append(piece)
        elif piece == "$":
            parts.append("$")
        else:
            parts.append(int(piece))
    return tuple(parts)


def redirect(value, path, base_dir, errors):
    """redirect = { to = "https://example.com{request_uri}", status = 301 }."""
    if not isinstance(value, dict):
        errors.append((path, f"expected a table {{ to = \"URL\", status = 301 }}, got {_show(value)}"))
        return None
    n = len(errors)
    _unknown(value, ("to", "status"), path, errors)
    where = _key(path, "to")
    to = _text(value.get("to"), where, errors, "a URL")
    if to is not None:
        if not to:
            errors.append((where, "empty"))
        elif re.search(r"[\x00-\x20\x7f]", to) or not to.isascii():
            errors.append((where, f"{_show(to)} must be ASCII without spaces or control "
                           "characters (percent-encode them)"))
        else:
            check_template(to, REDIRECT_VARIABLES, where, errors)
    status = value.get("status", 302)
    if isinstance(status, bool) or status not in REDIRECT_STATUSES:
        errors.append((_key(path, "status"), f"{_show(status)} is not one of "
                       + ", ".join(map(str, REDIRECT_STATUSES))))
    if len(errors) > n or to is None:
        return None
    return RedirectConfig(to=to, status=status)


def template_parts(text: str) -> tuple:
    """"https://x{path}" -> (b"https://x", "path"): literal bytes and variable names."""
    parts: list = []
    for i, piece in enumerate(re.split(r"(\{\{|\}\}|\{[^{}]*\})", text)):
        if i % 2 == 0:
            lit = piece
        elif piece in ("{{", "}}"):
            lit = piece[0]
        else:
            parts.append(piece[1:-1])
            continue
        if lit:
            if parts and isinstance(parts[-1], bytes):
                parts[-1] += lit.encode("latin-1")
            else:
                parts.append(lit.encode("latin-1"))
    return tuple(parts)


# --- error pages ---------------------------------------------------------------

def content_type_of(path: str) -> str:
    kind, _ = mimetypes.guess_type(path, strict=False)
    if kind is None:
        return "application/octet-stream"
    if kind.startswith("text/") or kind in ("application/json", "application/xml",
                                             "application/javascript", "image/svg+xml"):
        return kind + "; charset=utf-8"
    return kind


def error_pages(value, path, base_dir, errors):
    """error_pages = { 502 = "pages/502.html" }: statuses 400-599; each file
    read now (at most ERROR_PAGE_MAX bytes)."""
    if not isinstance(value, dict):
        errors.append((path, f"expected a table of status = \"file\", got {_show(value)}"))
        return None
    n = len(errors)
    pages = []
    for status, file in value.items():
        where = _key(path, status)
        if not (status.isdigit() and status.isascii() and 400 <= int(status) <= 599):
            errors.append((where, "the key is an error status, 400 to 599"))
            continue
        file = _text(file, where, errors, "a file path")
        if not file:
            if file == "":
                errors.append((where, "expected a file path, got \"\""))
            continue
        full = os.path.abspath(os.path.join(base_dir, os.path.expanduser(file)))
        try:
            with open(full, "rb") as f:
                body = f.read(ERROR_PAGE_MAX + 1)
        except OSError as exc:
            errors.append((where, f"{_show(file)} cannot be read: {exc.strerror} ({full})"))
            continue
        if len(body) > ERROR_PAGE_MAX:
            errors.append((where, f"{_show(file)} is larger than {ERROR_PAGE_MAX} bytes"))
            continue
        pages.append((int(status), ErrorPage(full, content_type_of(full), body)))
    if len(errors) > n:
        return None
    return tuple(sorted(pages, key=lambda p: p[0]))


# --- basic auth ----------------------------------------------------------------

def auth_basic(value, path, base_dir, errors):
    """auth_basic = { realm = "staff", users = "htpasswd", forward = false }."""
    if not isinstance(value, dict):
        errors.append((path, f"expected a table {{ realm = \"...\", users = \"htpasswd\" }}, "
                       f"got {_show(value)}"))
        return None
    n = len(errors)
    _unknown(value, ("realm", "users", "forward"), path, errors)
    where = _key(path, "realm")
    realm = _text(value.get("realm"), where, errors, "a realm name")
    if realm is not None and (not realm or re.search(r'[\x00-\x1f\x7f"\\]', realm)):
        errors.append((where, f"{_show(realm)} must be non-empty, without quotes, "
                       "backslashes or control characters"))
    where = _key(path, "users")
    users = _text(value.get("users"), where, errors, "an htpasswd file path")
    entries = None
    if users is not None:
        full = os.path.abspath(os.path.join(base_dir, os.path.expanduser(users)))
        try:
            entries = read_htpasswd(full)
        except HtpasswdError as exc:
            errors.append((where, str(exc)))
    forward = value.get("forward", False)
    if not isinstance(forward, bool):
        errors.append((_key(path, "forward"), f"expected true or false, got {_show(forward)}"))
    if len(errors) > n or entries is None or realm is None:
        return None
    return AuthBasicConfig(realm=realm, users=full, entries=entries, forward=forward)
