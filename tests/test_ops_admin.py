"""The admin listener against a real supervisor: Prometheus metrics summed
over workers (and kept when a worker dies), /status, taking backends out,
in, adding and removing them (with `edgeproxy status` showing the same),
the config checks of `server.admin`, and the status page rendered by
headless Chromium."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys

import pytest
from harness import ROOT, Client, Origin
from ops_support import admin, json_lines, metrics, start, status, wait_until, worker_pids

from edgeproxy.config import ConfigError, parse_config

ROUTE = 'route="/",pool="web"'


def test_metrics_sum_the_workers_and_survive_a_dead_one(proxy_factory, tmp_path, origin):
    proxy, port = start(proxy_factory, tmp_path, origin.url, workers=2, admin=True)
    for _ in range(6):
        with Client(proxy.port) as c:
            assert c.request("GET", "/size/10").status == 200
    for _ in range(2):
        with Client(proxy.port) as c:
            assert c.request("GET", "/status/404").status == 404
    backend = f'pool="web",backend="127.0.0.1:{origin.port}"'
    m = wait_until(lambda: (m := metrics(port)).get(f"edgeproxy_backend_requests_total{{{backend}}}") == 8
                   and m, what="the backend counter")
    assert m[f'edgeproxy_requests_total{{{ROUTE},code="2xx"}}'] == 6
    assert m[f'edgeproxy_requests_total{{{ROUTE},code="4xx"}}'] == 2
    assert m["edgeproxy_request_duration_seconds_count"] == 8
    assert m['edgeproxy_request_duration_seconds_bucket{le="+Inf"}'] == 8
    assert m["edgeproxy_client_connections_accepted_total"] >= 8
    assert m["edgeproxy_client_sent_bytes_total"] > 60 + 8 * 30
    assert m["edgeproxy_client_received_bytes_total"] > 8 * 20
    assert m[f"edgeproxy_backend_up{{{backend}}}"] == 1
    assert m["edgeproxy_workers"] == 2
    assert m['edgeproxy_config_reloads_total{result="ok"}'] == 0
    # both workers took requests: each slot counts its own
    pids = worker_pids(port)
    os.kill(pids[0], signal.SIGKILL)
    wait_until(lambda: len(worker_pids(port)) == 2 and pids[0] not in worker_pids(port),
               what="a replacement")
    after = metrics(port)
    assert after[f'edgeproxy_requests_total{{{ROUTE},code="2xx"}}'] == 6
    assert after["edgeproxy_request_duration_seconds_count"] == 8
    assert after["edgeproxy_worker_restarts_total"] == 1
    with Client(proxy.port) as c:
        c.request("GET", "/size/1")
    # counted when the request ends, just after its response is sent
    wait_until(lambda: metrics(port)[f'edgeproxy_requests_total{{{ROUTE},code="2xx"}}'] == 7,
               what="the new request counted")


def test_status_json(proxy_factory, tmp_path, origin):
    proxy, port = start(proxy_factory, tmp_path, origin.url, admin=True)
    with Client(proxy.port) as c:
        c.request("GET", "/size/1")
        with Client(proxy.port):
            st = wait_until(lambda: (s := status(port))["connections"]["client_connections"] == 2
                            and s, what="two open connections")
    assert st["requests"]["total"] == 1 and st["requests"]["by_class"] == {"2xx": 1}
    assert st["config"]["source"].endswith(".toml")
    import hashlib
    assert st["config"]["checksum"] == hashlib.sha256(proxy.config_path.read_bytes()).hexdigest()
    assert st["workers"][0]["state"] == "serving" and st["generation"] == 1
    assert admin(port, "GET", "/nope").status == 404
    assert admin(port, "GET", "/reload").status == 405


def test_backends_drained_enabled_added_and_removed(proxy_factory, tmp_path, origin):
    proxy, port = start(proxy_factory, tmp_path, origin.url, workers=2, admin=True)
    first = f"127.0.0.1:{origin.port}"
    r = admin(port, "POST", f"/backends/web/{first}/drain")
    assert r.status == 200 and r.json()["ok"]
    wait_until(lambda: status(port)["backends"][0]["drained"], what="drained in /status")
    for _ in range(4):
        with Client(proxy.port) as c:
            assert c.request("GET", "/size/1").status == 503
    assert admin(port, "POST", f"/backends/web/{first}/enable").status == 200
    wait_until(lambda: _get(proxy.port) == 200, what="the backend back")

    second = Origin().start()
    try:
        assert admin(port, "PUT", f"/pools/web/backends/127.0.0.1:{second.port}",
                     body=b'{"weight": 2}').status == 200
        assert admin(port, "PUT", f"/pools/web/backends/127.0.0.1:{second.port}").status == 409
        assert admin(port, "PUT", "/pools/nope/backends/127.0.0.1:1").status == 404
        assert admin(port, "PUT", "/pools/web/backends/not a host").status == 400
        wait_until(lambda: _get(proxy.port) and second.requests, what="traffic to the new one")
        assert {b["backend"] for b in status(port)["backends"]} == {first, f"127.0.0.1:{second.port}"}
        assert admin(port, "DELETE", f"/pools/web/backends/{first}").status == 200
        assert admin(port, "DELETE", f"/pools/web/backends/127.0.0.1:{second.port}").status == 409
        n = len(origin.requests)
        for _ in range(6):
            assert _get(proxy.port) == 200
        assert len(origin.requests) == n           # every request went to the second one
        # a replacement worker gets the changes too
        os.kill(worker_pids(port)[0], signal.SIGKILL)
        wait_until(lambda: status(port)["worker_restarts"] == 1 and len(worker_pids(port)) == 2,
                   what="a replacement")
        for _ in range(6):
            assert _get(proxy.port) == 200
        assert len(origin.requests) == n
        # a reload of the file forgets them
        assert admin(port, "POST", "/reload").status == 200
        wait_until(lambda: [b["backend"] for b in status(port)["backends"]] == [first],
                   what="the file's backends")
    finally:
        second.stop()


def _get(port: int) -> int:
    with Client(port) as c:
        return c.request("GET", "/size/1").status


BASE = '[[listen]]\nbind = "{bind}"\n[[route]]\npool = "a"\n[pool.a]\nbackends = ["http://127.0.0.1:1"]\n'


@pytest.mark.parametrize("bind,admin_,error", [
    ("127.0.0.1:8080", ":9901", "needs an explicit IP address"),
    ("127.0.0.1:8080", "0.0.0.0:9901", "needs an explicit IP address"),
    ("127.0.0.1:8080", "127.0.0.1:8080", "must not be public"),
    (":9901", "127.0.0.1:9901", "must not be public"),
])
def test_admin_address_is_checked(bind, admin_, error):
    with pytest.raises(ConfigError) as info:
        parse_config(BASE.format(bind=bind) + f'[server]\nadmin = "{admin_}"\n')
    assert "server.admin" in str(info.value) and error in str(info.value)
    ok = parse_config(BASE.format(bind="127.0.0.1:8080") + '[server]\nadmin = "[::1]:9901"\n')
    assert ok.server.admin_host == "::1" and ok.server.admin_port == 9901


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(not CHROMIUM, reason="headless Chromium not installed "
                    "(apt-get install chromium chromium-driver)")
def test_status_page_in_chromium(proxy_factory, tmp_path, origin):
    proxy, port = start(proxy_factory, tmp_path, origin.url, admin=True)
    for _ in range(3):
        assert _get(proxy.port) == 200
    backend = f"127.0.0.1:{origin.port}"
    wait_until(lambda: status(port)["backends"][0]["up"], what="the backend gauge")
    out = subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu",
                          "--disable-background-networking", "--disable-component-update",
                          "--disable-sync", "--no-first-run", f"--user-data-dir={tmp_path}/chrome",
                          "--virtual-time-budget=3000", "--dump-dom", f"http://127.0.0.1:{port}/"],
                         capture_output=True, text=True, timeout=60)
    dom = out.stdout
    assert f'data-backend="web/{backend}"' in dom, (dom[-2000:], out.stderr[-2000:])
    assert '<td class="up health">up</td>' in dom
    assert '<b id="total">3</b>' in dom
    assert '<b id="workers">1</b>' in dom
    assert '<div id="error"></div>' in dom       # no fetch error shown


def test_an_added_backend_keeps_every_ticker_running(proxy_factory, tmp_path, origin):
    """A backend added at run time gets its health slot in every worker: the
    workers' tickers go on (access log, Date, timeout.header) and it shows
    as up while it serves."""
    log_path = tmp_path / "access.log"
    proxy, port = start(proxy_factory, tmp_path, origin.url, workers=2, admin=True,
                        extra=f'[timeout]\nheader = 1.0\n[log]\naccess_log = "{log_path}"\n'
                              'access_format = "json"\n')
    second = Origin().start()
    try:
        added = f"127.0.0.1:{second.port}"
        assert admin(port, "PUT", f"/pools/web/backends/{added}").status == 200
        wait_until(lambda: _get(proxy.port) == 200 and second.requests, what="traffic to the new one")
        # the Date line advances
        with Client(proxy.port) as c:
            first = c.request("GET", "/size/1").header("date")
            wait_until(lambda: c.request("GET", "/size/1").header("date") != first,
                       timeout=5, every=0.2, what="a new Date")
        # timeout.header is enforced
        with Client(proxy.port) as c:
            c.send(b"GET / HTTP/1.1\r\nHost: a\r\n")      # never finished
            c.sock.settimeout(8)
            assert c.sock.recv(4096).startswith(b"HTTP/1.1 408")
        # every request so far reaches the access log (the tickers flush it)
        sent = len(origin.requests) + len(second.requests) + 1      # + the 408
        wait_until(lambda: len(json_lines(log_path)) == sent, what="the log lines")
        # it shows as up, with its requests counted
        entry = wait_until(lambda: [b for b in status(port)["backends"]
                                    if b["backend"] == added and b["up"]
                                    and b["requests"] == len(second.requests)],
                           what="the new one up")
        assert len(entry) == 1
        assert "Traceback" not in proxy.log()
    finally:
        second.stop()


def _cli_status(proxy) -> dict | None:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    out = subprocess.run([sys.executable, "-m", "edgeproxy", "status", "-c", str(proxy.config_path),
                          "--json"], capture_output=True, text=True, env=env, timeout=20)
    return json.loads(out.stdout) if out.returncode == 0 else None


def _agree(proxy, port) -> dict | None:
    """{backend: (drained, requests)} when `edgeproxy status` and /status say
    the same of every backend, else None."""
    cli = _cli_status(proxy)
    if cli is None:
        return None
    shown = {b["backend"]: (b["drained"], b["requests"]) for p in cli["pools"] for b in p["backends"]}
    admin_ = {b["backend"]: (b["drained"], b["requests"]) for b in status(port)["backends"]}
    return shown if shown == admin_ else None


def test_edgeproxy_status_agrees_with_the_admin_status(proxy_factory, tmp_path, origin):
    proxy, port = start(proxy_factory, tmp_path, origin.url, workers=2, admin=True)
    first = f"127.0.0.1:{origin.port}"
    for _ in range(3):
        assert _get(proxy.port) == 200
    second = Origin().start()
    try:
        added = f"127.0.0.1:{second.port}"
        assert admin(port, "PUT", f"/pools/web/backends/{added}").status == 200
        assert admin(port, "POST", f"/backends/web/{first}/drain").status == 200
        for _ in range(4):
            assert _get(proxy.port) == 200
        assert len(second.requests) == 4 and len(origin.requests) == 3
        shown = wait_until(lambda: _agree(proxy, port), what="the same backends")
        assert shown == {first: (True, 3), added: (False, 4)}
        text = subprocess.run([sys.executable, "-m", "edgeproxy", "status", "-c",
                               str(proxy.config_path)], capture_output=True, text=True,
                              env=dict(os.environ, PYTHONPATH=str(ROOT)), timeout=20).stdout
        assert "drained" in text and f"http://{added}" in text
        # enabled again: neither says drained any more
        assert admin(port, "POST", f"/backends/web/{first}/enable").status == 200
        assert wait_until(lambda: _agree(proxy, port), what="enabled")[first] == (False, 3)
        # a reload forgets the admin's changes but not the requests counted
        assert admin(port, "POST", "/reload").status == 200
        wait_until(lambda: [w["generation"] for w in status(port)["workers"]] == [2, 2],
                   what="the old workers gone")
        assert wait_until(lambda: _agree(proxy, port), what="after the reload") == {first: (False, 3)}
        assert _get(proxy.port) == 200
        assert wait_until(lambda: (s := _agree(proxy, port)) and s[first][1] == 4 and s,
                          what="counting on") == {first: (False, 4)}
    finally:
        second.stop()
