"""Self-signed certificates for development and the demo, never for production."""
from __future__ import annotations

import datetime as _dt
import ipaddress
import os
from collections.abc import Sequence

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


def san_entry(host: str) -> x509.GeneralName:
    """An IP SAN for an IP address, a DNS SAN otherwise."""
    try:
        return x509.IPAddress(ipaddress.ip_address(host.strip("[]")))
    except ValueError:
        return x509.DNSName(host.lower().rstrip("."))


def generate_selfsigned(hosts: Sequence[str], days: int = 30) -> tuple[bytes, bytes]:
    """(cert_pem, key_pem): an ECDSA P-256 certificate for hosts, valid for days."""
    if not hosts:
        raise ValueError("at least one host is needed")
    if days < 1:
        raise ValueError("days must be at least 1")
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0][:64]),
                      x509.NameAttribute(NameOID.ORGANIZATION_NAME, "edgeproxy development")])
    now = _dt.datetime.now(_dt.UTC)
    public = key.public_key()
    cert = (
        x509.CertificateBuilder()
        .subject_name(name).issuer_name(name)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _dt.timedelta(minutes=5))   # small clock skew
        .not_valid_after(now + _dt.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName([san_entry(h) for h in hosts]),
                       critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(
            digital_signature=True, content_commitment=False, key_encipherment=False,
            data_encipherment=False, key_agreement=False, key_cert_sign=False,
            crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]),
                       critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .sign(key, hashes.SHA256())
    )
    cert_pem = cert.public_bytes(serialization.Encoding.PEM)
    key_pem = key.private_bytes(serialization.Encoding.PEM,
                                serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    return cert_pem, key_pem


def _write(path: str, data: bytes, mode: int, overwrite: bool) -> None:
    flags = os.O_WRONLY | os.O_CREAT | (os.O_TRUNC if overwrite else os.O_EXCL)
    fd = os.open(path, flags, mode)
    try:
        os.fchmod(fd, mode)     # an existing file keeps its mode otherwise
        os.write(fd, data)
    finally:
        os.close(fd)


def write_selfsigned(hosts: Sequence[str], out_dir: str, days: int = 30,
                     overwrite: bool = False) -> tuple[str, str]:
    """Write out_dir/cert.pem and out_dir/key.pem (mode 0600); return their paths.

    Raises FileExistsError if either exists and overwrite is false.
    """
    cert_pem, key_pem = generate_selfsigned(hosts, days)
    os.makedirs(out_dir, exist_ok=True)
    cert_path = os.path.join(out_dir, "cert.pem")
    key_path = os.path.join(out_dir, "key.pem")
    if not overwrite:
        for p in (cert_path, key_path):
            if os.path.exists(p):
                raise FileExistsError(p)
    _write(key_path, key_pem, 0o600, overwrite)
    _write(cert_path, cert_pem, 0o644, overwrite)
    return cert_path, key_path
