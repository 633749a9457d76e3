"""The cache wired into the data plane: real proxy processes in front of a real
origin (harness.Origin's /cache/<name>?... paths), checking each RFC 9111
behaviour end to end."""

from __future__ import annotations

import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from harness import ROOT, Client, Origin

FRESH = "cc=max-age=60"


def cache_config(tmp_path: Path, origin_url: str, extra: str = "", *, workers: int = 1,
                 max_object: str = "1MiB") -> str:
    return f"""
[server]
workers = {workers}

[timeout]
connect = 1.0
read = 3.0

[cache]
path = "{tmp_path / 'cache'}"
max_size = "64MiB"
max_object = "{max_object}"
{extra}

[[route]]
path = "/"
pool = "web"
cache = true

[[route]]
path = "/size/"
pool = "web"

[pool.web]
backends = ["{origin_url}"]
"""


@pytest.fixture
def cached(origin, proxy_factory, tmp_path):
    """A proxy caching everything but /size/ in front of the origin."""
    return proxy_factory(cache_config(tmp_path, origin.url))


def get(port: int, target: str, headers: dict | None = None, method: str = "GET"):
    with Client(port) as c:
        return c.request(method, target, headers)


def wait_for(pred, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.02)
    return pred()


def test_miss_then_hit_with_age_and_cache_status(cached, origin):
    target = f"/cache/a?{FRESH}&age=7"
    r1 = get(cached.port, target)
    assert r1.status == 200 and r1.body == b"a v0 "
    assert r1.header("cache-status") == "edgeproxy; fwd=uri-miss; fwd-status=200; stored"
    assert wait_for(lambda: get(cached.port, target).header("cache-status").startswith(
        "edgeproxy; hit"))
    r2 = get(cached.port, target)
    assert r2.body == b"a v0 " and r2.header("content-length") == "5"
    assert r2.header("cache-status").startswith("edgeproxy; hit; ttl=")
    assert int(r2.header("age")) >= 7          # the origin's Age, plus the time here
    assert r2.header("date")
    assert origin.hits["a"] == 1


def test_hits_do_not_bring_back_what_the_core_hides(cached, origin):
    target = f"/cache/lk?{FRESH}&leaky=1"
    get(cached.port, target)
    assert wait_for(lambda: get(cached.port, target).header("cache-status").startswith(
        "edgeproxy; hit"))
    r = get(cached.port, target)
    names = {k.lower() for k, _ in r.headers}
    assert r.header("x-kept") == "yes"
    assert not names & {"server", "x-powered-by", "x-hop", "connection"}


def test_large_hit_is_read_off_the_loop(origin, proxy_factory, tmp_path):
    p = proxy_factory(cache_config(tmp_path, origin.url, max_object="4MiB"))
    target = f"/cache/lg?{FRESH}&len=2500000"
    first = get(p.port, target).body
    assert wait_for(lambda: get(p.port, target).header("cache-status").startswith(
        "edgeproxy; hit"))
    r = get(p.port, target, {"Range": "bytes=-10"})
    assert r.status == 206 and r.body == first[-10:]
    r = get(p.port, target)
    assert r.body == first and origin.hits["lg"] == 1


def test_keepalive_and_pipelining_after_a_hit(cached, origin):
    target = f"/cache/p?{FRESH}"
    get(cached.port, target)
    assert wait_for(lambda: get(cached.port, target).header("cache-status").startswith(
        "edgeproxy; hit"))
    with Client(cached.port) as c:
        one = f"GET {target} HTTP/1.1\r\nHost: example.test\r\n\r\n".encode()
        c.send(one * 3 + b"GET /size/3 HTTP/1.1\r\nHost: example.test\r\n\r\n")
        for _ in range(3):
            r = c.read_response()
            assert r.status == 200 and r.body == b"p v0 "
            assert r.header("cache-status").startswith("edgeproxy; hit")
        last = c.read_response()
        assert last.body == b"xxx" and last.header("cache-status") is None  # uncached route
    assert origin.hits["p"] == 1


def test_head_is_answered_from_a_stored_get(cached, origin):
    target = f"/cache/h?{FRESH}"
    get(cached.port, target)
    assert wait_for(lambda: get(cached.port, target).header("cache-status").startswith(
        "edgeproxy; hit"))
    r = get(cached.port, target, method="HEAD")
    assert r.status == 200 and r.body == b"" and r.header("content-length") == "5"
    assert r.header("cache-status").startswith("edgeproxy; hit")
    assert origin.hits["h"] == 1


def test_head_miss_is_not_stored(cached, origin):
    r = get(cached.port, f"/cache/hm?{FRESH}", method="HEAD")
    assert r.header("cache-status") == "edgeproxy; fwd=uri-miss; fwd-status=200; detail=method"
    get(cached.port, f"/cache/hm?{FRESH}")
    assert origin.hits["hm"] == 2


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE"])
def test_unsafe_methods_go_to_the_origin_and_invalidate(cached, origin, method):
    target = f"/cache/u?{FRESH}"
    get(cached.port, target)
    assert wait_for(lambda: get(cached.port, target).header("cache-status").startswith(
        "edgeproxy; hit"))
    with Client(cached.port) as c:
        r = c.request(method, target, body=b"data")
    assert r.status == 200 and r.header("cache-status") is None
    assert origin.hits["u"] == 2
    r = get(cached.port, target)
    assert r.header("cache-status").startswith("edgeproxy; fwd=uri-miss")
    assert origin.hits["u"] == 3


@pytest.mark.parametrize("query", ["cc=s-maxage%3D60,max-age%3D0", "expires=60"])
def test_s_maxage_and_expires_give_freshness(cached, origin, query):
    target = f"/cache/f?{query}"
    get(cached.port, target)
    assert wait_for(lambda: get(cached.port, target).header("cache-status").startswith(
        "edgeproxy; hit"))
    assert origin.hits["f"] == 1


@pytest.mark.parametrize("query,headers,detail", [
    ("cc=no-store", {}, "no-store"),
    ("cc=private,max-age%3D60", {}, "private"),
    (FRESH, {"Authorization": "Bearer x"}, "authorization"),
    (f"{FRESH}&cookie=1", {}, "set-cookie"),
    (f"{FRESH}&vary=*", {}, "vary-star"),
    (FRESH, {"Cache-Control": "no-store"}, "no-store"),
])
def test_never_stored(cached, origin, query, headers, detail):
    target = f"/cache/n?{query}"
    r = get(cached.port, target, headers)
    assert r.status == 200
    assert r.header("cache-status") == f"edgeproxy; fwd=uri-miss; fwd-status=200; detail={detail}"
    time.sleep(0.1)
    r = get(cached.port, target, headers)
    assert "detail=" + detail in r.header("cache-status")
    assert origin.hits["n"] == 2


def test_too_large_streams_through_uncached(cached, origin):
    target = f"/cache/big?{FRESH}&len=1500000"
    r = get(cached.port, target)
    assert len(r.body) == 1500000 and r.body[:3] == bytes([0, 7, 14])
    assert r.header("cache-status").endswith("detail=too-large")
    get(cached.port, target)
    assert origin.hits["big"] == 2


def test_large_chunked_body_is_stored_decoded(cached, origin):
    target = f"/cache/ch?{FRESH}&chunked=1&len=300000"
    r1 = get(cached.port, target)
    assert r1.header("transfer-encoding") == "chunked" and len(r1.body) == 300000
    assert "detail=" not in r1.header("cache-status")   # storable (`stored` only when it came whole)
    assert wait_for(lambda: get(cached.port, target).header("cache-status").startswith(
        "edgeproxy; hit"))
    r2 = get(cached.port, target)
    assert r2.body == r1.body and r2.header("content-length") == "300000"
    assert origin.hits["ch"] == 1


def test_no_cache_response_is_revalidated_every_time(cached, origin):
    target = "/cache/nc?cc=no-cache&etag=1"
    get(cached.port, target)
    time.sleep(0.2)
    r = get(cached.port, target)
    assert r.status == 200 and r.body == b"nc v0 "
    assert r.header("cache-status").startswith("edgeproxy; fwd=stale; fwd-status=304")
    assert origin.hits["nc"] == 2
    assert origin.requests[-1].header("if-none-match") == '"nc-0"'


def test_stale_entry_is_revalidated_and_refreshed(cached, origin):
    target = "/cache/rv?cc=max-age%3D1&etag=1&age=5"      # stale at once
    get(cached.port, target)
    time.sleep(0.2)
    r = get(cached.port, target)
    assert r.status == 200 and r.body == b"rv v0 "
    assert r.header("cache-status").startswith("edgeproxy; fwd=stale; fwd-status=304")
    assert origin.requests[-1].header("if-none-match") == '"rv-0"'
    origin.version["rv"] += 1        # now the origin has a new version: a 200 replaces it
    r = get(cached.port, target)
    assert r.body == b"rv v1 " and r.header("cache-status").endswith("stored")


def test_client_conditional_gets_304_from_a_fresh_entry(cached, origin):
    target = f"/cache/cond?{FRESH}&etag=1"
    get(cached.port, target)
    assert wait_for(lambda: get(cached.port, target).header("cache-status").startswith(
        "edgeproxy; hit"))
    r = get(cached.port, target, {"If-None-Match": '"cond-0"'})
    assert r.status == 304 and r.header("etag") == '"cond-0"'
    assert r.header("cache-status").startswith("edgeproxy; hit")
    assert origin.hits["cond"] == 1


def test_range_gets_206_from_the_cache(cached, origin):
    target = f"/cache/rg?{FRESH}&len=1000"
    full = get(cached.port, target).body
    assert wait_for(lambda: get(cached.port, target).header("cache-status").startswith(
        "edgeproxy; hit"))
    r = get(cached.port, target, {"Range": "bytes=100-199"})
    assert r.status == 206 and r.body == full[100:200]
    assert r.header("content-range") == "bytes 100-199/1000"
    r = get(cached.port, target, {"Range": "bytes=5000-"})
    assert r.status == 416
    assert origin.hits["rg"] == 1


def test_vary_keeps_variants_apart(cached, origin):
    target = f"/cache/v?{FRESH}&vary=Accept-Language"
    en, fr = {"Accept-Language": "en"}, {"Accept-Language": "fr"}
    assert get(cached.port, target, en).body == b"v v0 en"
    time.sleep(0.2)
    r = get(cached.port, target, fr)
    assert r.body == b"v v0 fr" and "fwd=vary-miss" in r.header("cache-status")
    time.sleep(0.2)
    for h, body in ((en, b"v v0 en"), (fr, b"v v0 fr")):
        r = get(cached.port, target, h)
        assert r.body == body and r.header("cache-status").startswith("edgeproxy; hit")
    assert origin.hits["v"] == 2


def test_stale_while_revalidate_serves_stale_and_refreshes(cached, origin):
    target = "/cache/swr?cc=max-age%3D1,stale-while-revalidate%3D60&age=5"
    get(cached.port, target)
    time.sleep(0.2)
    origin.version["swr"] += 1
    r = get(cached.port, target)
    assert r.body == b"swr v0 "                   # stale, at once
    assert r.header("cache-status").startswith("edgeproxy; hit; ttl=-")
    assert wait_for(lambda: origin.hits["swr"] == 2)
    assert wait_for(lambda: get(cached.port, target).body == b"swr v1 ")


def test_stale_if_error_with_the_origin_down(proxy_factory, tmp_path):
    origin = Origin().start()
    p = proxy_factory(cache_config(tmp_path, origin.url))
    sie = "/cache/sie?cc=max-age%3D1,stale-if-error%3D60&age=5"
    strict = "/cache/mr?cc=max-age%3D1,must-revalidate&age=5"
    get(p.port, sie)
    get(p.port, strict)
    time.sleep(0.2)
    origin.failing.add("sie")
    r = get(p.port, sie)
    assert r.status == 200 and r.body == b"sie v0 "
    assert re.fullmatch(r"edgeproxy; fwd=stale; fwd-status=500; ttl=-\d+; detail=stale-if-error",
                        r.header("cache-status"))
    origin.stop()
    r = get(p.port, sie)
    assert r.status == 200 and r.body == b"sie v0 "
    assert r.header("cache-status").endswith("detail=stale-if-error")
    assert get(p.port, strict).status == 502   # must-revalidate: never stale


def test_stale_grace_from_the_config(proxy_factory, tmp_path):
    origin = Origin().start()
    p = proxy_factory(cache_config(tmp_path, origin.url, "stale_grace = 60"))
    target = "/cache/g?cc=max-age%3D1&age=5"
    get(p.port, target)
    time.sleep(0.2)
    origin.stop()
    r = get(p.port, target)
    assert r.status == 200 and r.body == b"g v0 "
    assert r.header("cache-status").endswith("detail=stale-if-error")


def test_concurrent_misses_collapse_into_one_origin_request(cached, origin):
    target = f"/cache/col?{FRESH}&delay=0.5"
    results = [None] * 50
    start = threading.Barrier(50)

    def one(i):
        with Client(cached.port) as c:
            start.wait()
            results[i] = c.request("GET", target)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(50)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(20)
    assert all(r is not None and r.status == 200 and r.body == b"col v0 " for r in results)
    assert origin.hits["col"] == 1
    assert sum("collapsed" in r.header("cache-status") for r in results) >= 40


def test_collapsed_requests_are_released_when_not_storable(cached, origin):
    target = "/cache/rel?cc=private&delay=0.3"
    results = []

    def one():
        results.append(get(cached.port, target))

    threads = [threading.Thread(target=one) for _ in range(5)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert len(results) == 5 and all(r.body == b"rel v0 " for r in results)
    assert origin.hits["rel"] == 5


def test_restart_keeps_the_cache(origin, proxy_factory, tmp_path):
    body = cache_config(tmp_path, origin.url)
    p = proxy_factory(body)
    target = f"/cache/rs?{FRESH}"
    get(p.port, target)
    assert wait_for(lambda: get(p.port, target).header("cache-status").startswith(
        "edgeproxy; hit"))
    assert p.stop() == 0
    p2 = proxy_factory(body)
    r = get(p2.port, target)
    assert r.body == b"rs v0 " and r.header("cache-status").startswith("edgeproxy; hit")
    assert origin.hits["rs"] == 1


def test_two_workers_share_the_store(origin, proxy_factory, tmp_path):
    p = proxy_factory(cache_config(tmp_path, origin.url, workers=2))
    target = f"/cache/w2?{FRESH}"
    get(p.port, target)
    time.sleep(0.3)
    statuses = [get(p.port, target).header("cache-status") for _ in range(30)]
    assert all(s.startswith("edgeproxy; hit") for s in statuses), statuses
    assert origin.hits["w2"] == 1
    children = subprocess.run(["pgrep", "-P", str(p.proc.pid)], capture_output=True, check=False,
                              text=True).stdout.split()
    assert len(children) == 2
    for pid in children:       # each worker opened the store itself, after fork
        assert "data.mdb" in Path(f"/proc/{pid}/maps").read_text()


def test_purge_of_a_running_proxy_takes_effect_at_once(cached, origin):
    target = f"/cache/pg?{FRESH}"
    get(cached.port, target)
    assert wait_for(lambda: get(cached.port, target).header("cache-status").startswith(
        "edgeproxy; hit"))
    out = subprocess.run([sys.executable, "-m", "edgeproxy", "cache", "purge", "-c",
                          str(cached.config_path), f"http://example.test{target}"],
                         capture_output=True, text=True, cwd=str(ROOT), timeout=30, check=False)
    assert out.returncode == 0, out.stderr
    r = get(cached.port, target)
    assert r.header("cache-status").startswith("edgeproxy; fwd=uri-miss")
    assert origin.hits["pg"] == 2


def test_only_if_cached_without_entry_is_504(cached, origin):
    r = get(cached.port, f"/cache/oic?{FRESH}", {"Cache-Control": "only-if-cached"})
    assert r.status == 504
    assert origin.hits["oic"] == 0
