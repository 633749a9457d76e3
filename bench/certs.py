"""The run's throwaway TLS certificate: made at start in the temp dir, gone with it."""
from __future__ import annotations

import os
import ssl
from dataclasses import dataclass
from pathlib import Path

NAMES = ["localhost", "127.0.0.1"]


class CertError(RuntimeError):
    """The certificate could not be made; the message says why."""


@dataclass(frozen=True)
class RunCert:
    cert: Path          # PEM certificate (nginx, edgeproxy)
    key: Path           # PEM private key, mode 0600
    combined: Path      # certificate then key in one file (HAProxy's crt)
    ciphers: str        # the TLS 1.2 cipher list all three proxies are given

    def client_context(self) -> ssl.SSLContext:
        """A client context that trusts only this certificate and checks the name."""
        ctx = ssl.create_default_context(cafile=str(self.cert))
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        return ctx


def _write_private(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def make_run_cert(workdir: Path) -> RunCert:
    """An ECDSA P-256 self-signed certificate for localhost and 127.0.0.1 in workdir."""
    try:
        from edgeproxy.tls import CIPHERS_TLS12, generate_selfsigned
    except ImportError as exc:  # edgeproxy or its cryptography dependency missing
        raise CertError(f"cannot import edgeproxy.tls to make the certificate: {exc}") from exc
    cert_pem, key_pem = generate_selfsigned(NAMES)  # 30 days: no expiry warning
    cert = RunCert(cert=workdir / "bench-cert.pem", key=workdir / "bench-key.pem",
                   combined=workdir / "bench-cert-key.pem", ciphers=CIPHERS_TLS12)
    cert.cert.write_bytes(cert_pem)
    _write_private(cert.key, key_pem)
    _write_private(cert.combined, cert_pem + key_pem)
    return cert
