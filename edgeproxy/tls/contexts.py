"""The ssl.SSLContext settings shared by every server and upstream context we build."""
from __future__ import annotations

import os
import ssl

from edgeproxy.tls.certs import LoadedCert, TLSConfigError
from edgeproxy.tls.groups import restrict_groups

# TLS 1.2 suites: forward secrecy (ECDHE) and AEAD only, AES-GCM first (hardware AES on
# servers), CHACHA20-POLY1305 for clients without it.  TLS 1.3 suites are OpenSSL's
# defaults, all AEAD.  SECLEVEL=2 refuses RSA keys under 2048 bits and SHA-1 signatures.
CIPHERS_TLS12 = ":".join((
    "ECDHE-ECDSA-AES128-GCM-SHA256",
    "ECDHE-RSA-AES128-GCM-SHA256",
    "ECDHE-ECDSA-AES256-GCM-SHA384",
    "ECDHE-RSA-AES256-GCM-SHA384",
    "ECDHE-ECDSA-CHACHA20-POLY1305",
    "ECDHE-RSA-CHACHA20-POLY1305",
)) + ":@SECLEVEL=2"

ALPN = ["http/1.1"]

MIN_VERSIONS = {"1.2": ssl.TLSVersion.TLSv1_2, "1.3": ssl.TLSVersion.TLSv1_3}


def tls_version(min_version: str) -> ssl.TLSVersion:
    try:
        return MIN_VERSIONS[min_version]
    except KeyError:
        raise TLSConfigError(
            f"min_version must be \"1.2\" or \"1.3\", not {min_version!r}") from None


def new_server_context(min_version: str, client_ca_pem: bytes | None) -> ssl.SSLContext:
    """A server context with our settings and no certificate yet."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = tls_version(min_version)
    ctx.set_ciphers(CIPHERS_TLS12)
    restrict_groups(ctx)                  # X25519, P-256, P-384
    ctx.options |= (ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION
                    | ssl.OP_CIPHER_SERVER_PREFERENCE)
    ctx.options &= ~ssl.OP_NO_TICKET      # session tickets stay on: resumption
    ctx.set_alpn_protocols(ALPN)
    if client_ca_pem is not None:
        ctx.verify_mode = ssl.CERT_REQUIRED
        try:
            ctx.load_verify_locations(cadata=client_ca_pem.decode("ascii"))
        except ssl.SSLError as e:
            raise TLSConfigError(f"OpenSSL refused the client CA: {e}") from None
    return ctx


def load_into_context(ctx: ssl.SSLContext, cert: LoadedCert) -> None:
    """Give ctx the chain and key that were checked, not whatever the files hold now.

    OpenSSL only loads from a path, so the PEM goes through an anonymous in-memory file
    (memfd): the key never touches a disk and a file replaced between the check and the
    load cannot slip in.  Without memfd (not Linux) the original files are loaded.
    """
    try:
        if hasattr(os, "memfd_create"):
            fd = os.memfd_create("edgeproxy-tls", os.MFD_CLOEXEC)
            try:
                data = memoryview(cert.pem_for_ssl())
                while data:
                    data = data[os.write(fd, data):]
                ctx.load_cert_chain(f"/proc/self/fd/{fd}")
            finally:
                os.close(fd)
        else:
            ctx.load_cert_chain(cert.config.cert, cert.config.key, cert.config.password)
    except (ssl.SSLError, OSError) as e:
        raise TLSConfigError(f"OpenSSL refused the certificate or key: {e}",
                             cert.config.cert) from None
