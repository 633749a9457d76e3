"""The listener's TLS: one context per certificate chosen by SNI, reloadable in place."""
from __future__ import annotations

import datetime as _dt
import logging
import ssl
import threading
from dataclasses import dataclass

from cryptography import x509

from edgeproxy.config.model import ListenTLSConfig
from edgeproxy.tls.certs import (
    LoadedCert,
    TLSConfigError,
    expiry_warnings,
    load_ca_file,
    load_cert_pair,
)
from edgeproxy.tls.contexts import load_into_context, new_server_context, tls_version

log = logging.getLogger("edgeproxy.tls")


def _normalize(name: str) -> str:
    return name.lower().rstrip(".")


@dataclass(frozen=True)
class SNITable:
    """Server name -> context; built whole, then swapped in by one assignment."""

    certs: tuple[LoadedCert, ...]
    client_ca: bytes | None                   # PEM, when client certificates are required
    contexts: tuple[ssl.SSLContext, ...]      # parallel to certs; [0] is the default
    exact: dict[str, ssl.SSLContext]
    wildcard: dict[str, ssl.SSLContext]       # "example.com" for "*.example.com"

    def context_for(self, server_name: str | None) -> ssl.SSLContext:
        """Exact name, then a one-label wildcard, then the first certificate."""
        if server_name:
            name = _normalize(server_name)
            ctx = self.exact.get(name)
            if ctx is not None:
                return ctx
            _, dot, parent = name.partition(".")
            if dot:
                ctx = self.wildcard.get(parent)
                if ctx is not None:
                    return ctx
        return self.contexts[0]


def build_sni_table(tls: ListenTLSConfig) -> SNITable:
    """Load and check every file of tls and build its per-certificate contexts.

    Raises TLSConfigError on the first bad file.  Blocking: run it in a thread
    when a loop is running.
    """
    if not tls.certs:
        raise TLSConfigError("a TLS listener needs at least one certificate")
    client_ca = load_ca_file(tls.client_ca) if tls.client_ca else None
    certs = tuple(load_cert_pair(c) for c in tls.certs)
    contexts = []
    exact: dict[str, ssl.SSLContext] = {}
    wildcard: dict[str, ssl.SSLContext] = {}
    for i, cert in enumerate(certs):
        ctx = new_server_context(tls.min_version, client_ca)
        load_into_context(ctx, cert)
        contexts.append(ctx)
        names = cert.dns_names
        if not names and i > 0:
            log.warning("%s: no DNS names in subjectAltName: this certificate is never "
                        "chosen (only the first one is served without a matching name)",
                        cert.config.cert)
        for name in names:
            if name.startswith("*."):
                table, key = wildcard, name[2:]
            elif "*" in name:
                log.warning("%s: ignoring the name %r: only a leading \"*.\" wildcard is "
                            "supported", cert.config.cert, name)
                continue
            else:
                table, key = exact, name
            if key in table:   # the earlier certificate keeps the name
                log.info("%s: %s is already served by an earlier certificate",
                         cert.config.cert, name)
                continue
            table[key] = ctx
    return SNITable(certs, client_ca, tuple(contexts), exact, wildcard)


class ServerTLS:
    """The context a TLS listener serves with, and what reloading its files needs.

    `context` is the listener's (`_ext.Listener.tls_context`) and never changes: its
    SNI callback moves each new connection onto the context of the certificate the
    client asked for.  `reload()` replaces those per-certificate contexts in one
    assignment, so handshakes already done keep theirs.
    """

    def __init__(self, tls: ListenTLSConfig, table: SNITable):
        self.config = tls
        # The outer context holds what the swap does not replace (the session cache
        # and ticket keys, protocol versions, ciphers, verify mode): resumption keeps
        # working across reloads.
        self.context = new_server_context(tls.min_version, table.client_ca)
        self.context.sni_callback = self._on_server_name
        self._table = table
        self._reload_lock = threading.Lock()

    @property
    def certs(self) -> tuple[LoadedCert, ...]:
        """The certificates in service, in config order."""
        return self._table.certs

    def context_for(self, server_name: str | None) -> ssl.SSLContext:
        return self._table.context_for(server_name)

    def _on_server_name(self, ssl_object, server_name, _context):
        # Called by OpenSSL for every ClientHello, with server_name None without SNI.
        ssl_object.context = self._table.context_for(server_name)

    def reload(self) -> bool:
        """Re-read every file; swap them in if all are good, else keep the old ones.

        Blocking: call it as `await loop.run_in_executor(None, stls.reload)`.
        Returns True when the new certificates are in service.
        """
        with self._reload_lock:
            try:
                table = build_sni_table(self.config)
            except TLSConfigError as e:
                log.error("TLS reload failed, the previous certificates stay in service: %s", e)
                return False
            self._table = table
        log.info("TLS reloaded: %s", ", ".join(c.config.cert for c in table.certs))
        return True

    def expiry_warnings(self, now: _dt.datetime | None = None) -> list[str]:
        """Messages for certificates in service that expire within 14 days."""
        return expiry_warnings(self._table.certs, now)


def build_server_context(tls: ListenTLSConfig) -> ServerTLS:
    """The listener's TLS; raises TLSConfigError naming the first bad file.

    Blocking (file I/O and crypto): at startup, or in a thread.
    """
    return ServerTLS(tls, build_sni_table(tls))


def client_subject(ssl_object: ssl.SSLObject | ssl.SSLSocket | None) -> str | None:
    """The verified client certificate's subject (RFC 4514), or None.

    Only when the listener requires client certificates: then the handshake has
    verified the certificate against client_ca before any request is read.
    """
    if ssl_object is None or ssl_object.context.verify_mode != ssl.CERT_REQUIRED:
        return None
    der = ssl_object.getpeercert(binary_form=True)
    if not der:
        return None
    return x509.load_der_x509_certificate(der).subject.rfc4514_string()


def check_listen_tls(tls: ListenTLSConfig) -> list[str]:
    """Every problem with a listener's TLS files, for `edgeproxy check` ([] = fine)."""
    problems = []
    try:
        tls_version(tls.min_version)
    except TLSConfigError as e:
        problems.append(str(e))
        return problems
    if not tls.certs:
        problems.append("a TLS listener needs at least one certificate")
    client_ca = None
    if tls.client_ca:
        try:
            client_ca = load_ca_file(tls.client_ca)
        except TLSConfigError as e:
            problems.append(str(e))
    for cfg in tls.certs:
        try:
            cert = load_cert_pair(cfg)
            load_into_context(new_server_context(tls.min_version, client_ca), cert)
        except TLSConfigError as e:
            problems.append(str(e))
    return problems
