"""Nothing lost under faults (issue 19, the core's share), over real
processes and sockets: reloads under clients that never retry, local
resource errors, pipelined requests after an error answer, request bodies
and 1xx responses that never end, and passive ejection that never takes a
pool down."""

from __future__ import annotations

import http.client
import os
import random
import resource
import signal
import socket
import threading
import time

import pytest
from harness import Client, Origin, free_port, simple_config
from ops_support import start, status, wait_until


class PlainClients:
    """http.client clients that never retry: `keepalive` ones reusing their
    connection with a random think time (0-400 ms) between requests, and
    `fresh` ones opening a connection per request.  Any exception or
    unexpected answer is a failure."""

    def __init__(self, port: int, keepalive: int = 12, fresh: int = 2, think: float = 0.4):
        self.port = port
        self.think = think
        self.stop = threading.Event()
        self.ok = 0
        self.failures: list[str] = []
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self._run, args=(True, i)) for i in range(keepalive)]
        self.threads += [threading.Thread(target=self._run, args=(False, i)) for i in range(fresh)]

    def _run(self, keep: bool, seed: int) -> None:
        rnd = random.Random(seed)
        conn = None
        while not self.stop.is_set():
            try:
                if conn is None:
                    conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
                conn.request("GET", "/size/100", headers={} if keep else {"Connection": "close"})
                r = conn.getresponse()
                body = r.read()
                if r.status != 200 or body != b"x" * 100:
                    raise AssertionError(f"status {r.status}, {len(body)} bytes")
                with self.lock:
                    self.ok += 1
                if not keep or r.will_close:
                    conn.close()
                    conn = None
            except Exception as exc:
                with self.lock:
                    self.failures.append(f"{type(exc).__name__}: {exc}")
                if conn is not None:
                    conn.close()
                conn = None
            self.stop.wait(rnd.uniform(0, self.think) if keep else 0.01)
        if conn is not None:
            conn.close()

    def __enter__(self):
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        for t in self.threads:
            t.join(15)


def test_reloads_lose_nothing_with_clients_that_do_not_retry(proxy_factory, tmp_path, origin):
    # default timeouts: the worker's ticker runs once a second, so its clock
    # lags the loop's by up to a second
    proxy, admin_port = start(proxy_factory, tmp_path, origin.url, admin=True)
    with PlainClients(proxy.port) as load:
        wait_until(lambda: load.ok > 40, what="traffic")
        for gen in (2, 3, 4):
            old = {w["pid"] for w in status(admin_port)["workers"]}
            proxy.proc.send_signal(signal.SIGHUP)
            wait_until(lambda gen=gen: status(admin_port)["generation"] == gen, what=f"reload to {gen}")
            wait_until(lambda old=old: not old & {w["pid"] for w in status(admin_port)["workers"]},
                       what=f"the old worker to drain (reload to {gen})")
            seen = load.ok
            wait_until(lambda seen=seen: load.ok > seen + 40, what="traffic after the reload")
            time.sleep(0.3)
    assert load.failures == [], (len(load.failures), load.ok, load.failures[:5])
    assert load.ok > 200


# ---- a pipelined request after an error answer ----------------------------

def two_pools(origin_url: str, dead_url: str, extra: str = "") -> str:
    return (f'[[route]]\npath = "/dead/"\npool = "dead"\n\n[[route]]\npath = "/"\npool = "web"\n\n'
            f'[pool.dead]\nbackends = ["{dead_url}"]\n\n[pool.web]\nbackends = ["{origin_url}"]\n\n'
            f'{extra}')


@pytest.mark.parametrize("first", ["/dead/refused", "/reset"])
def test_pipelined_request_after_a_502_is_answered_at_once(proxy_factory, origin, first):
    # the first request fails after its head was parsed (connect refused, or
    # the backend resets): its 502 keeps the connection, and the request
    # pipelined behind it is answered at once, not after timeout.keepalive
    p = proxy_factory(two_pools(origin.url, f"http://127.0.0.1:{free_port()}"))
    with Client(p.port, timeout=8) as c:
        t = time.monotonic()
        c.send(f"GET {first} HTTP/1.1\r\nHost: a\r\n\r\n"
               "GET /size/3 HTTP/1.1\r\nHost: a\r\n\r\n".encode())
        r1 = c.read_response()
        r2 = c.read_response()
        assert (r1.status, r1.header("connection")) == (502, None)
        assert (r2.status, r2.body) == (200, b"xxx")
        assert time.monotonic() - t < 5
        assert c.request("GET", "/size/2").body == b"xx"     # and the connection goes on


# ---- bodies and interim responses that never end ---------------------------

class RawBackend:
    """A backend that runs `handler(conn)` on a thread for each connection it
    accepts, and records when each connection reached EOF from the proxy."""

    def __init__(self, handler):
        self.handler = handler
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.eof = threading.Event()     # some connection saw the proxy close it
        self.conns: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.conns.append(conn)
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        conn.settimeout(20)
        try:
            self.handler(conn)
            while conn.recv(65536):
                pass
            self.eof.set()
        except OSError:
            self.eof.set()

    def close(self) -> None:
        self.sock.close()
        for c in self.conns:
            c.close()


def read_head(conn: socket.socket) -> bytes:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = conn.recv(65536)
        if not chunk:
            raise ConnectionError("closed before a head")
        data += chunk
    return data


@pytest.fixture
def raw_backend():
    made = []

    def make(handler):
        made.append(RawBackend(handler))
        return made[-1]

    yield make
    for b in made:
        b.close()


def test_a_request_body_that_never_comes_is_timed_out(proxy_factory, raw_backend):
    backend = raw_backend(read_head)     # takes the head, then waits for the body
    p = proxy_factory(simple_config(backend.url, "[timeout]\nbody = 1.0\n"))
    with Client(p.port, timeout=8) as c:
        t = time.monotonic()
        c.send(b"POST /upload HTTP/1.1\r\nHost: a\r\nContent-Length: 10\r\n\r\n")
        r = c.read_response()
        assert r.status == 408 and r.header("connection") == "close"
        assert time.monotonic() - t < 5
        assert c.is_closed()
    assert backend.eof.wait(5)           # the backend connection was let go too
    assert "no request body for 1.0s" in p.log()


def test_a_body_trickling_in_is_timed_between_reads(proxy_factory, origin):
    # two pieces 0.6 s apart with timeout.body = 1: not a timeout
    p = proxy_factory(simple_config(origin.url, "[timeout]\nbody = 1.0\n"))
    with Client(p.port, timeout=8) as c:
        c.send(b"POST /echo HTTP/1.1\r\nHost: a\r\nContent-Length: 6\r\n\r\n")
        for piece in (b"ab", b"cd", b"ef"):
            time.sleep(0.6)
            c.send(piece)
        r = c.read_response()
    assert r.status == 200 and r.json()["body_len"] == 6


def _no_continue(conn: socket.socket) -> None:
    # a backend that ignores "Expect: 100-continue" but reads the body when it comes
    head = read_head(conn)
    n = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
    body = head.split(b"\r\n\r\n", 1)[1]
    while len(body) < n:
        body += conn.recv(65536)
    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))


def test_a_backend_that_never_answers_100_continue_gets_the_body_anyway(proxy_factory, raw_backend):
    backend = raw_backend(_no_continue)
    p = proxy_factory(simple_config(backend.url))
    with Client(p.port, timeout=8) as c:
        t = time.monotonic()
        c.send(b"POST /up HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\nContent-Length: 4\r\n\r\n")
        assert c._read_until(b"\r\n\r\n").startswith(b"HTTP/1.1 100 Continue")
        assert time.monotonic() - t < 5
        c.send(b"body")
        r = c.read_response()
    assert (r.status, r.body) == (200, b"body")


def _interim(count: int, every: float, final: bool):
    def handler(conn: socket.socket) -> None:
        read_head(conn)
        for _ in range(count):
            conn.sendall(b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>; rel=preload\r\n\r\n")
            time.sleep(every)
        if final:
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
    return handler


def test_interim_responses_do_not_extend_the_read_timeout(proxy_factory, raw_backend):
    # a 103 every 0.4 s for 8 s: the read timeout (1 s) covers the whole wait
    # for the final response, so it is a 504 long before the 103s stop
    backend = raw_backend(_interim(20, 0.4, True))
    p = proxy_factory(simple_config(backend.url, "[timeout]\nread = 1.0\n"))
    with Client(p.port, timeout=10) as c:
        t = time.monotonic()
        r = c.request("GET", "/")
        assert r.status == 504
        assert time.monotonic() - t < 3.5
    assert backend.eof.wait(5)


def test_an_interim_response_storm_is_a_502(proxy_factory, raw_backend):
    backend = raw_backend(_interim(12, 0, True))
    p = proxy_factory(simple_config(backend.url))
    with Client(p.port, timeout=8) as c:
        r = c.request("GET", "/")
    assert r.status == 502 and len(r.interim) == 10
    assert "more than 10 interim responses" in p.log()


# ---- passive ejection never takes a pool down -------------------------------

def pool_config(urls: list[str], extra: str = "") -> str:
    listed = ", ".join(f'"{u}"' for u in urls)
    return f'[[route]]\npath = "/"\npool = "web"\n\n[pool.web]\nbackends = [{listed}]\n{extra}\n'


def get(port: int, target: str) -> int:
    with Client(port, timeout=10) as c:
        return c.request("GET", target).status


def test_requests_dropped_on_purpose_do_not_eject_the_only_backend(proxy_factory, origin):
    # the RFC 9111 conformance run: its origin drops the connection on
    # purpose for six tests that start together; the rest must go on
    p = proxy_factory(pool_config([origin.url]))
    got = []
    threads = [threading.Thread(target=lambda i=i: got.append(get(p.port, f"/reset/{i}")))
               for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(15)
    assert got == [502] * 6
    assert [get(p.port, f"/size/{i}") for i in range(20)] == [200] * 20
    log = p.log()
    assert "ejected for" not in log
    assert "not ejected: it is the last available backend of the pool" in log


def test_a_path_that_resets_does_not_take_the_other_paths_down(proxy_factory, origin):
    """The issue's case: 20 concurrent requests to one path the backend
    resets, beside steady traffic to other paths: those see no 503."""
    p = proxy_factory(pool_config([origin.url]))
    stop = threading.Event()
    others: list[int] = []

    def steady(k: int) -> None:
        i = 0
        while not stop.is_set() and i < 200:
            others.append(get(p.port, f"/size/{k * 1000 + i}"))
            i += 1

    background = [threading.Thread(target=steady, args=(k,)) for k in range(3)]
    for t in background:
        t.start()
    reset: list[int] = []
    burst = [threading.Thread(target=lambda: reset.append(get(p.port, "/reset/one")))
             for _ in range(20)]
    for t in burst:
        t.start()
    for t in burst:
        t.join(15)
    time.sleep(0.3)               # traffic after the burst too
    stop.set()
    for t in background:
        t.join(15)
    assert reset == [502] * 20
    assert others and set(others) == {200}, sorted(set(others))
    assert "ejected for" not in p.log()


def test_one_request_that_a_backend_drops_is_not_a_backend_failure(proxy_factory):
    # the same request, dropped by both backends again and again, says
    # nothing about them: no ejection
    a, b = Origin().start(), Origin().start()
    try:
        p = proxy_factory(pool_config([a.url, b.url], "passive.failures = 2"))
        assert [get(p.port, "/reset/same") for _ in range(6)] == [502] * 6
        assert [get(p.port, f"/size/{i}") for i in range(6)] == [200] * 6
        assert len(a.requests) >= 6 and len(b.requests) >= 6   # both kept their share
        assert "ejected" not in p.log() and "failed 2 times" not in p.log()
    finally:
        a.stop()
        b.stop()


def test_a_backend_that_drops_different_requests_is_still_ejected(proxy_factory, origin):
    from pool_origins import ResetServer
    rst = ResetServer(read_first=True)      # resets every connection after reading its request
    try:
        p = proxy_factory(pool_config([rst.url, origin.url], "passive.failures = 3"))
        for i in range(12):
            get(p.port, f"/size/{i}")
        assert f"backend 127.0.0.1:{rst.port} ejected for 10.0s after 3 failures" in p.log()
        assert [get(p.port, f"/size/{i}") for i in range(6)] == [200] * 6
    finally:
        rst.stop()


def test_ejection_takes_at_most_max_ejected_of_a_pool(proxy_factory, origin):
    dead = [f"http://127.0.0.1:{free_port()}" for _ in range(3)]     # connect refused
    p = proxy_factory(pool_config([*dead, origin.url], "passive.failures = 2"))   # max_ejected: 0.5
    for i in range(30):
        get(p.port, f"/size/{i}")
    log = p.log()
    assert log.count("ejected for 10.0s") == 2, log           # half of four backends
    assert "not ejected: 2 of 4 backends are ejected already (max_ejected 0.5)" in log


# ---- this host out of descriptors -------------------------------------------

def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


@pytest.mark.parametrize("loop", ["uvloop", "asyncio"])
def test_running_out_of_descriptors_never_counts_against_a_backend(proxy_factory, loop):
    a, b = Origin().start(), Origin().start()
    conns: list[socket.socket] = []
    try:
        # one failure would eject a backend, if this host's errors counted (and the
        # worker would stop accepting before it runs out, without fd_reserve = 0)
        p = proxy_factory("[server]\nfd_reserve = 0\n"
                          + pool_config([a.url, b.url], "passive.failures = 1"),
                          args=("--no-supervisor",), env={"EDGEPROXY_LOOP": loop})
        pid = p.proc.pid
        time.sleep(0.3)                  # the start-up probe connection is gone
        soft, hard = resource.prlimit(pid, resource.RLIMIT_NOFILE)
        limit = open_fds(pid) + 4
        resource.prlimit(pid, resource.RLIMIT_NOFILE, (limit, hard))
        try:
            # client connections until the proxy has no descriptor left
            for _ in range(40):
                if open_fds(pid) >= limit:
                    break
                conns.append(socket.create_connection(("127.0.0.1", p.port), timeout=3))
                time.sleep(0.05)
            assert open_fds(pid) >= limit
            extra = socket.create_connection(("127.0.0.1", p.port), timeout=3)  # meets it at accept
            time.sleep(1.2)                  # the worker's ticker looks once a second
            answers = []
            for c in conns:
                try:
                    c.sendall(b"GET /size/1 HTTP/1.1\r\nHost: a\r\n\r\n")
                    answers.append(c.recv(4096).split(b"\r\n")[0])
                except OSError as exc:
                    answers.append(type(exc).__name__.encode())
            assert b"HTTP/1.1 503 Service Unavailable" in answers, answers
        finally:
            resource.prlimit(pid, resource.RLIMIT_NOFILE, (soft, hard))
        for c in conns + [extra]:
            c.close()
        # it recovers at once, on both backends: neither was ejected
        assert [get(p.port, f"/size/{i}") for i in range(4)] == [200] * 4
        assert a.requests and b.requests
        log = p.log()
        assert "ejected" not in log and "retrying on backend" not in log, log[-3000:]
        assert "connect failed: [Errno 24] Too many open files: this host is out of descriptors" in log
        assert "no descriptor left, new connections are closed at accept" in log \
            or "accept failed: Too many open files" in log
        assert log.count("this host is out of descriptors") <= 6     # rate-limited
    finally:
        a.stop()
        b.stop()
