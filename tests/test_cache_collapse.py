"""Collapsing concurrent cache misses across worker processes: the claims of
edgeproxy/cache/fills.py between real processes, and real proxies with two
workers in front of an origin that counts its requests. Which worker took a
connection is read from /proc (the socket's inode among the worker's fds)."""

from __future__ import annotations

import os
import re
import signal
import socketserver
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import pytest
from harness import ROOT, Client, free_port
from test_cache_proxy import FRESH, cache_config, wait_for

from edgeproxy.cache.fills import FILLS_FILE, SLOTS, Claim, FillLocks, key_hash
from edgeproxy.cache.keys import cache_key

pytestmark = pytest.mark.skipif(not Path("/proc/net/tcp").exists(), reason="needs Linux /proc")


def key(target: str) -> bytes:
    return cache_key(b"http", b"example.test", target.encode())


def worker_pids(proxy) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(proxy.proc.pid)], capture_output=True, text=True,
                         check=False).stdout
    return sorted(int(p) for p in out.split())


def _inodes_by_peer_port(port: int) -> dict[int, int]:
    """Client port -> inode of the proxy's side of each TCP connection to port."""
    found = {}
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        f = line.split()
        local, remote, inode = f[1], f[2], int(f[9])
        if int(local.split(":")[1], 16) == port and inode:
            found[int(remote.split(":")[1], 16)] = inode
    return found


def owners(proxy, clients: list[Client], timeout: float = 5.0) -> list[int]:
    """The pid of the worker that accepted each client's connection."""
    pids = worker_pids(proxy)
    deadline = time.monotonic() + timeout
    while True:
        by_port = _inodes_by_peer_port(proxy.port)
        held = {}
        for pid in pids:
            for fd in Path(f"/proc/{pid}/fd").iterdir():
                try:
                    link = os.readlink(fd)
                except OSError:
                    continue
                if link.startswith("socket:["):
                    held[int(link[8:-1])] = pid
        out = [held.get(by_port.get(c.sock.getsockname()[1], -1)) for c in clients]
        if all(out) or time.monotonic() > deadline:
            assert all(out), "some connections were not accepted by a worker"
            return out
        time.sleep(0.02)


def connect_to_both(proxy, n: int) -> tuple[list[Client], list[int]]:
    """n connections, half of them to each of the two workers (the kernel
    hands a connection to whichever worker accepts first, so open more and
    keep what is needed)."""
    by_pid: dict[int, list[Client]] = {}
    for _ in range(20):
        batch = [Client(proxy.port) for _ in range(10)]
        for c, pid in zip(batch, owners(proxy, batch), strict=True):
            by_pid.setdefault(pid, []).append(c)
        if len(by_pid) == 2 and all(len(cs) >= (n + 1) // 2 for cs in by_pid.values()):
            break
    else:
        pytest.fail(f"could not spread {n} connections over the workers: "
                    f"{ {pid: len(cs) for pid, cs in by_pid.items()} }")
    first, second = by_pid.values()
    chosen = first[:(n + 1) // 2] + second[:n // 2]
    spare = first[(n + 1) // 2:] + second[n // 2:]
    for c in spare:
        c.close()
    return chosen, owners(proxy, chosen)


def send_all(clients: list[Client], target: str) -> list:
    """One GET of target on every client at once; the responses (or the error)."""
    results: list = [None] * len(clients)
    start = threading.Barrier(len(clients))

    def one(i):
        start.wait()
        try:
            results[i] = clients[i].request("GET", target)
        except (OSError, AssertionError) as exc:
            results[i] = exc
    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(clients))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(20)
    return results


def log_lines(proxy, pattern: str) -> list[tuple[int, str]]:
    """(pid, message) of the proxy's log lines matching pattern."""
    out = []
    for m in re.finditer(r"\[(\d+)\] edgeproxy\.cache: (?:cache: )?(.*)", proxy.log()):
        if re.search(pattern, m.group(2)):
            out.append((int(m.group(1)), m.group(2)))
    return out


class CuttingOrigin:
    """An origin whose first answer for a path breaks off (half the body,
    then close) after `delay`; later answers are whole and private."""

    def __init__(self, delay: float = 0.5):
        self.hits: Counter[str] = Counter()
        origin = self

        class Handler(socketserver.BaseRequestHandler):
            def handle(self):
                data = b""
                while b"\r\n\r\n" not in data:
                    got = self.request.recv(65536)
                    if not got:
                        return
                    data += got
                path = data.split(b" ", 2)[1].decode()
                origin.hits[path] += 1
                if origin.hits[path] == 1:
                    time.sleep(delay)
                    self.request.sendall(b"HTTP/1.1 200 OK\r\nCache-Control: max-age=60\r\n"
                                         b"Content-Length: 100\r\n\r\n" + b"c" * 50)
                    return
                body = b"whole " + path.encode()
                self.request.sendall(b"HTTP/1.1 200 OK\r\nCache-Control: private\r\n"
                                     b"Connection: close\r\nContent-Length: %d\r\n\r\n%s"
                                     % (len(body), body))

        class Server(socketserver.ThreadingTCPServer):
            daemon_threads = True
            request_queue_size = 64

        self.server = Server(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


# ---- the claims, between real processes ------------------------------------------

_HOLDER = """
import sys
from edgeproxy.cache.fills import FillLocks
f = FillLocks.open(sys.argv[1])
print(f.claim(sys.argv[2].encode(), 5.0).value, flush=True)
sys.stdin.read()
"""


def test_a_claim_is_seen_by_other_processes_and_dies_with_its_holder(tmp_path):
    path = str(tmp_path / FILLS_FILE)
    holder = subprocess.Popen([sys.executable, "-c", _HOLDER, path, "k1"], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True, cwd=ROOT,
                              env={**os.environ, "PYTHONPATH": str(ROOT)})
    fills = FillLocks.open(path)
    try:
        assert holder.stdout.readline().strip() == "own"
        assert fills.claim(b"k1", 5.0) is Claim.WAIT and fills.busy(b"k1")
        assert fills.claim(b"k1", 0.0) is Claim.NONE      # a fetch running too long: no wait
        # another key in the same slot: a collision, not a fetch of this key
        slot = key_hash(b"k1") % SLOTS
        other = next(k for k in (b"x%d" % i for i in range(1_000_000))
                     if key_hash(k) % SLOTS == slot)
        assert fills.claim(other, 5.0) is Claim.NONE and not fills.busy(other)
        assert fills.claim(b"k2", 5.0) is Claim.OWN         # other slots are free
        holder.kill()                                       # no release: the kernel drops it
        holder.wait(5)
        assert not fills.busy(b"k1")
        assert fills.claim(b"k1", 5.0) is Claim.OWN
        assert fills.claim(other, 5.0) is Claim.NONE       # this process holds that slot
        fills.release(b"k1")
        assert fills.claim(other, 5.0) is Claim.OWN and fills.held == 2
    finally:
        holder.kill()
        holder.wait(5)
        fills.close()


# ---- two workers, one origin request ---------------------------------------------

def test_fifty_misses_over_two_workers_make_one_origin_request(origin, proxy_factory, tmp_path):
    p = proxy_factory(cache_config(tmp_path, origin.url, workers=2))
    clients, pids = connect_to_both(p, 50)
    target = f"/cache/col2?{FRESH}&delay=0.5"
    results = send_all(clients, target)
    for c in clients:
        c.close()
    assert all(not isinstance(r, Exception) and r.status == 200 and r.body == b"col2 v0 "
               for r in results), results
    assert origin.hits["col2"] == 1
    # one worker fetched it; the other answered every request from that fetch
    by_worker = {pid: [r.header("cache-status") for r, o in zip(results, pids, strict=True)
                       if o == pid] for pid in set(pids)}
    leader = [pid for pid, st in by_worker.items() if any("stored" in s for s in st)]
    assert len(leader) == 1
    (other,) = set(pids) - set(leader)
    assert all(s.startswith("edgeproxy; hit") for s in by_worker[other]), by_worker[other]
    assert sum("collapsed" in s for s in by_worker[other]) >= len(by_worker[other]) - 1
    assert (other, f"another process fetches http://example.test{target}; waiting for its entry") \
        in log_lines(p, "another process fetches")


def test_not_storable_over_two_workers_every_request_goes_to_the_origin(origin, proxy_factory,
                                                                         tmp_path):
    p = proxy_factory(cache_config(tmp_path, origin.url, workers=2))
    clients, _ = connect_to_both(p, 10)
    results = send_all(clients, "/cache/priv?cc=private&delay=0.3")
    for c in clients:
        c.close()
    assert all(not isinstance(r, Exception) and r.body == b"priv v0 " and
               r.header("cache-status").endswith("detail=private") for r in results), results
    assert origin.hits["priv"] == 10


def test_waiters_go_to_the_origin_when_the_fetching_worker_dies(origin, proxy_factory, tmp_path):
    p = proxy_factory(cache_config(tmp_path, origin.url, workers=2))
    clients, pids = connect_to_both(p, 8)
    target = f"/cache/dies?{FRESH}&delay=1.5"
    lead = clients[0]
    leader, other = pids[0], next(pid for pid in pids if pid != pids[0])
    waiting = [c for c, pid in zip(clients, pids, strict=True) if pid == other]
    lead.send(f"GET {target} HTTP/1.1\r\nHost: example.test\r\n\r\n".encode())
    assert wait_for(lambda: origin.hits["dies"] == 1)
    # the leader's claim: a POSIX lock on the fills file, held by its process
    inode = os.stat(tmp_path / "cache" / FILLS_FILE).st_ino
    assert any(f"POSIX  ADVISORY  WRITE {leader} " in ln and f":{inode} " in ln
               for ln in Path("/proc/locks").read_text().splitlines())
    results: list = []
    threads = [threading.Thread(target=lambda c=c: results.append(c.request("GET", target)))
               for c in waiting]
    for t in threads:
        t.start()
    assert wait_for(lambda: any(pid == other for pid, _ in
                                log_lines(p, "another process fetches .*dies")))
    os.kill(leader, signal.SIGKILL)
    for t in threads:
        t.join(15)
    for c in clients:
        c.close()
    assert len(results) == len(waiting)
    assert all(r.status == 200 and r.body == b"dies v0 " and "fwd=uri-miss" in
               r.header("cache-status") for r in results), results
    assert origin.hits["dies"] == 1 + len(waiting)
    # released when the claim went away with the process, not after COLLAPSE_WAIT
    assert [pid for pid, _ in log_lines(p, "fetch of .*dies.* ended without")] == [other]
    assert not log_lines(p, "waited .* to fetch")


def test_waiters_go_to_the_origin_when_the_fetch_breaks_off(proxy_factory, tmp_path):
    with CuttingOrigin(delay=0.5) as cutting:
        p = proxy_factory(cache_config(tmp_path, cutting.url, workers=2))
        clients, pids = connect_to_both(p, 10)
        results = send_all(clients, "/cut")
        for c in clients:
            c.close()
        cut = [r for r in results if isinstance(r, Exception)]
        whole = [r for r in results if not isinstance(r, Exception)]
        assert len(cut) == 1                      # the leader's client saw the break
        assert all(r.status == 200 and r.body == b"whole /cut" for r in whole), [
            (r.status, r.headers, r.body[:60]) for r in whole if r.body != b"whole /cut"]
        assert cutting.hits["/cut"] == 10
        assert log_lines(p, "fetch of .*/cut ended without a fresh entry"), p.log()


def test_a_waiting_client_that_leaves_does_not_strand_the_next(origin, proxy_factory, tmp_path):
    p = proxy_factory(cache_config(tmp_path, origin.url, workers=2))
    clients, _ = connect_to_both(p, 4)
    lead, first, second = clients[0], clients[2], clients[3]     # [2:] in the other worker
    target = f"/cache/left?{FRESH}&delay=1.5"
    request = f"GET {target} HTTP/1.1\r\nHost: example.test\r\n\r\n".encode()
    lead.send(request)
    assert wait_for(lambda: origin.hits["left"] == 1)
    first.send(request)
    assert wait_for(lambda: log_lines(p, "another process fetches .*left"))
    first.close()                 # gone while waiting for the other worker's fetch
    r = second.request("GET", target)
    assert r.body == b"left v0 " and r.header("cache-status").endswith("collapsed")
    assert lead.read_response().body == b"left v0 "
    assert origin.hits["left"] == 1
    for c in clients:
        c.close()


# ---- the claim ends with the fetch, whatever its end ----------------------------------

def test_the_claim_is_released_on_every_outcome(origin, proxy_factory, tmp_path):
    dead = free_port()
    with CuttingOrigin(delay=0.1) as cutting:
        routes = f"""
[[route]]
path = "/down/"
pool = "down"
cache = true

[[route]]
path = "/cut/"
pool = "cutting"
cache = true

[pool.down]
backends = ["http://127.0.0.1:{dead}"]

[pool.cutting]
backends = ["{cutting.url}"]
"""
        p = proxy_factory(cache_config(tmp_path, origin.url) + routes)
        assert wait_for(lambda: (tmp_path / "cache" / FILLS_FILE).exists())
        fills = FillLocks.open(str(tmp_path / "cache" / FILLS_FILE))

        def claimable(target: str) -> bool:
            k = key(target)
            if fills.claim(k, 60.0) is not Claim.OWN:
                return False
            fills.release(k)
            return True

        try:
            cases = {
                "stored": (f"/cache/st?{FRESH}", 200),
                "not storable": ("/cache/ns?cc=private", 200),
                "backend error": ("/down/x", 502),
            }
            for target, status in cases.values():
                with Client(p.port) as c:
                    assert c.request("GET", target).status == status
                assert wait_for(lambda t=target: claimable(t)), target
            with Client(p.port) as c, pytest.raises(ConnectionError):
                c.request("GET", "/cut/a")                  # the response breaks off
            assert wait_for(lambda: claimable("/cut/a"))
            # the client leaves while its request is the one fetching
            target = f"/cache/gone?{FRESH}&delay=1"
            with Client(p.port) as c:
                c.send(f"GET {target} HTTP/1.1\r\nHost: example.test\r\n\r\n".encode())
                assert wait_for(lambda: origin.hits["gone"] == 1)
                assert fills.claim(key(target), 60.0) is Claim.WAIT     # held while fetching
            assert wait_for(lambda: claimable(target))
        finally:
            fills.close()


def test_without_the_fills_file_misses_still_collapse_within_a_worker(origin, proxy_factory,
                                                                      tmp_path):
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / FILLS_FILE).mkdir()     # cannot be opened as a file
    p = proxy_factory(cache_config(tmp_path, origin.url))
    assert wait_for(lambda: log_lines(p, "cannot open .*fills.*collapse within each worker only"))
    clients = [Client(p.port) for _ in range(10)]
    results = send_all(clients, f"/cache/nofills?{FRESH}&delay=0.3")
    for c in clients:
        c.close()
    assert all(not isinstance(r, Exception) and r.body == b"nofills v0 " for r in results)
    assert origin.hits["nofills"] == 1
