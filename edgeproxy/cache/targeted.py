"""RFC 9213 targeted cache control: the cache directives a response gives this edge in `CDN-Cache-Control` (or another field on the target list), read as an RFC 8941 Dictionary.

Sans-I/O, like policy.py. The target list is configured (`cache.targeted`,
lower-case names, in order). The first field on the list that the response
carries with a valid, non-empty value decides; the cache then ignores
`Cache-Control` and `Expires` for its own storage and freshness decisions
(RFC 9213 §2.2). An empty field, one that is not a valid Structured Field
Dictionary, or one whose known directives have the wrong type (max-age="60")
counts as absent (§2.1): the next name on the list is tried, then the
cache falls back to Cache-Control.

The Dictionary is parsed by `http_sf` (Mark Nottingham's parser, checked
against the structured-field-tests suite), strictly: keys are lower-case
by the grammar, so `MaX-aGe=60` is a parse error and the field is ignored.
"""
from __future__ import annotations

from typing import NamedTuple

import http_sf

__all__ = ["NO_TARGETING", "Targeting", "targeted_directives"]

Headers = list[tuple[bytes, bytes]]
Directives = dict[bytes, "bytes | None"]

# Directives whose value is a delta-seconds: an sf-integer >= 0.
_SECONDS = frozenset({"max-age", "s-maxage", "stale-while-revalidate", "stale-if-error"})
# Directives without a value: sf-boolean true. `private` and `no-cache` may
# carry a list of field names in Cache-Control (qualified forms, which this
# cache treats as unqualified): here a String or an Inner List of them.
_FLAGS = frozenset({"no-store", "no-transform", "must-revalidate", "proxy-revalidate",
                    "public", "must-understand", "immutable"})
_QUALIFIED = frozenset({"private", "no-cache"})


class Targeting(NamedTuple):
    """The target list (lower-case field names, first present wins) and
    whether the targeted fields reach clients."""
    names: tuple[bytes, ...]
    forward: bool

    @classmethod
    def from_config(cls, names: tuple[str, ...], forward: bool) -> Targeting:
        return cls(tuple(n.lower().encode("ascii") for n in names), forward)

    @property
    def hidden(self) -> tuple[bytes, ...]:
        """The names to keep from clients (and out of stored heads)."""
        return () if self.forward else self.names


NO_TARGETING = Targeting((), True)


def _directive(name: str, value: object) -> tuple[bytes, bytes | None] | None:
    """One member as policy's (name, value) pair; None when a known directive
    has a value of the wrong type (the whole field is then invalid)."""
    key = name.encode("ascii")
    if name in _SECONDS:
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            return None
        return key, b"%d" % value
    if name in _FLAGS:
        return (key, None) if value is True else None
    if name in _QUALIFIED:
        # true, or the qualified form: a String or an Inner List of Strings/Tokens
        if value is True or isinstance(value, (str, list)):
            return key, None
        return None
    # an extension directive: kept (unrecognised ones are ignored by policy)
    if value is True:
        return key, None
    if isinstance(value, (str, int)) and not isinstance(value, bool):
        return key, str(value).encode("ascii", "replace")
    return key, b""


def _parse(value: bytes) -> Directives | None:
    try:
        members = http_sf.parse(value, tltype="dictionary")
    except (http_sf.StructuredFieldError, ValueError, UnicodeError):
        return None
    out: Directives = {}
    for name, (item, _params) in members.items():
        pair = _directive(name, item)
        if pair is None:
            return None
        out[pair[0]] = pair[1]
    return out


def targeted_directives(headers: Headers, names: tuple[bytes, ...]) -> Directives | None:
    """The directives of the first field of `names` (lower-case) that the
    response carries with a valid, non-empty value; None when there is none
    (then Cache-Control and Expires apply as usual). Several lines of one
    field are one Dictionary, joined by commas (RFC 8941 §4.2)."""
    if not names:
        return None
    for name in names:
        lines = [v.strip() for n, v in headers if n.lower() == name]
        lines = [line for line in lines if line]
        if not lines:
            continue          # absent or empty: ignored (§2.1)
        directives = _parse(b", ".join(lines))
        if directives:
            return directives
    return None
