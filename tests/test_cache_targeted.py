"""RFC 9213 targeted cache control end to end: a scripted origin sends
CDN-Cache-Control (and the other fields of the target list) with
Cache-Control, a real proxy process stores and serves by the targeted
field, and keeps it from clients unless told to forward it."""

from __future__ import annotations

import time
from email.utils import formatdate

import pytest
from test_cache_conformance import ScriptedOrigin, committed, get
from test_cache_proxy import cache_config, wait_for

from edgeproxy.cache import policy
from edgeproxy.cache.targeted import Targeting, targeted_directives
from edgeproxy.config import ConfigError, parse_config

CDN = (b"cdn-cache-control",)


@pytest.fixture
def scripted_with(proxy_factory, tmp_path):
    """make(script, extra) -> (origin, proxy): the cache, configured with
    the [cache] lines `extra`, in front of a scripted origin."""
    made = []

    def make(script, extra=""):
        origin = ScriptedOrigin(script)
        made.append(origin)
        return origin, proxy_factory(cache_config(tmp_path, origin.url, extra))

    yield make
    for o in made:
        o.close()


def http_date(offset: float) -> str:
    return formatdate(time.time() + offset, usegmt=True)


def ttl_of(cache_status: str) -> int:
    for part in cache_status.split(";"):
        part = part.strip()
        if part.startswith("ttl="):
            return int(part[4:])
    raise AssertionError(f"no ttl in {cache_status!r}")


def hit_after_store(port: int, path: str, proxy, stores: int):
    committed(proxy, stores)
    return get(port, path)


# --- the parser (RFC 8941 Dictionary, RFC 9213 §2.1) ----------------------------------

@pytest.mark.parametrize("value, expected", [
    (b"max-age=3600", {b"max-age": b"3600"}),
    (b"foobar, max-age=3600", {b"foobar": None, b"max-age": b"3600"}),
    (b"no-store", {b"no-store": None}),
    (b'private="set-cookie"', {b"private": None}),   # qualified: treated as unqualified
    (b"max-age=99999999999", {b"max-age": b"99999999999"}),
])
def test_valid_targeted_fields_parse_as_a_dictionary(value, expected):
    assert targeted_directives([(b"CDN-Cache-Control", value)], CDN) == expected


@pytest.mark.parametrize("value", [
    b"", b"   ", b"max-age =100", b"max-age= 100", b"MaX-aGe=3600",
    b"max-age=10000, &&&&&", b'max-age="10000"', b"max-age=-1", b"max-age", b"no-store=1",
    b"max-age=1.5",
])
def test_invalid_or_empty_targeted_fields_are_ignored(value):
    assert targeted_directives([(b"CDN-Cache-Control", value)], CDN) is None


def test_the_first_valid_field_of_the_target_list_wins():
    names = (b"edgeproxy-cache-control", b"cdn-cache-control")
    both = [(b"CDN-Cache-Control", b"max-age=10"), (b"Edgeproxy-Cache-Control", b"max-age=20")]
    assert targeted_directives(both, names) == {b"max-age": b"20"}
    bad_first = [(b"Edgeproxy-Cache-Control", b"max-age=x y"),
                 (b"CDN-Cache-Control", b"max-age=10")]
    assert targeted_directives(bad_first, names) == {b"max-age": b"10"}
    # several lines of one field are one dictionary
    split = [(b"CDN-Cache-Control", b"max-age=10"), (b"CDN-Cache-Control", b"must-revalidate")]
    assert targeted_directives(split, CDN) == {b"max-age": b"10", b"must-revalidate": None}


def test_policy_ignores_cache_control_and_expires_under_a_valid_targeted_field():
    now = time.time()
    t = Targeting((b"cdn-cache-control",), False)
    headers = [(b"Cache-Control", b"no-store"), (b"CDN-Cache-Control", b"max-age=600"),
               (b"Expires", b"0")]
    assert policy.why_not_storable(b"GET", 200, [], headers, now=now, targeting=t) is None
    assert policy.why_not_storable(b"GET", 200, [], headers, now=now) == "no-store"
    entry = policy.new_entry(b"http://h/x", [], 200, b"OK", headers, now, now, targeting=t)
    assert entry.lifetime == 600
    assert b"cdn-cache-control" not in entry.head.lower()       # not forwarded: not stored
    kept = policy.new_entry(b"http://h/x", [], 200, b"OK", headers, now, now,
                            targeting=t._replace(forward=True))
    assert b"CDN-Cache-Control: max-age=600" in kept.head


def test_config_keys_are_checked():
    base = ('[[listen]]\nbind = "127.0.0.1:8080"\n[[route]]\npath = "/"\npool = "w"\n'
            'cache = true\n[pool.w]\nbackends = ["http://127.0.0.1:9"]\n'
            '[cache]\npath = "/tmp/x"\n')
    cfg = parse_config(base)
    assert cfg.cache.targeted == ("edgeproxy-cache-control", "cdn-cache-control")
    assert cfg.cache.forward_targeted is False
    cfg = parse_config(base + 'targeted = ["Akamai-Cache-Control"]\nforward_targeted = true\n')
    assert cfg.cache.targeted == ("akamai-cache-control",) and cfg.cache.forward_targeted
    for bad, msg in (('targeted = ["Cache-Control"]', "cache.targeted"),
                     ('targeted = ["a b"]', "cache.targeted[0]"),
                     ('targeted = "CDN-Cache-Control"', "cache.targeted"),
                     ('targeted = ["x", "X"]', "twice"),
                     ("forward_targeted = 1", "cache.forward_targeted")):
        with pytest.raises(ConfigError) as e:
            parse_config(base + bad + "\n")
        assert msg in str(e.value)


# --- end to end: the RFC's examples and the cache-tests behaviours -----------------------

def test_cdn_cache_control_overrides_cache_control_for_the_edge(scripted_with):
    origin, p = scripted_with({
        # RFC 9213 §3.1: the CDN keeps it an hour, browsers a minute
        "/long": [(200, [("Cache-Control", "max-age=60"),
                         ("CDN-Cache-Control", "max-age=3600")])],
        # a short CDN lifetime beats a long Cache-Control one
        "/short": [(200, [("Cache-Control", "max-age=3600"),
                          ("CDN-Cache-Control", "max-age=5")])],
        # stored although Cache-Control says no-store (cdn-fresh-cc-nostore)
        "/cc-nostore": [(200, [("Cache-Control", "no-store"),
                               ("CDN-Cache-Control", "max-age=10000")])],
        # a past Expires does not count (Expires is ignored too)
        "/expires": [(200, [("CDN-Cache-Control", "max-age=3600"),
                            ("Expires", http_date(-10000))])],
        # an extension directive does not spoil it
        "/ext": [(200, [("CDN-Cache-Control", "foobar, max-age=3600")])],
        # max-age beyond 2^31 saturates (cdn-max-age-max-plus)
        "/huge": [(200, [("CDN-Cache-Control", "max-age=99999999999")])],
    })
    for path in ("/long", "/short", "/cc-nostore", "/expires", "/ext", "/huge"):
        first = get(p.port, path)
        assert first.status == 200, path
        assert first.header("cdn-cache-control") is None, path     # consumed, not forwarded
    committed(p, 6)
    long_hit = get(p.port, "/long")
    status = long_hit.header("cache-status")
    assert status.startswith("edgeproxy; hit"), status
    assert 3500 < ttl_of(status) <= 3600
    assert long_hit.header("cache-control") == "max-age=60"       # the client's own rules stay
    assert long_hit.header("cdn-cache-control") is None
    short = get(p.port, "/short").header("cache-status")
    assert short.startswith("edgeproxy; hit") and ttl_of(short) <= 5, short
    for path in ("/cc-nostore", "/expires", "/ext", "/huge"):
        assert get(p.port, path).header("cache-status").startswith("edgeproxy; hit"), path
        assert origin.count(path) == 1, path


def test_targeted_directives_that_forbid_storing_or_reuse(scripted_with):
    future = http_date(10000)
    origin, p = scripted_with({
        # RFC 9213 §3.1: no-store for the CDN, cacheable downstream
        "/nostore": [(200, [("Cache-Control", "max-age=10000"),
                            ("CDN-Cache-Control", "no-store"), ("Expires", future)])],
        "/private": [(200, [("CDN-Cache-Control", "private"),
                            ("Cache-Control", "max-age=10000"), ("Expires", future)])],
        "/max-age-0": [(200, [("CDN-Cache-Control", "max-age=0"), ("Expires", future)])],
        "/aged": [(200, [("CDN-Cache-Control", "max-age=3600"), ("Age", "7200")])],
        "/no-cache": [(200, [("CDN-Cache-Control", "no-cache"),
                             ("Cache-Control", "max-age=10000"), ("ETag", '"n"')]),
                      (304, [("ETag", '"n"')])],
    })
    assert "detail=no-store" in get(p.port, "/nostore").header("cache-status")
    assert "detail=private" in get(p.port, "/private").header("cache-status")
    for path in ("/max-age-0", "/aged"):
        # stale on arrival: never served from the cache, every request goes on
        get(p.port, path)
        time.sleep(0.2)
        assert "hit" not in get(p.port, path).header("cache-status"), path
        assert origin.count(path) == 2
    get(p.port, "/no-cache")
    committed(p, 1)
    again = get(p.port, "/no-cache").header("cache-status")
    assert "fwd=stale; fwd-status=304" in again, again        # revalidated before reuse
    assert origin.seen["/no-cache"][-1].get("if-none-match") == '"n"'
    for path in ("/nostore", "/private"):
        get(p.port, path)
        assert origin.count(path) == 2, path


def test_an_invalid_targeted_field_falls_back_to_cache_control(scripted_with):
    origin, p = scripted_with({
        "/unknown-type": [(200, [("CDN-Cache-Control", "max-age=10000, &&&&&"),
                                 ("Cache-Control", "no-store")])],
        "/wrong-type": [(200, [("CDN-Cache-Control", 'max-age="10000"'),
                               ("Cache-Control", "no-store")])],
        "/space": [(200, [("Cache-Control", "max-age=3600"),
                          ("CDN-Cache-Control", "max-age =1")])],
        "/empty": [(200, [("Cache-Control", "max-age=3600"), ("CDN-Cache-Control", "")])],
    })
    for path in ("/unknown-type", "/wrong-type"):
        assert "detail=no-store" in get(p.port, path).header("cache-status"), path
    for path in ("/space", "/empty"):
        get(p.port, path)
    committed(p, 2)
    for path in ("/space", "/empty"):
        status = get(p.port, path).header("cache-status")
        assert status.startswith("edgeproxy; hit") and ttl_of(status) > 3000, (path, status)
    get(p.port, "/unknown-type")
    assert origin.count("/unknown-type") == 2


def test_target_list_order_and_fields_not_on_it(scripted_with):
    origin, p = scripted_with({
        "/both": [(200, [("CDN-Cache-Control", "no-store"),
                         ("Edgeproxy-Cache-Control", "max-age=600")])],
        "/other": [(200, [("Cache-Control", "max-age=3600"),
                          ("Akamai-Cache-Control", "no-store")])],
    })
    first = get(p.port, "/both")
    assert first.header("cdn-cache-control") is None
    assert first.header("edgeproxy-cache-control") is None
    # a targeted field not on the list changes nothing and passes through
    other = get(p.port, "/other")
    assert other.header("akamai-cache-control") == "no-store"
    committed(p, 2)
    status = get(p.port, "/both").header("cache-status")
    assert status.startswith("edgeproxy; hit") and 500 < ttl_of(status) <= 600, status
    hit = get(p.port, "/other")
    assert hit.header("cache-status").startswith("edgeproxy; hit")
    assert hit.header("akamai-cache-control") == "no-store"
    assert origin.count("/both") == 1 and origin.count("/other") == 1


def test_forward_targeted_and_a_custom_target_list(scripted_with):
    origin, p = scripted_with({
        "/a": [(200, [("Cache-Control", "no-store"), ("Akamai-Cache-Control", "max-age=600"),
                      ("CDN-Cache-Control", "no-store")])],
    }, 'targeted = ["Akamai-Cache-Control"]\nforward_targeted = true')
    first = get(p.port, "/a")
    assert first.header("akamai-cache-control") == "max-age=600"
    assert first.header("cdn-cache-control") == "no-store"      # not on this edge's list
    committed(p, 1)
    hit = get(p.port, "/a")
    assert hit.header("cache-status").startswith("edgeproxy; hit")
    assert hit.header("akamai-cache-control") == "max-age=600"
    assert origin.count("/a") == 1


def test_an_empty_target_list_is_plain_rfc_9111(scripted_with):
    origin, p = scripted_with({
        "/a": [(200, [("Cache-Control", "no-store"), ("CDN-Cache-Control", "max-age=600")])],
    }, "targeted = []")
    r = get(p.port, "/a")
    assert "detail=no-store" in r.header("cache-status")
    assert r.header("cdn-cache-control") == "max-age=600"


def test_a_304_without_the_targeted_field_keeps_its_directives(scripted_with):
    # The stored response's CDN-Cache-Control (not stored in the head, since
    # it is not forwarded) still holds after a revalidation whose 304
    # carries only Cache-Control: the 304 updates fields, it does not remove them.
    origin, p = scripted_with({
        "/r": [(200, [("Cache-Control", "max-age=3600"), ("CDN-Cache-Control", "max-age=1"),
                      ("ETag", '"r"')]),
               (304, [("Cache-Control", "max-age=3600"), ("ETag", '"r"')])],
    })
    get(p.port, "/r")
    committed(p, 1)
    seen = []

    def revalidated() -> bool:
        seen.append(get(p.port, "/r").header("cache-status") or "")
        return "fwd=stale" in seen[-1]

    assert wait_for(revalidated, timeout=5.0), seen
    assert "fwd-status=304" in seen[-1], seen
    assert origin.seen["/r"][-1].get("if-none-match") == '"r"'
    # fresh again for one second (CDN-Cache-Control), not for an hour
    assert ttl_of(seen[-1]) <= 1, seen
