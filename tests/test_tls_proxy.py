"""TLS through a real proxy process: termination with SNI, HSTS, redirect,
client certificates, verified TLS to backends with pooled connections,
certificate reload on SIGHUP, and handshakes that do not stall others."""

from __future__ import annotations

import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
from pathlib import Path

import pytest
from cryptography import x509
from harness import ROOT, Client, Origin, simple_config
from tlsutil import CA, cn_of


@pytest.fixture(scope="module")
def ca():
    return CA()


def _listen_tls(tmp_path, ca, *names_list, extra=""):
    entries = []
    for i, names in enumerate(names_list):
        cc = ca.issue(*names).write(str(tmp_path), f"site{i}")
        entries.append(f'{{ cert = "{cc.cert}", key = "{cc.key}" }}')
    return f"tls.certs = [{', '.join(entries)}]\n{extra}"


def _client_ctx(ca, cert=None):
    ctx = ssl.create_default_context(cafile=None)
    ctx.load_verify_locations(cadata=ca.pem().decode())
    if cert is not None:
        ctx.load_cert_chain(cert.cert, cert.key)
    return ctx


def _served_cn(port, ctx, name):
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
        with ctx.wrap_socket(raw, server_hostname=name) as s:
            return cn_of(x509.load_der_x509_certificate(s.getpeercert(binary_form=True)))


def test_https_termination_with_sni(tmp_path, ca, origin, proxy_factory):
    p = proxy_factory(simple_config(origin.url), listen_lines=[
        _listen_tls(tmp_path, ca, ["a.test"], ["*.b.test", "b.test"], extra='tls.hsts = "max-age=31536000"')])
    ctx = _client_ctx(ca)
    assert _served_cn(p.port, ctx, "a.test") == "a.test"
    assert _served_cn(p.port, ctx, "x.b.test") == "*.b.test"
    with Client(p.port, ssl_context=ctx, server_name="x.b.test") as c:
        r = c.request("GET", "/echo", host="x.b.test")
        assert r.status == 200
        assert r.header("strict-transport-security") == "max-age=31536000"
        assert c.sock.version() in ("TLSv1.2", "TLSv1.3")
        assert c.sock.selected_alpn_protocol() in (None, "http/1.1")
    seen = origin.requests[-1]
    assert seen.header("x-forwarded-proto") == "https"
    assert seen.header("forwarded").endswith("proto=https")


def test_old_tls_versions_refused(tmp_path, ca, origin, proxy_factory):
    p = proxy_factory(simple_config(origin.url), listen_lines=[_listen_tls(tmp_path, ca, ["a.test"])])
    ctx = _client_ctx(ca)
    ctx.minimum_version = ssl.TLSVersion.TLSv1
    ctx.maximum_version = ssl.TLSVersion.TLSv1_1
    ctx.set_ciphers("ALL:@SECLEVEL=0")
    with pytest.raises((ssl.SSLError, ConnectionError)):
        _served_cn(p.port, ctx, "a.test")


def test_plain_listener_redirects_to_https(tmp_path, ca, origin, proxy_factory):
    p = proxy_factory(simple_config(origin.url), listen_lines=[
        _listen_tls(tmp_path, ca, ["a.test"]), "redirect_http = true"])
    with Client(p.ports[1]) as c:
        r = c.request("GET", "/x/y?z=1", host="a.test:8080")
        assert r.status == 308
        assert r.header("location") == f"https://a.test:{p.ports[0]}/x/y?z=1"
        assert c.request("GET", "/", host="a.test").status == 308   # kept alive
    assert origin.requests == []


def test_client_certificates_required_and_subject_passed(tmp_path, ca, origin, proxy_factory):
    client_ca = CA("client root")
    ca_path = client_ca.write(str(tmp_path), "clients")
    p = proxy_factory(simple_config(origin.url), listen_lines=[_listen_tls(
        tmp_path, ca, ["a.test"], extra=f'tls.client_ca = "{ca_path}"\ntls.client_subject_header = "X-Client-Subject"')])
    with pytest.raises((ssl.SSLError, ConnectionError)):
        with Client(p.port, ssl_context=_client_ctx(ca), server_name="a.test") as c:
            c.request("GET", "/echo")
    alice = client_ca.issue(cn="alice", client=True).write(str(tmp_path), "alice")
    with Client(p.port, ssl_context=_client_ctx(ca, alice), server_name="a.test") as c:
        r = c.request("GET", "/echo", headers={"x-client-subject": "CN=mallory"})
    assert r.status == 200
    assert origin.requests[-1].header("x-client-subject") == "CN=alice"


def secure_pool(backend_url: str, ca_path: str, server_name: str, extra: str = "") -> str:
    """One route to a pool of one https backend, verified against ca_path."""
    return (f'[[route]]\npath = "/"\npool = "secure"\n[pool.secure]\n'
            f'backends = ["{backend_url}"]\ntls.ca = "{ca_path}"\n'
            f'tls.server_name = "{server_name}"\n{extra}')


@pytest.fixture
def tls_origin(tmp_path, ca):
    issued = ca.issue("backend.test")
    cc = issued.write(str(tmp_path), "backend")
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(cc.cert, cc.key)
    o = Origin(ssl_context=ctx).start()
    yield o
    o.stop()


def test_verified_tls_to_backend_reuses_connections(tmp_path, ca, tls_origin, proxy_factory):
    ca_path = ca.write(str(tmp_path), "internal-ca")
    p = proxy_factory(secure_pool(tls_origin.url, ca_path, "backend.test"))
    with Client(p.port) as c:
        for i in range(20):
            assert c.request("GET", f"/size/{i}").body == b"x" * i
    for _ in range(5):
        with Client(p.port) as c:
            assert c.request("GET", "/size/3").status == 200
    assert tls_origin.connections == 1      # one handshake for 25 requests


def test_backend_certificate_failure_is_502_and_logged(tmp_path, tls_origin, proxy_factory):
    other = CA("some other root")
    ca_path = other.write(str(tmp_path), "wrong-ca")
    p = proxy_factory(secure_pool(tls_origin.url, ca_path, "backend.test"))
    with Client(p.port) as c:
        r = c.request("GET", "/size/3")
    assert r.status == 502
    time.sleep(0.2)
    log = p.log()
    assert "TLS handshake failed" in log and f"127.0.0.1:{tls_origin.port}" in log
    assert "CERTIFICATE_VERIFY_FAILED" in log


def test_backend_name_mismatch_is_502(tmp_path, ca, tls_origin, proxy_factory):
    ca_path = ca.write(str(tmp_path), "internal-ca")
    p = proxy_factory(secure_pool(tls_origin.url, ca_path, "not-the-backend.test"))
    with Client(p.port) as c:
        assert c.request("GET", "/size/3").status == 502


def test_sighup_reloads_certificates(tmp_path, ca, origin, proxy_factory):
    cc = ca.issue("a.test", cn="first").write(str(tmp_path), "site")
    p = proxy_factory(simple_config(origin.url), listen_lines=[
        f'tls.certs = [{{ cert = "{cc.cert}", key = "{cc.key}" }}]'])
    ctx = _client_ctx(ca)
    held = Client(p.port, ssl_context=ctx, server_name="a.test")
    assert held.request("GET", "/size/1").status == 200
    assert _served_cn(p.port, ctx, "a.test") == "first"
    ca.issue("a.test", cn="second").write(str(tmp_path), "site")
    p.proc.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 5
    while _served_cn(p.port, ctx, "a.test") != "second" and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _served_cn(p.port, ctx, "a.test") == "second"
    assert held.request("GET", "/size/2").status == 200   # established connection kept
    # a broken certificate keeps the current one in service
    (tmp_path / "site.key").write_bytes(b"not a key")
    p.proc.send_signal(signal.SIGHUP)
    time.sleep(1.0)
    assert _served_cn(p.port, ctx, "a.test") == "second"
    log = p.log()
    assert "NOT reloaded" in log or "reload failed, nothing changed" in log
    held.close()


def test_slow_handshake_does_not_stall_others(tmp_path, ca, origin, proxy_factory):
    p = proxy_factory(simple_config(origin.url), listen_lines=[_listen_tls(tmp_path, ca, ["a.test"])])
    slow = socket.create_connection(("127.0.0.1", p.port))
    slow.sendall(b"\x16\x03\x01\x02\x00\x01")      # the start of a ClientHello, then nothing
    ctx = _client_ctx(ca)
    t = time.monotonic()
    for _ in range(10):
        with Client(p.port, ssl_context=ctx, server_name="a.test") as c:
            assert c.request("GET", "/size/1").status == 200
    assert time.monotonic() - t < 5
    slow.close()


def test_check_reports_certificate_problems(tmp_path, ca):
    a = ca.issue("a.test").write(str(tmp_path), "a")
    b = ca.issue("b.test").write(str(tmp_path), "b")
    cfg = tmp_path / "bad.toml"
    cfg.write_text(f'''[[listen]]
bind = "127.0.0.1:8443"
tls.certs = [{{ cert = "{a.cert}", key = "{b.key}" }}]
[[route]]
path = "/"
pool = "web"
[pool.web]
backends = ["http://127.0.0.1:5000"]
''')
    out = subprocess.run([sys.executable, "-m", "edgeproxy", "check", "-c", str(cfg)],
                         capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 1
    assert "listen[0].tls" in out.stderr and "a.crt" in out.stderr
    assert "does not match" in out.stderr or "match" in out.stderr


def _health_state(proxy, url):
    from edgeproxy.config import load_config
    from edgeproxy.health.status import read_state, state_path
    data = read_state(state_path(load_config(proxy.config_path)))
    for pool in (data or {}).get("pools", []):
        for b in pool["backends"]:
            if b["url"] == url:
                return b
    return None


@pytest.mark.parametrize("trusted", [True, False], ids=["verified", "unverified"])
def test_active_health_checks_over_tls(tmp_path, ca, tls_origin, proxy_factory, trusted):
    """Probes of an https backend use the pool's TLS settings: a backend
    whose certificate does not verify is taken out, like one that fails."""
    ca_path = (ca if trusted else CA("another root")).write(str(tmp_path), "pool-ca")
    p = proxy_factory(secure_pool(tls_origin.url, ca_path, "backend.test", """health.path = "/size/0"
health.interval = 0.2
health.timeout = 1.0
health.rise = 1
health.fall = 1
"""))
    deadline = time.monotonic() + 10
    want = "up" if trusted else "down"
    while time.monotonic() < deadline:
        b = _health_state(p, tls_origin.url)
        if b and b.get("state") == want and b.get("last_check"):
            break
        time.sleep(0.1)
    assert b and b["state"] == want, b
    probes = [r for r in tls_origin.requests if r.target == "/size/0"]
    if trusted:
        assert probes and probes[0].header("host") == "backend.test"
        with Client(p.port) as c:
            assert c.request("GET", "/size/4").status == 200
    else:
        assert not probes          # the handshake failed: nothing was sent
        with Client(p.port) as c:
            r = c.request("GET", "/size/4")
        assert r.status == 503 and r.header("retry-after")


def test_tls_backend_connections_take_reads_as_bytes(tmp_path, ca):
    """uvloop's TLS layer hands reads to a protocol's get_buffer when it
    has one, and that path leaks (~700 bytes per connection, uvloop 0.23):
    connections to https backends, which still use it, must not offer it.
    (Clients' TLS is run by the listener, and an https listener cannot be
    made without the context it runs.)"""
    from edgeproxy import _ext
    with pytest.raises(ValueError, match="SSLContext"):
        _ext.Listener(_ext.ProxySettings(), _ext.Router([]), "https")
    plain_up = _ext.Backend("127.0.0.1", 80)._new_conn()
    tls_up = _ext.Backend("127.0.0.1", 443, scheme="https",
                          ssl=ssl.create_default_context())._new_conn()
    assert hasattr(plain_up, "get_buffer") and not hasattr(tls_up, "get_buffer")
    assert hasattr(tls_up, "data_received")


@pytest.mark.skipif(shutil.which("wrk") is None, reason="needs wrk (apt-get install wrk)")
def test_tls_connection_churn_does_not_grow_memory(tmp_path, ca, origin, proxy_factory):
    """Thousands of short HTTPS connections (a handshake each): the worker's
    RSS settles instead of growing with every connection."""
    p = proxy_factory(simple_config(origin.url), args=("--no-supervisor",),
                      listen_lines=[_listen_tls(tmp_path, ca, ["a.test"])])

    def churn() -> int:
        out = subprocess.run(["wrk", "-t1", "-c20", "-d3s", "-H", "Connection: close",
                              f"https://127.0.0.1:{p.port}/size/100"],
                             capture_output=True, text=True, timeout=30, check=True).stdout
        return int(out.split(" requests in ")[0].split()[-1])

    def rss_kib() -> int:
        for line in Path(f"/proc/{p.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        raise AssertionError("no VmRSS")

    churn()                                  # warm up: allocator arenas, caches
    before = rss_kib()
    made = churn() + churn()
    growth = rss_kib() - before
    if made < 4000:
        pytest.skip(f"only {made} handshakes: too few to tell on a machine this busy")
    # the leak this guards against cost ~700-900 bytes per connection; 1 MiB
    # of slack for the allocator
    assert growth * 1024 < made * 250 + (1 << 20), (growth, made)
