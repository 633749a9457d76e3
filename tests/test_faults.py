"""The fault matrix: each kind of request (GET, chunked POST, cached GET,
WebSocket upgrade, GET to an https backend) through each network fault
between edgeproxy and its origin (tests/faultproxy.py), on one supervised
proxy shared by the module.  For each: the client gets the status the
fault calls for (502, 504), or the response it started and then a clean
close, within a bound; afterwards no client, backend or in-flight request
is left counted, the worker is the same process, its RSS stays bounded, and
the cache holds nothing the fault spoiled (what comes next is a correct
response, never a hit on a cut one)."""

from __future__ import annotations

import json
import socket
import ssl
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from faultproxy import Fault, FaultProxy
from harness import Client, Origin, free_port, start_proxy
from ops_support import _connectable, metrics, server_section, status, wait_until
from tlsutil import CA

READ_TIMEOUT = 1.0           # the proxy's timeout.read: how long a stall lasts
CONNECT_TIMEOUT = 4.0        # covers an https backend's handshake, trickled (~1 s)
RSS_GROWTH_MAX_KIB = 64 << 10
WS_HEAD = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n"


@dataclass(frozen=True)
class Kind:
    name: str
    host: str
    target: str
    body_at: int             # an offset of the origin's response ("down") inside its body
    request_body: bytes = b""

    def request(self, target: str) -> bytes:
        if self.name == "post":
            return (b"POST %s HTTP/1.1\r\nHost: %s\r\nTransfer-Encoding: chunked\r\n\r\n%s"
                    % (target.encode(), self.host.encode(), self.request_body))
        if self.name == "ws":
            return (b"GET %s HTTP/1.1\r\nHost: %s\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n"
                    % (target.encode(), self.host.encode()))
        return b"GET %s HTTP/1.1\r\nHost: %s\r\n\r\n" % (target.encode(), self.host.encode())


CACHE_BODY_LEN = 300
KINDS = {
    "get": Kind("get", "a.test", "/size/300", 150),
    "post": Kind("post", "a.test", "/echo", 120, b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"),
    "cached": Kind("cached", "a.test", f"/cache/{{case}}?cc=max-age=60&len={CACHE_BODY_LEN}", 200),
    "ws": Kind("ws", "a.test", "/ws", len(WS_HEAD)),         # right after the 101
    # past the handshake (~1.3 KB) and inside the body; a trickle takes /size/300
    "https": Kind("https", "tls.test", "/size/100000", 40000),
}

# fault -> what the client should see: "ok" (the whole response), a status
# answered by the proxy, or "cut" (the response started, then a clean close)
FAULTS = {
    "pass": (lambda k: Fault.passing(), {"ok"}),
    "close-on-accept": (lambda k: Fault.cut("up", 0), {502}),
    "reset-on-accept": (lambda k: Fault.reset("up", 0), {502}),
    "cut-request": (lambda k: Fault.cut("up", 20), {502}),
    "cut-in-head": (lambda k: Fault.cut("down", 12), {502}),
    "cut-in-body": (lambda k: Fault.cut("down", k.body_at), {"cut"}),
    # a reset can discard what the proxy had not read yet: then nothing of the
    # response reached it, and 502 is right too
    "reset-in-body": (lambda k: Fault.reset("down", k.body_at), {"cut", 502}),
    "stall-before-head": (lambda k: Fault.stall("down", 0), {504}),
    "stall-in-body": (lambda k: Fault.stall("down", k.body_at), {"cut"}),
    "trickle": (lambda k: Fault.trickle("down", 0.001), {"ok"}),
    "delay-accept": (lambda k: Fault.delay_accept(0.3), {"ok"}),
    "never-read": (lambda k: Fault.never_read(), {504}),
}

XFAIL: dict[tuple[str, str], str] = {}   # (fault, kind): why it is expected to fail


@dataclass
class Outcome:
    status: int | None       # None: closed before a status line
    complete: bool
    head: bytes
    body: bytes
    elapsed: float

    def header(self, name: str) -> str | None:
        for line in self.head.decode("latin-1").split("\r\n")[1:]:
            k, _, v = line.partition(":")
            if k.strip().lower() == name:
                return v.strip()
        return None

    def seen(self):
        if self.status is None or (self.status in (200, 101) and not self.complete):
            return "cut" if self.status is not None else "closed"
        if self.status in (200, 101):
            return "ok"
        return self.status


def exchange(port: int, kind: Kind, target: str, bound: float) -> Outcome:
    """Send kind's request; read the answer until it is whole or the proxy
    closes. More than `bound` seconds without either fails the test."""
    t0 = time.monotonic()
    c = Client(port, timeout=bound)
    try:
        c.send(kind.request(target))
        try:
            head = c._read_until(b"\r\n\r\n")
        except ConnectionError:
            return Outcome(None, False, b"", c.buf, time.monotonic() - t0)
        out = Outcome(int(head.split(b" ", 2)[1]), False, head, b"", 0.0)
        try:
            if out.status == 101:
                c.send(b"ping")
                out.body = c._read_exact(9)
                out.complete = out.body == b"echo:ping"
            elif out.header("transfer-encoding") == "chunked":
                while True:
                    size = int(c._read_until(b"\r\n").split(b";")[0], 16)
                    if size == 0:
                        c._read_until(b"\r\n")
                        break
                    out.body += c._read_exact(size)
                    c._read_exact(2)
                out.complete = True
            else:
                out.body = c._read_exact(int(out.header("content-length")))
                out.complete = True
        except ConnectionError:
            out.body += c.buf
        out.elapsed = time.monotonic() - t0
        return out
    except TimeoutError:
        raise AssertionError(f"{kind.name}: neither an answer nor a close within {bound}s") from None
    finally:
        c.close()


def body_ok(kind: Kind, out: Outcome, target: str) -> bool:
    if kind.name == "post":
        try:
            return json.loads(out.body)["body_len"] == len(b"hello world")
        except ValueError:
            return False
    if kind.name == "cached":
        return out.body == bytes(i * 7 % 251 for i in range(CACHE_BODY_LEN))
    if kind.name == "ws":
        return out.body == b"echo:ping"
    return out.body == b"x" * int(target.rsplit("/", 1)[1])


def _gauge(m: dict, name: str) -> float:
    return sum(v for k, v in m.items() if k == name or k.startswith(name + "{"))


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


class Rig:
    """The module's proxy, its two fault proxies and origins."""

    def __init__(self, tmp: Path):
        ca = CA()
        cc = ca.issue("backend.test").write(str(tmp), "backend")
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(cc.cert, cc.key)
        self.origin = Origin().start()
        self.tls_origin = Origin(ssl_context=ctx).start()
        self.fp = FaultProxy(self.origin.port).start()
        self.tls_fp = FaultProxy(self.tls_origin.port).start()
        self.admin_port = free_port()
        pool = "keepalive = 0\nretries = 0\npassive.failures = 0\n"  # every request meets the fault
        body = (server_section(tmp, admin_port=self.admin_port)
                + f"[timeout]\nconnect = {CONNECT_TIMEOUT}\nread = {READ_TIMEOUT}\nsend = 2.0\n"
                  "header = 5.0\nkeepalive = 5.0\n\n"
                + f'[cache]\npath = "{tmp / "cache"}"\nmax_size = "64MiB"\nmax_object = "1MiB"\n\n'
                + '[[route]]\npath = "/"\npool = "plain"\n\n'
                + '[[route]]\npath = "/cache/"\npool = "plain"\ncache = true\n\n'
                + '[[route]]\nhost = "tls.test"\npath = "/"\npool = "secure"\n\n'
                + f'[pool.plain]\nbackends = ["http://127.0.0.1:{self.fp.port}"]\n{pool}\n'
                + f'[pool.secure]\nbackends = ["https://127.0.0.1:{self.tls_fp.port}"]\n{pool}'
                + f'tls.ca = "{ca.write(str(tmp), "ca")}"\ntls.server_name = "backend.test"\n')
        self.proxy = start_proxy(tmp, body)
        wait_until(lambda: _connectable(self.admin_port), what="admin listener")
        self.workers = [w["pid"] for w in status(self.admin_port)["workers"]]
        assert len(self.workers) == 1
        self.rss_base = _rss_kib(self.workers[0])

    def fault_proxy(self, kind: Kind) -> FaultProxy:
        return self.tls_fp if kind.name == "https" else self.fp

    def stop(self) -> None:
        self.proxy.stop()
        for x in (self.fp, self.tls_fp, self.origin, self.tls_origin):
            x.stop()

    def settled(self):
        m = metrics(self.admin_port)
        return (_gauge(m, "edgeproxy_client_connections") == 0
                and _gauge(m, "edgeproxy_backend_active_requests") == 0
                and _gauge(m, "edgeproxy_upstream_connections") == 0) and m

    def check_whole(self, what: str) -> None:
        """Nothing left counted, the same worker, RSS bounded."""
        try:
            wait_until(self.settled, timeout=10, what=f"{what}: gauges back to zero")
        except AssertionError:
            m = metrics(self.admin_port)
            gauges = {k: v for k, v in m.items() if "connections" in k or "active" in k}
            raise AssertionError(f"{what}: gauges not back to zero: {gauges}") from None
        assert self.proxy.proc.poll() is None, f"{what}: the supervisor exited"
        assert [w["pid"] for w in status(self.admin_port)["workers"]] == self.workers, \
            f"{what}: the worker was replaced:\n{self.proxy.log()[-3000:]}"
        growth = _rss_kib(self.workers[0]) - self.rss_base
        assert growth < RSS_GROWTH_MAX_KIB, f"{what}: the worker's RSS grew by {growth >> 10} MiB"


@pytest.fixture(scope="module")
def rig(tmp_path_factory):
    r = Rig(tmp_path_factory.mktemp("faults"))
    yield r
    r.stop()


def _cases():
    for fault in FAULTS:
        for kind in KINDS:
            marks = [pytest.mark.xfail(strict=True, reason=XFAIL[fault, kind])] \
                if (fault, kind) in XFAIL else []
            yield pytest.param(fault, kind, id=f"{fault}-{kind}", marks=marks)


@pytest.mark.parametrize("fault_name,kind_name", list(_cases()))
def test_fault(rig, fault_name, kind_name):
    kind = KINDS[kind_name]
    make_fault, expected = FAULTS[fault_name]
    fp = rig.fault_proxy(kind)
    target = kind.target.format(case=f"{fault_name}-{time.monotonic_ns()}")
    fault = make_fault(kind)
    if fault_name == "trickle" and kind.name == "https":
        # the proxy's read timeout counts decrypted reads: a TLS record must
        # arrive whole within it, so on a busy machine trickle faster (a
        # record of /size/300 in well under READ_TIMEOUT)
        target = "/size/300"
        fault = Fault.trickle("down", 0.0002)
    accepted = fp.accepted
    fp.set(fault)
    try:
        out = exchange(rig.proxy.port, kind, target,
                       bound=(CONNECT_TIMEOUT + 6) if kind.name == "https" else (READ_TIMEOUT + 5))
    finally:
        fp.set(Fault.passing())
    seen = out.seen()
    assert seen in expected, f"expected {expected}, got {seen}: {out.head[:200]!r} {out.body[:100]!r}"
    assert fp.accepted > accepted, "the request never went through the fault proxy"
    if seen == "ok":
        assert body_ok(kind, out, target), out.body[:200]
    if seen == "cut":
        assert not body_ok(kind, out, target)
    # before the fault proxy lets go of what it holds: the proxy must have
    # closed its side of a stalled or unread connection by itself
    rig.check_whole(f"{fault_name}-{kind_name}")
    fp.drop_all()
    if kind.name == "cached":
        # the store commits off the loop thread: give a wrong commit time to land
        time.sleep(0.5)
        for _ in range(20):
            again = exchange(rig.proxy.port, kind, target, bound=10)
            assert again.seen() == "ok" and body_ok(kind, again, target), again.head
            cache_status = again.header("cache-status") or ""
            if seen != "ok":
                assert "hit" not in cache_status, f"a faulted response was stored: {cache_status}"
                break
            if "hit" in cache_status:    # stored whole, served whole
                break
            time.sleep(0.1)
        else:
            raise AssertionError(f"a whole response was never served from the cache: {cache_status}")
        rig.check_whole(f"{fault_name}-{kind_name}, then again")


def test_the_worker_serves_every_kind_after_the_matrix(rig):
    """Run last: the same worker still answers each kind cleanly, and its
    log holds no traceback."""
    for kind in KINDS.values():
        target = kind.target.format(case=f"after-{time.monotonic_ns()}")
        out = exchange(rig.proxy.port, kind, target, bound=10)
        assert out.seen() == "ok" and body_ok(kind, out, target), (kind.name, out.head)
    rig.check_whole("after the matrix")
    log = rig.proxy.log()
    assert "Traceback" not in log and "died" not in log, log[-3000:]


def test_fault_proxy_faults_do_what_they_say():
    """The fault proxy itself, against the plain origin without edgeproxy:
    a cut after n bytes delivers exactly n, a stall delivers n and holds."""
    origin = Origin().start()
    fp = FaultProxy(origin.port).start()
    try:
        req = b"GET /size/1000 HTTP/1.1\r\nHost: a\r\n\r\n"
        fp.set(Fault.cut("down", 100))
        with socket.create_connection(("127.0.0.1", fp.port), timeout=5) as s:
            s.sendall(req)
            got = b""
            while data := s.recv(4096):
                got += data
        assert len(got) == 100 and got.startswith(b"HTTP/1.1 200")
        fp.set(Fault.stall("down", 100))
        with socket.create_connection(("127.0.0.1", fp.port), timeout=5) as s:
            s.sendall(req)
            got = b""
            s.settimeout(1.0)
            with pytest.raises(TimeoutError):
                while data := s.recv(4096):
                    got += data
            assert len(got) == 100
        fp.drop_all()
    finally:
        fp.stop()
        origin.stop()
