"""Loading and checking certificate files: every problem names the file."""
from __future__ import annotations

import datetime as dt
import logging

import pytest
from cryptography.hazmat.primitives.asymmetric import rsa
from tlsutil import CA, NOW, cert_pem, key_pem

from edgeproxy.config.model import CertConfig, ListenTLSConfig, PoolTLSConfig
from edgeproxy.tls import (
    TLSConfigError,
    build_server_context,
    check_listen_tls,
    check_pool_tls,
    expiry_warnings,
    load_ca_file,
    load_cert_pair,
)


@pytest.fixture(scope="module")
def root():
    return CA()


@pytest.fixture
def good(root, tmp_path) -> CertConfig:
    return root.issue("good.test").write(tmp_path, "good")


def _error(cfg: CertConfig) -> TLSConfigError:
    with pytest.raises(TLSConfigError) as info:
        load_cert_pair(cfg)
    return info.value


def test_good_pair_loads(good):
    loaded = load_cert_pair(good)
    assert loaded.dns_names == ("good.test",)
    assert loaded.config is good
    assert b"BEGIN CERTIFICATE" in loaded.pem_for_ssl()


def test_chain_order_is_kept(root, tmp_path):
    inter = root.intermediate()
    loaded = load_cert_pair(inter.issue("a.test").write(tmp_path, "a"))
    assert [c.subject for c in loaded.chain] == [loaded.leaf.subject, inter.cert.subject]


def test_missing_cert_file(good, tmp_path):
    missing = str(tmp_path / "nope.crt")
    e = _error(CertConfig(cert=missing, key=good.key))
    assert e.path == missing and missing in str(e) and "cannot read" in str(e)


def test_missing_key_file(good, tmp_path):
    missing = str(tmp_path / "nope.key")
    e = _error(CertConfig(cert=good.cert, key=missing))
    assert e.path == missing and "cannot read" in str(e)


def test_not_pem(good, tmp_path):
    junk = tmp_path / "junk.crt"
    junk.write_text("this is not a certificate\n")
    e = _error(CertConfig(cert=str(junk), key=good.key))
    assert e.path == str(junk) and "no PEM certificate" in str(e)


def test_corrupt_pem_block(good, tmp_path):
    bad = tmp_path / "bad.crt"
    bad.write_text("-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n")
    e = _error(CertConfig(cert=str(bad), key=good.key))
    assert e.path == str(bad) and "certificate #1" in str(e)


def test_der_file_gets_a_hint(root, good, tmp_path):
    from cryptography.hazmat.primitives.serialization import Encoding
    der = tmp_path / "cert.der"
    der.write_bytes(root.issue("x.test").cert.public_bytes(Encoding.DER))
    e = _error(CertConfig(cert=str(der), key=good.key))
    assert e.path == str(der) and "DER" in str(e)


def test_no_key_in_key_file(good, tmp_path):
    e = _error(CertConfig(cert=good.cert, key=good.cert))
    assert e.path == good.cert and "no PEM private key" in str(e)


def test_key_does_not_match(root, good, tmp_path):
    other = root.issue("other.test").write(tmp_path, "other")
    e = _error(CertConfig(cert=good.cert, key=other.key))
    assert e.path == good.cert and other.key in str(e) and "does not match" in str(e)


def test_expired(root, tmp_path):
    cfg = root.issue("old.test", not_before=NOW - dt.timedelta(days=60),
                     not_after=NOW - dt.timedelta(days=2)).write(tmp_path, "old")
    e = _error(cfg)
    assert e.path == cfg.cert and "expired on" in str(e)
    assert (NOW - dt.timedelta(days=2)).strftime("%Y-%m-%d") in str(e)


def test_not_yet_valid(root, tmp_path):
    cfg = root.issue("future.test", not_before=NOW + dt.timedelta(days=3),
                     not_after=NOW + dt.timedelta(days=90)).write(tmp_path, "future")
    e = _error(cfg)
    assert e.path == cfg.cert and "not valid until" in str(e)


@pytest.mark.parametrize("traditional", [False, True], ids=["pkcs8", "traditional"])
def test_encrypted_key(root, tmp_path, traditional):
    issued = root.issue("enc.test", kind="rsa")
    cfg = issued.write(tmp_path, "enc")
    (tmp_path / "enc.key").write_bytes(key_pem(issued.key, "s3cret", traditional))
    assert load_cert_pair(CertConfig(cfg.cert, cfg.key, "s3cret")).dns_names == ("enc.test",)
    e = _error(CertConfig(cfg.cert, cfg.key))
    assert e.path == cfg.key and "encrypted and no password" in str(e)
    e = _error(CertConfig(cfg.cert, cfg.key, "wrong"))
    assert e.path == cfg.key and "wrong password" in str(e)


def test_small_rsa_key_refused(root, tmp_path):
    key = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    (tmp_path / "weak.key").write_bytes(key_pem(key))
    (tmp_path / "weak.crt").write_bytes(cert_pem(root.issue("weak.test").cert))
    e = _error(CertConfig(str(tmp_path / "weak.crt"), str(tmp_path / "weak.key")))
    assert e.path == str(tmp_path / "weak.key") and "1024 bits" in str(e)


def test_cert_and_key_in_one_file(root, tmp_path):
    issued = root.issue("both.test")
    both = tmp_path / "both.pem"
    both.write_bytes(cert_pem(issued.cert) + key_pem(issued.key))
    assert load_cert_pair(CertConfig(str(both), str(both))).dns_names == ("both.test",)


def test_expiring_soon_warns_at_load(root, tmp_path, caplog):
    soon = NOW + dt.timedelta(days=5)
    cfg = root.issue("soon.test", not_before=soon - dt.timedelta(days=90),  # 90 days in all
                     not_after=soon).write(tmp_path, "soon")
    with caplog.at_level(logging.WARNING, logger="edgeproxy.tls"):
        load_cert_pair(cfg)
    messages = [r.getMessage() for r in caplog.records]
    assert any(cfg.cert in m and soon.strftime("%Y-%m-%d") in m for m in messages), messages


def test_expiry_warnings_daily_check(root, tmp_path):
    soon = NOW + dt.timedelta(days=5)
    cfg_soon = root.issue("soon.test", not_before=soon - dt.timedelta(days=90),
                          not_after=soon).write(tmp_path, "soon")
    cfg_far = root.issue("far.test").write(tmp_path, "far")   # 90 days
    certs = [load_cert_pair(cfg_soon), load_cert_pair(cfg_far)]
    warnings = expiry_warnings(certs, NOW)
    assert len(warnings) == 1 and cfg_soon.cert in warnings[0]
    assert soon.strftime("%Y-%m-%d") in warnings[0]
    assert expiry_warnings(certs, NOW - dt.timedelta(days=30)) == []
    later = expiry_warnings(certs, NOW + dt.timedelta(days=80))
    assert len(later) == 2 and "expired on" in later[0] and cfg_far.cert in later[1]
    stls = build_server_context(ListenTLSConfig(certs=(cfg_far, cfg_soon)))
    assert [cfg_soon.cert in w for w in stls.expiry_warnings(NOW)] == [True]


def test_short_lived_certificates_warn_in_the_last_third_of_their_life(root, tmp_path):
    """A six-day certificate (ACME's short-lived profile, the demo's own) does not
    warn when fresh, as the 14-day rule would have it; it does with two days left."""
    six_days = root.issue("short.test", not_before=NOW - dt.timedelta(hours=1),
                          not_after=NOW + dt.timedelta(days=6) - dt.timedelta(hours=1))
    certs = [load_cert_pair(six_days.write(tmp_path, "short"))]
    assert expiry_warnings(certs, NOW) == []
    assert expiry_warnings(certs, NOW + dt.timedelta(days=3)) == []
    late = expiry_warnings(certs, NOW + dt.timedelta(days=4))
    assert len(late) == 1 and "(in 1 days)" in late[0]
    # a 90-day certificate keeps the 14-day rule
    ninety = [load_cert_pair(root.issue("ninety.test").write(tmp_path, "ninety"))]
    assert expiry_warnings(ninety, NOW + dt.timedelta(days=75)) == []
    assert len(expiry_warnings(ninety, NOW + dt.timedelta(days=77))) == 1


def test_check_listen_tls_reports_every_problem(root, good, tmp_path):
    other = root.issue("other.test").write(tmp_path, "other")
    mismatched = CertConfig(cert=good.cert, key=other.key)
    missing = CertConfig(cert=str(tmp_path / "missing.crt"), key=good.key)
    bad_ca = str(tmp_path / "missing-ca.crt")
    problems = check_listen_tls(ListenTLSConfig(certs=(good, mismatched, missing),
                                                client_ca=bad_ca))
    assert len(problems) == 3, problems
    assert any(bad_ca in p for p in problems)
    assert any(other.key in p and "does not match" in p for p in problems)
    assert any(missing.cert in p for p in problems)
    assert check_listen_tls(ListenTLSConfig(certs=(good,), client_ca=root.write(tmp_path))) == []


def test_check_listen_tls_min_version(good):
    problems = check_listen_tls(ListenTLSConfig(certs=(good,), min_version="1.1"))
    assert len(problems) == 1 and "min_version" in problems[0]


def test_build_server_context_raises_named_error(root, good, tmp_path):
    other = root.issue("other.test").write(tmp_path, "other")
    with pytest.raises(TLSConfigError) as info:
        build_server_context(ListenTLSConfig(certs=(good, CertConfig(other.cert, good.key))))
    assert info.value.path == other.cert
    with pytest.raises(TLSConfigError, match="at least one certificate"):
        build_server_context(ListenTLSConfig(certs=()))
    with pytest.raises(TLSConfigError, match="min_version"):
        build_server_context(ListenTLSConfig(certs=(good,), min_version="1.0"))


def test_ca_file(root, good, tmp_path):
    path = root.write(tmp_path)
    assert load_ca_file(path) == root.pem()
    with pytest.raises(TLSConfigError) as info:
        load_ca_file(good.key)
    assert info.value.path == good.key


def test_check_pool_tls(root, tmp_path):
    client = root.issue("client", client=True).write(tmp_path, "client")
    assert check_pool_tls(PoolTLSConfig(ca=root.write(tmp_path), client_cert=client.cert,
                                        client_key=client.key)) == []
    missing_ca = str(tmp_path / "nope.crt")
    problems = check_pool_tls(PoolTLSConfig(ca=missing_ca, client_cert=client.cert))
    assert len(problems) == 2
    assert missing_ca in problems[0] and "client_key" in problems[1]
