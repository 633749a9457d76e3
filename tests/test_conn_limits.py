"""Connection limits over real sockets: a listener's max_connections and
server.max_connections_per_ip (503 and close beyond them, counted in the
metrics, keyed on the PROXY header's client when there is one), and a
worker out of descriptors (RLIMIT_NOFILE lowered on the running process):
it does not spin on accept, and serves again once descriptors free up."""

from __future__ import annotations

import os
import resource
import socket
import time

import pytest
from harness import Client, free_port
from ops_support import metrics, wait_until

from edgeproxy.clientaddr import proxyproto as pp


def connect(port: int, source: str = "127.0.0.1", header: bytes = b"") -> socket.socket:
    s = socket.socket()
    s.settimeout(5)
    s.bind((source, 0))
    s.connect(("127.0.0.1", port))
    if header:
        s.sendall(header)
    return s


def refused_with_503(s: socket.socket) -> bool:
    """The proxy answered 503 with Connection: close and closed, unasked."""
    data = b""
    while True:
        try:
            d = s.recv(65536)
        except (ConnectionResetError, TimeoutError):
            break
        if not d:
            break
        data += d
    s.close()
    return data.startswith(b"HTTP/1.1 503 ") and b"\r\nConnection: close\r\n" in data


def works(s: socket.socket) -> bool:
    s.sendall(b"GET /size/3 HTTP/1.1\r\nHost: a\r\n\r\n")
    data = b""
    while not data.endswith(b"xxx"):
        d = s.recv(65536)
        if not d:
            return False
        data += d
    return data.startswith(b"HTTP/1.1 200 ")


def config(origin_url: str, server: str = "", admin_port: int | None = None) -> str:
    admin = f'admin = "127.0.0.1:{admin_port}"\n' if admin_port else ""
    return (f'[server]\n{admin}{server}\n\n[[route]]\npath = "/"\npool = "web"\n\n'
            f'[pool.web]\nbackends = ["{origin_url}"]\n')


def test_listener_max_connections(origin, proxy_factory):
    admin = free_port()
    p = proxy_factory(config(origin.url, admin_port=admin),
                      listen_lines=["max_connections = 3", ""])
    held = [connect(p.port) for _ in range(3)]
    assert all(works(s) for s in held)
    assert refused_with_503(connect(p.port))
    assert refused_with_503(connect(p.port))
    other = connect(p.ports[1])             # another listener has its own count
    assert works(other)
    held.pop().close()
    s = wait_until(lambda: (c := connect(p.port)) and (works(c) and c), what="room again")
    assert refused_with_503(connect(p.port))
    m = wait_until(lambda: (m := metrics(admin)).get(
        'edgeproxy_client_connections_refused_total{reason="max_connections"}', 0) >= 3 and m,
        what="the refused counter")
    assert m['edgeproxy_client_connections_refused_total{reason="max_connections_per_ip"}'] == 0
    for c in held + [s, other]:
        c.close()


def test_max_connections_per_ip(origin, proxy_factory):
    p = proxy_factory(config(origin.url, "max_connections_per_ip = 2"))
    a = [connect(p.port, "127.0.0.1") for _ in range(2)]
    assert all(works(s) for s in a)
    assert refused_with_503(connect(p.port, "127.0.0.1"))
    b = [connect(p.port, "127.0.0.2") for _ in range(2)]      # another address: its own count
    assert all(works(s) for s in b)
    assert refused_with_503(connect(p.port, "127.0.0.2"))
    a.pop().close()
    wait_until(lambda: (c := connect(p.port, "127.0.0.1")) and works(c) and (a.append(c) or True),
               what="room for 127.0.0.1 again")
    assert "connection refused (server.max_connections_per_ip reached)" in p.log()
    for s in a + b:
        s.close()


def test_per_ip_counts_the_client_a_proxy_header_names(origin, proxy_factory):
    p = proxy_factory(config(origin.url, "max_connections_per_ip = 2"),
                      listen_lines=['proxy_protocol = true\nproxy_protocol_from = ["127.0.0.1/32"]'])

    def via_lb(client: str) -> socket.socket:
        return connect(p.port, header=pp.header(2, client, 1000, "198.51.100.1", 443))

    one = [via_lb("192.0.2.1") for _ in range(2)]
    assert all(works(s) for s in one)
    assert refused_with_503(via_lb("192.0.2.1"))
    two = via_lb("192.0.2.2")          # same TCP peer, another client: not limited
    assert works(two)
    for s in one + [two]:
        s.close()


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


@pytest.mark.parametrize("loop", ["uvloop", "asyncio"])
def test_out_of_descriptors_the_worker_does_not_spin_and_recovers(origin, proxy_factory, loop):
    p = proxy_factory(config(origin.url), args=("--no-supervisor",), env={"EDGEPROXY_LOOP": loop})
    pid = p.proc.pid
    time.sleep(0.3)
    soft, hard = resource.prlimit(pid, resource.RLIMIT_NOFILE)
    limit = open_fds(pid) + 30
    conns: list[socket.socket] = []
    waiting: list[socket.socket] = []
    try:
        resource.prlimit(pid, resource.RLIMIT_NOFILE, (limit, hard))
        # connections (each with a request in flight to the origin: two descriptors)
        # until the worker stops taking them
        for _ in range(60):
            s = connect(p.port)
            s.sendall(b"GET /slow/30 HTTP/1.1\r\nHost: a\r\n\r\n")
            conns.append(s)
            time.sleep(0.03)
        wait_until(lambda: "not accepting new connections until some close" in p.log(),
                   what="the worker to stop accepting", timeout=5)
        # more clients keep coming while it is full: they wait in the listen queue
        waiting = [connect(p.port) for _ in range(20)]
        for s in waiting:
            s.sendall(b"GET /size/3 HTTP/1.1\r\nHost: a\r\n\r\n")
        cpu0, t0 = cpu_seconds(pid), time.monotonic()
        time.sleep(3.0)
        used = cpu_seconds(pid) - cpu0
        assert used < 0.3 * (time.monotonic() - t0), f"{used:.2f}s of CPU in 3s: spinning"
    finally:
        resource.prlimit(pid, resource.RLIMIT_NOFILE, (soft, hard))
    for s in conns:
        s.close()
    # descriptors free again: the clients that waited are served, and new ones too
    served = 0
    for s in waiting:
        try:
            served += works_after(s)
        except OSError:
            pass
        s.close()
    with Client(p.port) as c:
        assert c.request("GET", "/size/5").status == 200
    assert "descriptors free again: accepting new connections" in p.log()
    if loop == "uvloop":
        assert served == len(waiting), served     # none was dropped at accept


def works_after(s: socket.socket) -> bool:
    s.settimeout(8)
    data = b""
    while not data.endswith(b"xxx"):
        d = s.recv(65536)
        if not d:
            return False
        data += d
    return data.startswith(b"HTTP/1.1 200 ")


def test_config_errors_name_the_key():
    from edgeproxy.config import ConfigError, parse_config
    with pytest.raises(ConfigError) as e:
        parse_config('[server]\nmax_connections_per_ip = -1\nmax_pending_heads_per_ip = "x"\n'
                     '[[listen]]\nbind = "127.0.0.1:1"\nmax_connections = 1.5\n'
                     '[[route]]\npool = "w"\n[pool.w]\nbackends = ["http://127.0.0.1:2"]\n')
    msg = str(e.value)
    assert "server.max_connections_per_ip: -1 must be 0 or more" in msg
    assert "server.max_pending_heads_per_ip: expected an integer" in msg
    assert "listen[0].max_connections: expected an integer" in msg
