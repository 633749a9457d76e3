"""Backend pools: the balancing algorithms (unit tests of the compiled
picker, and end to end with the requests counted at real origins), backups,
retries on other backends, the retry budget, max_conns queueing and the 503
when nothing can take a request."""

from __future__ import annotations

import threading
import time
from collections import Counter

import pytest
from harness import Client, Origin
from pool_origins import ResetServer

from edgeproxy import _ext


def make_pool(weights, balance="round_robin", backups=(), **kw):
    backends = [_ext.Backend("127.0.0.1", 5000 + i, weight=w, backup=i in backups)
                for i, w in enumerate(weights)]
    return _ext.Pool("p", backends, balance=balance, **kw), backends


def config(urls, extra="", workers=1):
    listed = ", ".join(f'"{u}"' for u in urls)
    return (f'[server]\nworkers = {workers}\n\n[[route]]\npath = "/"\npool = "web"\n\n'
            f'[pool.web]\nbackends = [{listed}]\n{extra}\n')


@pytest.fixture
def origins():
    started = []

    def make(n):
        for _ in range(n):
            started.append(Origin().start())
        return started[-n:]

    yield make
    for o in started:
        if o._thread.is_alive():       # a test may have stopped it already
            o.stop()


# ---- the picker, in process ----------------------------------------------

def test_swrr_interleaves_like_nginx():
    pool, (a, b, c) = make_pool([5, 1, 1])
    names = {a: "a", b: "b", c: "c"}
    order = "".join(names[pool.pick_backend()] for _ in range(14))
    assert order == "aabacaa" * 2


def test_round_robin_with_equal_weights_takes_turns():
    pool, bs = make_pool([1, 1, 1])
    assert [pool.pick_backend() for _ in range(6)] == bs + bs


def test_round_robin_skips_a_backend_that_is_down_and_keeps_the_ratio():
    pool, (a, b, c) = make_pool([3, 1, 2])
    c.up = False
    got = Counter(pool.pick_backend() for _ in range(400))
    assert got[c] == 0
    assert got[a] == 300 and got[b] == 100


def test_least_conn_prefers_fewest_outstanding():
    pool, (a, b, c) = make_pool([1, 1, 1], balance="least_conn")
    a.active, b.active, c.active = 4, 1, 3
    assert all(pool.pick_backend() is b for _ in range(10))
    b.active = 9
    assert pool.pick_backend() is c


def test_least_conn_weighs_outstanding_by_weight():
    pool, (a, b) = make_pool([1, 4], balance="least_conn")
    a.active, b.active = 1, 3        # 1/1 against 3/4
    assert pool.pick_backend() is b


def test_p2c_spreads_and_avoids_the_busiest():
    pool, (a, b, c) = make_pool([1, 1, 1], balance="p2c")
    got = Counter(pool.pick_backend() for _ in range(3000))
    assert min(got.values()) > 700
    a.active = 50
    got = Counter(pool.pick_backend() for _ in range(300))
    assert got[a] == 0 and got[b] > 50 and got[c] > 50


def test_hash_is_sticky_and_moves_about_one_nth_when_a_backend_goes():
    pool, bs = make_pool([1] * 5, balance="hash")
    keys = [f"user-{i}".encode() for i in range(10000)]
    before = {k: pool.pick_backend(k) for k in keys}
    assert all(pool.pick_backend(k) is before[k] for k in keys[:500])
    spread = Counter(before.values())
    assert all(1600 < n < 2400 for n in spread.values())
    gone = bs[2]
    gone.up = False
    after = {k: pool.pick_backend(k) for k in keys}
    moved = [k for k in keys if after[k] is not before[k]]
    assert all(before[k] is gone for k in moved)        # only its keys move
    assert len(moved) == spread[gone]
    assert 0.15 < len(moved) / len(keys) < 0.25
    gone.up = True
    assert all(pool.pick_backend(k) is before[k] for k in keys)


def test_weighted_hash_follows_the_weights():
    pool, (a, b) = make_pool([1, 3], balance="hash")
    got = Counter(pool.pick_backend(f"k{i}".encode()) for i in range(8000))
    assert 0.70 < got[b] / 8000 < 0.80


def test_backups_only_when_every_primary_is_down():
    pool, (a, b, c) = make_pool([1, 1, 1], backups={2})
    assert c not in {pool.pick_backend() for _ in range(50)}
    a.up = False
    assert {pool.pick_backend() for _ in range(10)} == {b}
    b.up = False
    assert {pool.pick_backend() for _ in range(10)} == {c}
    c.up = False
    assert pool.pick_backend() is None


def test_pick_skips_backends_already_tried():
    pool, (a, b, c) = make_pool([1, 1, 1], balance="hash")
    first = pool.pick_backend(b"k")
    second = pool.pick_backend(b"k", avoid=[first])
    assert second is not first
    assert pool.pick_backend(b"k", avoid=[a, b, c]) is None


# ---- end to end -----------------------------------------------------------

def run_requests(port, n, target="/size/3", headers=None):
    statuses = Counter()
    with Client(port) as c:
        for _ in range(n):
            statuses[c.request("GET", target, headers=headers).status] += 1
    return statuses


def test_weights_hold_over_3000_requests(origins, proxy_factory):
    os_ = origins(3)
    proxy = proxy_factory(config([f"{os_[0].url} weight=1", f"{os_[1].url} weight=2",
                                  f"{os_[2].url} weight=3"]))
    assert run_requests(proxy.port, 3000) == {200: 3000}
    counts = [len(o.requests) for o in os_]
    for n, w in zip(counts, (1, 2, 3), strict=True):
        assert abs(n - 500 * w) <= 0.1 * 500 * w, counts


def test_swrr_order_end_to_end(origins, proxy_factory):
    os_ = origins(3)
    proxy = proxy_factory(config([f"{os_[0].url} weight=5", os_[1].url, os_[2].url]))
    with Client(proxy.port) as c:
        for i in range(7):
            assert c.request("GET", f"/size/{i}").status == 200
    where = {}
    for name, o in zip("abc", os_, strict=True):
        for s in o.requests:
            where[int(s.target.rsplit("/", 1)[1])] = name
    assert "".join(where[i] for i in range(7)) == "aabacaa"


def test_least_conn_sends_to_the_idle_backend(origins, proxy_factory):
    a, b = origins(2)
    proxy = proxy_factory(config([a.url, b.url], 'balance = "least_conn"'))
    slow = Client(proxy.port)
    slow.send(b"GET /slow/1.5 HTTP/1.1\r\nHost: x\r\n\r\n")
    deadline = time.monotonic() + 5
    while not (a.requests or b.requests) and time.monotonic() < deadline:
        time.sleep(0.01)
    busy, idle = (a, b) if a.requests else (b, a)
    assert run_requests(proxy.port, 10) == {200: 10}
    assert slow.read_response().body == b"slow"
    slow.close()
    assert len(busy.requests) == 1 and len(idle.requests) == 10


def test_p2c_spreads_requests(origins, proxy_factory):
    os_ = origins(3)
    proxy = proxy_factory(config([o.url for o in os_], 'balance = "p2c"'))
    assert run_requests(proxy.port, 300) == {200: 300}
    assert all(len(o.requests) > 50 for o in os_)


def test_hash_on_a_header_keeps_a_user_on_one_backend(origins, proxy_factory):
    os_ = origins(3)
    proxy = proxy_factory(config([o.url for o in os_], 'balance = "hash"\nhash_key = "header:X-User"'))
    homes = set()
    for user in ("alice", "bob", "carol", "dave", "erin", "frank"):
        run_requests(proxy.port, 5, target=f"/size/1?u={user}", headers={"X-User": user})
        seen = {i for i, o in enumerate(os_) for s in o.requests if s.target.endswith(f"u={user}")}
        assert len(seen) == 1, (user, seen)
        homes |= seen
    assert len(homes) >= 2


def test_hash_on_a_cookie(origins, proxy_factory):
    os_ = origins(3)
    proxy = proxy_factory(config([o.url for o in os_], 'balance = "hash"\nhash_key = "cookie:sid"'))
    for sid in ("s1", "s2", "s3", "s4"):
        run_requests(proxy.port, 4, target=f"/size/1?sid={sid}",
                     headers={"Cookie": f"theme=dark; sid={sid}; lang=en"})
        seen = {i for i, o in enumerate(os_) for s in o.requests if s.target.endswith(f"sid={sid}")}
        assert len(seen) == 1


def test_backup_takes_over_only_when_the_primaries_fail(origins, proxy_factory):
    p1, p2, bk = origins(3)
    proxy = proxy_factory(config([p1.url, p2.url, f"{bk.url} backup"],
                                 "passive.failures = 1\npassive.eject = 30.0"))
    assert run_requests(proxy.port, 40) == {200: 40}
    assert len(bk.requests) == 0
    p1.stop()
    p2.stop()
    # refused by both primaries: retried onto the backup, no client errors
    assert run_requests(proxy.port, 20) == {200: 20}
    assert len(bk.requests) == 20


def test_refused_connection_is_retried_on_another_backend(origins, proxy_factory):
    good, = origins(1)
    dead = ResetServer()
    dead.stop()                          # nothing listens there now: connect is refused
    proxy = proxy_factory(config([f"http://127.0.0.1:{dead.port}", good.url],
                                 "passive.failures = 2"))
    with Client(proxy.port) as c:        # a POST too: nothing reached the dead backend
        assert c.request("POST", "/echo", body=b"abc").json()["body_len"] == 3
    assert run_requests(proxy.port, 20) == {200: 20}
    assert "retrying on backend" in proxy.log()
    assert "ejected for 10.0s after 2 failures" in proxy.log()


def test_idempotent_request_reset_after_sending_is_retried(origins, proxy_factory):
    rst = ResetServer(read_first=True)
    good, = origins(1)
    try:
        proxy = proxy_factory(config([rst.url, good.url], "passive.failures = 0"))
        # (a retry takes the next round-robin turn, so each of these meets
        # the resetting backend first; the budget's floor covers three)
        assert run_requests_fresh(proxy.port, 3) == {200: 3}
        assert rst.accepted == 3 and len(good.requests) == 3
    finally:
        rst.stop()


def test_post_reset_after_sending_is_not_retried(origins, proxy_factory):
    rst = ResetServer(read_first=True)
    good, = origins(1)
    try:
        proxy = proxy_factory(config([rst.url, good.url], "passive.failures = 0"))
        statuses = Counter()
        for _ in range(4):
            with Client(proxy.port) as c:
                statuses[c.request("POST", "/echo", body=b"data").status] += 1
        # round robin: two of the four reached the resetting backend
        assert statuses == {200: 2, 502: 2}
        assert rst.accepted == 2
    finally:
        rst.stop()


def test_retry_budget_caps_retries(proxy_factory):
    servers = [ResetServer() for _ in range(3)]
    try:
        proxy = proxy_factory(config([s.url for s in servers],
                                     "passive.failures = 0\nretries = 2"))
        n = 30
        statuses = run_requests_fresh(proxy.port, n)
        assert statuses == {502: n}
        attempts = sum(s.accepted for s in servers)
        # without a budget: 3 attempts each (90); with it: 20% more (+ a floor of 3)
        assert n < attempts <= n + 0.2 * n + 3
    finally:
        for s in servers:
            s.stop()


def run_requests_fresh(port, n):
    statuses = Counter()
    for _ in range(n):
        with Client(port) as c:
            statuses[c.request("GET", "/size/3").status] += 1
    return statuses


def test_the_last_available_backend_is_never_ejected(proxy_factory):
    from pool_origins import PortOrigin
    dead = ResetServer()
    dead.stop()
    proxy = proxy_factory(config([f"http://127.0.0.1:{dead.port}"],
                                 "passive.failures = 1\npassive.eject = 30.0"))
    with Client(proxy.port) as c:
        assert [c.request("GET", "/").status for _ in range(3)] == [502] * 3
    assert "not ejected: it is the last available backend of the pool" in proxy.log()
    back = PortOrigin(dead.port).start()     # it comes back: served at once, not 503 for 30 s
    try:
        assert run_requests(proxy.port, 5) == {200: 5}
    finally:
        back.stop()


def test_max_conns_queues_then_serves(origins, proxy_factory):
    o, = origins(1)
    proxy = proxy_factory(config([o.url], "max_conns = 1\nqueue_timeout = 5.0"))
    results = []

    def one():
        with Client(proxy.port) as c:
            results.append(c.request("GET", "/slow/0.5").status)

    threads = [threading.Thread(target=one) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert results == [200, 200, 200]
    assert o.connections == 1        # one at a time: one backend connection served all


def test_max_conns_503_after_queue_timeout(origins, proxy_factory):
    o, = origins(1)
    proxy = proxy_factory(config([o.url], "max_conns = 1\nqueue_timeout = 0.3"))
    first = Client(proxy.port)
    first.send(b"GET /slow/2.5 HTTP/1.1\r\nHost: x\r\n\r\n")
    time.sleep(0.2)
    with Client(proxy.port) as c:
        r = c.request("GET", "/size/1")
    assert r.status == 503 and r.header("retry-after") == "1"
    assert first.read_response().status == 200
    first.close()
    assert [s.target for s in o.requests] == ["/slow/2.5"]


def test_slow_start_ramps_a_returning_backend_up():
    pool, (a, b) = make_pool([1, 1], slow_start=10.0)
    try:
        _ext.set_pools([pool])
        b.ejected, b.eject_until = True, 1000.0
        _ext.set_clock(999.0)
        _ext.pools_tick()
        assert b.ejected and not b.available
        _ext.set_clock(1000.0)
        _ext.pools_tick()                # the ejection ends: b starts its slow start
        assert b.available and b.up_since == 1000.0
        _ext.set_clock(1001.0)           # 10% of its weight
        got = Counter(pool.pick_backend() for _ in range(1100))
        assert 70 <= got[b] <= 130
        _ext.set_clock(1005.0)           # 50%
        got = Counter(pool.pick_backend() for _ in range(1500))
        assert 450 <= got[b] <= 550
        _ext.set_clock(1011.0)
        _ext.pools_tick()                # over: back to the plain schedule
        assert Counter(pool.pick_backend() for _ in range(100)) == {a: 50, b: 50}
    finally:
        _ext.set_pools([])


@pytest.mark.parametrize("extra, error", [
    ('balance = "random"', 'pool.web.balance: "random" is not one of'),
    ('hash_key = "ip"', 'pool.web.hash_key: only used with balance = "hash"'),
    ('balance = "hash"\nhash_key = "query:x"', 'pool.web.hash_key: "query:x" is not "ip"'),
    ('health.interval = 1.0', "pool.web.health.path: missing (required)"),
    ('health.path = "/h"\nhealth.expect = "399-200"', "pool.web.health.expect: \"399-200\": the range"),
    ('health.path = "/h"\nhealth.rise = 0', "pool.web.health.rise: 0 must be 1 or more"),
    ('passive.eject = 0', "pool.web.passive.eject: 0 must be greater than 0"),
    ('retries = -1', "pool.web.retries: -1 must be 0 or more"),
    ('queue_timeout = 0', "pool.web.queue_timeout: 0 must be greater than 0"),
])
def test_pool_config_errors_name_the_key(extra, error):
    from edgeproxy.config import ConfigError, parse_config
    text = '[[listen]]\nbind = "127.0.0.1:1"\n' + config(["http://127.0.0.1:2"], extra)
    with pytest.raises(ConfigError) as info:
        parse_config(text)
    assert any(e.startswith(error) for e in info.value.errors), info.value.errors


def test_pool_config_reaches_the_compiled_pool():
    from edgeproxy.config import parse_config
    from edgeproxy.proxy import build_pools
    text = '[[listen]]\nbind = "127.0.0.1:1"\n' + config(
        ["http://127.0.0.1:2 weight=3", "http://127.0.0.1:3 backup"],
        'balance = "hash"\nhash_key = "cookie:sid"\nretries = 1\nmax_conns = 7\n'
        'queue_timeout = 2.5\nslow_start = 4.0\npassive.failures = 2\npassive.eject = 3.0\n'
        'passive.max_ejected = 0.25\n'
        'health.path = "/h"\nhealth.expect = "204"')
    cfg = parse_config(text)
    assert cfg.pools["web"].health.expect == (204, 204)
    pool = build_pools(cfg)["web"]
    assert (pool.balance, pool.hash_key, pool.retries, pool.max_conns, pool.queue_timeout,
            pool.slow_start, pool.fail_max, pool.eject_base, pool.max_ejected) == \
        ("hash", "cookie:sid", 1, 7, 2.5, 4.0, 2, 3.0, 0.25)
    assert [b.weight for b in pool.backends] == [3, 1] and pool.backends[1].backup
