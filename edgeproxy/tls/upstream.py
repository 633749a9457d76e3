"""TLS toward https:// backends: the client context of a pool and the name it verifies."""
from __future__ import annotations

import ssl

from edgeproxy.config.model import CertConfig, PoolTLSConfig
from edgeproxy.tls.certs import TLSConfigError, load_ca_file, load_cert_pair
from edgeproxy.tls.contexts import ALPN, load_into_context


def _client_cert(tls: PoolTLSConfig) -> CertConfig | None:
    if tls.client_cert is None and tls.client_key is None:
        return None
    if tls.client_cert is None or tls.client_key is None:
        raise TLSConfigError("mTLS to backends needs both client_cert and client_key",
                             tls.client_cert or tls.client_key)
    return CertConfig(cert=tls.client_cert, key=tls.client_key)


def build_client_context(tls: PoolTLSConfig) -> ssl.SSLContext:
    """The context for a pool's upstream connections; raises TLSConfigError.

    Use with `loop.create_connection(..., ssl=ctx,
    server_hostname=server_name_for(tls, backend.host))`.  One context per pool,
    built once (blocking file I/O): it is shared by all its connections.
    """
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)   # CERT_REQUIRED, check_hostname
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION
    ctx.set_alpn_protocols(ALPN)
    if tls.verify:
        if tls.ca:
            ca = load_ca_file(tls.ca)
            try:
                ctx.load_verify_locations(cadata=ca.decode("ascii"))
            except ssl.SSLError as e:
                raise TLSConfigError(f"OpenSSL refused the CA file: {e}", tls.ca) from None
        else:
            ctx.load_default_certs(ssl.Purpose.SERVER_AUTH)
    else:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    client = _client_cert(tls)
    if client is not None:
        load_into_context(ctx, load_cert_pair(client))
    return ctx


def server_name_for(tls: PoolTLSConfig, backend_host: str) -> str:
    """The name sent as SNI and verified in the backend's certificate.

    An IP address is verified against the certificate's IP SANs and not sent as SNI
    (Python's ssl does that by itself).
    """
    return tls.server_name or backend_host


def check_pool_tls(tls: PoolTLSConfig) -> list[str]:
    """Every problem with a pool's TLS files, for `edgeproxy check` ([] = fine)."""
    problems = []
    if tls.verify and tls.ca:
        try:
            load_ca_file(tls.ca)
        except TLSConfigError as e:
            problems.append(str(e))
    try:
        client = _client_cert(tls)
        if client is not None:
            load_cert_pair(client)
    except TLSConfigError as e:
        problems.append(str(e))
    return problems
