"""TLS for edgeproxy: listener contexts with SNI and reload, backend contexts, cert files."""
from edgeproxy.tls.certs import (
    LoadedCert,
    TLSConfigError,
    expiry_warnings,
    load_ca_file,
    load_cert_pair,
)
from edgeproxy.tls.contexts import CIPHERS_TLS12
from edgeproxy.tls.devcerts import generate_selfsigned, write_selfsigned
from edgeproxy.tls.server import ServerTLS, build_server_context, check_listen_tls, client_subject
from edgeproxy.tls.upstream import build_client_context, check_pool_tls, server_name_for

__all__ = [
    "CIPHERS_TLS12", "LoadedCert", "ServerTLS", "TLSConfigError",
    "build_client_context", "build_server_context", "check_listen_tls", "check_pool_tls",
    "client_subject", "expiry_warnings", "generate_selfsigned", "load_ca_file",
    "load_cert_pair", "server_name_for", "write_selfsigned",
]
