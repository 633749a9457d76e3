"""Cache hits written from the LMDB map (ClientConn._send_parts): whole and
exact when the client reads slowly (the kernel takes part, the rest is
copied for the transport), when the entry is replaced and its pages reused
while a client is still reading, over HTTPS (where everything is copied),
and after the pinned read snapshot was renewed."""
from __future__ import annotations

import functools
import socket
import ssl
import time

import pytest
from harness import Client
from test_cache_hot import cli, counters, stored
from test_cache_proxy import cache_config, get, wait_for
from tlsutil import CA

LONG = "cc=public,max-age=600"
SIZE = 900_000            # four LMDB chunks (256 KiB each)


@functools.cache
def body_of(version: int, size: int = SIZE) -> bytes:
    """What the origin sends for /cache/<name>?len=size at that version."""
    return bytes((i * 7 + version) % 251 for i in range(size))


def slow_reader(port: int, target: str) -> socket.socket:
    """Send GET target on a socket with a tiny receive buffer and read nothing yet."""
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s.settimeout(10)
    s.connect(("127.0.0.1", port))
    s.sendall(f"GET {target} HTTP/1.1\r\nHost: example.test\r\nConnection: close\r\n\r\n".encode())
    return s


def read_all(s: socket.socket) -> bytes:
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 22)   # now read at full speed
    got = bytearray()
    while chunk := s.recv(65536):
        got += chunk
    s.close()
    return bytes(got)


@pytest.fixture
def big(origin, proxy_factory, tmp_path):
    return proxy_factory(cache_config(tmp_path, origin.url))


@pytest.mark.parametrize("hits_before", [1, 3], ids=["phase-hit", "hot-hit"])
def test_slow_reader_gets_the_entry_it_asked_for_while_it_is_replaced(big, origin, hits_before):
    target = f"/cache/zc?{LONG}&len={SIZE}"
    stored(big, target)
    for _ in range(hits_before):     # the second hit onward comes from the hot index
        r = get(big.port, target)
        assert r.header("cache-status").startswith("edgeproxy; hit") and r.body == body_of(0)
    slow = slow_reader(big.port, target)
    time.sleep(0.3)                  # the proxy wrote what the kernel took; the rest waits
    # Replace the entry, then store other large bodies so that LMDB has
    # every reason to reuse the old body's pages.
    origin.version["zc"] += 1
    out = cli(big, "purge", f"http://example.test{target}")
    assert "1" in out
    for i in range(6):
        stored(big, f"/cache/filler{i}?{LONG}&len={SIZE}", n=2 + i)
    r = get(big.port, target)
    assert "detail=" not in r.header("cache-status") and r.body == body_of(1)
    response = read_all(slow)
    head, _, body = response.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 ") and b"Cache-Status: edgeproxy; hit" in head
    assert len(body) == SIZE and body == body_of(0)


def test_hits_on_one_connection_stay_in_order_when_writes_queue(big, origin):
    """Pipelined hits: the first answer fills the socket, so the later ones
    must go behind it through the transport, not around it."""
    targets = [f"/cache/pipe{i}?{LONG}&len={SIZE}" for i in range(3)]
    for n, t in enumerate(targets, 1):
        stored(big, t, n=n)
        get(big.port, t)             # and into the hot index
    with Client(big.port) as c:
        # 2.7 MB asked for at once and not read for a while: more than the
        # socket buffers hold
        c.send(b"".join(f"GET {t} HTTP/1.1\r\nHost: example.test\r\n\r\n".encode()
                        for t in targets))
        time.sleep(0.3)
        for t in targets:
            r = c.read_response()
            assert r.status == 200 and r.header("cache-status").startswith("edgeproxy; hit"), t
            assert r.body == body_of(0)


def test_hits_over_https_are_whole(origin, proxy_factory, tmp_path):
    ca = CA()
    cc = ca.issue("a.test").write(str(tmp_path), "site")
    p = proxy_factory(cache_config(tmp_path, origin.url),
                      listen_lines=['', f'tls.certs = [{{ cert = "{cc.cert}", key = "{cc.key}" }}]'])
    ctx = ssl.create_default_context()
    ctx.load_verify_locations(cadata=ca.pem().decode())
    target = f"/cache/tls?{LONG}&len={SIZE}"
    with Client(p.ports[1], ssl_context=ctx, server_name="a.test") as c:
        r = c.request("GET", target, headers={"Host": "example.test"})
    assert "detail=" not in r.header("cache-status") and r.body == body_of(0)
    assert wait_for(lambda: counters(p)["stores"] >= 1, timeout=8.0)
    for _ in range(3):
        with Client(p.ports[1], ssl_context=ctx, server_name="a.test") as c:
            r = c.request("GET", target, headers={"Host": "example.test"})
        assert r.status == 200 and r.header("cache-status").startswith("edgeproxy; hit")
        assert r.body == body_of(0)


def test_hot_entries_survive_the_snapshot_renewal(big, origin):
    """The pinned snapshot is renewed every PIN_RENEW seconds; hot entries
    are moved to the new one and keep answering the same bytes."""
    from edgeproxy.cache.phase import PIN_RENEW
    target = f"/cache/renew?{LONG}&len=300000"
    stored(big, target)
    assert get(big.port, target).body == body_of(0, 300000)
    before = counters(big)["hot_hits"]
    # churn while the snapshot is renewed: new bodies, purged ones
    deadline = time.monotonic() + PIN_RENEW + 1.5
    i = 0
    while time.monotonic() < deadline:
        stored(big, f"/cache/churn{i}?{LONG}&len=200000", n=2 + i)
        cli(big, "purge", f"http://example.test/cache/churn{i}?{LONG}&len=200000")
        r = get(big.port, target)
        assert r.body == body_of(0, 300000)
        i += 1
    assert wait_for(lambda: counters(big)["hot_hits"] > before, timeout=8.0)
    for _ in range(5):
        r = get(big.port, target)
        assert r.header("cache-status").startswith("edgeproxy; hit")
        assert r.body == body_of(0, 300000)
