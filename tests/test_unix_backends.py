"""Unix-socket backends ("unix:/run/gunicorn.sock") end to end: real
origins listening on unix sockets in tmp_path, a real proxy process.  They
are pooled (one connection serves many requests), balanced, health-checked
and ejected like TCP ones, named "unix:/path" in logs, metrics and status,
and their failures (no socket, nobody listening) are 502s with a log line."""

from __future__ import annotations

import asyncio
import os
import socket
import time
from collections import Counter

import pytest
from harness import Client, free_port
from ops_support import metrics, wait_until
from pool_origins import PortOrigin

from edgeproxy.config import ConfigError, parse_config


class UnixOrigin(PortOrigin):
    """The tests' origin (harness.Origin's answers, /healthz) on a unix socket."""

    def __init__(self, path, health_status: int = 200):
        super().__init__(health_status=health_status)
        self.path = str(path)

    async def _start(self):
        self._server = await asyncio.start_unix_server(self._conn, self.path, limit=1 << 20)

    @property
    def url(self) -> str:
        return f"unix:{self.path}"


@pytest.fixture
def unix_origins(tmp_path):
    started = []

    def make(name, **kw):
        o = UnixOrigin(tmp_path / name, **kw).start()
        started.append(o)
        return o

    yield make
    for o in started:
        if o._thread.is_alive():
            o.stop()


def pool_config(urls, extra="", server=""):
    listed = ", ".join(f'"{u}"' for u in urls)
    return (f'[server]\nworkers = 1\n{server}\n[[route]]\npath = "/"\npool = "web"\n\n'
            f'[pool.web]\nbackends = [{listed}]\n{extra}\n')


@pytest.mark.parametrize("loop", ["uvloop", "asyncio"])
def test_requests_go_over_one_pooled_unix_connection(unix_origins, proxy_factory, loop):
    app = unix_origins("app.sock")
    proxy = proxy_factory(pool_config([app.url]), env={"EDGEPROXY_LOOP": loop})
    for i in range(5):                       # five client connections, one after the other
        with Client(proxy.port) as c:
            r = c.request("GET", f"/echo?n={i}", host="shop.example")
            assert r.status == 200
            assert r.json()["target"] == f"/echo?n={i}"
    with Client(proxy.port) as c:
        r = c.request("POST", "/echo", body=b"x" * 100000, host="shop.example")
        assert r.status == 200 and r.json()["body_len"] == 100000
        assert c.request("GET", "/size/70000").body == b"x" * 70000
    assert app.connections == 1              # kept alive and reused
    # the client's Host reaches the backend, as for TCP ones
    assert {s.header("host") for s in app.requests} == {"shop.example", "example.test"}
    # an HTTP/1.0 client without Host: the backend gets "localhost" (as nginx sends)
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as s:
        s.sendall(b"GET /echo HTTP/1.0\r\n\r\n")
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    assert data.startswith(b"HTTP/1.1 200")
    assert app.requests[-1].header("host") == "localhost"
    assert f"backend unix:{app.path}" not in proxy.log()     # no error of any kind


def _refusing_socket(path) -> None:
    """A socket file nobody listens on: connecting gets ECONNREFUSED."""
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(path))
    s.close()


def test_unix_failures_are_502_with_a_log_line(tmp_path, proxy_factory):
    missing = tmp_path / "missing.sock"
    refusing = tmp_path / "refusing.sock"
    _refusing_socket(refusing)
    body = (f'[[route]]\npath = "/a/"\npool = "a"\n[[route]]\npath = "/b/"\npool = "b"\n'
            f'[pool.a]\nbackends = ["unix:{missing}"]\n'
            f'[pool.b]\nbackends = ["unix:{refusing}"]\n')
    proxy = proxy_factory(body)
    with Client(proxy.port) as c:
        r = c.request("GET", "/a/x")
        assert r.status == 502
    with Client(proxy.port) as c:
        assert c.request("GET", "/b/x").status == 502
    wait_until(lambda: f"backend unix:{refusing}: connect failed" in proxy.log(), what="log")
    log = proxy.log()
    assert f"backend unix:{missing}: connect failed" in log and "No such file" in log
    assert "Connection refused" in log
    assert "Traceback" not in log


@pytest.mark.skipif(os.geteuid() == 0, reason="root connects to any socket file")
def test_unix_permission_denied_is_502(unix_origins, proxy_factory):
    app = unix_origins("locked.sock")
    os.chmod(app.path, 0)
    proxy = proxy_factory(pool_config([app.url]))
    with Client(proxy.port) as c:
        assert c.request("GET", "/x").status == 502
    wait_until(lambda: "Permission denied" in proxy.log(), what="log line")


def test_unix_backends_are_balanced_checked_and_ejected(unix_origins, tmp_path, proxy_factory):
    a = unix_origins("a.sock")
    b = unix_origins("b.sock")
    admin_port = free_port()
    health = ('health.path = "/healthz"\nhealth.interval = 0.3\nhealth.timeout = 0.5\n'
              'health.rise = 1\nhealth.fall = 1\n')
    proxy = proxy_factory(pool_config([a.url, b.url], health,
                                      server=f'admin = "127.0.0.1:{admin_port}"\n'))
    wait_until(lambda: a.probes() and b.probes(), what="probes on both unix backends")
    assert a.requests[0].header("host") == "localhost"   # the probe's Host
    for _ in range(10):
        with Client(proxy.port) as c:
            assert c.request("GET", "/size/3").status == 200
    assert (a.traffic(), b.traffic()) == (5, 5)           # round robin
    label = f'pool="web",backend="unix:{a.path}"'
    wait_until(lambda: metrics(admin_port).get(f"edgeproxy_backend_requests_total{{{label}}}") == 5,
               what="the backend's metric under its path")
    # b's checks fail: it is taken out, every request goes to a
    b.health_status = 503
    wait_until(lambda: "is down" in proxy.log(), what="b marked down")
    before = a.traffic()
    for _ in range(6):
        with Client(proxy.port) as c:
            assert c.request("GET", "/size/3").status == 200
    assert a.traffic() - before == 6
    assert f"backend unix:{b.path} is down" in proxy.log()


def test_a_vanished_unix_backend_is_retried_and_ejected(unix_origins, tmp_path, proxy_factory):
    good = unix_origins("good.sock")
    gone = tmp_path / "gone.sock"
    proxy = proxy_factory(pool_config([f"unix:{gone}", good.url], "passive.failures = 2\n"))
    seen = Counter()
    for _ in range(10):
        with Client(proxy.port) as c:
            seen[c.request("GET", "/size/1").status] += 1
    assert seen == {200: 10}                  # refused connects go to the other backend
    wait_until(lambda: "ejected for" in proxy.log(), what="the ejection")
    log = proxy.log()
    assert f"unix:{gone}" in log and "retrying on backend" in log


def test_unix_backend_config():
    base = '[[listen]]\nbind = "127.0.0.1:0"\n[[route]]\npool = "p"\n[pool.p]\n'
    c = parse_config(base + 'backends = ["unix:/run/app.sock weight=3", "http://unix:/run/b.sock backup",'
                     ' "http://127.0.0.1:5000"]\n', source="/etc/edgeproxy/e.toml")
    a, b, tcp = c.pools["p"].backends
    assert (a.path, a.name, a.weight, a.port) == ("/run/app.sock", "unix:/run/app.sock", 3, 0)
    assert (b.path, b.backup) == ("/run/b.sock", True)
    assert tcp.path is None and tcp.name == "127.0.0.1:5000"
    rel = parse_config(base + 'backends = ["unix:run/app.sock"]\n', source="/etc/edgeproxy/e.toml")
    assert rel.pools["p"].backends[0].path == "/etc/edgeproxy/run/app.sock"
    for bad, words in (('"https://unix:/run/a.sock"', "TLS to a unix socket backend"),
                       ('"unix:"', "has no socket path"),
                       ('"unix:/' + "x" * 120 + '"', "longer than 107 bytes"),
                       ('"unix:/a.sock", "unix:/a.sock"', "already listed as backends[0]")):
        with pytest.raises(ConfigError) as e:
            parse_config(base + f"backends = [{bad}]\n")
        assert any(words in err and err.startswith("pool.p.backends[") for err in e.value.errors), \
            e.value.errors


def test_unix_backend_added_through_the_admin_api(unix_origins, tmp_path, proxy_factory, origin):
    from ops_support import admin, start
    proxy, port = start(proxy_factory, tmp_path, origin.url, admin=True)
    app = unix_origins("added.sock")
    quoted = app.path.replace("/", "%2F")
    r = admin(port, "PUT", f"/pools/web/backends/unix:{quoted}", b"")
    assert r.status == 200, r.body
    deadline = time.monotonic() + 5
    while not app.traffic() and time.monotonic() < deadline:
        with Client(proxy.port) as c:
            assert c.request("GET", "/size/2").status == 200
    assert app.traffic()
    names = [b["backend"] for b in admin(port, "GET", "/status").json()["backends"]]
    assert f"unix:{app.path}" in names
    assert admin(port, "PUT", "/pools/web/backends/unix:relative.sock", b"").status == 400
