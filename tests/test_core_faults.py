"""Nothing lost under faults (issue 19, the core's share), over real
processes and sockets: reloads under clients that never retry, local
resource errors, pipelined requests after an error answer, request bodies
and 1xx responses that never end, and passive ejection that never takes a
pool down."""

from __future__ import annotations

import http.client
import random
import signal
import threading
import time

import pytest
from harness import Client, free_port
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
