"""A fleet: one [[limit]] enforced across several edge processes through a
real Redis (Debian's redis-server, started on a free loopback port and
stopped by PID), the fall back to the local limit when Redis is gone, the
reconnection, on_store_error = "deny", and what `edgeproxy check` says."""

from __future__ import annotations

import subprocess
import sys

import pytest
from harness import ROOT, Client, free_port
from limits_support import REDIS_SERVER, RedisServer, concurrently, hammer
from ops_support import metrics, start, wait_until

pytestmark = pytest.mark.skipif(not __import__("os").path.exists(REDIS_SERVER),
                                reason="redis-server is not installed")


@pytest.fixture
def redis_server(tmp_path):
    r = RedisServer(tmp_path).start()
    yield r
    r.stop()


def fleet_body(origin_url: str, limit: str) -> str:
    return (f'[server]\nlimits = ["fleet"]\n\n[[route]]\npath = "/"\npool = "web"\n\n'
            f'[pool.web]\nbackends = ["{origin_url}"]\n\n[[limit]]\nname = "fleet"\n{limit}')


def test_three_edges_enforce_one_limit_within_ten_percent(origin, proxy_factory, redis_server):
    rate, burst = 30, 5         # (the burst absorbs a loaded machine's jitter)
    body = fleet_body(origin.url, f'rate = "{rate}r/s"\nburst = {burst}\n'
                                  f'store = "{redis_server.url}"\n')
    edges = [proxy_factory(body) for _ in range(3)]
    counts, took = hammer([p.port for p in edges], 3.0, per_port=3)
    assert counts[429] > 0, counts
    expected = rate * took + burst + 1
    assert abs(counts[200] - expected) <= 0.1 * expected, (counts, expected)
    for p in edges:
        assert "Redis store" not in p.log()     # no fall back happened


def test_a_redis_limit_delays_inside_the_burst_and_refuses_beyond(origin, proxy_factory,
                                                                  redis_server):
    # 5r/s, burst 2, delay 1 (in Redis): 2 at once, the third after ~200 ms, the fourth 429
    p = proxy_factory(fleet_body(origin.url, f'rate = "5r/s"\nburst = 2\ndelay = 1\n'
                                             f'store = "{redis_server.url}"\n'))
    got, took = concurrently(p.port, 4, "/size/3")
    assert sorted(r.status for r in got) == [200, 200, 200, 429], got
    assert max(t for r, t in zip(got, took, strict=True) if r.status == 200) >= 0.15
    refused = next(r for r in got if r.status == 429)
    assert refused.header("ratelimit-policy") == '"fleet";q=3;w=1'


def test_unreachable_redis_falls_back_to_the_local_limit_then_reconnects(
        origin, proxy_factory, tmp_path, redis_server):
    body = f'rate = "1r/m"\nstore = "{redis_server.url}"\n'
    p, admin = start(proxy_factory, tmp_path, origin.url, admin=True,
                     server_extra='limits = ["fleet"]',
                     extra=f'[[limit]]\nname = "fleet"\n{body}')
    with Client(p.port) as c:
        assert c.request("GET", "/size/1").status == 200
        assert c.request("GET", "/size/1").status == 429         # Redis said so
        redis_server.stop()
        # fail open: this host's own limit decides (it has not seen the key yet)
        assert c.request("GET", "/size/1").status == 200
        assert c.request("GET", "/size/1").status == 429         # the local limit
    wait_until(lambda: "Redis store redis://127.0.0.1" in p.log(), what="the warning")
    assert "this host's local limit decides" in p.log()
    m = metrics(admin)
    assert m['edgeproxy_limit_store_errors_total{limit="fleet"}'] >= 2
    # Redis comes back (empty): the edge goes back to it by itself
    redis_server.start()

    def back() -> bool:
        with Client(p.port) as c:
            c.request("GET", "/size/1")
        return "answers again" in p.log()
    wait_until(back, timeout=20, every=0.3, what="the reconnection")
    with Client(p.port) as c:
        assert c.request("GET", "/size/1").status == 429      # its key is in Redis again


def test_on_store_error_deny_refuses_while_redis_is_down(origin, proxy_factory, tmp_path):
    dead = f"redis://127.0.0.1:{free_port()}/0"
    p = proxy_factory(fleet_body(origin.url, f'rate = "100r/s"\nstore = "{dead}"\n'
                                             'on_store_error = "deny"\n'))
    with Client(p.port) as c:
        for _ in range(3):
            r = c.request("GET", "/size/1")
            assert r.status == 429 and int(r.header("retry-after")) >= 1
    assert not origin.requests


def run_check(tmp_path, body: str) -> subprocess.CompletedProcess:
    cfg = tmp_path / "check.toml"
    cfg.write_text(body)
    return subprocess.run([sys.executable, "-m", "edgeproxy", "check", "-c", str(cfg)],
                          capture_output=True, text=True, timeout=60, cwd=str(ROOT))


def test_check_warns_about_an_unreachable_redis_without_failing(tmp_path, redis_server):
    dead = free_port()
    body = (f'[[listen]]\nbind = "127.0.0.1:{free_port()}"\n\n'
            + fleet_body("http://127.0.0.1:9", f'rate = "5r/s"\nstore = "redis://127.0.0.1:{dead}/2"\n')
            + f'\n[[limit]]\nname = "up"\nrate = "5r/s"\nstore = "{redis_server.url}"\n')
    r = run_check(tmp_path, body)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("OK:")
    assert f"warning: limit[0].store: redis://127.0.0.1:{dead}/2: unreachable" in r.stderr
    assert "limit[1]" not in r.stderr          # the reachable one is fine


def test_check_names_every_bad_limit_and_access_key(tmp_path):
    body = (f'[[listen]]\nbind = "127.0.0.1:{free_port()}"\naccess = ["allow 10.0.0.0/33"]\n\n'
            '[server]\nlimits = ["nope"]\n\n'
            '[[route]]\npath = "/"\npool = "web"\nlimits = ["api", "ghost"]\n'
            'access = ["permit 10.0.0.0/8", "deny 10.0.0.1/8", "allow all"]\n\n'
            '[pool.web]\nbackends = ["http://127.0.0.1:9"]\n\n'
            '[[limit]]\nname = "api"\nrate = "ten per second"\nstore = "memcached://x"\n'
            'mode = "sometimes"\nkey = "header:"\n')
    r = run_check(tmp_path, body)
    assert r.returncode == 1
    for where in ("listen[0].access[0]", "server.limits[0]: no [[limit]] named \"nope\"",
                  "route[0].limits[1]: no [[limit]] named \"ghost\"", "route[0].access[0]",
                  "route[0].access[1]", "limit[0].rate", "limit[0].store", "limit[0].mode",
                  "limit[0].key"):
        assert where in r.stderr, (where, r.stderr)
    assert "route[0].access[2]" not in r.stderr
    assert "has host bits set" in r.stderr
