"""`edgeproxy cert selfsigned` and `edgeproxy cert inspect`, and the demo's generate_selfsigned."""
from __future__ import annotations

import datetime as dt
import ipaddress
import os
import ssl
import stat

import pytest
from click.testing import CliRunner
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtensionOID
from tlsutil import CA, NOW, TLSServer, cn_of, connect

from edgeproxy.cli.cert import cert
from edgeproxy.config.model import CertConfig, ListenTLSConfig
from edgeproxy.tls import build_server_context, generate_selfsigned, load_cert_pair


def run(*args: str):
    return CliRunner().invoke(cert, list(args))


def _load(path) -> x509.Certificate:
    with open(path, "rb") as f:
        return x509.load_pem_x509_certificate(f.read())


def test_selfsigned_writes_usable_pair(tmp_path):
    out = tmp_path / "dev"
    r = run("selfsigned", "--host", "a.test", "--host", "b.test", "--host", "127.0.0.1",
            "--out", str(out), "--days", "10")
    assert r.exit_code == 0, r.output
    key_path, cert_path = out / "key.pem", out / "cert.pem"
    assert stat.S_IMODE(os.stat(key_path).st_mode) == 0o600
    c = _load(cert_path)
    san = c.extensions.get_extension_for_oid(ExtensionOID.SUBJECT_ALTERNATIVE_NAME).value
    assert san.get_values_for_type(x509.DNSName) == ["a.test", "b.test"]
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1")]
    key = serialization.load_pem_private_key(key_path.read_bytes(), None)
    assert isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name == "secp256r1"
    days = (c.not_valid_after_utc - dt.datetime.now(dt.UTC)).days
    assert 9 <= days <= 10
    # served by the listener and verified, by name and by IP, by a client trusting cert.pem
    cfg = CertConfig(str(cert_path), str(key_path))
    assert load_cert_pair(cfg).dns_names == ("a.test", "b.test")
    stls = build_server_context(ListenTLSConfig(certs=(cfg,)))
    with TLSServer(stls.context) as srv:
        client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)   # verifies chain and name
        client.load_verify_locations(str(cert_path))
        for name in ("b.test", "127.0.0.1"):
            hs = connect(srv.port, client, name)
            assert cn_of(hs.cert) == "a.test"
            hs.sock.close()


def test_selfsigned_refuses_to_overwrite(tmp_path):
    assert run("selfsigned", "--host", "a.test", "--out", str(tmp_path)).exit_code == 0
    first = (tmp_path / "cert.pem").read_bytes()
    r = run("selfsigned", "--host", "a.test", "--out", str(tmp_path))
    assert r.exit_code != 0 and "already exists" in r.output and "--force" in r.output
    assert (tmp_path / "cert.pem").read_bytes() == first
    r = run("selfsigned", "--host", "a.test", "--out", str(tmp_path), "--force")
    assert r.exit_code == 0 and (tmp_path / "cert.pem").read_bytes() != first
    assert stat.S_IMODE(os.stat(tmp_path / "key.pem").st_mode) == 0o600


def test_selfsigned_needs_a_host(tmp_path):
    r = run("selfsigned", "--out", str(tmp_path))
    assert r.exit_code != 0 and "--host" in r.output


def test_inspect(tmp_path):
    run("selfsigned", "--host", "a.test", "--host", "::1", "--out", str(tmp_path))
    path = tmp_path / "cert.pem"
    r = run("inspect", str(path))
    assert r.exit_code == 0, r.output
    c = _load(path)
    fingerprint = c.fingerprint(hashes.SHA256()).hex(":").upper()
    pairs = (line.split(":", 1) for line in r.output.splitlines())
    fields = {k.strip(): v.strip() for k, v in pairs}
    assert "CN=a.test" in fields["subject"].split(",")
    assert fields["SANs"] == "DNS:a.test, IP:::1"
    assert fields["issuer"].endswith("(self-signed)")
    assert "days left" in fields["not after"]
    assert fields["not before"].endswith("UTC")
    assert fields["key"] == "ECDSA secp256r1 256 bits"
    assert fields["SHA-256"] == fingerprint


def test_inspect_chain_and_rsa(tmp_path):
    root = CA()
    cfg = root.intermediate().issue("www.test", kind="rsa").write(tmp_path, "www")
    r = run("inspect", cfg.cert)
    assert r.exit_code == 0, r.output
    assert "certificate 1 of 2 (leaf)" in r.output and "certificate 2 of 2 (chain)" in r.output
    assert "RSA 2048 bits" in r.output and "CN=edgeproxy test intermediate" in r.output


def test_inspect_expired(tmp_path):
    cfg = CA().issue("old.test", not_before=NOW - dt.timedelta(days=30),
                     not_after=NOW - dt.timedelta(days=3)).write(tmp_path, "old")
    r = run("inspect", cfg.cert)
    assert r.exit_code == 0 and "EXPIRED" in r.output


def test_inspect_der(tmp_path):
    c = CA().issue("der.test").cert
    path = tmp_path / "cert.der"
    path.write_bytes(c.public_bytes(serialization.Encoding.DER))
    r = run("inspect", str(path))
    assert r.exit_code == 0 and "DNS:der.test" in r.output


CORRUPT_PEM = b"-----BEGIN CERTIFICATE-----\nAA\n-----END CERTIFICATE-----\n"


@pytest.mark.parametrize("content", [None, b"not a certificate", CORRUPT_PEM],
                         ids=["missing", "junk", "corrupt"])
def test_inspect_bad_file(tmp_path, content):
    path = tmp_path / "bad.pem"
    if content is not None:
        path.write_bytes(content)
    r = run("inspect", str(path))
    assert r.exit_code == 1
    assert str(path) in r.output and r.output.startswith("Error:")
    assert "Traceback" not in r.output


def test_generate_selfsigned_for_demo():
    cert_pem, key_pem = generate_selfsigned(["demo.test", "127.0.0.1"], days=2)
    c = x509.load_pem_x509_certificate(cert_pem)
    key = serialization.load_pem_private_key(key_pem, None)
    assert c.public_key().public_numbers() == key.public_key().public_numbers()
    assert c.not_valid_after_utc - c.not_valid_before_utc <= dt.timedelta(days=2, minutes=5)
    with pytest.raises(ValueError):
        generate_selfsigned([], days=2)
