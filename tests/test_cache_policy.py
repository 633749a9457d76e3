"""RFC 9111 cache policy, case by case: storability, freshness, age, lookup decisions,
validation, invalidation, ranges and Cache-Status (edgeproxy.cache.policy and keys)."""
from __future__ import annotations

import dataclasses

import pytest

from edgeproxy.cache import policy
from edgeproxy.cache.entry import FLAG_INVALIDATED, CacheEntry, decode_record, encode_entry
from edgeproxy.cache.keys import cache_key, key_for_url, key_prefix_for_url, variant_key, vary_names
from edgeproxy.cache.policy import UNSATISFIABLE, Action

T = 1_700_000_000.0  # when the stored responses arrived
KEY = b"https://example.com/page"


def date(t: float) -> bytes:
    return policy.format_http_date(t)


def cc(value: str) -> tuple[bytes, bytes]:
    return (b"Cache-Control", value.encode())


def entry(*headers: tuple[bytes, bytes], status: int = 200, date_at: float | None = T,
          request_headers=(), request_time: float = T, response_time: float = T,
          heuristic: bool = True, body_length: int = 100) -> CacheEntry:
    fields = list(headers)
    if date_at is not None:
        fields.append((b"Date", date(date_at)))
    e = policy.new_entry(KEY, list(request_headers), status, b"", fields, request_time,
                         response_time, heuristic=heuristic)
    e.body_length = body_length
    return e


# --- storability (RFC 9111 §3) ------------------------------------------------------

STORABLE_CASES = [
    # id, method, status, request headers, response headers, kwargs, expected
    ("max-age", b"GET", 200, [], [cc("max-age=60")], {}, None),
    ("post", b"POST", 200, [], [cc("max-age=60")], {}, "method"),
    ("head", b"HEAD", 200, [], [cc("max-age=60")], {}, "method"),
    ("request-no-store", b"GET", 200, [cc("no-store")], [cc("max-age=60")], {}, "no-store"),
    ("response-no-store", b"GET", 200, [], [cc("no-store, max-age=60")], {}, "no-store"),
    ("must-understand-known-status", b"GET", 200, [],
     [cc("no-store, must-understand, max-age=60")], {}, None),
    ("must-understand-unknown-status", b"GET", 299, [],
     [cc("no-store, must-understand, max-age=60")], {}, "status"),
    ("private", b"GET", 200, [], [cc("private, max-age=60")], {}, "private"),
    ("private-qualified", b"GET", 200, [], [cc('private="Set-Cookie", max-age=60')], {},
     "private"),
    ("private-case", b"GET", 200, [], [(b"cache-control", b"PRIVATE")], {}, "private"),
    ("vary-star", b"GET", 200, [], [cc("max-age=60"), (b"Vary", b"*")], {}, "vary-star"),
    ("vary-star-in-list", b"GET", 200, [], [cc("max-age=60"), (b"Vary", b"Accept, *")], {},
     "vary-star"),
    ("authorization", b"GET", 200, [(b"Authorization", b"Basic eDp5")],
     [cc("max-age=60")], {}, "authorization"),
    ("authorization-public", b"GET", 200, [(b"Authorization", b"Basic eDp5")],
     [cc("public, max-age=60")], {}, None),
    ("authorization-s-maxage", b"GET", 200, [(b"Authorization", b"Basic eDp5")],
     [cc("s-maxage=60")], {}, None),
    ("authorization-must-revalidate", b"GET", 200, [(b"Authorization", b"Basic eDp5")],
     [cc("max-age=60, must-revalidate")], {}, None),
    ("set-cookie", b"GET", 200, [], [cc("max-age=60"), (b"Set-Cookie", b"sid=1")], {},
     "set-cookie"),
    ("set-cookie-allowed", b"GET", 200, [], [cc("max-age=60"), (b"Set-Cookie", b"sid=1")],
     {"allow_set_cookie": True}, None),
    ("too-large", b"GET", 200, [], [cc("max-age=60")],
     {"content_length": 2000, "max_object": 1000}, "too-large"),
    ("size-ok", b"GET", 200, [], [cc("max-age=60")],
     {"content_length": 1000, "max_object": 1000}, None),
    ("partial", b"GET", 206, [], [cc("max-age=60")], {}, "partial"),
    ("not-modified", b"GET", 304, [], [cc("max-age=60")], {}, "status"),
    ("informational", b"GET", 103, [], [cc("max-age=60")], {}, "status"),
    ("302-no-freshness", b"GET", 302, [], [(b"Last-Modified", date(T - 1000))], {},
     "no-freshness"),
    ("302-max-age", b"GET", 302, [], [cc("max-age=60")], {}, None),
    ("500-no-freshness", b"GET", 500, [], [], {}, "no-freshness"),
    ("500-expires", b"GET", 500, [], [(b"Date", date(T)), (b"Expires", date(T + 60))], {},
     None),
    ("200-nothing", b"GET", 200, [], [(b"Content-Type", b"text/plain")], {}, "no-freshness"),
    ("200-heuristic", b"GET", 200, [], [(b"Date", date(T)),
                                        (b"Last-Modified", date(T - 1000))], {}, None),
    ("200-etag-only", b"GET", 200, [], [(b"ETag", b'"x"')], {}, None),
    ("404-heuristic", b"GET", 404, [], [(b"Date", date(T)),
                                        (b"Last-Modified", date(T - 1000))], {}, None),
    ("no-cache-with-validator", b"GET", 200, [], [cc("no-cache"), (b"ETag", b'"x"')], {},
     None),
    ("expired-without-validator", b"GET", 200, [],
     [(b"Date", date(T)), (b"Expires", date(T - 10))], {}, "no-freshness"),
    ("public-301", b"GET", 301, [], [cc("public"), (b"Date", date(T)),
                                     (b"Last-Modified", date(T - 1000))], {}, None),
]


@pytest.mark.parametrize("method,status,request_headers,response_headers,kwargs,expected",
                         [c[1:] for c in STORABLE_CASES], ids=[c[0] for c in STORABLE_CASES])
def test_why_not_storable(method, status, request_headers, response_headers, kwargs, expected):
    assert policy.why_not_storable(method, status, request_headers, response_headers,
                                   now=T, **kwargs) == expected


# --- freshness lifetime (§4.2.1, §4.2.2) ---------------------------------------------

LIFETIME_CASES = [
    ("s-maxage-first", 200, [cc("max-age=10, s-maxage=100")], True, (100.0, False)),
    ("max-age-over-expires", 200, [cc("max-age=10"), (b"Date", date(T)),
                                   (b"Expires", date(T + 500))], True, (10.0, False)),
    ("expires-minus-date", 200, [(b"Date", date(T - 100)), (b"Expires", date(T + 200))],
     True, (300.0, False)),
    ("expires-without-date", 200, [(b"Expires", date(T + 50))], True, (50.0, False)),
    ("expires-invalid", 200, [(b"Date", date(T)), (b"Expires", b"0")], True, (0.0, False)),
    ("expires-twice", 200, [(b"Date", date(T)), (b"Expires", date(T + 60)),
                            (b"Expires", date(T + 90))], True, (0.0, False)),
    ("max-age-invalid", 200, [cc("max-age=abc")], True, (0.0, False)),
    ("max-age-conflict", 200, [cc("max-age=10"), cc("max-age=20")], True, (0.0, False)),
    ("max-age-repeated-same", 200, [cc("max-age=10, max-age=10")], True, (10.0, False)),
    ("max-age-quoted", 200, [cc('max-age="60"')], True, (60.0, False)),
    ("max-age-huge", 200, [cc("max-age=99999999999999999999999")], True,
     (float(2 ** 31), False)),
    ("heuristic", 200, [(b"Date", date(T)), (b"Last-Modified", date(T - 1000))], True,
     (100.0, True)),
    ("heuristic-capped", 200, [(b"Date", date(T)), (b"Last-Modified", date(T - 10 ** 7))],
     True, (86400.0, True)),
    ("heuristic-off", 200, [(b"Date", date(T)), (b"Last-Modified", date(T - 1000))], False,
     (0.0, False)),
    ("heuristic-not-for-302", 302, [(b"Date", date(T)), (b"Last-Modified", date(T - 1000))],
     True, (0.0, False)),
    ("heuristic-302-public", 302, [cc("public"), (b"Date", date(T)),
                                   (b"Last-Modified", date(T - 1000))], True, (100.0, True)),
    ("nothing", 200, [], True, (0.0, False)),
]


@pytest.mark.parametrize("status,headers,heuristic,expected", [c[1:] for c in LIFETIME_CASES],
                         ids=[c[0] for c in LIFETIME_CASES])
def test_freshness_lifetime(status, headers, heuristic, expected):
    assert policy.freshness_lifetime(status, headers, T, heuristic=heuristic) == expected


# --- age (§4.2.3) ---------------------------------------------------------------------

@pytest.mark.parametrize("date_at,age,request_time,now,expected", [
    (T - 10, None, T - 2, T + 20, 30.0),   # apparent age 10 beats Age 0 + delay 2
    (T, b"100", T - 2, T + 20, 122.0),     # corrected Age: 100 + delay 2, + 20 resident
    (T + 50, None, T, T + 5, 5.0),         # Date in the future: apparent age 0
    (None, None, T - 1, T, 1.0),           # no Date: the response delay still counts
], ids=["apparent", "age-header", "future-date", "no-date"])
def test_current_age(date_at, age, request_time, now, expected):
    headers = [cc("max-age=600")] + ([(b"Age", age)] if age else [])
    e = entry(*headers, date_at=date_at, request_time=request_time)
    assert policy.current_age(e, now) == expected


# --- lookup decisions --------------------------------------------------------------------

def soft_purged(e: CacheEntry) -> CacheEntry:
    e.flags |= FLAG_INVALIDATED
    return e


LOOKUP_CASES = [
    # id, entry headers, request headers, seconds after T, (action, fwd)
    ("fresh", [cc("max-age=60")], [], 10, (Action.FRESH, None)),
    ("stale", [cc("max-age=60")], [], 70, (Action.MUST_REVALIDATE, "stale")),
    ("request-no-cache", [cc("max-age=60")], [cc("no-cache")], 10,
     (Action.MUST_REVALIDATE, "request")),
    ("pragma-no-cache", [cc("max-age=60")], [(b"Pragma", b"no-cache")], 10,
     (Action.MUST_REVALIDATE, "request")),
    ("pragma-ignored-with-cache-control", [cc("max-age=60")],
     [(b"Pragma", b"no-cache"), cc("max-stale")], 10, (Action.FRESH, None)),
    ("request-max-age-exceeded", [cc("max-age=60")], [cc("max-age=5")], 10,
     (Action.MUST_REVALIDATE, "request")),
    ("request-max-age-ok", [cc("max-age=60")], [cc("max-age=20")], 10, (Action.FRESH, None)),
    ("request-max-age-0", [cc("max-age=60")], [cc("max-age=0")], 1,
     (Action.MUST_REVALIDATE, "request")),
    ("min-fresh-not-met", [cc("max-age=60")], [cc("min-fresh=55")], 10,
     (Action.MUST_REVALIDATE, "request")),
    ("min-fresh-met", [cc("max-age=60")], [cc("min-fresh=40")], 10, (Action.FRESH, None)),
    ("max-stale-any", [cc("max-age=60")], [cc("max-stale")], 1000, (Action.STALE, None)),
    ("max-stale-within", [cc("max-age=60")], [cc("max-stale=20")], 70, (Action.STALE, None)),
    ("max-stale-exceeded", [cc("max-age=60")], [cc("max-stale=5")], 70,
     (Action.MUST_REVALIDATE, "stale")),
    ("must-revalidate-beats-max-stale", [cc("max-age=60, must-revalidate")],
     [cc("max-stale")], 70, (Action.MUST_REVALIDATE, "stale")),
    ("proxy-revalidate-beats-max-stale", [cc("max-age=60, proxy-revalidate")],
     [cc("max-stale")], 70, (Action.MUST_REVALIDATE, "stale")),
    ("s-maxage-implies-proxy-revalidate", [cc("s-maxage=60")], [cc("max-stale")], 70,
     (Action.MUST_REVALIDATE, "stale")),
    ("response-no-cache", [cc("no-cache, max-age=60"), (b"ETag", b'"a"')], [], 1,
     (Action.MUST_REVALIDATE, "stale")),
    ("response-no-cache-beats-max-stale", [cc("no-cache"), (b"ETag", b'"a"')],
     [cc("max-stale")], 1, (Action.MUST_REVALIDATE, "stale")),
    ("swr-within", [cc("max-age=60, stale-while-revalidate=30")], [], 70,
     (Action.STALE_REVALIDATE_IN_BACKGROUND, None)),
    ("swr-exceeded", [cc("max-age=60, stale-while-revalidate=30")], [], 100,
     (Action.MUST_REVALIDATE, "stale")),
    ("swr-but-must-revalidate", [cc("max-age=60, stale-while-revalidate=30, must-revalidate")],
     [], 70, (Action.MUST_REVALIDATE, "stale")),
    ("only-if-cached-fresh", [cc("max-age=60")], [cc("only-if-cached")], 10,
     (Action.FRESH, None)),
    ("only-if-cached-stale", [cc("max-age=60")], [cc("only-if-cached")], 70,
     (Action.GATEWAY_TIMEOUT, "stale")),
    ("only-if-cached-with-max-stale", [cc("max-age=60")], [cc("only-if-cached, max-stale")],
     70, (Action.STALE, None)),
    ("if-match-goes-to-origin", [cc("max-age=60")], [(b"If-Match", b'"a"')], 10,
     (Action.MISS, "request")),
]


@pytest.mark.parametrize("headers,request_headers,after,expected",
                         [c[1:] for c in LOOKUP_CASES], ids=[c[0] for c in LOOKUP_CASES])
def test_lookup_decision(headers, request_headers, after, expected):
    decision = policy.lookup_decision(entry(*headers), request_headers, T + after)
    assert (decision.action, decision.fwd) == expected


def test_lookup_decision_ttl_and_misses():
    decision = policy.lookup_decision(entry(cc("max-age=60")), [], T + 10)
    assert decision.ttl == 50
    assert policy.lookup_decision(None, [], T) == (Action.MISS, "uri-miss", None)
    assert policy.lookup_decision(None, [], T, vary_miss=True) == (Action.MISS, "vary-miss", None)
    assert policy.lookup_decision(None, [cc("only-if-cached")], T).action == \
        Action.GATEWAY_TIMEOUT


def test_soft_purge_makes_fresh_entry_stale():
    assert policy.lookup_decision(soft_purged(entry(cc("max-age=60"))), [], T + 1).action == \
        Action.MUST_REVALIDATE
    swr = soft_purged(entry(cc("max-age=60, stale-while-revalidate=30")))
    assert policy.lookup_decision(swr, [], T + 1).action == \
        Action.STALE_REVALIDATE_IN_BACKGROUND


@pytest.mark.parametrize("headers,request_headers,after,grace,expected", [
    ([cc("max-age=60, stale-if-error=60")], [], 90, 0, True),
    ([cc("max-age=60, stale-if-error=60")], [], 130, 0, False),
    ([cc("max-age=60")], [], 90, 100, True),
    ([cc("max-age=60")], [], 90, 0, False),
    ([cc("max-age=60")], [cc("stale-if-error=120")], 90, 0, True),
    ([cc("max-age=60, must-revalidate, stale-if-error=600")], [], 90, 600, False),
    ([cc("s-maxage=60")], [], 90, 600, False),
    ([cc("no-cache, stale-if-error=600"), (b"ETag", b'"a"')], [], 1, 600, False),
], ids=["sie-within", "sie-exceeded", "grace", "nothing", "request-sie", "must-revalidate",
        "s-maxage", "no-cache"])
def test_serve_stale_on_error(headers, request_headers, after, grace, expected):
    assert policy.serve_stale_on_error(entry(*headers), request_headers, T + after,
                                       stale_grace=grace) is expected


# --- validation (§4.3) -------------------------------------------------------------------

def test_revalidation_headers_and_strip_conditionals():
    e = entry(cc("max-age=60"), (b"ETag", b'"v1"'), (b"Last-Modified", date(T - 100)))
    assert policy.revalidation_headers(e) == [(b"If-None-Match", b'"v1"'),
                                              (b"If-Modified-Since", date(T - 100))]
    assert policy.revalidation_headers(entry(cc("max-age=60"))) == []
    request = [(b"Host", b"a"), (b"If-None-Match", b'"x"'), (b"if-modified-since", b"x"),
               (b"Range", b"bytes=0-1"), (b"If-Range", b'"x"'), (b"Accept", b"*/*")]
    assert policy.strip_conditionals(request) == [(b"Host", b"a"), (b"Accept", b"*/*")]


def test_apply_304_updates_headers_and_freshness():
    e = entry(cc("max-age=60"), (b"Content-Type", b"text/html"), (b"ETag", b'"v1"'),
              (b"X-Old", b"1"), body_length=1234)
    e.body_id, e.chunk_size = 77, 4096
    e = soft_purged(e)
    later = T + 500
    updated = policy.apply_304(e, [(b"Date", date(later)), cc("max-age=300"),
                                   (b"ETag", b'"v1"'), (b"X-Old", b"2"),
                                   (b"Content-Length", b"0"), (b"Age", b"3")],
                               later - 1, later)
    assert updated is not None
    fields = {n.lower(): v for n, v in updated.headers}
    assert fields[b"cache-control"] == b"max-age=300"
    assert fields[b"x-old"] == b"2"
    assert fields[b"content-type"] == b"text/html"  # kept
    assert b"content-length" not in fields and b"age" not in fields
    assert updated.lifetime == 300 and updated.age_value == 3
    assert (updated.body_length, updated.body_id, updated.chunk_size) == (1234, 77, 4096)
    assert not updated.invalidated
    assert policy.lookup_decision(updated, [], later + 10).action == Action.FRESH


@pytest.mark.parametrize("stored,sent,selects", [
    (b'"v1"', b'"v1"', True),
    (b'"v1"', b'"v2"', False),
    (b'W/"v1"', b'W/"v1"', True),     # weak validators: weak comparison
    (b'"v1"', b'W/"v1"', True),
    (b'W/"v1"', b'"v1"', False),      # a strong validator needs a strong match
    (None, b'"v1"', False),
    (b'"v1"', None, True),            # no validator: it answers our own conditional
])
def test_apply_304_selection(stored, sent, selects):
    e = entry(cc("max-age=60"), *([(b"ETag", stored)] if stored else []))
    headers = [cc("max-age=60")] + ([(b"ETag", sent)] if sent else [])
    assert (policy.apply_304(e, headers, T + 1, T + 1) is not None) is selects


@pytest.mark.parametrize("request_headers,expected", [
    ([(b"If-None-Match", b'"v1"')], True),
    ([(b"If-None-Match", b'W/"v1"')], True),                     # weak comparison
    ([(b"If-None-Match", b'"a", "v1"')], True),
    ([(b"If-None-Match", b'"a", "b"')], False),
    ([(b"If-None-Match", b"*")], True),
    ([(b"If-None-Match", b'"x"'), (b"If-Modified-Since", date(T))], False),  # INM wins
    ([(b"If-Modified-Since", date(T - 100))], True),            # equal to Last-Modified
    ([(b"If-Modified-Since", date(T - 101))], False),
    ([(b"If-Modified-Since", b"yesterday")], False),
    ([], False),
], ids=["inm", "inm-weak", "inm-list", "inm-none", "inm-star", "inm-over-ims", "ims-equal",
        "ims-older", "ims-invalid", "none"])
def test_is_not_modified(request_headers, expected):
    e = entry(cc("max-age=60"), (b"ETag", b'"v1"'), (b"Last-Modified", date(T - 100)))
    assert policy.is_not_modified(e, request_headers) is expected


def test_is_not_modified_only_for_2xx():
    e = entry(cc("max-age=60"), (b"ETag", b'"v1"'), status=404)
    assert not policy.is_not_modified(e, [(b"If-None-Match", b'"v1"')])


# --- invalidation (§4.4) ---------------------------------------------------------------------

def test_invalidation_keys():
    headers = [(b"Location", b"https://example.com/new"),
               (b"Content-Location", b"item/7?x=1"),
               (b"Location", b"https://other.example/x")]
    keys = policy.invalidation_keys(b"POST", 201, b"https", b"Example.com", b"/items/", headers)
    assert keys == [b"https://example.com/items/", b"https://example.com/new",
                    b"https://example.com/items/item/7?x=1"]
    assert policy.invalidation_keys(b"DELETE", 302, b"https", b"example.com", b"/a", []) == \
        [b"https://example.com/a"]
    assert policy.invalidation_keys(b"POST", 500, b"https", b"example.com", b"/a", []) == []
    assert policy.invalidation_keys(b"GET", 200, b"https", b"example.com", b"/a", []) == []
    # http and https are different origins
    assert policy.invalidation_keys(b"PUT", 204, b"https", b"example.com", b"/a",
                                    [(b"Location", b"http://example.com/b")]) == \
        [b"https://example.com/a"]


# --- ranges --------------------------------------------------------------------------------------

@pytest.mark.parametrize("value,length,expected", [
    (b"bytes=0-9", 100, (0, 10)),
    (b"bytes=90-", 100, (90, 100)),
    (b"bytes=-10", 100, (90, 100)),
    (b"bytes=-1000", 100, (0, 100)),
    (b"bytes=0-999", 100, (0, 100)),
    (b"BYTES = 5-5", 100, (5, 6)),
    (b"bytes=100-", 100, UNSATISFIABLE),
    (b"bytes=-0", 100, UNSATISFIABLE),
    (b"bytes=0-", 0, UNSATISFIABLE),
    (b"bytes=-5", 0, None),
    (b"bytes=0-1,5-6", 100, None),     # several ranges: send it all
    (b"items=0-1", 100, None),
    (b"bytes=5-2", 100, None),
    (b"bytes=abc", 100, None),
    (b"bytes=1", 100, None),
    (None, 100, None),
])
def test_byte_range(value, length, expected):
    assert policy.byte_range(value, length) == expected


def _head_fields(head: bytes) -> tuple[bytes, dict[bytes, bytes]]:
    status_line, *lines = head.split(b"\r\n")
    assert lines[-1] == b""  # ends with CRLF, without the blank line
    return status_line, {n.lower(): v.strip() for n, _, v in
                             (line.partition(b":") for line in lines[:-1])}


def test_respond_from_cache_full_head_range():
    e = entry(cc("max-age=60"), (b"Content-Type", b"text/plain"), (b"ETag", b'"v1"'),
              (b"Last-Modified", date(T - 100)), body_length=1000)
    status = policy.cache_status(hit=True, ttl=50)
    full = policy.respond_from_cache(e, b"GET", [], T + 10, status)
    line, fields = _head_fields(full.head)
    assert (full.status, line, full.body_start, full.body_end) == (200, b"HTTP/1.1 200 OK", 0,
                                                                    1000)
    assert fields[b"content-length"] == b"1000" and fields[b"age"] == b"10"
    assert fields[b"cache-status"] == b"edgeproxy; hit; ttl=50"
    assert fields[b"accept-ranges"] == b"bytes" and fields[b"content-type"] == b"text/plain"

    head = policy.respond_from_cache(e, b"HEAD", [], T + 10, status)
    assert (head.status, head.body_start, head.body_end) == (200, 0, 0)
    assert b"Content-Length: 1000\r\n" in head.head

    part = policy.respond_from_cache(e, b"GET", [(b"Range", b"bytes=10-19")], T, status)
    line, fields = _head_fields(part.head)
    assert (part.status, part.body_start, part.body_end) == (206, 10, 20)
    assert fields[b"content-range"] == b"bytes 10-19/1000" and fields[b"content-length"] == b"10"

    bad = policy.respond_from_cache(e, b"GET", [(b"Range", b"bytes=5000-")], T, status)
    line, fields = _head_fields(bad.head)
    assert (bad.status, bad.body_end) == (416, 0) and fields[b"content-range"] == b"bytes */1000"

    stale_validator = [(b"Range", b"bytes=10-19"), (b"If-Range", b'"v0"')]
    assert policy.respond_from_cache(e, b"GET", stale_validator, T, status).status == 200
    good_validator = [(b"Range", b"bytes=10-19"), (b"If-Range", b'"v1"')]
    assert policy.respond_from_cache(e, b"GET", good_validator, T, status).status == 206
    by_date = [(b"Range", b"bytes=10-19"), (b"If-Range", date(T - 100))]
    assert policy.respond_from_cache(e, b"GET", by_date, T, status).status == 206

    nm = policy.respond_from_cache(e, b"GET", [(b"If-None-Match", b'"v1"')], T, status)
    line, fields = _head_fields(nm.head)
    assert (nm.status, nm.body_end) == (304, 0)
    assert fields[b"etag"] == b'"v1"' and b"content-type" not in fields
    assert b"content-length" not in fields


def test_respond_from_cache_204_has_no_content_length():
    e = entry(cc("max-age=60"), status=204, body_length=0)
    r = policy.respond_from_cache(e, b"GET", [], T, b"edgeproxy; hit")
    assert r.head.startswith(b"HTTP/1.1 204 No Content\r\n") and b"Content-Length" not in r.head


def test_stored_head_drops_per_hop_and_per_client_fields():
    e = entry(cc("max-age=60"), (b"Connection", b"close"), (b"Set-Cookie", b"a=1"),
              (b"Age", b"5"), (b"Content-Length", b"3"), (b"Transfer-Encoding", b"chunked"),
              (b"X-Kept", b"yes"))
    names = {n.lower() for n, _ in e.headers}
    assert names == {b"cache-control", b"x-kept", b"date"}


# --- Cache-Status (RFC 9211) --------------------------------------------------------------------

@pytest.mark.parametrize("kwargs,expected", [
    ({"hit": True, "ttl": 30}, b"edgeproxy; hit; ttl=30"),
    ({"hit": True, "ttl": -0.5}, b"edgeproxy; hit; ttl=-1"),
    ({"fwd": "uri-miss", "fwd_status": 200, "stored": True},
     b"edgeproxy; fwd=uri-miss; fwd-status=200; stored"),
    ({"fwd": "uri-miss", "fwd_status": 200, "detail": "private"},
     b"edgeproxy; fwd=uri-miss; fwd-status=200; detail=private"),
    ({"fwd": "stale", "fwd_status": 304, "key": b"https://a/b"},
     b'edgeproxy; fwd=stale; fwd-status=304; key="https://a/b"'),
    ({"fwd": "miss", "detail": "no store"}, b'edgeproxy; fwd=miss; detail="no store"'),
    ({"hit": True, "collapsed": True}, b"edgeproxy; hit; collapsed"),
])
def test_cache_status(kwargs, expected):
    assert policy.cache_status(**kwargs) == expected


# --- keys, dates, records ----------------------------------------------------------

def test_cache_key_normalisation():
    assert cache_key(b"HTTPS", b"Example.COM:443", b"/a?b=C") == b"https://example.com/a?b=C"
    assert cache_key(b"http", b"example.com:80", b"/") == b"http://example.com/"
    assert cache_key(b"http", b"example.com:8080", b"/") == b"http://example.com:8080/"
    assert cache_key(b"https", b"example.com", b"/") != cache_key(b"http", b"example.com", b"/")
    assert key_for_url("https://user@Example.com:443/p?q#frag") == b"https://example.com/p?q"
    assert key_for_url("ftp://example.com/") is None and key_for_url("/relative") is None
    assert key_prefix_for_url("https://Example.com/static/") == b"https://example.com/static/"
    assert key_prefix_for_url("https://example.com") == b"https://example.com/"
    assert key_prefix_for_url("example.com/x") is None


def test_variant_key_normalisation():
    names = vary_names([(b"Vary", b"Accept-Encoding, accept-language"), (b"vary", b"Origin")])
    assert names == (b"accept-encoding", b"accept-language", b"origin")
    a = variant_key(names, [(b"Accept-Encoding", b"gzip, br"), (b"Accept-Language", b"en")])
    b = variant_key(names, [(b"accept-encoding", b"GZIP,BR"), (b"Accept-Language", b"EN")])
    c = variant_key(names, [(b"Accept-Encoding", b"gzip"), (b"Accept-Encoding", b"br"),
                            (b"Accept-Language", b"en")])
    assert a == b == c and len(a) == 16
    assert variant_key(names, [(b"Accept-Encoding", b"gzip")]) != \
        variant_key(names, [(b"Accept-Encoding", b"gzip"), (b"Accept-Language", b"")])
    assert variant_key(names, [(b"Origin", b"https://A")]) != \
        variant_key(names, [(b"Origin", b"https://a")])  # not a case-insensitive field
    assert variant_key((), [(b"Accept-Encoding", b"gzip")]) == b""


@pytest.mark.parametrize("text", [b"Sun, 06 Nov 1994 08:49:37 GMT",
                                  b"Sunday, 06-Nov-94 08:49:37 GMT",
                                  b"Sun Nov  6 08:49:37 1994"])
def test_http_date_formats(text):
    assert policy.parse_http_date(text) == 784111777.0


@pytest.mark.parametrize("text", [b"0", b"-1", b"", b"Sun, 06 Nov 1994 08:49:37 PST",
                                  b"Sun, 06 Foo 1994 08:49:37 GMT",
                                  b"Sun, 06 Nov 1994 25:00:00 GMT"])
def test_http_date_invalid(text):
    assert policy.parse_http_date(text) is None


def test_entry_record_round_trip():
    e = entry(cc("max-age=60, stale-if-error=5"), (b"ETag", b'"v"'), (b"Vary", b"Accept"),
              (b"Surrogate-Key", b"a b"), (b"Cache-Tag", b"c, a"),
              request_headers=[(b"Accept", b"text/html")])
    e.body_id, e.chunk_size, e.last_access = 12345, 4096, T + 3
    assert e.tags == (b"a", b"b", b"c") and e.vary == (b"accept",) and e.stale_if_error == 5
    assert decode_record(encode_entry(e)) == e
    assert decode_record(encode_entry(dataclasses.replace(e, vary=(), tags=()))).tags == ()
    for bad in (b"", b"\x09junk", encode_entry(e)[:-1]):
        with pytest.raises(ValueError):
            decode_record(bad)


def test_entry_record_checksums():
    """A record carries its body's CRC-32 and its own; a changed byte is
    an unreadable record, the patches keep it readable, and a record of
    format 1 (no checksums) is still read, with no body checksum."""
    import struct

    from edgeproxy.cache.entry import patch_flags, patch_last_access
    e = entry(cc("max-age=60"), (b"ETag", b'"v"'))
    e.body_id, e.chunk_size, e.body_crc = 7, 4096, 0
    assert decode_record(encode_entry(e)).body_crc == 0
    e.body_crc = 0xFFFFFFFF
    raw = encode_entry(e)
    assert decode_record(raw).body_crc == 0xFFFFFFFF
    assert decode_record(encode_entry(dataclasses.replace(e, body_crc=None))).body_crc is None
    for i in (1, 40, len(raw) // 2, len(raw) - 1):
        bad = bytearray(raw)
        bad[i] ^= 1
        with pytest.raises(ValueError, match="checksum"):
            decode_record(bytes(bad))
    assert decode_record(patch_last_access(raw, T + 9)).last_access == T + 9
    assert decode_record(patch_flags(raw, FLAG_INVALIDATED)).invalidated
    # format 1: kind 1, the fixed part without the body checksum, no trailer
    v1 = b"\x01" + raw[1:struct.calcsize("<BBHIQQ8d8I")] + raw[struct.calcsize("<BBHIQQ8d8Iq"):-4]
    old = decode_record(v1)
    assert old.body_crc is None and old.head == e.head and old.key == e.key
