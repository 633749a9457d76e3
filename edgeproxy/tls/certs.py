"""Reading and checking certificate, key and CA files, with errors that name the file."""
from __future__ import annotations

import datetime as _dt
import logging
import re
from collections.abc import Iterable
from dataclasses import dataclass

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtensionOID

from edgeproxy.config.model import CertConfig

log = logging.getLogger("edgeproxy.tls")

EXPIRY_WARNING_DAYS = 14
# A certificate whose whole validity is short (ACME's six-day certificates, the
# demo's own) is renewed early in its life, not 14 days before its end: it warns
# only once this share of its lifetime is left.
EXPIRY_WARNING_SHARE = 1 / 3
MIN_RSA_BITS = 2048

_PEM_BLOCK = re.compile(
    rb"-----BEGIN ([A-Z0-9 ]+)-----\r?\n(.*?)-----END \1-----", re.DOTALL)


class TLSConfigError(Exception):
    """A certificate, key or CA file that cannot be used; the message names the file."""

    def __init__(self, problem: str, path: str | None = None):
        self.problem = problem
        self.path = path
        super().__init__(f"{path}: {problem}" if path else problem)


PrivateKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey


@dataclass(frozen=True, eq=False)
class LoadedCert:
    """A checked certificate chain (leaf first) and its private key."""

    config: CertConfig
    chain: tuple[x509.Certificate, ...]
    key: PrivateKey

    @property
    def leaf(self) -> x509.Certificate:
        return self.chain[0]

    @property
    def not_after(self) -> _dt.datetime:
        return self.leaf.not_valid_after_utc

    @property
    def lifetime(self) -> _dt.timedelta:
        return self.leaf.not_valid_after_utc - self.leaf.not_valid_before_utc

    @property
    def dns_names(self) -> tuple[str, ...]:
        """The subjectAltName DNS names, lower-case, in certificate order."""
        return dns_names(self.leaf)

    def pem_for_ssl(self) -> bytes:
        """The chain then the unencrypted key, as one PEM blob for OpenSSL.

        Only ever written to anonymous memory (see contexts.py), never to disk.
        """
        parts = [c.public_bytes(serialization.Encoding.PEM) for c in self.chain]
        parts.append(self.key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption()))
        return b"".join(parts)


def dns_names(cert: x509.Certificate) -> tuple[str, ...]:
    try:
        san = cert.extensions.get_extension_for_oid(ExtensionOID.SUBJECT_ALTERNATIVE_NAME)
    except x509.ExtensionNotFound:
        return ()
    return tuple(n.lower().rstrip(".") for n in san.value.get_values_for_type(x509.DNSName))


def read_file(path: str, what: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise TLSConfigError(f"cannot read the {what} file: {e.strerror or e}", path) from None


def pem_blocks(data: bytes) -> list[tuple[str, bytes]]:
    """(label, whole block including the BEGIN/END lines) for each PEM block."""
    return [(m.group(1).decode("ascii"), m.group(0)) for m in _PEM_BLOCK.finditer(data)]


def parse_certificates(data: bytes, path: str) -> tuple[x509.Certificate, ...]:
    """Every CERTIFICATE block in data, in order; at least one."""
    blocks = [b for label, b in pem_blocks(data) if label in ("CERTIFICATE", "TRUSTED CERTIFICATE")]
    if not blocks:
        hint = ""
        try:
            x509.load_der_x509_certificate(data)
            hint = " (the file is DER; convert it: openssl x509 -inform der -in FILE -out FILE.pem)"
        except ValueError:
            pass
        raise TLSConfigError("no PEM certificate in the file" + hint, path)
    certs = []
    for i, block in enumerate(blocks, 1):
        try:
            certs.append(x509.load_pem_x509_certificate(block))
        except ValueError as e:
            raise TLSConfigError(
                f"certificate #{i} in the file is not valid PEM: {e}", path) from None
    return tuple(certs)


def parse_private_key(data: bytes, path: str, password: str | None) -> PrivateKey:
    blocks = [(label, b) for label, b in pem_blocks(data) if label.endswith("PRIVATE KEY")]
    if not blocks:
        raise TLSConfigError("no PEM private key in the file", path)
    label, block = blocks[0]
    encrypted = label == "ENCRYPTED PRIVATE KEY" or b"Proc-Type: 4,ENCRYPTED" in block
    if encrypted and password is None:
        raise TLSConfigError("the key is encrypted and no password is configured", path)
    try:
        key = serialization.load_pem_private_key(
            block, password.encode() if encrypted and password is not None else None)
    except ValueError:
        if encrypted:
            raise TLSConfigError("cannot decrypt the key: wrong password", path) from None
        raise TLSConfigError("the private key is not valid PEM", path) from None
    except (TypeError, UnsupportedAlgorithm) as e:
        raise TLSConfigError(f"cannot load the private key: {e}", path) from None
    if password is not None and not encrypted:
        log.warning("%s: a password is configured but the key is not encrypted", path)
    if isinstance(key, rsa.RSAPrivateKey):
        if key.key_size < MIN_RSA_BITS:
            raise TLSConfigError(
                f"RSA key of {key.key_size} bits is too small (at least {MIN_RSA_BITS})", path)
    elif not isinstance(key, ec.EllipticCurvePrivateKey):
        raise TLSConfigError(
            f"unsupported key type {type(key).__name__} (use RSA or ECDSA)", path)
    return key


def _spki(public_key) -> bytes:
    return public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def _utc(now: _dt.datetime | None) -> _dt.datetime:
    if now is None:
        return _dt.datetime.now(_dt.UTC)
    return now if now.tzinfo else now.replace(tzinfo=_dt.UTC)


def fmt_time(t: _dt.datetime) -> str:
    return t.strftime("%Y-%m-%d %H:%M UTC")


def _check_validity(chain: tuple[x509.Certificate, ...], path: str, now: _dt.datetime) -> None:
    for i, cert in enumerate(chain):
        which = "the certificate" if i == 0 else (
            f"chain certificate #{i + 1} ({cert.subject.rfc4514_string()})")
        if now < cert.not_valid_before_utc:
            raise TLSConfigError(
                f"{which} is not valid until {fmt_time(cert.not_valid_before_utc)}", path)
        if now > cert.not_valid_after_utc:
            raise TLSConfigError(f"{which} expired on {fmt_time(cert.not_valid_after_utc)}", path)


def load_cert_pair(cfg: CertConfig, now: _dt.datetime | None = None) -> LoadedCert:
    """Read and check one certificate/key pair; raise TLSConfigError naming the bad file.

    Blocking file I/O and crypto: call it from a thread when a loop is running.
    """
    now = _utc(now)
    chain = parse_certificates(read_file(cfg.cert, "certificate"), cfg.cert)
    key = parse_private_key(read_file(cfg.key, "key"), cfg.key, cfg.password)
    if _spki(chain[0].public_key()) != _spki(key.public_key()):
        raise TLSConfigError(
            f"the private key in {cfg.key} does not match the certificate", cfg.cert)
    _check_validity(chain, cfg.cert, now)
    for i in range(len(chain) - 1):
        if chain[i].issuer != chain[i + 1].subject:
            log.warning("%s: chain certificate #%d is not the issuer of #%d: "
                        "clients may fail to build the chain", cfg.cert, i + 2, i + 1)
            break
    loaded = LoadedCert(cfg, chain, key)
    for message in expiry_warnings((loaded,), now):
        log.warning("%s", message)
    return loaded


def expiry_warnings(certs: Iterable[LoadedCert], now: _dt.datetime | None = None,
                    days: int = EXPIRY_WARNING_DAYS) -> list[str]:
    """A message for each certificate that expires within `days`, or within a
    third of its lifetime when that is shorter (or has expired)."""
    now = _utc(now)
    out = []
    for c in certs:
        left = c.not_after - now
        if left <= _dt.timedelta(0):
            out.append(f"{c.config.cert}: the certificate expired on {fmt_time(c.not_after)}")
        elif left <= min(_dt.timedelta(days=days), c.lifetime * EXPIRY_WARNING_SHARE):
            out.append(f"{c.config.cert}: the certificate expires on {fmt_time(c.not_after)} "
                       f"(in {left.days} days)")
    return out


def load_ca_file(path: str) -> bytes:
    """Read and check a CA bundle; return its certificates as PEM for `cadata=`."""
    certs = parse_certificates(read_file(path, "CA"), path)
    return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs)
