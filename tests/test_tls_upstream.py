"""Client contexts toward https:// backends: verification, names, mTLS (real handshakes)."""
from __future__ import annotations

import asyncio
import json
import ssl

import pytest
from tlsutil import CA, TLSServer

from edgeproxy.config.model import ListenTLSConfig, PoolTLSConfig
from edgeproxy.tls import (
    TLSConfigError,
    build_client_context,
    build_server_context,
    server_name_for,
)


@pytest.fixture(params=["asyncio", "uvloop"])
def loop_kind(request):
    return request.param


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    d = tmp_path_factory.mktemp("upstream")
    root, client_ca = CA("backend root"), CA("proxy client CA")
    return {
        "dir": d,
        "root": root.write(d, "root"),
        "stranger_root": CA("unknown root").write(d, "stranger"),
        "backend": root.issue("backend.test", "127.0.0.1", cn="backend").write(d, "backend"),
        "client_ca": client_ca.write(d, "client-ca"),
        "client": client_ca.issue(cn="edgeproxy", client=True).write(d, "client"),
    }


@pytest.fixture
def backend(pki, loop_kind):
    stls = build_server_context(ListenTLSConfig(certs=(pki["backend"],)))
    with TLSServer(stls.context, loop_kind) as srv:
        yield srv


async def _fetch(port: int, tls: PoolTLSConfig, backend_host: str) -> dict:
    """Open an upstream connection the way the proxy does and read the backend's line."""
    loop = asyncio.get_running_loop()
    ctx = build_client_context(tls)
    reader = asyncio.StreamReader()
    transport, _ = await loop.create_connection(
        lambda: asyncio.StreamReaderProtocol(reader), "127.0.0.1", port,
        ssl=ctx, server_hostname=server_name_for(tls, backend_host))
    try:
        line = await asyncio.wait_for(reader.readline(), 5)
        if not line:
            raise ConnectionError("the backend closed the connection")
        info = json.loads(line)
        info["client_alpn"] = transport.get_extra_info("ssl_object").selected_alpn_protocol()
        return info
    finally:
        transport.abort()   # a test client: no TLS close_notify needed


def fetch(loop_kind: str, port: int, tls: PoolTLSConfig, backend_host: str = "127.0.0.1"):
    if loop_kind == "uvloop":
        import uvloop
        factory = uvloop.new_event_loop
    else:
        factory = asyncio.new_event_loop
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(_fetch(port, tls, backend_host))


def test_verified_by_name(backend, pki, loop_kind):
    tls = PoolTLSConfig(ca=pki["root"], server_name="backend.test")
    info = fetch(loop_kind, backend.port, tls)
    assert info["client_alpn"] == "http/1.1" and info["alpn"] == "http/1.1"


def test_verified_by_ip_san(backend, pki, loop_kind):
    info = fetch(loop_kind, backend.port, PoolTLSConfig(ca=pki["root"]), "127.0.0.1")
    assert info["version"] in ("TLSv1.2", "TLSv1.3")


def test_wrong_name_fails(backend, pki, loop_kind):
    with pytest.raises(ssl.SSLCertVerificationError, match="(?i)hostname"):
        fetch(loop_kind, backend.port, PoolTLSConfig(ca=pki["root"], server_name="other.test"))


def test_unknown_ca_fails(backend, pki, loop_kind):
    with pytest.raises(ssl.SSLCertVerificationError):
        fetch(loop_kind, backend.port,
              PoolTLSConfig(ca=pki["stranger_root"], server_name="backend.test"))


def test_system_store_does_not_know_the_test_root(backend, loop_kind):
    with pytest.raises(ssl.SSLCertVerificationError):
        fetch(loop_kind, backend.port, PoolTLSConfig(server_name="backend.test"))


def test_verify_false_accepts_anything(backend, pki, loop_kind):
    tls = PoolTLSConfig(verify=False, ca=pki["stranger_root"], server_name="other.test")
    ctx = build_client_context(tls)
    assert ctx.verify_mode == ssl.CERT_NONE and not ctx.check_hostname
    assert fetch(loop_kind, backend.port, tls)["client_alpn"] == "http/1.1"


def test_client_context_settings(pki):
    ctx = build_client_context(PoolTLSConfig(ca=pki["root"]))
    assert ctx.verify_mode == ssl.CERT_REQUIRED and ctx.check_hostname
    assert ctx.minimum_version == ssl.TLSVersion.TLSv1_2
    assert ctx.options & ssl.OP_NO_COMPRESSION


def test_mtls_to_backend(pki, loop_kind):
    stls = build_server_context(ListenTLSConfig(certs=(pki["backend"],),
                                                client_ca=pki["client_ca"]))
    with TLSServer(stls.context, loop_kind) as srv:
        without = PoolTLSConfig(ca=pki["root"], server_name="backend.test")
        with pytest.raises((ssl.SSLError, ConnectionError)):
            fetch(loop_kind, srv.port, without)
        with_cert = PoolTLSConfig(ca=pki["root"], server_name="backend.test",
                                  client_cert=pki["client"].cert, client_key=pki["client"].key)
        assert fetch(loop_kind, srv.port, with_cert)["subject"] == "CN=edgeproxy"


def test_server_name_for():
    assert server_name_for(PoolTLSConfig(), "api.internal") == "api.internal"
    assert server_name_for(PoolTLSConfig(server_name="api.example.com"), "10.0.0.5") == \
        "api.example.com"


def test_bad_files_name_the_file(pki, tmp_path):
    missing = str(tmp_path / "missing-ca.pem")
    with pytest.raises(TLSConfigError) as info:
        build_client_context(PoolTLSConfig(ca=missing))
    assert info.value.path == missing
    with pytest.raises(TLSConfigError, match="client_key"):
        build_client_context(PoolTLSConfig(client_cert=pki["client"].cert))
    with pytest.raises(TLSConfigError) as info:
        build_client_context(PoolTLSConfig(client_cert=pki["client"].cert,
                                           client_key=pki["backend"].key))
    assert info.value.path == pki["client"].cert and "does not match" in str(info.value)
