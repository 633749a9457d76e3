"""A worker's memory under slow clients, measured on the real worker
process: a client that reads slowly costs it a bounded buffer while it
stays (the client transport's high-water mark plus one read), and what
those buffers took goes back to the system after the clients leave
(edgeproxy.server.memory), crowd after crowd; a TLS connection does not
keep the size of the largest response it carried."""

from __future__ import annotations

import socket
import ssl
import time
from pathlib import Path

from harness import Client, simple_config
from tlsutil import CA

READERS = 100
PER_READER_KIB = 512         # measured: ~265 KiB each (was ~800 KiB with a 512 KiB high-water mark)
RETURNED_SLACK_KIB = 8 << 10   # measured: ~0 after a trim, 25 MiB kept without it


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def _slow_crowd(port: int, n: int) -> list[socket.socket]:
    socks = []
    for _ in range(n):
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16384)
        s.connect(("127.0.0.1", port))
        s.sendall(b"GET /big/%d HTTP/1.1\r\nHost: a\r\n\r\n" % (64 << 20))
        s.setblocking(False)
        socks.append(s)
    return socks


def _read_slowly(socks: list[socket.socket], seconds: float) -> None:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        for s in socks:
            try:
                s.recv(4096)
            except BlockingIOError:
                pass
        time.sleep(0.1)


def test_slow_readers_cost_a_bounded_buffer_that_is_returned(origin, proxy_factory):
    p = proxy_factory(simple_config(origin.url, "[timeout]\nread = 30\nsend = 30\n"),
                      args=("--no-supervisor",))     # the process is the worker
    with socket.create_connection(("127.0.0.1", p.port), timeout=5) as s:
        s.sendall(b"GET /size/10 HTTP/1.1\r\nHost: a\r\n\r\n")
        s.recv(1000)
    time.sleep(0.5)
    base = _rss_kib(p.proc.pid)
    # two crowds: glibc's first large buffers are mappings of their own, returned
    # when freed; the heap only serves (and keeps) them once its mmap threshold rose
    for crowd in range(2):
        socks = _slow_crowd(p.port, READERS)
        try:
            _read_slowly(socks, 2.5)
            during = _rss_kib(p.proc.pid) - base
            assert during < READERS * PER_READER_KIB, \
                f"crowd {crowd}: {READERS} slow readers took {during >> 10} MiB"
        finally:
            for s in socks:
                s.close()
        deadline = time.monotonic() + 10
        while _rss_kib(p.proc.pid) - base > RETURNED_SLACK_KIB and time.monotonic() < deadline:
            time.sleep(0.2)
        after = _rss_kib(p.proc.pid) - base
        assert after <= RETURNED_SLACK_KIB, \
            f"crowd {crowd}: {after >> 10} MiB still held after the readers left (during: {during >> 10} MiB)"
    assert p.proc.poll() is None


def test_idle_tls_connections_do_not_keep_their_largest_response(tmp_path, origin, proxy_factory):
    """100 keep-alive TLS connections, each after a 1 MiB response: they
    cost what idle TLS connections cost (measured ~30 KiB each; ~300 KiB
    when each response was encrypted into one growing memory BIO)."""
    ca = CA()
    cc = ca.issue("a.test").write(str(tmp_path), "site")
    p = proxy_factory(simple_config(origin.url),
                      listen_lines=[f'tls.certs = [{{ cert = "{cc.cert}", key = "{cc.key}" }}]\n'],
                      args=("--no-supervisor",))
    ctx = ssl.create_default_context(cadata=ca.pem().decode())
    with Client(p.port, ssl_context=ctx, server_name="a.test") as c:
        assert c.request("GET", "/size/10").status == 200
    time.sleep(0.5)
    base = _rss_kib(p.proc.pid)
    conns = []
    try:
        for _ in range(100):
            c = Client(p.port, ssl_context=ctx, server_name="a.test")
            conns.append(c)
            assert len(c.request("GET", f"/big/{1 << 20}").body) == 1 << 20
        time.sleep(1.5)          # past a heap trim of what the responses freed
        growth = _rss_kib(p.proc.pid) - base
        assert growth < 100 * 100, f"100 idle TLS connections hold {growth >> 10} MiB"
    finally:
        for c in conns:
            c.close()
