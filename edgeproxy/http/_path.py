"""The routing path: the pure-Python twin of ext/normalize.pyx.

Routes (and every rule that matches on the path) compare the normal form
of a request's path, so that `/x/../admin/`, `/%61dmin/` and `//admin/` all
take the route of `/admin/` (docs/parser-contract.md, "The routing path").
The normal form follows RFC 3986 §6.2.2 and nginx: escapes of unreserved
bytes are decoded, the others written in upper-case hex, duplicate slashes
merged, `.` and `..` segments removed (§5.2.4).  Refused with 400: a
malformed escape, an escaped `/` (never decoded into a separator), an
escaped NUL, a `#`, and a `..` that climbs above the root.

Every scan is linear (`bytes.find`, `bytes.split`); no regular expressions.
The compiled twin must give the same bytes or the same error for any input.
"""
from __future__ import annotations

from edgeproxy.http._pure import ParseError

__all__ = ["normalize_path", "path_is_normal"]

# RFC 3986 §2.3: the bytes whose escapes are decoded.
UNRESERVED = frozenset(b"-._~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")
_HEX = frozenset(b"0123456789abcdefABCDEF")


def _path_of(target: bytes) -> bytes:
    if not target.startswith(b"/"):
        raise ValueError("not an origin-form target")
    query = target.find(b"?")
    return target if query < 0 else target[:query]


def _decode(segment: bytes) -> bytes:
    """One segment with its escapes decoded or upper-cased, or ParseError,
    errors in the order they appear."""
    fragment = segment.find(b"#")
    text = segment if fragment < 0 else segment[:fragment]
    if b"%" in text:
        out = bytearray()
        start = 0
        while (pct := text.find(b"%", start)) >= 0:
            out += text[start:pct]
            hexdigits = text[pct + 1:pct + 3]
            if len(hexdigits) != 2 or not _HEX.issuperset(hexdigits):
                raise ParseError(400, "malformed percent-encoding in the path")
            value = int(hexdigits, 16)
            if value == 0x2F:
                raise ParseError(400, "encoded slash (%2F) in the path")
            if value == 0:
                raise ParseError(400, "encoded NUL (%00) in the path")
            out += bytes((value,)) if value in UNRESERVED else b"%" + hexdigits.upper()
            start = pct + 3
        out += text[start:]
        text = bytes(out)
    if fragment >= 0:
        raise ParseError(400, "fragment (#) in the request target")
    return text


def normalize_path(target: bytes) -> bytes:
    """The routing path of an origin-form target (bytes starting with "/";
    the query is not part of it): the bytes, or ParseError(400)."""
    parts: list[bytes] = []
    trailing_slash = False
    for raw in _path_of(target).split(b"/")[1:]:
        segment = _decode(raw)
        trailing_slash = segment in (b"", b".", b"..")
        if segment == b"..":
            if not parts:
                raise ParseError(400, "the path climbs above the root (..)")
            parts.pop()
        elif not trailing_slash:
            parts.append(segment)
    if not parts:
        return b"/"
    return b"/" + b"/".join(parts) + (b"/" if trailing_slash else b"")


def path_is_normal(target: bytes) -> bool:
    """The target's path is its own normal form (the case that costs the
    compiled twin one pass and no copy)."""
    path = _path_of(target)
    try:
        return normalize_path(path) == path
    except ParseError:
        return False
