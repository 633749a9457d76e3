"""Rate limits ([[limit]], ext/limits.pyx) over real sockets: 429 with
Retry-After and the RateLimit fields, keys by address, header, cookie,
route and hook, dry-run, delay (held requests, with bodies and
pipelining), a limit shared by two workers through shared memory, the
GCRA table's atomicity across processes, and the metrics."""

from __future__ import annotations

import mmap
import os
import re
import threading
import time

import pytest
from harness import Client
from limits_support import concurrently, hammer
from ops_support import metrics, start, wait_until

from edgeproxy import _ext


def limit_body(origin_url: str, limits: str, route_extra: str = "", server: str = "") -> str:
    return (f"[server]\n{server}\n[[route]]\npath = \"/\"\npool = \"web\"\n{route_extra}\n"
            f"[pool.web]\nbackends = [\"{origin_url}\"]\n\n{limits}")


def test_beyond_the_limit_429_with_retry_after_and_ratelimit_fields(origin, proxy_factory):
    p = proxy_factory(limit_body(origin.url, '[[limit]]\nname = "api"\nrate = "1r/m"\nburst = 2\n',
                                 'limits = ["api"]'))
    with Client(p.port) as c:
        assert [c.request("GET", "/size/3").status for _ in range(3)] == [200, 200, 200]
        r = c.request("GET", "/size/3")
        assert r.status == 429, r
        retry = int(r.header("retry-after"))
        assert 1 <= retry <= 60
        # draft-ietf-httpapi-ratelimit-headers-10: quota 3 (burst + 1) per 180 s
        assert r.header("ratelimit-policy") == '"api";q=3;w=180'
        assert re.fullmatch(r'"api";r=0;t=(\d+)', r.header("ratelimit"))
        assert int(r.header("ratelimit").rpartition("=")[2]) == retry
        assert r.body == b"429 Too Many Requests\n"
        # the connection stays: the next request is answered (refused again)
        assert c.request("GET", "/size/3").status == 429
    assert len(origin.requests) == 3
    # one log line per key per second, however many were refused
    wait_until(lambda: "limit api: 429 for GET /size/3" in p.log(), what="the log line")
    assert p.log().count("limit api: 429") <= 2


def test_keys_by_header_cookie_and_unkeyed_requests(origin, proxy_factory):
    limits = ('[[limit]]\nname = "by-key"\nrate = "1r/m"\nkey = "header:X-Api-Key"\n\n'
              '[[limit]]\nname = "by-session"\nrate = "1r/m"\nkey = "cookie:sid"\n')
    p = proxy_factory(limit_body(origin.url, limits, 'limits = ["by-key", "by-session"]'))
    with Client(p.port) as c:
        assert c.request("GET", "/size/1", {"X-Api-Key": "a"}).status == 200
        assert c.request("GET", "/size/1", {"X-Api-Key": "a"}).status == 429
        assert c.request("GET", "/size/1", {"X-Api-Key": "b"}).status == 200
        # neither header nor cookie: no key, not counted
        assert [c.request("GET", "/size/1").status for _ in range(3)] == [200] * 3
        assert c.request("GET", "/size/1", {"Cookie": "x=1; sid=s1"}).status == 200
        r = c.request("GET", "/size/1", {"Cookie": "sid=s1"})
        assert r.status == 429 and r.header("ratelimit-policy") == '"by-session";q=1;w=60'
        assert c.request("GET", "/size/1", {"Cookie": "sid=s2"}).status == 200
    # header values are not logged (API keys): only a hash
    wait_until(lambda: "limit by-key: 429" in p.log(), what="the log line")
    assert "key #" in p.log() and "X-Api-Key: a" not in p.log()


def test_key_hook_and_route_key(origin, proxy_factory, tmp_path):
    (tmp_path / "limitkeys.py").write_text(
        "def tenant(req):\n"
        "    t = req.header('x-tenant')\n"
        "    return None if t == 'free' else (t or req.client_ip) + ':' + req.method\n")
    limits = ('[[limit]]\nname = "tenant"\nrate = "1r/m"\nkey = "limitkeys:tenant"\n\n'
              '[[limit]]\nname = "whole"\nrate = "1r/m"\nburst = 5\nkey = "route"\n')
    body = limit_body(origin.url, limits, 'limits = ["tenant"]') + (
        '\n[[route]]\npath = "/size/"\npool = "web"\nlimits = ["whole"]\n')
    p = proxy_factory(body)
    with Client(p.port) as c:
        assert c.request("GET", "/echo", {"X-Tenant": "t1"}).status == 200
        assert c.request("GET", "/echo", {"X-Tenant": "t1"}).status == 429
        assert c.request("HEAD", "/echo", {"X-Tenant": "t1"}).status == 200   # another key
        assert [c.request("GET", "/echo", {"X-Tenant": "free"}).status
                for _ in range(3)] == [200] * 3
        # key = "route": every client shares the route's one budget
        got = [c.request("GET", "/size/1", {"X-Tenant": f"n{i}"}).status for i in range(8)]
        assert got == [200] * 6 + [429] * 2


def test_dry_run_logs_and_counts_but_never_refuses(origin, proxy_factory, tmp_path):
    limits = '[[limit]]\nname = "trial"\nrate = "1r/m"\nmode = "dry-run"\n'
    p, admin = start(proxy_factory, tmp_path, origin.url, admin=True,
                     server_extra='limits = ["trial"]', extra=limits)
    with Client(p.port) as c:
        assert [c.request("GET", "/size/1").status for _ in range(5)] == [200] * 5
    m = metrics(admin)
    assert m['edgeproxy_limit_requests_total{limit="trial",result="dry_run"}'] == 4
    assert m['edgeproxy_limit_requests_total{limit="trial",result="passed"}'] == 5
    assert m['edgeproxy_limit_requests_total{limit="trial",result="limited"}'] == 0
    assert "limit trial: would refuse (dry-run) GET /size/1" in p.log()


def test_delay_holds_requests_inside_the_burst_then_refuses_beyond(origin, proxy_factory,
                                                                    tmp_path):
    # 10r/s, burst 4, delay 1: 2 at once, 3 more spaced 100 ms apart, then 429
    limits = '[[limit]]\nname = "paced"\nrate = "10r/s"\nburst = 4\ndelay = 1\n'
    p, admin = start(proxy_factory, tmp_path, origin.url, admin=True,
                     server_extra='limits = ["paced"]', extra=limits)
    results: dict[int, tuple[int, float]] = {}
    clients = [Client(p.port) for _ in range(6)]
    t0 = time.monotonic()

    def one(i: int) -> None:
        r = clients[i].request("GET", "/size/2")
        results[i] = (r.status, time.monotonic() - t0)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    for c in clients:
        c.close()
    statuses = sorted(s for s, _ in results.values())
    assert statuses == [200] * 5 + [429], results
    times = sorted(t for s, t in results.values() if s == 200)
    assert times[-1] >= 0.25, times        # the last of the delayed ones waited ~300 ms
    assert times[-1] < 2.0, times          # bounded by burst / rate
    m = metrics(admin)
    assert m['edgeproxy_limit_requests_total{limit="paced",result="delayed"}'] == 3
    assert m['edgeproxy_limit_requests_total{limit="paced",result="limited"}'] == 1


def test_a_held_request_keeps_its_body_and_the_pipelined_one_after_it(origin, proxy_factory):
    limits = '[[limit]]\nname = "paced"\nrate = "5r/s"\nburst = 3\ndelay = 1\n'
    p = proxy_factory(limit_body(origin.url, limits, 'limits = ["paced"]'))
    with Client(p.port) as c:
        assert c.request("GET", "/size/1").status == 200
        assert c.request("GET", "/size/1").status == 200
        # this one waits ~200 ms: its body, sent with the head, and a
        # pipelined request behind it must both come through, in order
        body = b"b" * 3000
        t0 = time.monotonic()
        c.send(b"POST /echo HTTP/1.1\r\nHost: a\r\nContent-Length: 3000\r\n\r\n" + body
               + b"GET /size/4 HTTP/1.1\r\nHost: a\r\n\r\n")
        r1 = c.read_response()
        r2 = c.read_response()
        assert time.monotonic() - t0 >= 0.15
    assert r1.status == 200 and r1.json()["body_len"] == 3000 and r1.json()["method"] == "POST"
    assert r2.status == 200 and r2.body == b"xxxx"
    assert origin.requests[-2].body == body


def test_limits_on_a_route_with_hooks_hold_and_refuse_too(origin, proxy_factory, tmp_path):
    (tmp_path / "tagger.py").write_text(
        "class Tag:\n"
        "    def request(self, ctx):\n"
        "        ctx.headers['X-Tagged'] = '1'\n")
    limits = '[[limit]]\nname = "paced"\nrate = "5r/s"\nburst = 2\ndelay = 1\n'
    p = proxy_factory(limit_body(origin.url, limits, 'limits = ["paced"]\nhooks = ["tagger:Tag"]'))
    got, took = concurrently(p.port, 4, "/echo")
    assert sorted(r.status for r in got) == [200, 200, 200, 429]
    assert max(took) >= 0.15              # the third waited ~200 ms
    assert all(("X-Tagged", "1") in [tuple(h) for h in r.json()["headers"]]
               for r in got if r.status == 200)



def test_two_workers_share_one_limit_within_ten_percent(origin, proxy_factory, tmp_path):
    # a small burst absorbs the scheduling jitter of a loaded machine (a
    # request that comes late loses the time it was late by, with burst 0)
    rate, burst = 40, 5
    limits = f'[[limit]]\nname = "shared"\nrate = "{rate}r/s"\nburst = {burst}\n'
    p, admin = start(proxy_factory, tmp_path, origin.url, workers=2, admin=True,
                     server_extra='limits = ["shared"]', extra=limits)
    counts, took = hammer([p.port], 3.0, per_port=8)
    assert counts[429] > 0, counts
    accepted = counts[200]
    expected = rate * took + burst + 1
    assert abs(accepted - expected) <= 0.1 * expected, (accepted, expected, counts)
    m = metrics(admin)
    assert m['edgeproxy_limit_requests_total{limit="shared",result="passed"}'] == accepted
    assert m['edgeproxy_limit_requests_total{limit="shared",result="limited"}'] == counts[429]


def test_the_table_is_atomic_across_processes():
    """Two processes take from one key's burst at once: exactly burst + 1 pass."""
    m = mmap.mmap(-1, 128 * 65, flags=mmap.MAP_SHARED)
    zone = _ext.LimitZone(m)
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        passed = sum(zone.check(42, 1 / 3600, 9999)[0] == 0 for _ in range(20000))
        os.write(w, str(passed).encode())
        os._exit(0)
    mine = sum(zone.check(42, 1 / 3600, 9999)[0] == 0 for _ in range(20000))
    os.waitpid(pid, 0)
    theirs = int(os.read(r, 64))
    os.close(r)
    os.close(w)
    assert theirs > 0 and mine > 0
    assert mine + theirs == 10000


def test_the_table_evicts_the_least_recent_key_when_full():
    m = mmap.mmap(-1, 128 * 3, flags=mmap.MAP_SHARED)      # 2 buckets of 5 slots
    zone = _ext.LimitZone(m)
    for k in range(1, 400):
        zone.check(k << 8, 1 / 3600, 0)
    assert zone.counters()["evicted"] >= 390
    # a key evicted long ago passes again (its state is gone): bounded memory
    assert zone.check(1 << 8, 1 / 3600, 0)[0] == 0


def test_a_route_without_limits_has_no_limit_phase(origin):
    import asyncio

    from edgeproxy.config.load import parse_config
    from edgeproxy.proxy import build_pools
    from edgeproxy.proxy.compiled import BuildEnv, route_phase

    def phase_of(route_extra: str):
        config = parse_config(limit_body(origin.url, '[[limit]]\nname = "x"\nrate = "1r/s"\n',
                                         route_extra) + '\n[[listen]]\nbind = "127.0.0.1:1"\n')
        return route_phase(BuildEnv(config, build_pools(config)), config.routes[0], 0, None)

    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    try:
        assert phase_of("") is None
        phase = phase_of('limits = ["x"]\naccess = ["allow all"]')
    finally:
        asyncio.set_event_loop(None)
        loop.close()
    assert type(phase).__name__ == "PhaseSeq"
    assert [type(x).__name__ for x in phase.items] == ["AccessPhase", "LimitPhase"]


@pytest.mark.parametrize("reload_keeps", [True])
def test_a_reload_keeps_the_limit_state(origin, proxy_factory, tmp_path, reload_keeps):
    import signal
    limits = '[[limit]]\nname = "api"\nrate = "1r/m"\n'
    p, admin = start(proxy_factory, tmp_path, origin.url, admin=True,
                     server_extra='limits = ["api"]', extra=limits)
    with Client(p.port) as c:
        assert c.request("GET", "/size/1").status == 200
        assert c.request("GET", "/size/1").status == 429
    p.proc.send_signal(signal.SIGHUP)
    wait_until(lambda: "generation 2 serving" in p.log(), what="the reload")
    with Client(p.port) as c:
        assert c.request("GET", "/size/1").status == 429   # no fresh budget on reload
