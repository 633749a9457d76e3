"""The compiled hot index of cache hits (ext/hotcache.pyx) in real proxy
processes: which requests it answers, that its answers are the cache phase's
byte for byte, and that it never serves what expired, was invalidated or purged."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time

import pytest
from harness import ROOT, Client, raw_exchange
from test_cache_proxy import FRESH, cache_config, get, wait_for


def cli(proxy, *args: str) -> str:
    out = subprocess.run([sys.executable, "-m", "edgeproxy", "cache", *args, "-c",
                          str(proxy.config_path)],
                         capture_output=True, text=True, cwd=str(ROOT), timeout=30, check=False)
    assert out.returncode == 0, out.stderr
    return out.stdout


def counters(proxy) -> dict:
    return json.loads(cli(proxy, "stats", "--json"))


def settle(proxy, hits: int) -> dict:
    """The counters once `hits` hits (hot or not) reached the store."""
    seen = {}

    def reached() -> bool:
        seen.update(counters(proxy))
        return seen["hits"] >= hits
    assert wait_for(reached, timeout=8.0), seen
    return seen


def raw(port: int, target: str, extra: bytes = b"", method: bytes = b"GET") -> bytes:
    return raw_exchange(port, method + b" " + target.encode() + b" HTTP/1.1\r\n"
                        b"Host: example.test\r\nConnection: close\r\n" + extra + b"\r\n")


def normalized(response: bytes) -> bytes:
    """Date and Age values and the ttl blanked (they depend on the second)."""
    response = re.sub(rb"\r\nDate: [^\r]*", b"\r\nDate: -", response)
    response = re.sub(rb"\r\nAge: \d+", b"\r\nAge: -", response)
    return re.sub(rb"; ttl=-?\d+", b"; ttl=-", response)


@pytest.fixture
def hot(origin, proxy_factory, tmp_path):
    return proxy_factory(cache_config(tmp_path, origin.url))


def stored(proxy, target: str, n: int = 1) -> None:
    """GET target (a miss that is stored), and wait until the store has n entries
    committed (then the next request is a hit, not a collapsed miss)."""
    r = get(proxy.port, target)
    # storable (a large body, streamed on after its head, cannot say `stored`)
    assert r.status == 200 and "detail=" not in r.header("cache-status"), r.headers
    assert wait_for(lambda: counters(proxy)["stores"] >= n, timeout=8.0)


def test_hot_answers_are_the_phase_answers_byte_for_byte(hot, origin):
    target = f"/cache/same?{FRESH}&etag=1&age=3"
    stored(hot, target)
    hot_get = raw(hot.port, target)
    hot_head = raw(hot.port, target, method=b"HEAD")
    # Pragma without no-cache changes nothing, but sends the request to the phase
    phase_get = raw(hot.port, target, b"Pragma: x\r\n")
    phase_head = raw(hot.port, target, b"Pragma: x\r\n", method=b"HEAD")
    c = settle(hot, 4)
    assert c["hits"] == 4 and c["hot_hits"] == 2
    assert origin.hits["same"] == 1
    assert b"Cache-Status: edgeproxy; hit; ttl=" in hot_get
    assert hot_get.endswith(b"\r\n\r\nsame v0 ")
    assert normalized(hot_get) == normalized(phase_get)
    assert normalized(hot_head) == normalized(phase_head)
    assert hot_head.endswith(b"\r\n\r\n") and b"Content-Length: 8\r\n" in hot_head
    assert int(re.search(rb"\r\nAge: (\d+)", hot_get).group(1)) >= 3


def test_requests_the_phase_must_see_are_not_answered_hot(hot, origin):
    target = f"/cache/cond?{FRESH}&etag=1"
    stored(hot, target)
    r = get(hot.port, target, {"If-None-Match": '"cond-0"'})
    assert r.status == 304 and r.header("etag") == '"cond-0"'
    r = get(hot.port, target, {"Range": "bytes=0-3"})
    assert r.status == 206 and r.body == b"cond" and r.header("content-range") == "bytes 0-3/8"
    r = get(hot.port, target, {"Cache-Control": "no-cache"})
    assert r.status == 200 and r.header("cache-status").startswith("edgeproxy; fwd=request")
    assert origin.hits["cond"] == 2      # the no-cache one revalidated
    r = get(hot.port, target, {"Authorization": "Basic eDp5"})
    assert r.status == 200
    c = settle(hot, 3)      # the 304, the 206 and the Authorization one came from the phase
    assert c["hot_hits"] == 0


def test_keep_alive_and_pipelining_after_hot_hits(hot, origin):
    a, b = f"/cache/pa?{FRESH}", f"/cache/pb?{FRESH}"
    stored(hot, a)
    stored(hot, b, 2)
    with Client(hot.port) as c:
        one = f"GET {a} HTTP/1.1\r\nHost: example.test\r\n\r\n"
        two = f"GET {b} HTTP/1.1\r\nHost: example.test\r\n\r\n"
        three = f"HEAD {a} HTTP/1.1\r\nHost: example.test\r\n\r\n"
        four = "GET /plain HTTP/1.1\r\nHost: example.test\r\n\r\n"
        c.send((one + two + three + four + one).encode())
        got = [c.read_response(), c.read_response(), c.read_response(head_request=True),
               c.read_response(), c.read_response()]
        assert [r.body for r in got] == [b"pa v0 ", b"pb v0 ", b"", got[3].body, b"pa v0 "]
        assert got[2].header("content-length") == "6"
        assert all(r.header("connection") is None for r in got)
        r = c.request("GET", a, {"Connection": "close"})
        assert r.body == b"pa v0 " and r.header("connection") == "close"
        assert c.is_closed()
    out = raw_exchange(hot.port, f"GET {a} HTTP/1.0\r\nHost: example.test\r\n\r\n".encode())
    assert out.startswith(b"HTTP/1.1 200 OK\r\n") and b"\r\nConnection: close\r\n" in out
    c = settle(hot, 6)
    assert c["hot_hits"] >= 5
    assert origin.hits["pa"] == 1 and origin.hits["pb"] == 1


def test_expired_entries_are_not_served_hot(hot, origin):
    max_age = 6         # room for a slow, shared machine to get a hot hit in first
    target = f"/cache/exp?cc=max-age={max_age}"
    t0 = time.monotonic()
    assert get(hot.port, target).header("cache-status").endswith("stored")

    def served_hot() -> bool:     # hot hits reach the store's counters within a tick
        assert get(hot.port, target).header("cache-status").startswith("edgeproxy; hit")
        return counters(hot)["hot_hits"] >= 1
    assert wait_for(served_hot, timeout=max_age - 1.5), "no hot hit while fresh"
    time.sleep(max(0.0, t0 + max_age + 0.2 - time.monotonic()))
    r = get(hot.port, target)
    assert not r.header("cache-status").startswith("edgeproxy; hit"), r.headers
    assert origin.hits["exp"] == 2


def test_entries_the_phase_must_decide_are_not_offered(hot, origin):
    for name, q in (("vary", "&vary=Accept"), ("nc", "&etag=1"), ("heur", "")):
        cc = "no-cache" if name == "nc" else ("" if name == "heur" else "max-age=60")
        target = f"/cache/{name}?lm=1" + (f"&cc={cc}" if cc else "") + q
        get(hot.port, target)
        get(hot.port, target)
        get(hot.port, target)
    c = settle(hot, 4)      # vary and heur: 2 hits each; nc: revalidated each time
    assert c["hits"] == 4 and c["hot_hits"] == 0


def test_cli_purge_takes_effect_at_once(hot, origin):
    target = f"/cache/pg?{FRESH}"
    stored(hot, target)
    assert get(hot.port, target).header("cache-status").startswith("edgeproxy; hit")
    assert settle(hot, 1)["hot_hits"] == 1
    cli(hot, "purge", f"http://example.test{target}")
    r = get(hot.port, target)
    assert r.header("cache-status").startswith("edgeproxy; fwd=uri-miss")
    assert origin.hits["pg"] == 2
    assert get(hot.port, target).header("cache-status").startswith("edgeproxy; hit")
    cli(hot, "purge", "--prefix", "http://example.test/cache/")
    assert get(hot.port, target).header("cache-status").startswith("edgeproxy; fwd=uri-miss")
    assert get(hot.port, target).header("cache-status").startswith("edgeproxy; hit")
    cli(hot, "purge", "--soft", f"http://example.test{target}")
    r = get(hot.port, target)
    assert not r.header("cache-status").startswith("edgeproxy; hit")
    assert origin.hits["pg"] == 4


def test_unsafe_method_invalidates_hot_entries(hot, origin):
    target = f"/cache/inv?{FRESH}"
    stored(hot, target)
    assert get(hot.port, target).body == b"inv v0 "
    origin.version["inv"] += 1
    assert get(hot.port, target, method="POST").status == 200
    r = get(hot.port, target)
    assert r.body == b"inv v1 " and r.header("cache-status").endswith("stored")


def test_two_workers_never_serve_what_another_process_changed(origin, proxy_factory, tmp_path):
    proxy = proxy_factory(cache_config(tmp_path, origin.url, workers=2))
    target = f"/cache/two?{FRESH}"
    stored(proxy, target)
    # new connections spread over both workers: each gets the entry hot
    for _ in range(12):
        assert get(proxy.port, target).body == b"two v0 "
    assert settle(proxy, 12)["hot_hits"] >= 6
    origin.version["two"] += 1
    assert get(proxy.port, target, method="POST").status == 200
    # the invalidating worker deletes in its writer thread after answering
    # (docs/cache.md): other workers see the deletion once it is committed
    assert wait_for(lambda: counters(proxy)["purges"] >= 1, timeout=8.0)
    for _ in range(12):
        assert get(proxy.port, target).body == b"two v1 "
    origin.version["two"] += 1
    cli(proxy, "purge", f"http://example.test{target}")
    for _ in range(12):
        assert get(proxy.port, target).body == b"two v2 "


def test_hot_index_stays_within_its_budget():
    ext = pytest.importorskip("edgeproxy._ext")
    hot = ext.HotIndex(4096, 1000)
    head = b"HTTP/1.1 200 OK\r\nContent-Length: 900\r\n"
    for i in range(10):
        assert hot.offer(b"http://h/%d" % i, head, b"x" * 900, 200, 0.0, 1e12)
        assert hot.used <= hot.budget
    assert len(hot) < 10 and hot.get(b"http://h/9") is not None
    assert hot.get(b"http://h/0") is None            # the oldest went first
    assert not hot.offer(b"http://h/big", head, b"x" * 1001, 200, 0.0, 1e12)
    assert hot.offer(b"http://h/9", head, b"y", 200, 0.0, 1e12)   # replaces
    assert hot.get(b"http://h/9").body == b"y" and not hot.get(b"http://h/9").has_date
    assert hot.drop(b"http://h/9") and not hot.drop(b"http://h/9")
    hot.clear()
    assert len(hot) == 0 and hot.used == 0


def test_hot_hits_are_logged_like_other_requests(origin, proxy_factory, tmp_path):
    log_path = tmp_path / "access.log"
    proxy = proxy_factory(cache_config(
        tmp_path, origin.url, f'\n[log]\naccess_log = "{log_path}"\naccess_format = "json"\n'))
    target = f"/cache/logged?{FRESH}"
    stored(proxy, target)
    with Client(proxy.port) as c:
        assert c.request("GET", target).body == b"logged v0 "
        assert c.request("HEAD", target).status == 200
    assert settle(proxy, 2)["hot_hits"] == 2

    def lines():
        text = log_path.read_text() if log_path.exists() else ""
        return [json.loads(ln) for ln in text.splitlines() if ln.strip()]
    assert wait_for(lambda: len(lines()) == 3, timeout=8.0), lines()
    _, get_line, head_line = lines()
    assert (get_line["method"], get_line["status"], get_line["bytes"]) == ("GET", 200, 10)
    assert (head_line["method"], head_line["status"], head_line["bytes"]) == ("HEAD", 200, 0)
    assert get_line["target"] == target and get_line["backend"] == "-"


def test_hot_index_keeps_buffers_and_rebinds_them():
    """Bodies are held as the buffers offered (slices of the map in a
    worker), and `rebind` moves an entry to new buffers of the same length
    or drops it."""
    from edgeproxy import _ext as ext
    hot = ext.HotIndex(1 << 20, 1 << 16)
    first = memoryview(b"abcdef")
    assert hot.offer(b"http://h/a", b"HTTP/1.1 200 OK\r\n", (first[:3], first[3:]), 200, 0.0, 1e12)
    e = hot.get(b"http://h/a")
    assert e.body_len == 6 and e.body == b"abcdef" and e.parts[0].obj is first.obj
    assert hot.rebind(b"http://h/a", (memoryview(b"ABCDEF"),))
    assert hot.get(b"http://h/a").body == b"ABCDEF"
    assert not hot.rebind(b"http://h/a", (b"short",)) and hot.get(b"http://h/a") is None
    assert hot.keys() == [] and not hot.rebind(b"http://h/gone", (b"x",))
