"""Helpers for the limit tests: a real redis-server (Debian's) on a free
loopback port, started and stopped by PID, and a bounded load loop that
counts statuses over keep-alive connections."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections import Counter
from pathlib import Path

from harness import Client, free_port

REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"


class RedisServer:
    def __init__(self, tmp_path: Path, port: int | None = None):
        self.port = port or free_port()
        self.dir = tmp_path / f"redis-{self.port}"
        self.dir.mkdir(exist_ok=True)
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        self.proc = subprocess.Popen(
            [REDIS_SERVER, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(self.dir), "--daemonize", "no"],
            stdout=open(self.dir / "log", "wb"), stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.ping():
                return self
            if self.proc.poll() is not None:
                raise RuntimeError((self.dir / "log").read_text())
            time.sleep(0.05)
        raise TimeoutError("redis-server did not answer")

    def ping(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as s:
                s.sendall(b"PING\r\n")
                return s.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)
        self.proc = None


def hammer(ports: list[int], seconds: float, *, per_port: int = 4, target: str = "/size/10",
           headers: dict | None = None, max_requests: int = 200_000) -> tuple[Counter, float]:
    """per_port keep-alive connections to each port, sending requests back
    to back for `seconds` (and at most max_requests in all); returns the
    statuses counted and the time from the first request sent to the last
    answer."""
    counts: Counter = Counter()
    lock = threading.Lock()
    stop_at = time.monotonic() + seconds
    sent = [0]
    first: list[float] = []       # when each thread sent its first request
    last: list[float] = []        # when each thread had its last answer

    def run(port: int) -> None:
        local: Counter = Counter()
        c = Client(port, timeout=10)
        t_last = 0.0
        try:
            while time.monotonic() < stop_at:
                with lock:
                    if sent[0] >= max_requests:
                        break
                    sent[0] += 1
                t = time.monotonic()
                if t_last == 0.0:
                    with lock:
                        first.append(t)
                r = c.request("GET", target, headers=headers)
                t_last = time.monotonic()
                local[r.status] += 1
                if r.header("connection") == "close":
                    c.close()
                    c = Client(port, timeout=10)
        finally:
            c.close()
            with lock:
                counts.update(local)
                if t_last:
                    last.append(t_last)

    threads = [threading.Thread(target=run, args=(p,)) for p in ports for _ in range(per_port)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(seconds + 30)
    # the time requests were under way (connecting and thread start-up left out)
    return counts, max(last) - min(first)

def concurrently(port: int, n: int, target: str):
    """n GET requests at once, each on its own connection: responses and times."""
    clients = [Client(port) for _ in range(n)]
    got: list = [None] * n
    took = [0.0] * n
    barrier = threading.Barrier(n)

    def one(i: int) -> None:
        barrier.wait()
        t0 = time.monotonic()
        got[i] = clients[i].request("GET", target)
        took[i] = time.monotonic() - t0

    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    for c in clients:
        c.close()
    return got, took
