"""Cache keys: the primary key of a URI and the secondary (variant) key chosen by `Vary`."""
from __future__ import annotations

import hashlib
from urllib.parse import urlsplit

__all__ = [
    "cache_key",
    "key_for_url",
    "key_prefix_for_url",
    "origin_of",
    "variant_key",
    "vary_names",
]

Headers = list[tuple[bytes, bytes]]

_DEFAULT_PORTS = {b"http": b":80", b"https": b":443"}

# Request fields whose values are case-insensitive (RFC 9110 §12.5): their
# values are lower-cased when building a variant key, so "GZIP" and "gzip"
# select the same stored response.
_CASE_INSENSITIVE = frozenset({b"accept", b"accept-charset", b"accept-encoding",
                               b"accept-language"})

_ABSENT = b"\x00"  # a Vary-listed field missing from the request (differs from empty)


def cache_key(scheme: bytes, host: bytes, target: bytes) -> bytes:
    """The primary key of a request: b"https://example.com/path?query".

    The method is not part of it (GET and HEAD share entries). The scheme and
    host are lower-cased and a default port (:80 for http, :443 for https)
    is dropped; the target (origin-form) is kept as received.
    """
    scheme = scheme.lower()
    host = host.lower()
    default_port = _DEFAULT_PORTS.get(scheme)
    if default_port and host.endswith(default_port):
        host = host[: -len(default_port)]
    return b"%s://%s%s" % (scheme, host, target or b"/")


def key_for_url(url: str | bytes) -> bytes | None:
    """The primary key of an absolute http(s) URL, or None for anything else."""
    if isinstance(url, bytes):
        url = url.decode("latin-1")
    try:
        parts = urlsplit(url.strip())
    except ValueError:
        return None
    if parts.scheme.lower() not in ("http", "https") or not parts.netloc:
        return None
    target = parts.path or "/"
    if parts.query or url.rstrip().endswith("?"):
        target += "?" + parts.query
    netloc = parts.netloc.rpartition("@")[2]  # userinfo is never part of a key
    return cache_key(parts.scheme.encode("latin-1"), netloc.encode("latin-1"),
                     target.encode("latin-1"))


def key_prefix_for_url(url: str | bytes) -> bytes | None:
    """The key prefix of an http(s) URL prefix: "https://Example.com/static/" gives
    b"https://example.com/static/"; "https://example.com" covers the whole host."""
    if isinstance(url, bytes):
        url = url.decode("latin-1")
    scheme, sep, rest = url.strip().partition("://")
    if not sep or scheme.lower() not in ("http", "https"):
        return None
    cut = min((i for i in (rest.find("/"), rest.find("?")) if i >= 0), default=len(rest))
    netloc, target = rest[:cut].rpartition("@")[2], rest[cut:]
    if not netloc:
        return None
    if not target.startswith("/"):
        target = "/" + target
    return cache_key(scheme.encode("latin-1"), netloc.encode("latin-1"), target.encode("latin-1"))


def origin_of(key: bytes) -> bytes:
    """b"https://example.com" for b"https://example.com/a/b"."""
    start = key.find(b"://")
    end = key.find(b"/", start + 3) if start >= 0 else -1
    return key if end < 0 else key[:end]


def vary_names(response_headers: Headers) -> tuple[bytes, ...]:
    """The field names a response's `Vary` lists: lower-case, sorted, without
    duplicates; (b"*",) when it contains "*"."""
    names: set[bytes] = set()
    for name, value in response_headers:
        if name.lower() != b"vary":
            continue
        for item in value.split(b","):
            item = item.strip().lower()
            if item == b"*":
                return (b"*",)
            if item:
                names.add(item)
    return tuple(sorted(names))


def _normalised(name: bytes, request_headers: Headers) -> bytes:
    values = [v for n, v in request_headers if n.lower() == name]
    if not values:
        return _ABSENT
    # RFC 9111 §4.1: combine the field lines and drop whitespace around
    # commas; lower-case where the field's values are case-insensitive.
    joined = b",".join(item.strip() for v in values for item in v.split(b","))
    if name == b"accept-encoding":
        return _accepted_codings(joined.lower())
    return joined.lower() if name in _CASE_INSENSITIVE else joined


def _accepted_codings(value: bytes) -> bytes:
    """Accept-Encoding as the set of codings it accepts (q > 0), sorted:
    clients that accept the same codings share one variant, so that a
    compressed response (route.compress) is stored once per coding class
    rather than once per spelling of the field; whichever coding the stored
    variant has, every client of its class accepts it.  A value that is
    not well formed is kept as it is (its own variant)."""
    accepted = set()
    for item in value.split(b","):
        coding, _, params = item.partition(b";")
        coding = coding.strip()
        if not coding:
            continue
        q = 1.0
        for p in params.split(b";") if params else ():
            k, _, v = p.partition(b"=")
            if k.strip() == b"q":
                try:
                    q = float(v.strip())
                except ValueError:
                    return value
        if q > 0 and coding != b"identity":
            accepted.add(coding)
    return b",".join(sorted(accepted)) if accepted else b"identity"


def variant_key(names: tuple[bytes, ...], request_headers: Headers) -> bytes:
    """The secondary key selecting a variant: a 16-byte digest of the request's
    (normalised) values of the fields in `names`; b"" when there are none."""
    if not names:
        return b""
    digest = hashlib.blake2b(digest_size=16)
    for name in names:
        value = _normalised(name, request_headers)
        digest.update(b"%d:%s%d:%s" % (len(name), name, len(value), value))
    return digest.digest()
