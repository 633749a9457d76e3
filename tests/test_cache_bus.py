"""The purge bus across edges: three edgeproxy instances (separate
processes, cache directories and ports) on one redis-server started here,
in front of one origin. A purge on one edge (CLI or admin API) stops the
others serving the object within a second; a purge made while Redis is
down is published when it is back; an edge that was away longer than the
stream keeps messages says so in its log and metrics."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import redis
from harness import Client, free_port, wait_port
from ops_support import admin, metrics
from test_cache_conformance import ScriptedOrigin
from test_cache_proxy import wait_for

REDIS = shutil.which("redis-server") or "/usr/bin/redis-server"
HOST = "shop.example"
pytestmark = pytest.mark.skipif(not Path(REDIS).exists(), reason="needs redis-server")


class RedisServer:
    """A redis-server on 127.0.0.1:port, without persistence, stopped by PID."""

    def __init__(self, port: int, workdir: Path):
        self.port = port
        self.workdir = workdir
        self.proc: subprocess.Popen | None = None

    def start(self) -> RedisServer:
        self.proc = subprocess.Popen(
            [REDIS, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(self.workdir), "--protected-mode", "no"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_port(self.port, self.proc)
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)
        self.proc = None


@pytest.fixture
def redis_server(tmp_path):
    workdir = tmp_path / "redis"
    workdir.mkdir()
    server = RedisServer(free_port(), workdir).start()
    yield server
    server.stop()


SCRIPT = {p: [(200, [("Cache-Control", "max-age=3600"), ("Surrogate-Key", f"all {tag}"),
                     ("ETag", f'"{p}"')])]
          for p, tag in (("/a", "ta"), ("/b", "tb"), ("/c", "tc"), ("/d", "td"),
                         *((f"/n{i}", "tn") for i in range(12)))}


def edge_config(tmp_path: Path, name: str, origin_url: str, redis_port: int,
                maxlen: int = 10000) -> str:
    return f"""
[server]
workers = 1
admin = "127.0.0.1:{free_port()}"

[cache]
path = "{tmp_path / name / 'cache'}"
max_size = "32MiB"
max_object = "1MiB"
purge_bus = "redis://127.0.0.1:{redis_port}/0"
purge_bus_maxlen = {maxlen}

[[route]]
path = "/"
pool = "web"
cache = true

[pool.web]
backends = ["{origin_url}"]
"""


def admin_port_of(proxy) -> int:
    for line in proxy.config_path.read_text().splitlines():
        if line.startswith("admin = "):
            return int(line.split(":")[-1].strip('"'))
    raise AssertionError("no admin port")


@pytest.fixture
def fleet(proxy_factory, tmp_path, redis_server):
    """(origin, [edge, edge, edge], redis): three edges on one purge bus."""
    origin = ScriptedOrigin(SCRIPT)
    edges = []
    for i in range(3):
        (tmp_path / f"edge{i}").mkdir()
        edges.append(proxy_factory(edge_config(tmp_path, f"edge{i}", origin.url,
                                               redis_server.port)))
    for e in edges:
        wait_port(admin_port_of(e))
        assert wait_for(lambda e=e: connected(e), timeout=10.0), e.log()
    yield origin, edges, redis_server
    origin.close()


def connected(edge) -> bool:
    return metrics(admin_port_of(edge)).get("edgeproxy_purge_bus_connected") == 1


def cache_status(edge, path: str) -> str:
    with Client(edge.port) as c:
        r = c.request("GET", path, None, host=HOST)
    assert r.status == 200
    return r.header("cache-status") or ""


def is_hit(edge, path: str) -> bool:
    return cache_status(edge, path).startswith("edgeproxy; hit")


def warm(edges, *paths: str) -> None:
    for e in edges:
        for p in paths:
            cache_status(e, p)
        for p in paths:
            assert wait_for(lambda e=e, p=p: is_hit(e, p), timeout=5.0), (e.log(), p)


def cli_purge(edge, *args: str) -> str:
    out = subprocess.run([*edge.proc.args[:3], "cache", "purge", "-c", str(edge.config_path),
                          *args], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return out.stdout


def gone_within(edges, path: str, limit: float) -> float:
    """Seconds until none of edges serves path from the cache (at most limit)."""
    start = time.monotonic()
    assert wait_for(lambda: not any(is_hit(e, path) for e in edges), timeout=limit), \
        [e.log()[-2000:] for e in edges]
    return time.monotonic() - start


def stale_within(edges, path: str, limit: float) -> None:
    assert wait_for(lambda: all("fwd=stale" in cache_status(e, path) for e in edges),
                    timeout=limit)


def test_a_purge_on_one_edge_reaches_the_others_within_a_second(fleet):
    origin, (a, b, c), _ = fleet
    warm((a, b, c), "/a", "/b", "/c")
    out = cli_purge(a, f"http://{HOST}/a")
    assert "sent to the purge bus" in out
    assert not is_hit(a, "/a")                      # applied here at once
    assert gone_within((b, c), "/a", 1.0) <= 1.0
    assert is_hit(b, "/b") and is_hit(c, "/c")      # nothing else went
    # a tag purge made through the admin API of another edge
    r = admin(admin_port_of(b), "POST", "/cache/purge",
              json.dumps({"tags": ["tb"]}).encode())
    assert r.status == 200 and r.json()["bus"] is True, r.body
    assert gone_within((a, c), "/b", 1.0) <= 1.0
    # a soft purge by prefix: the others revalidate (a conditional GET, 200 here)
    cli_purge(c, "--soft", "--prefix", f"http://{HOST}/c")
    stale_within((a, b), "/c", 1.0)
    assert origin.seen["/c"][-1].get("if-none-match") == '"/c"'
    # each purge went out once, and each edge applied the two of the others
    for e in (a, b, c):
        m = metrics(admin_port_of(e))
        assert m["edgeproxy_purge_bus_published_total"] == 1, e.log()
        assert m["edgeproxy_purge_bus_applied_total"] == 2, e.log()
        assert m["edgeproxy_purge_bus_gaps_total"] == 0


def test_a_purge_made_while_redis_is_down_is_sent_when_it_is_back(fleet):
    origin, (a, b, c), redis_server = fleet
    warm((a, b, c), "/d")
    redis_server.stop()
    assert wait_for(lambda: not connected(a) and not connected(b), timeout=10.0)
    cli_purge(a, f"http://{HOST}/d")
    time.sleep(0.5)
    assert is_hit(b, "/d") and is_hit(c, "/d")      # nobody could hear it yet
    redis_server.start()
    assert wait_for(lambda: not is_hit(b, "/d") and not is_hit(c, "/d"), timeout=20.0), \
        [e.log()[-3000:] for e in (a, b, c)]
    assert "purge bus: connected to" in a.log() and "again after" in a.log()
    assert metrics(admin_port_of(b))["edgeproxy_purge_bus_applied_total"] == 1


def test_an_edge_away_longer_than_the_stream_keeps_reports_the_gap(proxy_factory, tmp_path,
                                                                   redis_server):
    origin = ScriptedOrigin(SCRIPT)
    try:
        for name in ("a", "c"):
            (tmp_path / name).mkdir()
        a = proxy_factory(edge_config(tmp_path, "a", origin.url, redis_server.port, maxlen=100))
        c_config = edge_config(tmp_path, "c", origin.url, redis_server.port, maxlen=100)
        c = proxy_factory(c_config)
        for e in (a, c):
            wait_port(admin_port_of(e))
            assert wait_for(lambda e=e: connected(e), timeout=10.0)
        cli_purge(a, f"http://{HOST}/n0")          # c hears this one
        assert wait_for(lambda: "applied url" in c.log(), timeout=5.0)
        c.stop()
        # more purges than the stream keeps, while c is away
        for i in range(3):
            cli_purge(a, "--tag", f"none-{i}")
        # and the stream trimmed to its last message (what MAXLEN does to a
        # long absence), with the redis client
        assert wait_for(lambda: metrics(admin_port_of(a))["edgeproxy_purge_bus_published_total"]
                        == 4, timeout=5.0)
        trim = redis.Redis(host="127.0.0.1", port=redis_server.port)
        try:
            assert trim.xtrim("edgeproxy:purges", maxlen=1, approximate=False) == 3
        finally:
            trim.close()
        c2 = proxy_factory(c_config)
        wait_port(admin_port_of(c2))
        assert wait_for(lambda: metrics(admin_port_of(c2)).get(
            "edgeproxy_purge_bus_applied_total", 0) >= 1, timeout=10.0), c2.log()[-3000:]
        m = metrics(admin_port_of(c2))
        assert m["edgeproxy_purge_bus_gaps_total"] == 1
        assert m["edgeproxy_purge_bus_missed_total"] == 2  # a's 2nd and 3rd purges
        assert m["edgeproxy_purge_bus_applied_total"] == 1  # the one left in the stream
        log = c2.log()
        assert "purge bus: missed 2 purges: trimmed from edgeproxy:purges" in log
        assert "purge bus: missed 2 purges from edge" in log     # a's numbers jumped too
    finally:
        origin.close()


def test_purge_bus_config_keys_are_checked(tmp_path):
    from edgeproxy.config import ConfigError, parse_config
    base = ('[[listen]]\nbind = "127.0.0.1:8080"\n[[route]]\npath = "/"\npool = "w"\n'
            'cache = true\n[pool.w]\nbackends = ["http://127.0.0.1:9"]\n'
            f'[cache]\npath = "{tmp_path}/c"\n')
    cfg = parse_config(base)
    assert cfg.cache.purge_bus is None and cfg.cache.purge_bus_maxlen == 10000
    cfg = parse_config(base + 'purge_bus = "redis://10.0.0.5:6380/2"\n'
                       'purge_bus_stream = "fleet-a"\npurge_bus_maxlen = 500\n')
    assert (cfg.cache.purge_bus, cfg.cache.purge_bus_stream, cfg.cache.purge_bus_maxlen) == \
        ("redis://10.0.0.5:6380/2", "fleet-a", 500)
    assert parse_config(base + 'purge_bus = "unix:///run/redis.sock"\n').cache.purge_bus
    for bad, msg in (('purge_bus = "http://x"', "is not a redis://"),
                     ('purge_bus = "redis://:6379"', "has no host"),
                     ('purge_bus = "redis://h:99999"', "bad port"),
                     ('purge_bus = "redis://h/x"', "database number"),
                     ('purge_bus = "unix://"', "no socket path"),
                     ("purge_bus_maxlen = 10", "cache.purge_bus_maxlen"),
                     ('purge_bus_stream = "a\\nb"', "cache.purge_bus_stream")):
        with pytest.raises(ConfigError) as e:
            parse_config(base + bad + "\n")
        assert msg in str(e.value), (bad, str(e.value))


def test_the_admin_purge_refuses_bad_bodies(fleet):
    origin, (a, b, c), _ = fleet
    port = admin_port_of(a)
    for body in (b"", b"[]", b'{"url": "x", "tags": ["t"]}', b'{"tags": []}',
                 b'{"url": 5}', b'{"url": "http://h/", "soft": "yes"}', b'{"nope": 1}'):
        r = admin(port, "POST", "/cache/purge", body)
        assert r.status == 400 and r.json()["ok"] is False, (body, r.body)
    r = admin(port, "POST", "/cache/purge", b'{"url": "not a url"}')
    assert r.status == 422 and "not an absolute" in r.json()["message"]
    assert admin(port, "GET", "/cache/purge").status == 405
    r = admin(port, "POST", "/cache/purge", b'{"url": "http://shop.example/a", "soft": true}')
    assert r.status == 200 and r.json()["purged"] == 0 and r.json()["soft"] is True


def test_a_purge_redis_lost_shows_as_a_jump_in_sequence_numbers(proxy_factory, tmp_path,
                                                                redis_server):
    origin = ScriptedOrigin(SCRIPT)
    try:
        for name in ("a", "c"):
            (tmp_path / name).mkdir()
        a = proxy_factory(edge_config(tmp_path, "a", origin.url, redis_server.port))
        c_config = edge_config(tmp_path, "c", origin.url, redis_server.port)
        c = proxy_factory(c_config)
        for e in (a, c):
            wait_port(admin_port_of(e))
            assert wait_for(lambda e=e: connected(e), timeout=10.0)
        cli_purge(a, "--tag", "one")                # c reads it
        assert wait_for(lambda: "applied tag one" in c.log(), timeout=5.0)
        c.stop()
        cli_purge(a, "--tag", "two")                # only Redis has it...
        assert wait_for(lambda: metrics(admin_port_of(a))["edgeproxy_purge_bus_published_total"]
                        == 2, timeout=5.0)
        redis_server.stop()                         # ...and loses it (no persistence)
        redis_server.start()
        c2 = proxy_factory(c_config)
        wait_port(admin_port_of(c2))
        assert wait_for(lambda: connected(c2), timeout=10.0)
        assert wait_for(lambda: connected(a), timeout=10.0)
        cli_purge(a, "--tag", "three")
        assert wait_for(lambda: "applied tag three" in c2.log(), timeout=10.0), c2.log()[-3000:]
        m = metrics(admin_port_of(c2))
        assert m["edgeproxy_purge_bus_gaps_total"] == 1
        assert m["edgeproxy_purge_bus_missed_total"] == 1
        log = c2.log()
        assert "the stream edgeproxy:purges is gone" in log
        assert "missed 1 purge from edge" in log and "lost: Redis restarted?" in log
    finally:
        origin.close()


def test_the_supervisor_restarts_the_bus_process_and_reloads_it(proxy_factory, tmp_path,
                                                                redis_server):
    import os
    import signal

    from ops_support import status
    origin = ScriptedOrigin(SCRIPT)
    try:
        (tmp_path / "a").mkdir()
        a = proxy_factory(edge_config(tmp_path, "a", origin.url, redis_server.port))
        port = admin_port_of(a)
        wait_port(port)
        assert wait_for(lambda: connected(a), timeout=10.0)
        first = status(port)["purge_bus"]
        assert first["connected"] is True and first["restarts"] == 0
        os.kill(first["pid"], signal.SIGKILL)      # the bus process dies...
        assert wait_for(lambda: (status(port)["purge_bus"]["pid"] not in (None, first["pid"])
                                 and connected(a)), timeout=10.0), a.log()[-2000:]
        assert status(port)["purge_bus"]["restarts"] == 1
        assert "purge bus process exited" in a.log()
        second = status(port)["purge_bus"]["pid"]
        # a reload that keeps the bus settings keeps the process
        assert admin(port, "POST", "/reload").status == 200
        assert status(port)["purge_bus"]["pid"] == second
        # one that changes them starts a new one; one without the bus stops it
        text = a.config_path.read_text()
        a.config_path.write_text(text.replace("purge_bus_maxlen = 10000",
                                              "purge_bus_maxlen = 500"))
        assert admin(port, "POST", "/reload").status == 200
        third = status(port)["purge_bus"]["pid"]
        assert third != second
        assert wait_for(lambda: connected(a), timeout=10.0)
        a.config_path.write_text(text.replace(
            f'purge_bus = "redis://127.0.0.1:{redis_server.port}/0"\n', ""))
        assert admin(port, "POST", "/reload").status == 200
        assert status(port)["purge_bus"] is None
        assert wait_for(lambda: not os.path.exists(f"/proc/{third}")
                        or "Z" in open(f"/proc/{third}/stat").read().split()[2], timeout=5.0)
    finally:
        origin.close()
