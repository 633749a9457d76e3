"""RFC 9111 shared-cache rules over plain values: what to store, for how long, how to answer.

Sans-I/O: methods and header fields are bytes, header lists are
[(name, value)] as received (any case), statuses are ints and times are
POSIX seconds as floats. Nothing here touches the store or a socket.
"""
from __future__ import annotations

import calendar
import email.utils
import enum
from http import HTTPStatus
from typing import NamedTuple
from urllib.parse import urljoin

from edgeproxy.cache.entry import (
    FLAG_HEURISTIC,
    FLAG_INVALIDATED,
    FLAG_MUST_REVALIDATE,
    FLAG_NO_CACHE,
    FLAG_TARGETED,
    CacheEntry,
)
from edgeproxy.cache.keys import cache_key, key_for_url, origin_of, variant_key, vary_names
from edgeproxy.cache.targeted import NO_TARGETING, Targeting, targeted_directives

__all__ = [
    "UNSATISFIABLE",
    "Action",
    "Decision",
    "HitResponse",
    "apply_304",
    "byte_range",
    "cache_directives",
    "cache_status",
    "corrected_initial_age",
    "current_age",
    "format_http_date",
    "freshness_lifetime",
    "invalidation_keys",
    "is_not_modified",
    "lookup_decision",
    "new_entry",
    "parse_http_date",
    "request_directives",
    "response_directives",
    "hit_head",
    "respond_from_cache",
    "response_tags",
    "revalidation_headers",
    "serve_stale_on_error",
    "strip_conditionals",
    "why_not_storable",
]

Headers = list[tuple[bytes, bytes]]

# RFC 9110 §15.1: status codes heuristically cacheable (may be stored and
# given a heuristic lifetime without explicit freshness).
HEURISTIC_STATUSES = frozenset({200, 203, 204, 206, 300, 301, 308, 404, 405, 410, 414, 501})
# The status codes whose semantics this cache understands (for must-understand).
UNDERSTOOD_STATUSES = frozenset({200, 201, 202, 203, 204, 205, 206, 300, 301, 302, 303, 304,
                                 305, 307, 308, *range(400, 418), 421, 422, 426,
                                 500, 501, 502, 503, 504, 505})
# RFC 5861 §4: the errors after which stale-if-error lets a stale response be used.
STALE_IF_ERROR_STATUSES = frozenset({500, 502, 503, 504})
SAFE_METHODS = frozenset({b"GET", b"HEAD", b"OPTIONS", b"TRACE"})

HEURISTIC_FRACTION = 0.1     # of (Date - Last-Modified), RFC 9111 §4.2.2
HEURISTIC_MAX = 86400.0      # a heuristic lifetime never exceeds one day
DELTA_SECONDS_MAX = 2 ** 31  # RFC 9111 §1.2.2

# Never part of a stored header block (RFC 9111 §3.1): hop-by-hop fields
# (the core removes them already), Age (recomputed on every hit),
# Content-Length (the hit path sends the stored body length) and Set-Cookie
# (one client's cookie must not reach another).
_NOT_STORED = frozenset({b"connection", b"keep-alive", b"proxy-connection", b"te", b"trailer",
                         b"transfer-encoding", b"upgrade", b"proxy-authenticate",
                         b"proxy-authorization", b"age", b"content-length", b"set-cookie"})
# A 304 does not replace these when it updates a stored response (§3.2).
_NOT_UPDATED = _NOT_STORED | frozenset({b"content-range"})
# Fields a 304 from the cache carries (RFC 9110 §15.4.5).
_NOT_MODIFIED_FIELDS = frozenset({b"cache-control", b"content-location", b"date", b"etag",
                                  b"expires", b"vary", b"last-modified"})
_CONDITIONAL_FIELDS = frozenset({b"if-none-match", b"if-modified-since", b"if-match",
                                 b"if-unmodified-since", b"if-range"})


# --- field helpers -------------------------------------------------------------

def field_values(headers: Headers, name: bytes) -> list[bytes]:
    """Every value of the field `name` (lower-case), in order."""
    return [v for n, v in headers if n.lower() == name]


def _split_list(value: bytes) -> list[bytes]:
    """The elements of a comma-separated field value; commas inside quoted
    strings do not split. Empty elements are dropped."""
    if b'"' not in value:
        return [item.strip() for item in value.split(b",") if item.strip()]
    items, start, quoted, escaped = [], 0, False, False
    for i, c in enumerate(value):
        if escaped:
            escaped = False
        elif quoted:
            if c == 0x5C:
                escaped = True
            elif c == 0x22:
                quoted = False
        elif c == 0x22:
            quoted = True
        elif c == 0x2C:
            items.append(value[start:i])
            start = i + 1
    items.append(value[start:])
    return [item.strip() for item in items if item.strip()]


def _unquote(value: bytes) -> bytes:
    if len(value) >= 2 and value[:1] == b'"' and value[-1:] == b'"':
        out, escaped = bytearray(), False
        for c in value[1:-1]:
            if escaped or c != 0x5C:
                out.append(c)
                escaped = False
            else:
                escaped = True
        return bytes(out)
    return value


def cache_directives(headers: Headers,
                     field: bytes = b"cache-control") -> dict[bytes, bytes | None]:
    """The directives of every `Cache-Control` line: lower-case name ->
    value (unquoted) or None. A directive repeated with different values
    gets the value b"" (invalid), which makes a max-age or s-maxage count as
    stale (RFC 9111 §4.2.1)."""
    out: dict[bytes, bytes | None] = {}
    for name, value in headers:
        if name.lower() != field:
            continue
        for item in _split_list(value):
            dname, eq, dvalue = item.partition(b"=")
            dname = dname.strip().lower()
            if not dname:
                continue
            parsed = _unquote(dvalue.strip()) if eq else None
            if dname in out and out[dname] != parsed:
                out[dname] = b""
            else:
                out[dname] = parsed
    return out


def request_directives(headers: Headers) -> dict[bytes, bytes | None]:
    """A request's cache directives; `Pragma: no-cache` counts as `no-cache`
    when the request has no Cache-Control field (RFC 9111 §5.4)."""
    directives = cache_directives(headers)
    if not directives and not field_values(headers, b"cache-control"):
        for value in field_values(headers, b"pragma"):
            if any(item.lower() == b"no-cache" for item in _split_list(value)):
                directives[b"no-cache"] = None
    return directives


def response_directives(headers: Headers, targeting: Targeting = NO_TARGETING
                        ) -> tuple[dict[bytes, bytes | None], bool]:
    """The directives this cache follows for a response, and whether they
    come from a targeted field (RFC 9213): the first field of the target
    list with a valid, non-empty Dictionary, and then Cache-Control and
    Expires are ignored; else Cache-Control."""
    targeted = targeted_directives(headers, targeting.names)
    if targeted is not None:
        return targeted, True
    return cache_directives(headers), False


def delta_seconds(value: bytes | None) -> int | None:
    """A delta-seconds value (RFC 9111 §1.2.2), None when missing or invalid."""
    if not value or not value.isdigit():
        return None
    if len(value) > 10:
        return DELTA_SECONDS_MAX
    return min(int(value), DELTA_SECONDS_MAX)


# --- HTTP dates ----------------------------------------------------------------

_MONTHS = {m: i for i, m in enumerate(
    (b"jan", b"feb", b"mar", b"apr", b"may", b"jun", b"jul", b"aug", b"sep", b"oct",
     b"nov", b"dec"), start=1)}


def _clock(value: bytes) -> tuple[int, int, int]:
    hh, mm, ss = value.split(b":")
    if len(hh) != 2 or len(mm) != 2 or len(ss) != 2 or not (hh + mm + ss).isdigit():
        raise ValueError("bad time")
    return int(hh), int(mm), int(ss)


def parse_http_date(value: bytes) -> float | None:
    """An HTTP-date (IMF-fixdate, RFC 850 or asctime, RFC 9110 §5.6.7) as
    POSIX seconds; None when it is not one. Names are matched without
    regard to case (RFC 9111 §4.2); the separators must be single spaces
    as the grammar has them, so "18  Aug  2050" is not a date."""
    try:
        value = value.strip()
        if b"," in value:
            rest = value.split(b",", 1)[1]
            if rest[:1] != b" ":
                return None
            parts = rest[1:].split(b" ")
            if len(parts) == 5:                     # Sun, 06 Nov 1994 08:49:37 GMT
                day, mon, year, clock, zone = parts
                if len(year) != 4:
                    return None
                y = int(year)
            elif len(parts) == 3:                   # Sunday, 06-Nov-94 08:49:37 GMT
                (day, mon, year), clock, zone = parts[0].split(b"-"), parts[1], parts[2]
                if len(year) != 2:
                    return None
                y = int(year)
                y += 1900 if y >= 70 else 2000
            else:
                return None
            if len(day) != 2 or zone.upper() != b"GMT":
                return None
        else:                                       # Sun Nov  6 08:49:37 1994
            parts = value.split(b" ")
            if len(parts) == 6 and not parts[2] and len(parts[3]) == 1:
                del parts[2]                        # a one-digit day follows two spaces
            elif len(parts) != 5 or len(parts[2]) != 2:
                return None
            _, mon, day, clock, year = parts
            if len(year) != 4:
                return None
            y = int(year)
        if not (day.isdigit() and year.isdigit()):
            return None
        m = _MONTHS[mon.lower()]
        d = int(day)
        hh, mm, ss = _clock(clock)
        if not (1 <= d <= 31 and hh < 24 and mm < 60 and ss <= 60):
            return None
        return float(calendar.timegm((y, m, d, hh, mm, ss, 0, 0, 0)))
    except (ValueError, KeyError):
        return None


def format_http_date(when: float) -> bytes:
    """`when` as an IMF-fixdate: b"Sun, 06 Nov 1994 08:49:37 GMT"."""
    return email.utils.formatdate(when, usegmt=True).encode("ascii")


# --- storing (RFC 9111 §3) -------------------------------------------------------

def why_not_storable(method: bytes, status: int, request_headers: Headers,
                     response_headers: Headers, *, now: float, content_length: int = -1,
                     max_object: int = 0, heuristic: bool = True,
                     allow_set_cookie: bool = False,
                     targeting: Targeting = NO_TARGETING) -> str | None:
    """None when the response may be stored, else why not, as the RFC 9211
    detail token used in Cache-Status: "method", "no-store", "status",
    "partial", "private", "vary-star", "authorization", "set-cookie",
    "too-large" or "no-freshness".

    `now` is when the response head arrived. `content_length` is the
    response's Content-Length (-1 when unknown,
    e.g. chunked; the store's writer then enforces `max_object` itself).
    With `allow_set_cookie`, a response with Set-Cookie is stored without
    that field. `targeting`: the RFC 9213 target list; a valid targeted
    field replaces Cache-Control and Expires in these decisions.
    """
    if method != b"GET":
        return "method"
    if b"no-store" in request_directives(request_headers):
        return "no-store"
    if status == 206:
        return "partial"  # only complete responses are stored
    if status < 200 or status == 304 or status > 999:
        return "status"
    cc, targeted = response_directives(response_headers, targeting)
    if b"must-understand" in cc:
        # §5.2.2.3: with must-understand, no-store only binds caches that do
        # not understand the status code.
        if status not in UNDERSTOOD_STATUSES:
            return "status"
    elif b"no-store" in cc:
        return "no-store"
    if b"private" in cc:
        return "private"  # also its qualified form: we do not strip fields
    if vary_names(response_headers) == (b"*",):
        return "vary-star"
    if (field_values(request_headers, b"authorization")
            and not (b"public" in cc or b"s-maxage" in cc or b"must-revalidate" in cc)):
        return "authorization"  # §3.5
    if not allow_set_cookie and field_values(response_headers, b"set-cookie"):
        return "set-cookie"
    if max_object and content_length > max_object:
        return "too-large"
    explicit = (b"public" in cc or b"max-age" in cc or b"s-maxage" in cc
                or (not targeted and bool(field_values(response_headers, b"expires"))))
    if not explicit and status not in HEURISTIC_STATUSES:
        return "no-freshness"
    lifetime, _ = freshness_lifetime(status, response_headers, now, heuristic=heuristic,
                                     directives=cc, targeted=targeted)
    if lifetime <= 0 and not (field_values(response_headers, b"etag")
                              or field_values(response_headers, b"last-modified")
                              or b"stale-if-error" in cc or b"stale-while-revalidate" in cc):
        # stale at once, cannot be revalidated, and may not be served stale
        # (RFC 5861): useless
        return "no-freshness"
    return None


def age_value(headers: Headers) -> float:
    """The response's Age in seconds (RFC 9111 §5.1): the first member of
    the first Age line, so "7200, 0" is 7200; 0 when missing or invalid."""
    ages = field_values(headers, b"age")
    first = _split_list(ages[0])[:1] if ages else []
    return float(delta_seconds(first[0]) or 0) if first else 0.0


def _date_value(headers: Headers, response_time: float) -> float:
    for value in field_values(headers, b"date"):
        when = parse_http_date(value)
        if when is not None:
            return when
    return response_time  # RFC 9110 §6.6.1: a missing Date is the time of receipt


def freshness_lifetime(status: int, headers: Headers, response_time: float, *,
                       heuristic: bool = True,
                       directives: dict[bytes, bytes | None] | None = None,
                       targeted: bool = False) -> tuple[float, bool]:
    """(freshness lifetime in seconds, whether it is heuristic), RFC 9111 §4.2.1:
    s-maxage, then max-age, then Expires - Date, then (if `heuristic`)
    10% of Date - Last-Modified capped at a day for heuristically cacheable
    statuses or `public` responses. Invalid values count as already stale.
    `targeted`: `directives` come from a targeted field (RFC 9213), and
    Expires is ignored."""
    cc = cache_directives(headers) if directives is None else directives
    if b"s-maxage" in cc:
        return float(delta_seconds(cc[b"s-maxage"]) or 0), False
    if b"max-age" in cc:
        return float(delta_seconds(cc[b"max-age"]) or 0), False
    expires = () if targeted else field_values(headers, b"expires")
    if expires:
        when = parse_http_date(expires[0]) if len(expires) == 1 else None
        if when is None:
            return 0.0, False  # an invalid Expires (e.g. "0") means already expired
        return max(0.0, when - _date_value(headers, response_time)), False
    if heuristic and (status in HEURISTIC_STATUSES or b"public" in cc):
        modified = field_values(headers, b"last-modified")
        when = parse_http_date(modified[0]) if modified else None
        if when is not None:
            date = _date_value(headers, response_time)
            if date > when:
                return min(HEURISTIC_FRACTION * (date - when), HEURISTIC_MAX), True
    return 0.0, False


def response_tags(headers: Headers) -> tuple[bytes, ...]:
    """The purge tags of a response: `Surrogate-Key` (space-separated) and
    `Cache-Tag` (comma-separated) values, without duplicates."""
    tags: list[bytes] = []
    for name, value in headers:
        lname = name.lower()
        if lname == b"surrogate-key":
            items = value.split()
        elif lname == b"cache-tag":
            items = [item.strip() for item in value.split(b",")]
        else:
            continue
        for item in items:
            if item and item not in tags:
                tags.append(item)
    return tuple(tags)


def _stored_head(headers: Headers, hidden: tuple[bytes, ...] = ()) -> bytes:
    return b"".join(b"%s: %s\r\n" % (n, v) for n, v in headers
                    if n.lower() not in _NOT_STORED and n.lower() not in hidden)


def _describe(entry: CacheEntry, headers: Headers, heuristic: bool,
              targeting: Targeting = NO_TARGETING) -> CacheEntry:
    """Fill the fields of `entry` that follow from its header fields."""
    cc, targeted = response_directives(headers, targeting)
    entry.head = _stored_head(headers, targeting.hidden)
    entry.date_value = _date_value(headers, entry.response_time)
    entry.age_value = age_value(headers)
    entry.lifetime, heuristic_used = freshness_lifetime(entry.status, headers,
                                                        entry.response_time,
                                                        heuristic=heuristic, directives=cc,
                                                        targeted=targeted)
    flags = FLAG_TARGETED if targeted else 0
    if b"no-cache" in cc:
        flags |= FLAG_NO_CACHE  # the qualified form too: stricter, never wrong
    if b"must-revalidate" in cc or b"proxy-revalidate" in cc or b"s-maxage" in cc:
        flags |= FLAG_MUST_REVALIDATE  # s-maxage implies proxy-revalidate (§5.2.2.10)
    if heuristic_used:
        flags |= FLAG_HEURISTIC
    entry.flags = flags
    entry.stale_while_revalidate = float(delta_seconds(cc.get(b"stale-while-revalidate")) or 0)
    entry.stale_if_error = float(delta_seconds(cc.get(b"stale-if-error")) or 0)
    etags = field_values(headers, b"etag")
    entry.etag = etags[0] if etags else b""
    modified = field_values(headers, b"last-modified")
    entry.last_modified = modified[0] if modified else b""
    entry.tags = response_tags(headers)
    return entry


def new_entry(key: bytes, request_headers: Headers, status: int, reason: bytes,
              response_headers: Headers, request_time: float, response_time: float, *,
              heuristic: bool = True, targeting: Targeting = NO_TARGETING) -> CacheEntry:
    """The entry to store for a response that `why_not_storable` accepted.

    `key` is the primary key (`keys.cache_key`); the variant key comes from
    the request's values of the fields the response's Vary lists.
    `request_time`/`response_time`: when the request was sent to the
    backend and when the response head arrived. The store sets the body
    fields when the writer commits. With `targeting`, a valid targeted
    field decides freshness (and is left out of the stored head unless
    forwarded).
    """
    vary = vary_names(response_headers)
    entry = CacheEntry(key=key, status=status, reason=reason, head=b"",
                       request_time=request_time, response_time=response_time,
                       date_value=response_time, age_value=0.0, lifetime=0.0,
                       variant=variant_key(vary, request_headers), vary=vary)
    return _describe(entry, response_headers, heuristic, targeting)


# --- age and freshness (RFC 9111 §4.2) -------------------------------------------

def corrected_initial_age(entry: CacheEntry) -> float:
    """RFC 9111 §4.2.3: the age the response had when it arrived."""
    apparent_age = max(0.0, entry.response_time - entry.date_value)
    response_delay = entry.response_time - entry.request_time
    corrected_age_value = entry.age_value + response_delay
    return max(apparent_age, corrected_age_value)


def current_age(entry: CacheEntry, now: float) -> float:
    """RFC 9111 §4.2.3: corrected initial age plus the time spent here."""
    resident_time = now - entry.response_time
    return corrected_initial_age(entry) + resident_time


class Action(enum.IntEnum):
    """What to do with a request the cache could answer (see `lookup_decision`)."""
    FRESH = 0                           # serve the entry
    STALE = 1                           # serve the stale entry: the client allowed it (max-stale)
    STALE_REVALIDATE_IN_BACKGROUND = 2  # serve the stale entry, revalidate it in the background
    MUST_REVALIDATE = 3                 # conditional request to the backend (revalidation_headers)
    MISS = 4                            # forward the request; store the response if storable
    GATEWAY_TIMEOUT = 5                 # only-if-cached and nothing usable: answer 504 here


class Decision(NamedTuple):
    action: Action
    fwd: str | None     # RFC 9211 fwd reason when the backend is asked
    ttl: float | None   # freshness left, seconds (negative once stale); None without entry


def lookup_decision(entry: CacheEntry | None, request_headers: Headers, now: float, *,
                    vary_miss: bool = False) -> Decision:
    """How to answer a GET/HEAD request given the stored entry (or None):
    request directives (no-cache, Pragma: no-cache, max-age, min-fresh,
    max-stale, only-if-cached) against the response's (no-cache,
    must-revalidate/proxy-revalidate/s-maxage, stale-while-revalidate) and
    a soft purge. A request with If-Match or If-Unmodified-Since is a MISS
    (fwd "request"): those preconditions are the origin's to evaluate.
    `vary_miss`: the URI is stored but not this variant. Serving stale
    after a backend failure is `serve_stale_on_error`."""
    req = request_directives(request_headers)
    only_if_cached = b"only-if-cached" in req
    if entry is None:
        fwd = "vary-miss" if vary_miss else "uri-miss"
        return Decision(Action.GATEWAY_TIMEOUT if only_if_cached else Action.MISS, fwd, None)
    age = current_age(entry, now)
    ttl = entry.lifetime - age
    if entry.invalidated:
        ttl = min(ttl, 0.0)
    fresh = ttl > 0
    revalidate = Action.GATEWAY_TIMEOUT if only_if_cached else Action.MUST_REVALIDATE

    if field_values(request_headers, b"if-match") or \
            field_values(request_headers, b"if-unmodified-since"):
        # Preconditions for the origin to evaluate (§4.3.2): pass it on.
        return Decision(Action.GATEWAY_TIMEOUT if only_if_cached else Action.MISS,
                        "request", ttl)
    if b"no-cache" in req:
        return Decision(revalidate, "request", ttl)
    if b"max-age" in req and age > (delta_seconds(req[b"max-age"]) or 0):
        return Decision(revalidate, "request", ttl)
    if entry.no_cache:
        return Decision(revalidate, "stale", ttl)
    if fresh:
        min_fresh = delta_seconds(req.get(b"min-fresh"))
        if min_fresh is not None and ttl < min_fresh:
            return Decision(revalidate, "request", ttl)
        return Decision(Action.FRESH, None, ttl)
    staleness = -ttl
    if entry.must_revalidate:
        return Decision(revalidate, "stale", ttl)
    if b"max-stale" in req:
        limit = req[b"max-stale"]
        if limit is None or staleness <= (delta_seconds(limit) or 0):
            return Decision(Action.STALE, None, ttl)
    if entry.stale_while_revalidate and staleness <= entry.stale_while_revalidate:
        return Decision(Action.STALE_REVALIDATE_IN_BACKGROUND, None, ttl)
    return Decision(revalidate, "stale", ttl)


def serve_stale_on_error(entry: CacheEntry, request_headers: Headers, now: float, *,
                         stale_grace: float = 0.0) -> bool:
    """Whether `entry` may answer the request after the backend failed
    (no connection, timeout, or a status in STALE_IF_ERROR_STATUSES):
    stale-if-error of the response or the request (RFC 5861 §4), or the
    configured grace, covers its staleness, and no directive forbids
    serving it unvalidated (no-cache, must-revalidate, proxy-revalidate,
    s-maxage: then the answer is a 504, §5.2.2.2)."""
    if entry.no_cache or entry.must_revalidate:
        return False
    staleness = max(0.0, current_age(entry, now) - entry.lifetime)
    allowed = max(entry.stale_if_error, stale_grace,
                  float(delta_seconds(request_directives(request_headers)
                                      .get(b"stale-if-error")) or 0))
    return allowed > 0 and staleness <= allowed


# --- validation (RFC 9111 §4.3) --------------------------------------------------

def revalidation_headers(entry: CacheEntry) -> Headers:
    """The conditional fields to add to the request revalidating `entry`
    (If-None-Match from its ETag, If-Modified-Since from its Last-Modified,
    §4.3.1). Remove the client's own with `strip_conditionals` first."""
    fields = []
    if entry.etag:
        fields.append((b"If-None-Match", entry.etag))
    if entry.last_modified:
        fields.append((b"If-Modified-Since", entry.last_modified))
    return fields


def strip_conditionals(request_headers: Headers) -> Headers:
    """The request fields without conditionals and Range: what to send the
    backend when the cache fetches or revalidates for itself."""
    return [(n, v) for n, v in request_headers
            if n.lower() not in _CONDITIONAL_FIELDS and n.lower() != b"range"]


def _opaque(tag: bytes) -> bytes:
    return tag[2:] if tag[:2] == b"W/" else tag


def _weak_match(a: bytes, b: bytes) -> bool:
    return _opaque(a) == _opaque(b)


def _strong_match(a: bytes, b: bytes) -> bool:
    return a == b and a[:2] != b"W/"


def _304_selects(entry: CacheEntry, headers: Headers) -> bool:
    """§4.3.4: whether a 304 identifies `entry` for update."""
    etags = field_values(headers, b"etag")
    if etags:
        if not entry.etag:
            return False
        if etags[0][:2] == b"W/":
            return _weak_match(etags[0], entry.etag)
        return _strong_match(etags[0], entry.etag)
    modified = field_values(headers, b"last-modified")
    if modified and entry.last_modified:
        return parse_http_date(modified[0]) == parse_http_date(entry.last_modified)
    # No validator: the 304 answers the conditional request built from this
    # very entry's validators.
    return True


def apply_304(entry: CacheEntry, response_headers: Headers, request_time: float,
              response_time: float, *, heuristic: bool = True,
              targeting: Targeting = NO_TARGETING) -> CacheEntry | None:
    """The entry updated by a 304 answering its revalidation (§4.3.4, §3.2):
    the 304's fields replace the stored ones of the same name (except
    Content-Length and the fields never stored), freshness is recomputed
    from the new exchange and a soft purge is cleared; the body stays.
    None when the 304's validators do not select this entry: then it must
    not be used, and the request is repeated without conditionals.
    An entry whose freshness came from a targeted field that is not stored
    (not forwarded) keeps its directives when the 304 carries none: the
    304 updates the stored fields, and the targeted one is among them."""
    if not _304_selects(entry, response_headers):
        return None
    replaced = {n.lower() for n, _ in response_headers if n.lower() not in _NOT_UPDATED}
    merged = [(n, v) for n, v in entry.headers if n.lower() not in replaced]
    merged += [(n, v) for n, v in response_headers if n.lower() in replaced]
    # Age comes from the 304 only: the stored head never holds one.
    merged += [(n, v) for n, v in response_headers if n.lower() == b"age"]
    updated = CacheEntry(key=entry.key, status=entry.status, reason=entry.reason, head=b"",
                         request_time=request_time, response_time=response_time,
                         date_value=response_time, age_value=0.0, lifetime=0.0,
                         variant=entry.variant, vary=entry.vary,
                         body_length=entry.body_length, body_id=entry.body_id,
                         chunk_size=entry.chunk_size, last_access=entry.last_access,
                         body_crc=entry.body_crc)
    updated = _describe(updated, merged, heuristic, targeting)
    if entry.flags & FLAG_TARGETED and not updated.flags & FLAG_TARGETED and \
            targeting.hidden and targeted_directives(merged, targeting.names) is None:
        # the stored response's targeted directives still hold: its
        # lifetime is relative (max-age), so only the times change
        updated.lifetime = entry.lifetime
        updated.flags = entry.flags & ~FLAG_INVALIDATED
        updated.stale_while_revalidate = entry.stale_while_revalidate
        updated.stale_if_error = entry.stale_if_error
    return updated


def is_not_modified(entry: CacheEntry, request_headers: Headers) -> bool:
    """Whether the client's own conditional GET/HEAD is answered 304 by
    `entry` (RFC 9110 §13.1.2, §13.1.3, §13.2.2): If-None-Match with weak
    comparison (and "*"), else If-Modified-Since against Last-Modified (or
    Date). Only 2xx entries are evaluated."""
    if not 200 <= entry.status < 300:
        return False
    none_match = field_values(request_headers, b"if-none-match")
    if none_match:
        tags = [t for value in none_match for t in _split_list(value)]
        if b"*" in tags:
            return True
        return bool(entry.etag) and any(_weak_match(t, entry.etag) for t in tags)
    since = field_values(request_headers, b"if-modified-since")
    if len(since) == 1:
        when = parse_http_date(since[0])
        if when is None:
            return False
        modified = parse_http_date(entry.last_modified) if entry.last_modified else None
        return (modified if modified is not None else entry.date_value) <= when
    return False


# --- ranges (RFC 9110 §14) -------------------------------------------------------

UNSATISFIABLE = "unsatisfiable"


def byte_range(value: bytes | None, length: int) -> tuple[int, int] | str | None:
    """The one byte range a `Range` value asks of a `length`-byte body:
    (start, end) with end exclusive, UNSATISFIABLE (answer 416), or None
    to ignore the Range and send the whole body (no or invalid Range, other
    units, several ranges, empty body)."""
    if not value:
        return None
    unit, eq, spec = value.partition(b"=")
    if not eq or unit.strip().lower() != b"bytes" or b"," in spec:
        return None
    first, dash, last = spec.strip().partition(b"-")
    if not dash:
        return None
    first, last = first.strip(), last.strip()
    if not first:                                   # -n: the last n bytes
        if not last.isdigit() or length == 0:
            return None
        n = int(last) if len(last) <= 18 else length
        if n == 0:
            return UNSATISFIABLE
        return max(0, length - n), length
    if not first.isdigit() or (last and not last.isdigit()):
        return None
    start = int(first) if len(first) <= 18 else length
    if last:
        end = int(last) + 1 if len(last) <= 18 else length
        if end <= start:
            return None  # last-pos < first-pos: an invalid range, ignored
    else:
        end = length
    if start >= length:
        return UNSATISFIABLE
    return start, min(end, length)


def _if_range_allows(entry: CacheEntry, value: bytes) -> bool:
    """RFC 9110 §13.1.5: the Range applies only if the validator matches strongly."""
    value = value.strip()
    if value[:1] == b'"' or value[:2] == b"W/":
        return bool(entry.etag) and _strong_match(value, entry.etag)
    when = parse_http_date(value)
    return when is not None and bool(entry.last_modified) and \
        parse_http_date(entry.last_modified) == when


# --- answering from the cache ------------------------------------------------------

class HitResponse(NamedTuple):
    status: int
    head: bytes       # status line and fields, each ending in CRLF; NOT the blank line
    body_start: int   # the body bytes to send: [body_start, body_end) of the stored body
    body_end: int


def _reason(status: int, stored: bytes = b"") -> bytes:
    if stored:
        return stored
    try:
        return HTTPStatus(status).phrase.encode("ascii")
    except ValueError:
        return b"Unknown"


def respond_from_cache(entry: CacheEntry, method: bytes, request_headers: Headers, now: float,
                       cache_status_value: bytes) -> HitResponse:
    """The response to send from `entry`: a 304 for the client's own
    matching conditional, a 206 or 416 for a single byte Range on a 200
    (unless If-Range does not match), else the stored response; HEAD gets
    no body. Adds Age and a Cache-Status field line (after any the backend
    sent: a list member appended, RFC 9211 §2). The caller appends its own
    fields (Connection, ...) and the final CRLF."""
    age = b"Age: %d\r\n" % min(int(max(0.0, current_age(entry, now))), DELTA_SECONDS_MAX)
    status_field = b"Cache-Status: %s\r\n" % cache_status_value
    length = entry.body_length
    if is_not_modified(entry, request_headers):
        fields = b"".join(b"%s: %s\r\n" % (n, v) for n, v in entry.headers
                          if n.lower() in _NOT_MODIFIED_FIELDS)
        return HitResponse(304, b"HTTP/1.1 304 Not Modified\r\n" + fields + age + status_field,
                           0, 0)
    body_end = 0 if method == b"HEAD" else length
    if entry.status == 200 and method == b"GET":
        ranges = field_values(request_headers, b"range")
        if_range = field_values(request_headers, b"if-range")
        wanted = byte_range(ranges[0], length) if len(ranges) == 1 else None
        if wanted is not None and if_range and not _if_range_allows(entry, if_range[0]):
            wanted = None
        if wanted == UNSATISFIABLE:
            return HitResponse(416, b"HTTP/1.1 416 Range Not Satisfiable\r\n"
                               b"Content-Range: bytes */%d\r\nContent-Length: 0\r\n" % length
                               + age + status_field, 0, 0)
        if wanted is not None:
            start, end = wanted
            head = (b"HTTP/1.1 206 Partial Content\r\n" + entry.head
                    + b"Content-Range: bytes %d-%d/%d\r\nContent-Length: %d\r\n"
                    % (start, end - 1, length, end - start) + age + status_field)
            return HitResponse(206, head, start, end)
    return HitResponse(entry.status, hit_head(entry) + age + status_field, 0, body_end)


def hit_head(entry: CacheEntry) -> bytes:
    """The head of the stored response as a hit sends it whole (to any
    request that is not conditional and has no Range), up to Content-Length:
    without Age and Cache-Status, which depend on the time of the request."""
    head = b"HTTP/1.1 %d %s\r\n" % (entry.status, _reason(entry.status, entry.reason)) + entry.head
    if entry.status == 200 and b"accept-ranges:" not in entry.head.lower():
        head += b"Accept-Ranges: bytes\r\n"
    if entry.status != 204 and not 100 <= entry.status < 200:
        head += b"Content-Length: %d\r\n" % entry.body_length
    return head


# --- invalidation (RFC 9111 §4.4) ---------------------------------------------------

def invalidation_keys(method: bytes, status: int, scheme: bytes, host: bytes, target: bytes,
                      response_headers: Headers) -> list[bytes]:
    """The primary keys an unsafe request's non-error (2xx/3xx) response
    invalidates: its target, and its Location and Content-Location when
    they have the same origin (relative references resolved against the
    target). Delete each with `CacheStore.delete` (all variants go)."""
    if method in SAFE_METHODS or not 200 <= status < 400:
        return []
    key = cache_key(scheme, host, target)
    keys = [key]
    origin = origin_of(key)
    base = key.decode("latin-1")
    for name in (b"location", b"content-location"):
        for value in field_values(response_headers, name):
            try:
                other = key_for_url(urljoin(base, value.decode("latin-1").strip()))
            except ValueError:
                continue
            if other and origin_of(other) == origin and other not in keys:
                keys.append(other)
    return keys


# --- Cache-Status (RFC 9211) ----------------------------------------------------------

def _is_sf_token(text: str) -> bool:
    if not text or not (text[0].isascii() and (text[0].isalpha() or text[0] == "*")):
        return False
    return all(c.isascii() and (c.isalnum() or c in "!#$%&'*+-.^_`|~:/") for c in text)


def _sf_string(text: str) -> bytes:
    return b'"%s"' % text.replace("\\", "\\\\").replace('"', '\\"').encode("ascii", "replace")


def cache_status(*, hit: bool = False, fwd: str | None = None, fwd_status: int | None = None,
                 ttl: float | None = None, stored: bool = False, collapsed: bool = False,
                 key: bytes | None = None, detail: str | None = None,
                 cache: str = "edgeproxy") -> bytes:
    """A Cache-Status list member (RFC 9211 §2), e.g.
    b"edgeproxy; hit; ttl=30", b"edgeproxy; fwd=uri-miss; fwd-status=200; stored",
    b"edgeproxy; fwd=uri-miss; fwd-status=200; detail=private"."""
    parts = [cache.encode("ascii")]
    if hit:
        parts.append(b"hit")
    if fwd:
        parts.append(b"fwd=" + fwd.encode("ascii"))
    if fwd_status is not None:
        parts.append(b"fwd-status=%d" % fwd_status)
    if ttl is not None:
        parts.append(b"ttl=%d" % int(ttl // 1))
    if stored:
        parts.append(b"stored")
    if collapsed:
        parts.append(b"collapsed")
    if key is not None:
        parts.append(b"key=" + _sf_string(key.decode("latin-1")))
    if detail:
        parts.append(b"detail=" + (detail.encode("ascii") if _is_sf_token(detail)
                                   else _sf_string(detail)))
    return b"; ".join(parts)
