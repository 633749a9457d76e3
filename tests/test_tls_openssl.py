"""The listener's TLS seen by `openssl s_client`, a client other than Python's ssl."""
from __future__ import annotations

import shutil
import ssl
import subprocess
import warnings

import pytest
from tlsutil import CA, TLSServer

from edgeproxy.config.model import ListenTLSConfig
from edgeproxy.tls import build_server_context

OPENSSL = shutil.which("openssl")
pytestmark = pytest.mark.skipif(OPENSSL is None, reason="no openssl command on PATH")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("s_client")
    root = CA()
    alpha = root.intermediate().issue("alpha.test", cn="alpha").write(d, "alpha")
    wild = root.issue("*.wild.test", kind="rsa", cn="wild").write(d, "wild")
    stls = build_server_context(ListenTLSConfig(certs=(alpha, wild)))
    with TLSServer(stls.context) as srv:
        yield {"port": srv.port, "root": root.write(d), "dir": d, "wild": wild}


def s_client(port: int, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [OPENSSL, "s_client", "-connect", f"127.0.0.1:{port}", *args],
        stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=15)


def _subject(out: str) -> str:
    return next(line for line in out.splitlines() if line.startswith("subject="))


@pytest.mark.parametrize("args, expected", [
    (("-servername", "alpha.test"), "CN = alpha"),
    (("-servername", "x.wild.test"), "CN = wild"),
    (("-servername", "nope.test"), "CN = alpha"),
    (("-noservername",), "CN = alpha"),
])
def test_sni(setup, args, expected):
    r = s_client(setup["port"], *args)
    assert r.returncode == 0, r.stderr
    assert _subject(r.stdout) == f"subject={expected}"


def test_chain_verifies_and_alpn(setup):
    r = s_client(setup["port"], "-servername", "alpha.test", "-CAfile", setup["root"],
                 "-verify_return_error", "-verify_hostname", "alpha.test", "-alpn", "http/1.1")
    assert r.returncode == 0, r.stderr
    assert "Verify return code: 0 (ok)" in r.stdout
    assert "ALPN protocol: http/1.1" in r.stdout


def test_tls12_session_resumption(setup):
    sess = str(setup["dir"] / "session.pem")
    first = s_client(setup["port"], "-tls1_2", "-servername", "x.wild.test", "-sess_out", sess)
    assert "New, TLSv1.2, Cipher is ECDHE-RSA-" in first.stdout
    second = s_client(setup["port"], "-tls1_2", "-servername", "x.wild.test", "-sess_in", sess)
    assert "Reused, TLSv1.2" in second.stdout


def test_tls11_refused(setup):
    weak = ("-tls1_1", "-cipher", "DEFAULT:@SECLEVEL=0", "-servername", "x.wild.test")
    # First prove this s_client can speak TLS 1.1 at all, against a permissive server.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        permissive = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        permissive.minimum_version = ssl.TLSVersion.TLSv1_1
    permissive.set_ciphers("DEFAULT:@SECLEVEL=0")
    permissive.load_cert_chain(setup["wild"].cert, setup["wild"].key)
    with TLSServer(permissive) as srv:
        probe = s_client(srv.port, *weak)
    # ("New, TLSv1.0, Cipher is ..." names the cipher's version; the session says 1.1)
    if probe.returncode != 0 or "Protocol  : TLSv1.1" not in probe.stdout:
        pytest.skip("this openssl cannot make a TLS 1.1 handshake at all")
    r = s_client(setup["port"], *weak)
    assert r.returncode != 0
    assert "Cipher is (NONE)" in r.stdout


def test_tls12_cbc_only_client_refused(setup):
    r = s_client(setup["port"], "-tls1_2", "-cipher", "ECDHE-RSA-AES128-SHA:ECDHE-ECDSA-AES128-SHA",
                 "-servername", "x.wild.test")
    assert r.returncode != 0
    assert "Cipher is (NONE)" in r.stdout or "alert handshake failure" in r.stderr


@pytest.mark.parametrize("version", ["-tls1_2", "-tls1_3"])
@pytest.mark.parametrize("group, offered", [
    ("X25519", True), ("P-256", True), ("P-384", True), ("X448", False), ("P-521", False),
])
def test_key_exchange_groups(setup, version, group, offered):
    """Only X25519, P-256 and P-384 are on offer (Mozilla's intermediate
    profile; OpenSSL's own default adds X448 and P-521)."""
    r = s_client(setup["port"], version, "-groups", group, "-servername", "x.wild.test")
    if offered:
        assert r.returncode == 0 and "Cipher is (NONE)" not in r.stdout, r.stderr[-300:]
    else:
        assert r.returncode != 0, r.stdout[-300:]
