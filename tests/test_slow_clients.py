"""Slow clients over real sockets: timeout.header is a deadline for the
whole head (a client trickling a byte at a time does not extend it),
timeout.body limits each wait for body bytes, server.max_pending_heads_per_ip
caps unfinished heads per address, and 1,000 slowloris connections from one
address leave another client's latency and the worker's CPU time alone."""

from __future__ import annotations

import os
import resource
import socket
import statistics
import time

import pytest
from harness import free_port
from ops_support import metrics, wait_until


def config(origin_url: str, server: str = "", timeout: str = "", admin_port: int | None = None) -> str:
    admin = f'admin = "127.0.0.1:{admin_port}"\n' if admin_port else ""
    return (f'[server]\n{admin}{server}\n\n[timeout]\n{timeout}\n\n'
            f'[[route]]\npath = "/"\npool = "web"\n\n[pool.web]\nbackends = ["{origin_url}"]\n')


def connect(port: int, source: str = "127.0.0.1") -> socket.socket:
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.settimeout(5)
    s.bind((source, 0))
    s.connect(("127.0.0.1", port))
    return s


def trickle_until_answered(s: socket.socket, data: bytes, every: float, limit: float) -> tuple[bytes, float]:
    """Send data a byte every `every` seconds until the proxy answers or
    closes; (what it sent, seconds it took)."""
    s.setblocking(False)
    t = time.monotonic()
    i = 0
    got = b""
    while time.monotonic() - t < limit:
        try:
            d = s.recv(65536)
            if not d:
                break
            got += d
            if b"\r\n\r\n" in got:
                break
        except BlockingIOError:
            pass
        except ConnectionResetError:
            break
        try:
            s.send(data[i % len(data):i % len(data) + 1])
        except (BrokenPipeError, ConnectionResetError):
            pass
        i += 1
        time.sleep(every)
    return got, time.monotonic() - t


def test_the_header_timeout_is_a_deadline_for_the_whole_head(origin, proxy_factory):
    admin = free_port()
    p = proxy_factory(config(origin.url, timeout="header = 1.0", admin_port=admin))
    s = connect(p.port)
    got, took = trickle_until_answered(s, b"GET / HTTP/1.1\r\nX-Slow: " + b"a" * 1000, 0.1, 6)
    assert got.startswith(b"HTTP/1.1 408 "), got
    assert 0.8 < took < 2.6, took
    s.close()
    # the same on a kept-alive connection's second request
    s = connect(p.port)
    s.sendall(b"GET /size/2 HTTP/1.1\r\nHost: a\r\n\r\n")
    first = b""
    while not first.endswith(b"xx"):
        first += s.recv(65536)
    assert first.startswith(b"HTTP/1.1 200 ")
    time.sleep(0.5)
    got, took = trickle_until_answered(s, b"GET /size/2 HTTP/1.1\r\nX-Slow: " + b"a" * 1000, 0.1, 6)
    # (a later request's head: closed at the deadline; main answers no 408 there either)
    assert got in (b"", ) or got.startswith(b"HTTP/1.1 408 "), got
    assert 0.8 < took < 2.6, took
    s.close()
    wait_until(lambda: metrics(admin).get('edgeproxy_client_slow_total{part="header"}', 0) >= 1,
               what="the slow-header counter")


def test_the_body_timeout_limits_each_wait_for_body_bytes(origin, proxy_factory):
    p = proxy_factory(config(origin.url, timeout="body = 1.0"))
    s = connect(p.port)
    s.sendall(b"POST /echo HTTP/1.1\r\nHost: a\r\nContent-Length: 100\r\n\r\n")
    # bytes within the timeout keep it going...
    start = time.monotonic()
    for _ in range(5):
        time.sleep(0.3)
        s.sendall(b"x")
    # ...a stall does not
    t = time.monotonic()
    data = s.recv(65536)
    assert data.startswith(b"HTTP/1.1 408 "), data
    assert t - start > 1.4                       # longer than one timeout.body in all
    assert 0.5 < time.monotonic() - t < 3.0
    s.close()


def closed_at_once(s: socket.socket, wait: float = 2.0) -> bool:
    s.settimeout(wait)
    try:
        return s.recv(1) == b""
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


def test_max_pending_heads_per_ip(origin, proxy_factory):
    p = proxy_factory(config(origin.url, "max_pending_heads_per_ip = 3"))
    slow = [connect(p.port, "127.0.0.2") for _ in range(3)]
    for s in slow[:2]:
        s.sendall(b"GET / HTTP/1.1\r\nHost:")            # unfinished heads
    time.sleep(0.3)
    fourth = connect(p.port, "127.0.0.2")
    assert closed_at_once(fourth)                          # one unfinished head too many
    assert not closed_at_once(slow[0], 0.3)
    # another address is not limited by these
    with connect(p.port, "127.0.0.1") as other:
        other.sendall(b"GET /size/2 HTTP/1.1\r\nHost: a\r\n\r\n")
        assert other.recv(65536).startswith(b"HTTP/1.1 200 ")
    # a head that ends frees its place; an idle kept-alive connection holds none
    slow[2].sendall(b"GET /size/2 HTTP/1.1\r\nHost: a\r\n\r\n")
    assert slow[2].recv(65536).startswith(b"HTTP/1.1 200 ")
    fifth = connect(p.port, "127.0.0.2")
    assert not closed_at_once(fifth, 0.5)
    assert closed_at_once(connect(p.port, "127.0.0.2"))
    # the kept-alive one starting a new head is one too many now
    slow[2].sendall(b"GET /")
    assert closed_at_once(slow[2])
    assert "connection refused (server.max_pending_heads_per_ip reached)" in p.log()
    for s in slow + [fifth]:
        s.close()


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def latencies(port: int, n: int) -> list[float]:
    """n requests, each on a new connection from 127.0.0.1."""
    out = []
    for _ in range(n):
        t = time.perf_counter()
        with connect(port) as s:
            s.sendall(b"GET /size/100 HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
            data = b""
            while True:
                d = s.recv(65536)
                if not d:
                    break
                data += d
        assert data.startswith(b"HTTP/1.1 200 "), data[:100]
        out.append(time.perf_counter() - t)
    return out


SLOWLORIS = 1000


def test_a_thousand_slowloris_connections_beside_a_normal_client(origin, proxy_factory):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 2 * SLOWLORIS + 200:
        pytest.skip(f"RLIMIT_NOFILE hard limit {hard} is too low for {SLOWLORIS} connections")
    want = min(hard if hard != resource.RLIM_INFINITY else 65536, 8192)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, want), hard))   # inherited by the proxy
    conns: list[socket.socket] = []
    try:
        p = proxy_factory(config(origin.url, "max_pending_heads_per_ip = 100",
                                 "header = 10.0"), args=("--no-supervisor",))
        pid = p.proc.pid
        latencies(p.port, 20)                                  # warm up
        before = latencies(p.port, 60)
        # the attack: 1,000 connections from 127.0.0.2, each an unfinished head
        opened = 0
        for _ in range(SLOWLORIS):
            try:
                s = connect(p.port, "127.0.0.2")
                s.setblocking(False)
                s.send(b"GET / HTTP/1.1\r\nHost: a\r\nX-a: ")
                conns.append(s)
                opened += 1
            except OSError:
                pass
        assert opened >= 0.9 * SLOWLORIS
        cpu0, t0 = cpu_seconds(pid), time.monotonic()
        during = []
        rounds = 0
        while time.monotonic() - t0 < 3.0 and rounds < 40:
            rounds += 1
            time.sleep(0.05)
            # a byte on each connection still open (a slowloris keeps them alive)
            for s in conns:
                try:
                    s.send(b"b")
                except OSError:
                    pass
            during += latencies(p.port, 8)
        wall = time.monotonic() - t0
        cpu = cpu_seconds(pid) - cpu0
        after = latencies(p.port, 40)
        base = statistics.median(before + after)
        loaded = statistics.median(during)
        print(f"slowloris: median {base * 1e3:.2f} ms without, {loaded * 1e3:.2f} ms with "
              f"{opened} connections; worker CPU {cpu:.2f}s in {wall:.1f}s")
        # within 2x of the unloaded median (plus 2 ms for timer noise on a busy machine)
        assert loaded <= 2 * base + 0.002, (loaded, base)
        # the worker's CPU stays low: the normal client's requests plus a byte per
        # open slowloris connection and round; not a spin over 1,000 sockets
        assert cpu < 0.5 * wall, f"{cpu:.2f}s of CPU in {wall:.1f}s"
        # the cap held: only 100 unfinished heads stayed open, the rest were closed
        still = 0
        for s in conns:
            try:
                if s.recv(1) == b"":
                    continue
            except BlockingIOError:
                still += 1
            except OSError:
                pass
        assert still <= 100, still
        assert still >= 50, still
    finally:
        for s in conns:
            s.close()
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_slow_tls_handshakes_count_as_unfinished_heads(origin, proxy_factory, tmp_path):
    import ssl

    from tlsutil import CA
    root = CA("slow clients root")
    cert = root.issue("a.test", cn="a.test").write(tmp_path, "server")
    p = proxy_factory(config(origin.url, "max_pending_heads_per_ip = 3"),
                      listen_lines=[f'tls.certs = [{{ cert = "{cert.cert}", key = "{cert.key}" }}]'])
    # three connections that never finish their handshake (nothing sent at all)
    idle = [connect(p.port, "127.0.0.2") for _ in range(3)]
    time.sleep(0.3)
    assert closed_at_once(connect(p.port, "127.0.0.2"))
    ctx = ssl.create_default_context(cafile=root.write(tmp_path, "root"))
    with ctx.wrap_socket(connect(p.port, "127.0.0.1"), server_hostname="a.test") as s:
        s.sendall(b"GET /size/2 HTTP/1.1\r\nHost: a\r\n\r\n")
        assert s.recv(65536).startswith(b"HTTP/1.1 200 ")
    # a handshake that ends frees its place for the next
    idle.pop().close()
    time.sleep(0.3)
    with ctx.wrap_socket(connect(p.port, "127.0.0.2"), server_hostname="a.test") as s:
        s.sendall(b"GET /size/2 HTTP/1.1\r\nHost: a\r\n\r\n")
        assert s.recv(65536).startswith(b"HTTP/1.1 200 ")
    # (s is idle between requests now: not counted) two idle handshakes + one more
    extra = connect(p.port, "127.0.0.2")
    assert not closed_at_once(extra, 0.5)
    assert closed_at_once(connect(p.port, "127.0.0.2"))
    for s in idle + [extra]:
        s.close()
