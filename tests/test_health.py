"""Active and passive health end to end: a backend that stops is routed
around with no client-visible error and gets traffic again once its checks
pass; one prober serves every worker, and checks backends added at run
time too; `edgeproxy status` shows it all."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections import Counter

import pytest
from harness import ROOT, Client, free_port
from ops_support import admin
from pool_origins import PortOrigin, ResetServer

from edgeproxy.config import load_config
from edgeproxy.health.status import read_state, state_path

HEALTH = """health.path = "/healthz"
health.interval = 0.5
health.timeout = 0.5
health.rise = 2
health.fall = 2
"""


def config(urls, extra="", workers=1):
    listed = ", ".join(f'"{u}"' for u in urls)
    return (f'[server]\nworkers = {workers}\n\n[[route]]\npath = "/"\npool = "web"\n\n'
            f'[pool.web]\nbackends = [{listed}]\n{extra}\n')


@pytest.fixture
def port_origins():
    started = []

    def make(n, **kw):
        for _ in range(n):
            started.append(PortOrigin(**kw).start())
        return started[-n:]

    def restart(old):
        o = PortOrigin(port=old.port).start()
        started.append(o)
        return o

    make.restart = restart
    yield make
    for o in started:
        if o._thread.is_alive():
            o.stop()


def wait_for(pred, timeout, what):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(0.05)
    raise AssertionError(f"not within {timeout}s: {what}")


def state(proxy):
    return read_state(state_path(load_config(proxy.config_path)))


def backend_state(proxy, url):
    data = state(proxy)
    if data is None:
        return None
    for pool in data["pools"]:
        for b in pool["backends"]:
            if b["url"] == url:
                return b
    return None


def run_status(proxy, *args):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", "edgeproxy", "status", "-c",
                           str(proxy.config_path), *args],
                          capture_output=True, text=True, env=env, timeout=20)


class Load:
    """GETs in a loop from a thread, every outcome counted (bounded)."""

    def __init__(self, port, limit=20000):
        self.port = port
        self.limit = limit
        self.outcomes = Counter()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(10)

    def _run(self):
        c = Client(self.port)
        n = 0
        while not self._stop.is_set() and n < self.limit:
            n += 1
            try:
                r = c.request("GET", "/size/10")
                self.outcomes[r.status] += 1
                if r.header("connection") == "close":
                    c.close()
                    c = Client(self.port)
            except Exception as exc:  # a client-visible error
                self.outcomes[type(exc).__name__] += 1
                c.close()
                c = Client(self.port)
            time.sleep(0.002)
        c.close()


def test_stopping_a_backend_costs_no_client_errors_and_it_comes_back(port_origins, proxy_factory):
    os_ = port_origins(3)
    proxy = proxy_factory(config([o.url for o in os_], HEALTH + "passive.failures = 3\n"))
    victim = os_[1]
    with Load(proxy.port) as load:
        wait_for(lambda: victim.traffic() > 20, 5, "traffic to every backend")
        victim.stop()
        wait_for(lambda: (backend_state(proxy, victim.url) or {}).get("state") == "down", 5,
                 "the stopped backend marked down")
        before = sum(load.outcomes.values())
        time.sleep(0.5)
        assert sum(load.outcomes.values()) > before       # still serving meanwhile
        back = port_origins.restart(victim)
        # rise x interval + 1 s
        wait_for(lambda: back.traffic() > 0, 2 * 0.5 + 1.0, "traffic to the returned backend")
    assert set(load.outcomes) == {200}, load.outcomes
    assert sum(load.outcomes.values()) > 200
    log = proxy.log()
    assert log.count(f"backend {victim.url} is down") == 1
    assert log.count(f"backend {victim.url} is up") == 1


def test_a_failing_check_takes_a_backend_out_and_a_passing_one_back(port_origins, proxy_factory):
    good, sick = port_origins(2)
    sick.health_status = 503
    proxy = proxy_factory(config([good.url, sick.url], HEALTH))
    wait_for(lambda: (backend_state(proxy, sick.url) or {}).get("state") == "down", 5,
             "the backend failing its checks marked down")
    served = sick.traffic()
    with Client(proxy.port) as c:
        for _ in range(30):
            assert c.request("GET", "/size/1").status == 200
    assert sick.traffic() == served
    sick.health_status = 200
    wait_for(lambda: (backend_state(proxy, sick.url) or {}).get("state") == "up", 5,
             "the backend marked up again")
    with Client(proxy.port) as c:
        for _ in range(30):
            assert c.request("GET", "/size/1").status == 200
    assert sick.traffic() >= served + 10


def test_two_workers_share_one_prober(port_origins, proxy_factory):
    o, = port_origins(1)
    proxy = proxy_factory(config([o.url], HEALTH.replace("interval = 0.5", "interval = 0.4"),
                                 workers=2))
    wait_for(lambda: state(proxy) is not None and len(state(proxy)["workers"]) == 2, 10,
             "both workers reporting")
    first = o.probes()
    time.sleep(2.0)
    probes = o.probes() - first
    # one prober: about 2.0 / 0.4 = 5; one per worker would be about 10
    assert 3 <= probes <= 6, probes
    heads = [s for s in o.requests if s.target == "/healthz"]
    assert all(s.header("user-agent") == "edgeproxy-health" for s in heads)
    # and the workers act on its verdict
    o.health_status = 500
    wait_for(lambda: (backend_state(proxy, o.url) or {}).get("state") == "down", 5, "down")
    with Client(proxy.port) as c:
        r = c.request("GET", "/size/1")
    assert r.status == 503 and r.header("retry-after") == "1"


@pytest.mark.parametrize("workers", [1, 2])
def test_status_shows_every_backend(port_origins, proxy_factory, workers):
    good, sick = port_origins(2)
    sick.health_status = 500
    dead = ResetServer()
    dead.stop()
    dead_url = f"http://127.0.0.1:{dead.port}"
    proxy = proxy_factory(config([good.url, sick.url, f"{dead_url} backup"],
                                 HEALTH.replace("health.fall = 2", "health.fall = 1"),
                                 workers=workers))
    wait_for(lambda: (backend_state(proxy, sick.url) or {}).get("state") == "down"
             and (backend_state(proxy, dead_url) or {}).get("state") == "down"
             and len(state(proxy)["workers"]) == workers, 10, "checks done")
    out = run_status(proxy)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    line = {url: next(ln for ln in lines if url in ln) for url in (good.url, sick.url, dead_url)}
    assert " up " in line[good.url] and "pass: 200 Health" in line[good.url]
    assert " down " in line[sick.url] and "FAIL: 500 Health" in line[sick.url]
    assert " down " in line[dead_url] and "connection refused" in line[dead_url]
    assert "backup" in line[dead_url]
    assert "pool web (round_robin, health /healthz)" in out.stdout
    data = json.loads(run_status(proxy, "--json").stdout)
    assert len(data["workers"]) == workers
    proxy.stop()
    after = run_status(proxy)
    assert after.returncode == 1 and "no running proxy" in after.stderr


def test_status_shows_a_passive_ejection(proxy_factory, port_origins):
    good, = port_origins(1)
    dead = ResetServer()
    dead.stop()
    dead_url = f"http://127.0.0.1:{dead.port}"
    proxy = proxy_factory(config([dead_url, good.url], "passive.failures = 1\npassive.eject = 30.0"))
    with Client(proxy.port) as c:
        for _ in range(4):
            assert c.request("GET", "/size/1").status == 200
    wait_for(lambda: (backend_state(proxy, dead_url) or {}).get("state") == "ejected", 5,
             "ejection reported")
    out = run_status(proxy)
    line = next(ln for ln in out.stdout.splitlines() if dead_url in ln)
    assert "ejected (" in line


def test_a_backend_added_at_run_time_is_checked(port_origins, proxy_factory, tmp_path):
    a, b = port_origins(2)
    b.health_status = 500
    admin_port = free_port()
    proxy = proxy_factory(config([a.url], HEALTH, workers=2).replace(
        "[server]\n", f'[server]\nadmin = "127.0.0.1:{admin_port}"\n'
                      f'pid_file = "{tmp_path}/edgeproxy.pid"\n'))
    wait_for(lambda: backend_state(proxy, a.url), 5, "the state file")
    assert admin(admin_port, "PUT", f"/pools/web/backends/127.0.0.1:{b.port}").status == 200
    wait_for(lambda: (backend_state(proxy, b.url) or {}).get("state") == "down", 5,
             "the added backend probed and down")
    assert backend_state(proxy, b.url)["check"]["status"] == 500
    before = b.traffic()
    with Client(proxy.port) as c:
        for _ in range(10):
            assert c.request("GET", "/size/1").status == 200
        assert b.traffic() == before              # a down backend gets nothing
        b.health_status = 200
        wait_for(lambda: (backend_state(proxy, b.url) or {}).get("state") == "up", 5, "back up")
        wait_for(lambda: c.request("GET", "/size/1").status == 200 and b.traffic() > before,
                 5, "traffic to it")
