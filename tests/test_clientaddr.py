"""The real client address over real sockets: PROXY protocol v1 and v2 read
on plain and TLS listeners (headers written here byte by byte), sent to
plain and TLS backends, and the trusted proxies' X-Forwarded-For and
Forwarded.  What the proxy settled on is seen where it is used: the hooks'
ctx.client_ip (tests/clientaddr_hooks.py), the X-Forwarded-For and
Forwarded sent to the backend, and the access log."""

from __future__ import annotations

import json
import socket
import ssl
import threading
import time

import pytest
from tlsutil import CA

from edgeproxy.clientaddr import proxyproto as pp

SIG = pp.V2_SIGNATURE
HOOK = 'hooks = ["tests.clientaddr_hooks:ShowClient"]'


def v2(cmd: int, fam: int, body: bytes) -> bytes:
    return SIG + bytes((0x20 | cmd, fam)) + len(body).to_bytes(2, "big") + body


def inet4(src: str, dst: str, sport: int, dport: int) -> bytes:
    return (socket.inet_aton(src) + socket.inet_aton(dst) + sport.to_bytes(2, "big")
            + dport.to_bytes(2, "big"))


def inet6(src: str, dst: str, sport: int, dport: int) -> bytes:
    return (socket.inet_pton(socket.AF_INET6, src) + socket.inet_pton(socket.AF_INET6, dst)
            + sport.to_bytes(2, "big") + dport.to_bytes(2, "big"))


REQUEST = b"GET /echo HTTP/1.1\r\nHost: a.test\r\nConnection: close\r\n\r\n"


def exchange(port: int, header: bytes, request: bytes = REQUEST, *, split: bool = False,
             pause: float = 0.0) -> bytes:
    """Send header (one byte per write with split) then request; read until close."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if split:
            for i in range(len(header)):
                s.sendall(header[i:i + 1])
                time.sleep(0.002)
        else:
            s.sendall(header)
        if pause:
            time.sleep(pause)
        s.sendall(request)
        return read_all(s)


def read_all(s: socket.socket) -> bytes:
    out = b""
    while True:
        try:
            d = s.recv(65536)
        except (ConnectionResetError, TimeoutError):
            break
        if not d:
            break
        out += d
    return out


def answer(raw: bytes) -> tuple[dict, dict]:
    """(response fields, the echoed request's fields) of an /echo answer."""
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    assert lines[0].startswith("HTTP/1.1 200"), raw[:300]
    fields = {k.lower(): v.strip() for k, v in (ln.split(":", 1) for ln in lines[1:])}
    echoed: dict = {}
    for k, v in json.loads(body)["headers"]:
        echoed.setdefault(k.lower(), v)
    return fields, echoed


@pytest.fixture
def pp_proxy(origin, proxy_factory):
    def make(listen_extra: str = "", server_extra: str = "", extra: str = ""):
        body = (f'[server]\n{HOOK}\n{server_extra}\n[timeout]\nheader = 1.0\n\n'
                f'[[route]]\npath = "/"\npool = "web"\n\n[pool.web]\nbackends = ["{origin.url}"]\n{extra}')
        return proxy_factory(body, listen_lines=[
            "proxy_protocol = true\n" + (listen_extra or 'proxy_protocol_from = ["127.0.0.1/32"]')])
    return make


# ---- reading the PROXY header ----------------------------------------------------

@pytest.mark.parametrize("split", [False, True], ids=["whole", "byte-by-byte"])
def test_v1_tcp4_names_the_client_everywhere(pp_proxy, split):
    p = pp_proxy()
    raw = exchange(p.port, b"PROXY TCP4 192.0.2.10 198.51.100.1 40000 443\r\n", split=split)
    fields, echoed = answer(raw)
    assert fields["x-client-ip"] == "192.0.2.10"
    assert echoed["x-forwarded-for"] == "192.0.2.10"
    assert echoed["forwarded"].startswith("for=192.0.2.10;")


@pytest.mark.parametrize("split", [False, True], ids=["whole", "byte-by-byte"])
def test_v2_tcp6_with_tlvs(pp_proxy, split):
    p = pp_proxy()
    tlvs = b"\x01\x00\x02h2" + b"\x02\x00\x08a.test:1" + b"\x04\x00\x05\0\0\0\0\0"
    raw = exchange(p.port, v2(1, 0x21, inet6("2001:db8::7", "2001:db8::1", 5, 443) + tlvs),
                   split=split)
    fields, echoed = answer(raw)
    assert fields["x-client-ip"] == "2001:db8::7"
    assert echoed["x-forwarded-for"] == "2001:db8::7"
    assert echoed["forwarded"].startswith('for="[2001:db8::7]";')


def test_header_and_request_in_one_write(pp_proxy):
    p = pp_proxy()
    with socket.create_connection(("127.0.0.1", p.port), timeout=5) as s:
        s.sendall(v2(1, 0x11, inet4("203.0.113.5", "10.0.0.1", 1, 80)) + REQUEST)
        fields, _ = answer(read_all(s))
    assert fields["x-client-ip"] == "203.0.113.5"


@pytest.mark.parametrize("header", [
    v2(0, 0x11, inet4("203.0.113.5", "10.0.0.1", 1, 80)),          # LOCAL: addresses ignored
    v2(0, 0x00, b""),
    v2(1, 0x00, b""),                                              # PROXY over UNSPEC
    v2(1, 0x31, b"/run/lb.sock".ljust(216, b"\0")),                # a unix socket client
    b"PROXY UNKNOWN\r\n",
    b"PROXY UNKNOWN ffff::1 ffff::2 1 2\r\n",
], ids=["v2-local", "v2-local-unspec", "v2-unspec", "v2-unix", "v1-unknown", "v1-unknown-rest"])
def test_headers_without_a_client_keep_the_tcp_peer(pp_proxy, header):
    p = pp_proxy()
    fields, echoed = answer(exchange(p.port, header))
    assert fields["x-client-ip"] == "127.0.0.1"
    assert echoed["x-forwarded-for"] == "127.0.0.1"


def closed_without_answer(port: int, data: bytes, wait: float = 3.0) -> bool:
    with socket.create_connection(("127.0.0.1", port), timeout=wait) as s:
        try:
            s.sendall(data)
        except OSError:
            return True
        return read_all(s) == b""


@pytest.mark.parametrize("data", [
    REQUEST,                                                       # no header at all
    b"PROXY TCP4 192.0.2.10 198.51.100.1 40000 443\n" + REQUEST,    # LF alone
    b"PROXY TCP4 192.0.2.300 198.51.100.1 40000 443\r\n" + REQUEST,
    b"PROXY TCP4 " + b"9" * 200 + b"\r\n",                          # oversize v1
    SIG + b"\x21\x11\xff\xff" + b"\0" * 3000,                      # oversize v2
    v2(1, 0x11, inet4("1.2.3.4", "5.6.7.8", 1, 2) + b"\x01\x00\x40x") + REQUEST,  # bad TLV
    v2(1, 0x12, inet4("1.2.3.4", "5.6.7.8", 1, 2)) + REQUEST,      # UDP
    b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\0" * 40,  # a ClientHello
    b"\0\0\0\0garbage",
], ids=["none", "lf", "bad-ip", "v1-oversize", "v2-oversize", "bad-tlv", "udp", "tls", "garbage"])
def test_malformed_or_missing_headers_close_the_connection(pp_proxy, origin, data):
    p = pp_proxy()
    before = len(origin.requests)
    assert closed_without_answer(p.port, data)
    assert len(origin.requests) == before
    # the listener goes on serving
    assert answer(exchange(p.port, b"PROXY TCP4 192.0.2.10 198.51.100.1 1 2\r\n"))[0]["x-client-ip"] \
        == "192.0.2.10"


def test_a_header_that_never_ends_times_out(pp_proxy):
    p = pp_proxy()          # timeout.header = 1.0
    with socket.create_connection(("127.0.0.1", p.port), timeout=6) as s:
        s.sendall(b"PROXY TCP4 192.0.2.10 ")
        t = time.monotonic()
        assert read_all(s) == b""
        assert 0.7 < time.monotonic() - t < 4.0


def test_a_header_from_an_untrusted_source_closes(pp_proxy, origin):
    p = pp_proxy('proxy_protocol_from = ["10.0.0.0/8", "::1/128"]')
    assert closed_without_answer(p.port, b"PROXY TCP4 192.0.2.10 198.51.100.1 1 2\r\n" + REQUEST)
    assert not origin.requests


def test_the_default_sources_are_the_trusted_proxies(pp_proxy):
    p = pp_proxy("", 'trusted_proxies = ["127.0.0.0/8"]')
    fields, _ = answer(exchange(p.port, b"PROXY TCP4 192.0.2.10 198.51.100.1 1 2\r\n"))
    assert fields["x-client-ip"] == "192.0.2.10"


def test_proxy_protocol_needs_a_source_list(tmp_path):
    from edgeproxy.config import ConfigError, parse_config
    with pytest.raises(ConfigError) as e:
        parse_config('[[listen]]\nbind = "127.0.0.1:1"\nproxy_protocol = true\n'
                     '[[route]]\npool = "w"\n[pool.w]\nbackends = ["http://127.0.0.1:2"]\n')
    assert "listen[0].proxy_protocol: true but no source may send the header" in str(e.value)
    with pytest.raises(ConfigError) as e:
        parse_config('[server]\ntrusted_proxies = ["10.0.0.1/8"]\n[[listen]]\nbind = "127.0.0.1:1"\n'
                     'proxy_protocol_from = ["nope"]\n'
                     '[[route]]\npool = "w"\n[pool.w]\nbackends = ["http://127.0.0.1:2"]\n'
                     'proxy_protocol = "v3"\n')
    msg = str(e.value)
    assert "server.trusted_proxies[0]: \"10.0.0.1/8\" is not a CIDR block" in msg
    assert "listen[0].proxy_protocol_from[0]: \"nope\" is not a CIDR block" in msg
    assert 'pool.w.proxy_protocol: expected "v1", "v2" or false, got "v3"' in msg


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    d = tmp_path_factory.mktemp("clientaddr-pki")
    root = CA("clientaddr root")
    return {"root": root, "root_path": root.write(d, "root"),
            "server": root.issue("a.test", "127.0.0.1", cn="a.test").write(d, "server")}


def test_tls_listener_reads_the_header_before_the_handshake(origin, proxy_factory, pki):
    cert = pki["server"]
    body = (f'[server]\n{HOOK}\n[[route]]\npath = "/"\npool = "web"\n\n'
            f'[pool.web]\nbackends = ["{origin.url}"]\n')
    p = proxy_factory(body, listen_lines=[
        f'proxy_protocol = true\nproxy_protocol_from = ["127.0.0.1/32"]\n'
        f'tls.certs = [{{ cert = "{cert.cert}", key = "{cert.key}" }}]'])
    ctx = ssl.create_default_context(cafile=pki["root_path"])
    for header, want in [(b"PROXY TCP4 192.0.2.44 198.51.100.1 1 443\r\n", "192.0.2.44"),
                         (v2(1, 0x21, inet6("2001:db8::44", "::1", 1, 443)), "2001:db8::44")]:
        raw = socket.create_connection(("127.0.0.1", p.port), timeout=5)
        for i in range(len(header)):            # byte by byte, then the ClientHello
            raw.sendall(header[i:i + 1])
        with ctx.wrap_socket(raw, server_hostname="a.test") as s:
            s.sendall(REQUEST)
            fields, echoed = answer(read_all(s))
        assert fields["x-client-ip"] == want
        assert echoed["x-forwarded-for"] == want
    # a TLS client without the header is closed
    with pytest.raises((ssl.SSLError, ConnectionError, OSError)):
        with socket.create_connection(("127.0.0.1", p.port), timeout=5) as raw:
            with ctx.wrap_socket(raw, server_hostname="a.test") as s:
                s.sendall(REQUEST)
                if not s.recv(100):
                    raise ConnectionError("closed")


# ---- trusted proxies: X-Forwarded-For and Forwarded --------------------------------

def xff_request(xff: list[str] | None = None, name: str = "X-Forwarded-For") -> bytes:
    fields = "".join(f"{name}: {v}\r\n" for v in (xff or []))
    return f"GET /echo HTTP/1.1\r\nHost: a.test\r\n{fields}Connection: close\r\n\r\n".encode()


@pytest.fixture
def trusting_proxy(origin, proxy_factory):
    def make(server_extra: str = 'trusted_proxies = ["127.0.0.0/8", "10.0.0.0/8", "::1/128"]'):
        return proxy_factory(
            f'[server]\n{HOOK}\n{server_extra}\n\n[log]\naccess_log = "access.log"\n'
            f'access_format = "json"\n\n[[route]]\npath = "/"\npool = "web"\n\n'
            f'[pool.web]\nbackends = ["{origin.url}"]\n')
    return make


def client_of(port: int, request: bytes) -> tuple[str, dict]:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(request)
        fields, echoed = answer(read_all(s))
    return fields["x-client-ip"], echoed


@pytest.mark.parametrize("xff,want", [
    (None, "127.0.0.1"),
    (["203.0.113.9"], "203.0.113.9"),
    (["198.51.100.1, 203.0.113.9, 10.1.2.3"], "203.0.113.9"),        # rightmost untrusted
    (["198.51.100.1", "203.0.113.9,10.1.2.3"], "203.0.113.9"),       # over two fields
    (["203.0.113.9", "10.1.2.3"], "203.0.113.9"),
    (["10.9.9.9, 10.1.2.3"], "10.9.9.9"),                            # all trusted: leftmost
    (["203.0.113.9:4711"], "203.0.113.9"),
    (["[2001:db8::9]:4711"], "2001:db8::9"),
    (["2001:DB8:0::9"], "2001:db8::9"),                             # written canonically
    (["203.0.113.9, , 10.1.2.3"], "203.0.113.9"),                    # empty element
    (["unknown"], "127.0.0.1"),                                      # malformed: ignored
    (["203.0.113.9, garbage, 10.1.2.3"], "127.0.0.1"),
    (["203.0.113.9, 10.1.2.3:99999"], "127.0.0.1"),
    (["1.2.3.4.5"], "127.0.0.1"),
    (["203.0.113.009"], "127.0.0.1"),
    ([", ".join(["10.0.0.1"] * 70)], "127.0.0.1"),                  # too many elements
], ids=str)
def test_x_forwarded_for_from_a_trusted_peer(trusting_proxy, xff, want):
    p = trusting_proxy()
    got, echoed = client_of(p.port, xff_request(xff))
    assert got == want
    # the chain sent on is the one received, plus the peer this proxy saw
    chain = [v for v in (xff or [])]
    assert echoed["x-forwarded-for"] == ", ".join(chain + ["127.0.0.1"])


def test_the_access_log_has_the_real_client(trusting_proxy):
    p = trusting_proxy()
    assert client_of(p.port, xff_request(["203.0.113.77"]))[0] == "203.0.113.77"
    log = p.config_path.parent / "access.log"
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and "203.0.113.77" not in (log.read_text() if log.exists() else ""):
        time.sleep(0.1)
    assert json.loads(log.read_text().splitlines()[-1])["remote"] == "203.0.113.77"


def test_each_request_of_a_connection_names_its_own_client(trusting_proxy):
    p = trusting_proxy()
    with socket.create_connection(("127.0.0.1", p.port), timeout=5) as s:
        seen = []
        for xff in (["203.0.113.1"], None, ["203.0.113.2"], ["bad value"]):
            s.sendall(xff_request(xff).replace(b"Connection: close\r\n", b""))
            buf = b""
            while b"\r\n\r\n" not in buf:
                buf += s.recv(65536)
            head, _, body = buf.partition(b"\r\n\r\n")
            n = int(head.split(b"Content-Length: ")[1].split(b"\r\n")[0])
            while len(body) < n:
                body += s.recv(65536)
            seen.append(head.split(b"X-Client-IP: ")[1].split(b"\r\n")[0].decode())
    assert seen == ["203.0.113.1", "127.0.0.1", "203.0.113.2", "127.0.0.1"]


def test_an_untrusted_peer_cannot_name_a_client(trusting_proxy):
    p = trusting_proxy('trusted_proxies = ["10.0.0.0/8"]')
    got, echoed = client_of(p.port, xff_request(["203.0.113.9"]))
    assert got == "127.0.0.1"
    assert echoed["x-forwarded-for"] == "203.0.113.9, 127.0.0.1"


@pytest.mark.parametrize("fwd,want", [
    (['for=203.0.113.9'], "203.0.113.9"),
    (['for="[2001:db8::9]:80";proto=https, for=10.1.1.1'], "2001:db8::9"),
    (['For="203.0.113.9:8080";by=10.0.0.2'], "203.0.113.9"),
    (['for=198.51.100.3', 'for=203.0.113.9;host="a,b", for=10.2.2.2'], "203.0.113.9"),
    (['proto=https;for=203.0.113.9'], "203.0.113.9"),
    (['for=unknown'], "127.0.0.1"),
    (['for=_hidden'], "127.0.0.1"),
    (['proto=https'], "127.0.0.1"),
    (['for="203.0.113.9'], "127.0.0.1"),
    (['for="\\"203.0.113.9"'], "127.0.0.1"),
], ids=str)
def test_forwarded_from_a_trusted_peer(trusting_proxy, fwd, want):
    p = trusting_proxy('trusted_proxies = ["127.0.0.0/8", "10.0.0.0/8"]\n'
                       'real_ip_header = "Forwarded"')
    assert client_of(p.port, xff_request(fwd, "Forwarded"))[0] == want
    # X-Forwarded-For is not looked at then
    assert client_of(p.port, xff_request(["203.0.113.50"]))[0] == "127.0.0.1"


def test_the_real_address_of_a_proxy_header_can_itself_be_a_trusted_proxy(pp_proxy):
    # LB -> an internal proxy 10.1.1.1 (named by the PROXY header) -> here
    p = pp_proxy("", 'trusted_proxies = ["127.0.0.0/8", "10.0.0.0/8"]')
    raw = exchange(p.port, b"PROXY TCP4 10.1.1.1 10.0.0.1 1 80\r\n", xff_request(["198.51.100.8"]))
    fields, echoed = answer(raw)
    assert fields["x-client-ip"] == "198.51.100.8"
    assert echoed["x-forwarded-for"] == "198.51.100.8, 10.1.1.1"


# ---- sending the PROXY header to backends --------------------------------------------

class ProxyProtocolOrigin:
    """A backend that requires a PROXY header (optionally then TLS): it
    records each header and answers one request per connection."""

    def __init__(self, ssl_context: ssl.SSLContext | None = None):
        self.ctx = ssl_context
        self.headers: list[tuple] = []
        self.heads: list[bytes] = []
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self):
        while True:
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._conn, args=(c,), daemon=True).start()

    def _conn(self, c: socket.socket):
        c.settimeout(5)
        try:
            buf = b""
            while True:
                got = pp.parse(buf)
                if got is not None:
                    break
                d = c.recv(1)          # a byte at a time: nothing past the header is read
                if not d:
                    return
                buf += d
            self.headers.append(got)
            if self.ctx is not None:
                c = self.ctx.wrap_socket(c, server_side=True)
            head = b""
            while b"\r\n\r\n" not in head:
                d = c.recv(65536)
                if not d:
                    return
                head += d
            self.heads.append(head)
            c.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok")
        except (OSError, ValueError):
            pass
        finally:
            c.close()

    def stop(self):
        self.sock.close()


@pytest.mark.parametrize("version", ["v1", "v2"])
@pytest.mark.parametrize("tls", [False, True], ids=["plain", "tls"])
def test_pools_send_the_header_before_anything_else(proxy_factory, pki, tmp_path, version, tls):
    ctx = None
    if tls:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(pki["server"].cert, pki["server"].key)
    be = ProxyProtocolOrigin(ctx)
    try:
        scheme = "https" if tls else "http"
        p = proxy_factory(
            f'[server]\ntrusted_proxies = ["127.0.0.0/8"]\n\n[[route]]\npath = "/"\npool = "web"\n\n'
            f'[pool.web]\nbackends = ["{scheme}://127.0.0.1:{be.port}"]\nproxy_protocol = "{version}"\n'
            f'tls.ca = "{pki["root_path"]}"\ntls.server_name = "a.test"\n')
        n = 1 if version == "v1" else 2
        # a plain client, then one named by X-Forwarded-For, on one keep-alive connection
        with socket.create_connection(("127.0.0.1", p.port), timeout=5) as s:
            local_port = s.getsockname()[1]
            for xff in (None, ["2001:db8::5"]):
                s.sendall(xff_request(xff).replace(b"Connection: close\r\n", b""))
                buf = b""
                while not buf.endswith(b"ok"):
                    d = s.recv(65536)
                    assert d, buf
                    buf += d
                assert buf.startswith(b"HTTP/1.1 200")
        first, second = be.headers
        assert first[0] == len(pp.header(n, "127.0.0.1", local_port, "127.0.0.1", p.port))
        assert first[1] == n
        assert first[3:] == ("INET", "127.0.0.1", local_port, "127.0.0.1", p.port)
        # each client's connection is its own: the second got a header of its own
        assert second[3] == "INET6" and second[4] == "2001:db8::5" and second[5] == 0
        assert second[6] == "::ffff:127.0.0.1"
        assert all(h.startswith(b"GET /echo HTTP/1.1") for h in be.heads)
    finally:
        be.stop()


def test_a_proxy_header_in_is_passed_on_out(proxy_factory):
    be = ProxyProtocolOrigin()
    try:
        p = proxy_factory(
            f'[[route]]\npath = "/"\npool = "web"\n\n'
            f'[pool.web]\nbackends = ["http://127.0.0.1:{be.port}"]\nproxy_protocol = "v2"\n',
            listen_lines=['proxy_protocol = true\nproxy_protocol_from = ["127.0.0.1/32"]'])
        raw = exchange(p.port, b"PROXY TCP4 192.0.2.10 198.51.100.1 40000 443\r\n")
        assert raw.startswith(b"HTTP/1.1 200")
        assert be.headers[0][3:] == ("INET", "192.0.2.10", 40000, "198.51.100.1", 443)
    finally:
        be.stop()

