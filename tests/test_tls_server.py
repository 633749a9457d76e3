"""The listener's TLS, through real handshakes on 127.0.0.1 (asyncio and uvloop servers)."""
from __future__ import annotations

import asyncio
import datetime as dt
import logging
import shutil
import ssl
import warnings

import pytest
from tlsutil import CA, NOW, TLSServer, cn_of, connect, insecure_client, trusting_client

from edgeproxy.config.model import CertConfig, ListenTLSConfig
from edgeproxy.tls import CIPHERS_TLS12, build_server_context, client_subject

TLS12 = {"maximum_version": ssl.TLSVersion.TLSv1_2}


@pytest.fixture(params=["asyncio", "uvloop"])
def loop_kind(request):
    return request.param


@pytest.fixture(scope="module")
def root():
    return CA()


@pytest.fixture(scope="module")
def pki(root, tmp_path_factory):
    """alpha (ECDSA, behind an intermediate, the default), wild (RSA), exact (ECDSA)."""
    d = tmp_path_factory.mktemp("pki")
    inter = root.intermediate()
    return {
        "alpha": inter.issue("alpha.test", "www.alpha.test", cn="alpha").write(d, "alpha"),
        "wild": root.issue("*.wild.test", kind="rsa", cn="wild").write(d, "wild"),
        "exact": root.issue("exact.wild.test", cn="exact").write(d, "exact"),
    }


@pytest.fixture
def server(pki, loop_kind):
    stls = build_server_context(ListenTLSConfig(certs=(pki["alpha"], pki["wild"], pki["exact"])))
    with TLSServer(stls.context, loop_kind) as srv:
        srv.stls = stls
        yield srv


@pytest.mark.parametrize("name, expected", [
    ("alpha.test", "alpha"),
    ("www.alpha.test", "alpha"),
    ("a.wild.test", "wild"),             # wildcard, one label
    ("A.Wild.Test.", "wild"),            # case and a trailing dot do not matter
    ("exact.wild.test", "exact"),        # an exact name beats a wildcard
    ("b.a.wild.test", "alpha"),          # a wildcard covers one label only: default
    ("wild.test", "alpha"),              # ... and not the bare domain
    ("unknown.test", "alpha"),           # unknown: the first certificate
    (None, "alpha"),                     # no SNI: the first certificate
])
def test_sni_selects_certificate(server, name, expected):
    hs = connect(server.port, insecure_client(), name)
    assert cn_of(hs.cert) == expected
    hs.sock.close()


def test_rsa_and_ecdsa(server):
    hs = connect(server.port, insecure_client(**TLS12), "x.wild.test")
    assert hs.info["cipher"].startswith("ECDHE-RSA-") and cn_of(hs.cert) == "wild"
    hs.sock.close()
    hs = connect(server.port, insecure_client(**TLS12), "alpha.test")
    assert hs.info["cipher"].startswith("ECDHE-ECDSA-") and cn_of(hs.cert) == "alpha"
    hs.sock.close()
    for name in ("x.wild.test", "alpha.test"):
        hs = connect(server.port, insecure_client(), name)
        assert hs.info["version"] == "TLSv1.3"
        hs.sock.close()


def test_full_chain_verifies_against_root_only(server, root, pki, tmp_path, loop_kind):
    hs = connect(server.port, trusting_client(root), "alpha.test")   # check_hostname on
    assert cn_of(hs.cert) == "alpha"
    hs.sock.close()
    # Without the intermediate in the file the same client fails: the chain was needed.
    leaf_only = tmp_path / "leaf.crt"
    end = b"-----END CERTIFICATE-----"
    with open(pki["alpha"].cert, "rb") as f:
        leaf_only.write_bytes(f.read().split(end)[0] + end + b"\n")
    alone = CertConfig(str(leaf_only), pki["alpha"].key)
    stls = build_server_context(ListenTLSConfig(certs=(alone,)))
    with TLSServer(stls.context, loop_kind) as srv:
        with pytest.raises(ssl.SSLCertVerificationError):
            connect(srv.port, trusting_client(root), "alpha.test")


def _client_can_speak_tls11(pki, loop_kind) -> bool:
    """Does the local OpenSSL still build a TLS 1.1 client? Try it on a permissive server."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        permissive = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        permissive.minimum_version = ssl.TLSVersion.TLSv1_1
        permissive.set_ciphers("DEFAULT:@SECLEVEL=0")
        permissive.load_cert_chain(pki["wild"].cert, pki["wild"].key)
        try:
            with TLSServer(permissive, loop_kind) as srv:
                hs = connect(srv.port, _tls11_client(), "a.wild.test")
                hs.sock.close()
                return hs.info["version"] == "TLSv1.1"
        except (ssl.SSLError, OSError):
            return False


def _tls11_client() -> ssl.SSLContext:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        ctx = insecure_client(minimum_version=ssl.TLSVersion.TLSv1_1,
                              maximum_version=ssl.TLSVersion.TLSv1_1)
    ctx.set_ciphers("DEFAULT:@SECLEVEL=0")
    return ctx


def test_tls11_refused(server, pki, loop_kind):
    assert server.stls.context.minimum_version == ssl.TLSVersion.TLSv1_2
    if not _client_can_speak_tls11(pki, loop_kind):
        pytest.skip("the local OpenSSL cannot build a TLS 1.1 client; "
                    "minimum_version is checked above")
    with pytest.raises((ssl.SSLError, ConnectionError)):
        connect(server.port, _tls11_client(), "a.wild.test")


def test_min_version_13_refuses_tls12(pki, loop_kind):
    stls = build_server_context(ListenTLSConfig(certs=(pki["alpha"],), min_version="1.3"))
    assert stls.context.minimum_version == ssl.TLSVersion.TLSv1_3
    assert stls.context_for("alpha.test").minimum_version == ssl.TLSVersion.TLSv1_3
    with TLSServer(stls.context, loop_kind) as srv:
        with pytest.raises((ssl.SSLError, ConnectionError)):
            connect(srv.port, insecure_client(**TLS12), "alpha.test")
        hs = connect(srv.port, insecure_client(), "alpha.test")
        assert hs.info["version"] == "TLSv1.3"
        hs.sock.close()


def test_tls12_ciphers_are_ecdhe_aead(server):
    ctx = server.stls.context_for("alpha.test")
    tls12 = [c for c in ctx.get_ciphers() if c["protocol"] == "TLSv1.2"]
    assert tls12 and all(c["kea"] == "kx-ecdhe" and c["aead"] for c in tls12)
    assert {c["name"] for c in tls12} == set(CIPHERS_TLS12.split(":")[:-1])
    # A TLS 1.2 client offering only CBC, or only static-RSA key exchange, is refused.
    for offered in ("ECDHE-ECDSA-AES128-SHA256:ECDHE-RSA-AES128-SHA256", "AES128-GCM-SHA256"):
        client = insecure_client(**TLS12)
        client.set_ciphers(offered)
        with pytest.raises((ssl.SSLError, ConnectionError)):
            connect(server.port, client, "alpha.test")


def test_context_options(server):
    stls = server.stls
    for ctx in (stls.context, stls.context_for("a.wild.test"), stls.context_for("alpha.test")):
        for flag in (ssl.OP_NO_COMPRESSION, ssl.OP_NO_RENEGOTIATION,
                     ssl.OP_CIPHER_SERVER_PREFERENCE):
            assert ctx.options & flag
        assert not ctx.options & ssl.OP_NO_TICKET


def test_alpn(server):
    client = insecure_client()
    client.set_alpn_protocols(["h2", "http/1.1"])
    hs = connect(server.port, client, "a.wild.test")
    assert hs.info["alpn"] == "http/1.1" and hs.sock.selected_alpn_protocol() == "http/1.1"
    hs.sock.close()
    # nothing in common: no ALPN, but the handshake completes
    client.set_alpn_protocols(["h2"])
    hs = connect(server.port, client, "a.wild.test")
    assert hs.info["alpn"] is None and hs.sock.selected_alpn_protocol() is None
    hs.sock.close()


@pytest.mark.parametrize("versions", [TLS12, {}], ids=["tls1.2", "tls1.3"])
@pytest.mark.parametrize("name", ["alpha.test", "a.wild.test"])
def test_session_resumption(server, root, versions, name):
    client = trusting_client(root, **versions)
    first = connect(server.port, client, name)
    session = first.sock.session
    assert not first.sock.session_reused
    first.sock.close()
    second = connect(server.port, client, name, session=session)
    assert second.sock.session_reused
    second.sock.close()


# --- client certificates --------------------------------------------------------------

@pytest.fixture(scope="module")
def client_pki(root, tmp_path_factory):
    d = tmp_path_factory.mktemp("clients")
    client_ca = CA("edgeproxy test client CA")
    return {
        "ca": client_ca.write(d, "client-ca"),
        "good": client_ca.issue(cn="client-1", client=True).write(d, "good"),
        "stranger": CA("someone else").issue(cn="client-2", client=True).write(d, "stranger"),
    }


@pytest.mark.parametrize("versions", [TLS12, {}], ids=["tls1.2", "tls1.3"])
def test_client_certificate_required(pki, root, client_pki, loop_kind, versions):
    stls = build_server_context(ListenTLSConfig(certs=(pki["alpha"], pki["wild"]),
                                                client_ca=client_pki["ca"]))
    with TLSServer(stls.context, loop_kind) as srv:
        # no certificate: refused (with TLS 1.3 the alert arrives at the first read)
        with pytest.raises((ssl.SSLError, ConnectionError)):
            connect(srv.port, trusting_client(root, **versions), "a.wild.test")
        # a certificate from another CA: refused
        stranger = trusting_client(root, **versions)
        stranger.load_cert_chain(client_pki["stranger"].cert, client_pki["stranger"].key)
        with pytest.raises((ssl.SSLError, ConnectionError)):
            connect(srv.port, stranger, "a.wild.test")
        # a certificate from client_ca: in, and its subject reaches the server side
        client = trusting_client(root, **versions)
        client.load_cert_chain(client_pki["good"].cert, client_pki["good"].key)
        for name in ("alpha.test", "a.wild.test"):
            hs = connect(srv.port, client, name)
            assert hs.info["subject"] == "CN=client-1"
            hs.sock.close()


def test_client_subject_none_without_client_ca(server):
    hs = connect(server.port, insecure_client(), "alpha.test")
    assert hs.info["subject"] is None
    hs.sock.close()
    assert client_subject(None) is None


# --- reload ---------------------------------------------------------------------------

def _install(cfg_from: CertConfig, cfg_to: CertConfig) -> None:
    shutil.copyfile(cfg_from.cert, cfg_to.cert)
    shutil.copyfile(cfg_from.key, cfg_to.key)


def test_reload_swaps_for_new_handshakes(root, tmp_path, loop_kind, caplog):
    live = CertConfig(str(tmp_path / "live.crt"), str(tmp_path / "live.key"))
    v1 = root.issue("site.test", cn="v1").write(tmp_path, "v1")
    v2 = root.issue("site.test", "new.test", cn="v2").write(tmp_path, "v2")
    _install(v1, live)
    stls = build_server_context(ListenTLSConfig(certs=(live,)))
    client = trusting_client(root)
    with TLSServer(stls.context, loop_kind) as srv:
        old = connect(srv.port, client, "site.test")
        assert cn_of(old.cert) == "v1"
        session = old.sock.session

        _install(v2, live)
        reloaded = asyncio.run(_reload_in_thread(stls))   # as the server will call it
        assert reloaded is True
        new = connect(srv.port, client, "new.test")
        assert cn_of(new.cert) == "v2"
        new.sock.close()
        # the established connection keeps working on its old certificate
        old.sock.sendall(b"still here\n")
        assert old.readline() == b"still here\n"
        assert cn_of(old.cert) == "v1"
        old.sock.close()
        # sessions made before the reload still resume (same session cache and ticket keys)
        resumed = connect(srv.port, client, "site.test", session=session)
        assert resumed.sock.session_reused
        resumed.sock.close()

        # a bad new pair: the key of another certificate. The old pair stays in service.
        other = root.issue("other.test").write(tmp_path, "other")
        shutil.copyfile(other.key, live.key)
        with caplog.at_level(logging.ERROR, logger="edgeproxy.tls"):
            assert stls.reload() is False
        assert any(live.cert in r.getMessage() and "does not match" in r.getMessage()
                   for r in caplog.records)
        hs = connect(srv.port, client, "new.test")
        assert cn_of(hs.cert) == "v2"
        hs.sock.close()
        assert [cn_of(c.leaf) for c in stls.certs] == ["v2"]

        # an expired certificate is refused too
        expired = root.issue("site.test", cn="v3", not_before=NOW - dt.timedelta(days=9),
                             not_after=NOW - dt.timedelta(days=1)).write(tmp_path, "v3")
        _install(expired, live)
        assert stls.reload() is False
        hs = connect(srv.port, client, "site.test")
        assert cn_of(hs.cert) == "v2"
        hs.sock.close()


async def _reload_in_thread(stls) -> bool:
    return await asyncio.get_running_loop().run_in_executor(None, stls.reload)
