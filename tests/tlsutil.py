"""Throwaway CAs and certificates made at test time, and a threaded TLS echo server."""
from __future__ import annotations

import asyncio
import datetime as dt
import json
import os
import socket
import ssl
import threading
from dataclasses import dataclass, field

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from edgeproxy.config.model import CertConfig
from edgeproxy.tls import client_subject
from edgeproxy.tls.devcerts import san_entry

NOW = dt.datetime.now(dt.UTC)


def new_key(kind: str = "ec"):
    if kind == "rsa":
        return rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return ec.generate_private_key(ec.SECP256R1())


def key_pem(key, password: str | None = None, traditional: bool = False) -> bytes:
    enc = (serialization.BestAvailableEncryption(password.encode()) if password
           else serialization.NoEncryption())
    fmt = (serialization.PrivateFormat.TraditionalOpenSSL if traditional
           else serialization.PrivateFormat.PKCS8)
    return key.private_bytes(serialization.Encoding.PEM, fmt, enc)


def cert_pem(*certs: x509.Certificate) -> bytes:
    return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs)


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


@dataclass
class Issued:
    """A leaf certificate, its key and the intermediates between it and the root."""
    cert: x509.Certificate
    key: object
    intermediates: list[x509.Certificate] = field(default_factory=list)

    def write(self, directory, stem: str, password: str | None = None,
              with_chain: bool = True) -> CertConfig:
        cert_path = os.path.join(directory, f"{stem}.crt")
        key_path = os.path.join(directory, f"{stem}.key")
        chain = self.intermediates if with_chain else []
        with open(cert_path, "wb") as f:
            f.write(cert_pem(self.cert, *chain))
        with open(key_path, "wb") as f:
            f.write(key_pem(self.key, password))
        return CertConfig(cert=cert_path, key=key_path, password=password)


class CA:
    """A certificate authority (a root, or an intermediate when parent is given)."""

    def __init__(self, cn: str = "edgeproxy test root", kind: str = "ec",
                 parent: CA | None = None):
        self.key = new_key(kind)
        self.parent = parent
        issuer_key = parent.key if parent else self.key
        issuer_name = parent.cert.subject if parent else _name(cn)
        self.cert = (
            x509.CertificateBuilder()
            .subject_name(_name(cn)).issuer_name(issuer_name)
            .public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(NOW - dt.timedelta(days=1))
            .not_valid_after(NOW + dt.timedelta(days=365))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=True,
                crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(self.key.public_key()),
                           critical=False)
            .sign(issuer_key, hashes.SHA256())
        )

    def intermediate(self, cn: str = "edgeproxy test intermediate", kind: str = "ec") -> CA:
        return CA(cn, kind, parent=self)

    @property
    def chain(self) -> list[x509.Certificate]:
        """This CA and its parents, up to but not including the root."""
        out, ca = [], self
        while ca.parent is not None:
            out.append(ca.cert)
            ca = ca.parent
        return out

    def pem(self) -> bytes:
        return cert_pem(self.cert)

    def write(self, directory, stem: str = "ca") -> str:
        path = os.path.join(directory, f"{stem}.crt")
        with open(path, "wb") as f:
            f.write(self.pem())
        return path

    def issue(self, *names: str, kind: str = "ec", cn: str | None = None,
              not_before: dt.datetime | None = None, not_after: dt.datetime | None = None,
              client: bool = False) -> Issued:
        key = new_key(kind)
        builder = (
            x509.CertificateBuilder()
            .subject_name(_name(cn or (names[0] if names else "no-name")))
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(not_before or NOW - dt.timedelta(hours=1))
            .not_valid_after(not_after or NOW + dt.timedelta(days=90))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.CLIENT_AUTH if client else ExtendedKeyUsageOID.SERVER_AUTH]),
                critical=False)
        )
        if names:
            builder = builder.add_extension(
                x509.SubjectAlternativeName([san_entry(n) for n in names]), critical=False)
        return Issued(builder.sign(self.key, hashes.SHA256()), key, self.chain)


# --- a TLS echo server on 127.0.0.1, run by asyncio or uvloop in a thread -----------

class _Echo(asyncio.Protocol):
    """Sends one JSON line about the handshake, then echoes what it receives."""

    def __init__(self, live: set):
        self.live = live

    def connection_made(self, transport):
        self.transport = transport
        self.live.add(transport)
        obj = transport.get_extra_info("ssl_object")
        info = {"alpn": obj.selected_alpn_protocol(), "version": obj.version(),
                "cipher": obj.cipher()[0], "subject": client_subject(obj)}
        transport.write(json.dumps(info).encode() + b"\n")

    def data_received(self, data):
        self.transport.write(data)

    def connection_lost(self, exc):
        self.live.discard(self.transport)


class TLSServer:
    """`with TLSServer(ctx, "uvloop") as srv:` serves ctx on 127.0.0.1:srv.port."""

    def __init__(self, context: ssl.SSLContext, loop_kind: str = "asyncio"):
        self.context = context
        self.loop_kind = loop_kind
        self.port = 0
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._live: set[asyncio.Transport] = set()

    def _run(self):
        if self.loop_kind == "uvloop":
            import uvloop
            self.loop = uvloop.new_event_loop()
        else:
            self.loop = asyncio.new_event_loop()
        try:
            self.server = self.loop.run_until_complete(self.loop.create_server(
                lambda: _Echo(self._live), "127.0.0.1", 0, ssl=self.context, ssl_handshake_timeout=5))
            self.port = self.server.sockets[0].getsockname()[1]
        except BaseException as e:  # reported to the test thread
            self._error = e
            self._ready.set()
            self.loop.close()
            return
        self._ready.set()
        self.loop.run_forever()
        self.server.close()
        for transport in list(self._live):
            transport.abort()
        self.loop.run_until_complete(self.server.wait_closed())
        self.loop.run_until_complete(asyncio.sleep(0.01))   # let aborts finish
        self.loop.close()

    def __enter__(self):
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        self._ready.wait(10)
        if self._error:
            raise self._error
        return self

    def __exit__(self, *exc):
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)


@dataclass
class Handshake:
    """What a client saw: the certificate it received, the server's line, the socket."""
    cert: x509.Certificate
    info: dict
    sock: ssl.SSLSocket

    def readline(self) -> bytes:
        buf = b""
        while not buf.endswith(b"\n"):
            chunk = self.sock.recv(4096)
            if not chunk:
                break
            buf += chunk
        return buf


def connect(port: int, ctx: ssl.SSLContext, server_name: str | None = None,
            session: ssl.SSLSession | None = None) -> Handshake:
    """Handshake with a blocking Python ssl client and read the server's line.

    The caller closes `.sock` (or lets the test end); errors propagate.
    """
    raw = socket.create_connection(("127.0.0.1", port), timeout=5)
    try:
        sock = ctx.wrap_socket(raw, server_hostname=server_name, session=session)
    except BaseException:
        raw.close()
        raise
    try:
        hs = Handshake(x509.load_der_x509_certificate(sock.getpeercert(binary_form=True)),
                       {}, sock)
        line = hs.readline()
        if not line:
            raise ConnectionError("the server closed the connection after the handshake")
        hs.info = json.loads(line)
    except BaseException:
        sock.close()
        raise
    return hs


def insecure_client(**versions) -> ssl.SSLContext:
    """A client that accepts any certificate: for looking at which one is served."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    for attr, value in versions.items():
        setattr(ctx, attr, value)
    return ctx


def trusting_client(ca: CA, **versions) -> ssl.SSLContext:
    """A verifying client whose only trust anchor is ca."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(cadata=ca.pem().decode())
    for attr, value in versions.items():
        setattr(ctx, attr, value)
    return ctx


def cn_of(cert: x509.Certificate) -> str:
    return cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value
