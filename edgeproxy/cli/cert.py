"""`edgeproxy cert`: make a development certificate, or show what a certificate file holds."""
from __future__ import annotations

import datetime as _dt

import click
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from cryptography.x509.oid import ExtensionOID

from edgeproxy.tls.certs import TLSConfigError, fmt_time, parse_certificates, read_file
from edgeproxy.tls.devcerts import write_selfsigned


def _key_description(cert: x509.Certificate) -> str:
    key = cert.public_key()
    if isinstance(key, rsa.RSAPublicKey):
        return f"RSA {key.key_size} bits"
    if isinstance(key, ec.EllipticCurvePublicKey):
        return f"ECDSA {key.curve.name} {key.key_size} bits"
    if isinstance(key, ed25519.Ed25519PublicKey):
        return "Ed25519"
    if isinstance(key, ed448.Ed448PublicKey):
        return "Ed448"
    return type(key).__name__


def _san_description(cert: x509.Certificate) -> str:
    try:
        san = cert.extensions.get_extension_for_oid(ExtensionOID.SUBJECT_ALTERNATIVE_NAME).value
    except x509.ExtensionNotFound:
        return "(none)"
    prefixes = {x509.DNSName: "DNS", x509.IPAddress: "IP", x509.RFC822Name: "email",
                x509.UniformResourceIdentifier: "URI"}
    return ", ".join(f"{prefixes.get(type(n), type(n).__name__)}:{n.value}" for n in san)


def _validity(cert: x509.Certificate, now: _dt.datetime) -> str:
    if now < cert.not_valid_before_utc:
        return "not valid yet"
    left = cert.not_valid_after_utc - now
    if left < _dt.timedelta(0):
        return f"EXPIRED {-left.days} days ago" if left.days < -1 else "EXPIRED"
    return f"{left.days} days left"


def describe_certificate(cert: x509.Certificate, now: _dt.datetime) -> list[tuple[str, str]]:
    """(label, value) lines for `edgeproxy cert inspect`."""
    issuer = cert.issuer.rfc4514_string()
    if cert.issuer == cert.subject:
        issuer += " (self-signed)"
    return [
        ("subject", cert.subject.rfc4514_string() or "(empty)"),
        ("SANs", _san_description(cert)),
        ("issuer", issuer),
        ("not before", fmt_time(cert.not_valid_before_utc)),
        ("not after", f"{fmt_time(cert.not_valid_after_utc)} ({_validity(cert, now)})"),
        ("key", _key_description(cert)),
        ("SHA-256", cert.fingerprint(hashes.SHA256()).hex(":").upper()),
    ]


@click.group()
def cert():
    """Make development certificates and inspect certificate files."""


@cert.command()
@click.option("--host", "hosts", multiple=True, required=True,
              help="A name or IP address the certificate is for (repeatable).")
@click.option("--out", required=True, type=click.Path(file_okay=False),
              help="Directory for cert.pem and key.pem (created if missing).")
@click.option("--days", default=30, show_default=True, type=click.IntRange(1, 825),
              help="Validity in days.")
@click.option("--force", is_flag=True, help="Overwrite existing cert.pem/key.pem.")
def selfsigned(hosts: tuple[str, ...], out: str, days: int, force: bool):
    """Write a self-signed dev certificate (ECDSA P-256) and key."""
    try:
        cert_path, key_path = write_selfsigned(list(hosts), out, days, overwrite=force)
    except FileExistsError as e:
        raise click.ClickException(f"{e} already exists (use --force to replace it)") from None
    except OSError as e:
        raise click.ClickException(f"cannot write to {out}: {e.strerror or e}") from None
    click.echo(f"wrote {cert_path}")
    click.echo(f"wrote {key_path} (mode 0600)")
    click.echo(f"self-signed for {', '.join(hosts)}, valid {days} days: for development "
               "only; clients must trust cert.pem explicitly")


@cert.command()
@click.argument("file", type=click.Path(dir_okay=False))
def inspect(file: str):
    """Show the certificates in FILE (PEM or DER)."""
    try:
        data = read_file(file, "certificate")
        if b"-----BEGIN" in data:
            certs = parse_certificates(data, file)
        else:
            try:
                certs = (x509.load_der_x509_certificate(data),)
            except ValueError:
                raise TLSConfigError("no certificate in the file (PEM or DER)", file) from None
    except TLSConfigError as e:
        raise click.ClickException(str(e)) from None
    now = _dt.datetime.now(_dt.UTC)
    for i, c in enumerate(certs):
        if len(certs) > 1:
            if i:
                click.echo()
            role = "leaf" if i == 0 else "chain"
            click.echo(f"certificate {i + 1} of {len(certs)} ({role})")
        for label, value in describe_certificate(c, now):
            click.echo(f"  {label + ':':<12} {value}")
