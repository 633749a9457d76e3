"""Choosing a response's content coding from a request's Accept-Encoding
(RFC 9110 §12.5.3), for static files' precompressed siblings and for
compression of backends' responses."""

from __future__ import annotations

# the codings edgeproxy produces, in its own order of preference (smallest
# output first) when the client's q-values tie
KNOWN = ("zstd", "br", "gzip")

_memo: dict[tuple, tuple] = {}
_MEMO_MAX = 1024


def _parse(value: str) -> dict[str, float] | None:
    """coding -> q; None when the field is not well formed (then it is
    ignored, as if absent)."""
    out: dict[str, float] = {}
    for item in value.split(","):
        item = item.strip()
        if not item:
            continue
        coding, _, params = item.partition(";")
        coding = coding.strip().lower()
        if not coding or any(c in coding for c in ' \t"='):
            return None
        q = 1.0
        for p in params.split(";") if params else ():
            name, _, v = p.strip().partition("=")
            if name.strip().lower() == "q":
                v = v.strip()
                try:
                    q = float(v)
                except ValueError:
                    return None
                if not (0.0 <= q <= 1.0) or len(v) > 5:
                    return None
        out[coding] = max(q, out[coding]) if coding in out else q
    return out


def ranked_encodings(accept: bytes | str | None, offered: tuple[str, ...]) -> tuple[str, ...]:
    """The codings of `offered` (a subset of KNOWN, in preference order)
    the client accepts, best first (highest q; ties in the order of
    `offered`).  No Accept-Encoding, or one that is not well formed:
    none (identity; the RFC lets any coding be sent then, but identity is
    what every client reads).  q=0 refuses a coding; "*" covers codings
    not named."""
    if not accept or not offered:
        return ()
    if isinstance(accept, bytes):
        accept = accept.decode("latin-1")
    key = (accept, offered)
    hit = _memo.get(key)
    if hit is not None:
        return hit
    prefs = _parse(accept)
    ranked: list[tuple[float, int, str]] = []
    if prefs:
        star = prefs.get("*")
        for i, coding in enumerate(offered):
            q = prefs.get(coding)
            if q is None and coding == "gzip":
                q = prefs.get("x-gzip")
            if q is None:
                q = star if star is not None else 0.0
            if q > 0:
                ranked.append((-q, i, coding))
    out = tuple(c for _, _, c in sorted(ranked))
    if len(_memo) >= _MEMO_MAX:
        _memo.clear()
    _memo[key] = out
    return out


def choose_encoding(accept: bytes | str | None, offered: tuple[str, ...]) -> str | None:
    """The coding to answer with (see ranked_encodings), or None for identity."""
    r = ranked_encodings(accept, offered)
    return r[0] if r else None


def identity_refused(accept: bytes | str | None) -> bool:
    """Whether the client refuses identity ("identity;q=0", or "*;q=0"
    without identity named): RFC 9110 §12.5.3 then allows a 415, but
    edgeproxy sends identity anyway (as nginx does); for tests and tools."""
    if not accept:
        return False
    if isinstance(accept, bytes):
        accept = accept.decode("latin-1")
    prefs = _parse(accept) or {}
    if "identity" in prefs:
        return prefs["identity"] == 0.0
    return prefs.get("*") == 0.0
