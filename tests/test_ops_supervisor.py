"""The supervisor and its workers as real processes: shared sockets, a dead
worker replaced (after growing delays when replacements die at start-up,
until the supervisor gives up when none can start), graceful stop on
SIGTERM/SIGINT, SIGQUIT at once, start-up failures that exit non-zero with
one clear line, a worker's ticker that outlives a failing step."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest
from harness import ROOT, Client, free_port, simple_config, wait_port
from ops_support import json_lines, start, status, wait_until, worker_pids


def test_workers_serve_and_a_dead_worker_is_replaced(proxy_factory, tmp_path, origin):
    proxy, admin_port = start(proxy_factory, tmp_path, origin.url, workers=2, admin=True)
    pids = wait_until(lambda: len(worker_pids(admin_port)) == 2 and worker_pids(admin_port),
                      what="two workers")
    assert proxy.proc.pid not in pids
    for pid in pids:
        assert os.getppid() != pid and open(f"/proc/{pid}/stat").read().split()[3] == str(proxy.proc.pid)
    os.kill(pids[0], signal.SIGKILL)
    new = wait_until(lambda: (p := worker_pids(admin_port)) and len(p) == 2 and pids[0] not in p and p,
                     what="a replacement worker")
    assert pids[1] in new
    assert f"worker {pids[0]} died (killed by signal 9 (SIGKILL)); starting another" in proxy.log()
    assert status(admin_port)["worker_restarts"] == 1
    for _ in range(4):      # both workers answer on the shared socket
        with Client(proxy.port) as c:
            assert c.request("GET", "/size/10").status == 200


def test_a_worker_exit_code_is_logged(proxy_factory, tmp_path, origin):
    proxy, admin_port = start(proxy_factory, tmp_path, origin.url, admin=True)
    pid = worker_pids(admin_port)[0]
    os.kill(pid, signal.SIGUSR2)       # default action: the process ends by the signal
    wait_until(lambda: f"worker {pid} died (killed by signal {int(signal.SIGUSR2)} (SIGUSR2))"
               in proxy.log(), what="the death in the log")
    wait_until(lambda: worker_pids(admin_port) and pid not in worker_pids(admin_port),
               what="a replacement")
    with Client(proxy.port) as c:
        assert c.request("GET", "/size/3").body == b"xxx"


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_stop_signal_lets_requests_in_flight_finish(proxy_factory, tmp_path, origin, sig):
    proxy, _ = start(proxy_factory, tmp_path, origin.url)
    idle = Client(proxy.port)
    assert idle.request("GET", "/size/1").status == 200       # an idle keep-alive connection
    result = {}

    def slow():
        with Client(proxy.port) as c:
            result["r"] = c.request("GET", "/slow/1.5")

    t = threading.Thread(target=slow)
    t.start()
    wait_until(lambda: any(s.target == "/slow/1.5" for s in origin.requests), what="the request")
    proxy.proc.send_signal(sig)
    assert proxy.proc.wait(15) == 0
    t.join(5)
    r = result["r"]
    assert r.status == 200 and r.body == b"slow"
    assert r.header("connection") == "close"
    assert idle.is_closed()
    with pytest.raises(ConnectionRefusedError):
        Client(proxy.port)
    log = proxy.log()
    assert "stopping (grace 5s)" in log and "supervisor" in log and "stopped" in log


def test_grace_ends_a_request_that_does_not_finish(proxy_factory, tmp_path, origin):
    proxy, _ = start(proxy_factory, tmp_path, origin.url, server_extra="")
    proxy.config_path.write_text(proxy.config_path.read_text().replace("grace = 5", "grace = 0.5"))
    c = Client(proxy.port)
    c.send(b"GET /hang HTTP/1.1\r\nHost: a\r\n\r\n")
    wait_until(lambda: any(s.target == "/hang" for s in origin.requests), what="the request")
    proxy.proc.send_signal(signal.SIGHUP)          # take grace = 0.5
    wait_until(lambda: "reload: generation 2" in proxy.log(), what="the reload")
    c2 = Client(proxy.port)
    c2.send(b"GET /hang HTTP/1.1\r\nHost: a\r\n\r\n")
    wait_until(lambda: sum(s.target == "/hang" for s in origin.requests) == 2, what="request 2")
    proxy.proc.send_signal(signal.SIGTERM)
    assert proxy.proc.wait(15) == 0
    assert c2.is_closed()
    assert "still open after the timeout" in proxy.log()
    c.close()


def test_sigquit_exits_at_once(proxy_factory, tmp_path, origin):
    proxy, _ = start(proxy_factory, tmp_path, origin.url, server_extra="")
    proxy.config_path.write_text(proxy.config_path.read_text().replace("grace = 5", "grace = 60"))
    proxy.proc.send_signal(signal.SIGHUP)
    wait_until(lambda: "reload: generation 2" in proxy.log(), what="the reload")
    with Client(proxy.port) as c:
        c.send(b"GET /hang HTTP/1.1\r\nHost: a\r\n\r\n")
        wait_until(lambda: any(s.target == "/hang" for s in origin.requests), what="the request")
        proxy.proc.send_signal(signal.SIGQUIT)
        assert proxy.proc.wait(10) == 0      # well before the 60 s grace
        assert c.is_closed()
    assert "signal SIGQUIT: exiting now" in proxy.log()


def test_without_supervisor(proxy_factory, origin):
    from harness import simple_config
    proxy = proxy_factory(simple_config(origin.url), args=("--no-supervisor",))
    with Client(proxy.port) as c:
        assert c.request("GET", "/size/2").status == 200
    assert "supervisor" not in proxy.log()
    assert proxy.stop() == 0


@pytest.mark.parametrize("supervised", [True, False], ids=["supervisor", "no-supervisor"])
def test_sighup_as_soon_as_the_port_opens(tmp_path, origin, supervised):
    """A SIGHUP sent the moment the listening port accepts (systemd's reload
    right after start, a deploy script) must be handled, not take SIGHUP's
    default action and kill the process: signals are handled, or held,
    from before the sockets listen."""
    for attempt in range(3):
        port = free_port()
        cfg = tmp_path / f"hup{attempt}.toml"
        cfg.write_text(f'[server]\npid_file = "{tmp_path}/hup{attempt}.pid"\n\n'
                       f'[[listen]]\nbind = "127.0.0.1:{port}"\n\n' + simple_config(origin.url))
        args = [] if supervised else ["--no-supervisor"]
        proc = subprocess.Popen([sys.executable, "-m", "edgeproxy", "run", "-c", str(cfg), *args],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + 15
            while time.monotonic() < deadline:
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=1).close()
                    break
                except OSError:
                    time.sleep(0.0005)
            proc.send_signal(signal.SIGHUP)
            time.sleep(1.0)
            assert proc.poll() is None, f"attempt {attempt}: exited {proc.returncode} on SIGHUP"
            with Client(port) as c:
                assert c.request("GET", "/size/2").status == 200
        finally:
            proc.terminate()
            proc.wait(15)


# A worker in its own process whose health-board step fails on every tick
# (as a KeyError in it once did): the only thing not real is that fault.
BROKEN_TICK_WORKER = """
import sys
from edgeproxy.cli import setup_logging
from edgeproxy.config import load_config
from edgeproxy.server.worker import Worker, bind_socket

def broken(*args):
    raise RuntimeError("the board is broken")

setup_logging("info")
config = load_config(sys.argv[1])
worker = Worker(config, [bind_socket(lc) for lc in config.listen])
worker.board.write_worker = broken
sys.exit(worker.run())
"""


def test_a_failing_tick_step_is_logged_once_and_the_ticker_goes_on(tmp_path, origin):
    port = free_port()
    log_path = tmp_path / "access.log"
    cfg = tmp_path / "edgeproxy.toml"
    cfg.write_text(f'[[listen]]\nbind = "127.0.0.1:{port}"\n\n' + simple_config(
        origin.url, f'[timeout]\nheader = 1.0\n[log]\naccess_log = "{log_path}"\n'
                    'access_format = "json"\n'))
    err = tmp_path / "worker.log"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    with open(err, "wb") as f:
        proc = subprocess.Popen([sys.executable, "-c", BROKEN_TICK_WORKER, str(cfg)],
                                stdout=subprocess.DEVNULL, stderr=f, env=env)
    try:
        wait_port(port, proc)
        with Client(port) as c:
            first = c.request("GET", "/size/1").header("date")
            wait_until(lambda: c.request("GET", "/size/1").header("date") != first,
                       timeout=5, every=0.2, what="a new Date")
            # a few more seconds of ticks, each one meeting the broken step
            second = c.request("GET", "/size/1").header("date")
            wait_until(lambda: c.request("GET", "/size/1").header("date") != second,
                       timeout=5, every=0.2, what="another new Date")
        with Client(port) as c:
            c.send(b"GET / HTTP/1.1\r\nHost: a\r\n")      # never finished
            c.sock.settimeout(8)
            assert c.sock.recv(4096).startswith(b"HTTP/1.1 408")
        wait_until(lambda: len(json_lines(log_path)) == len(origin.requests) + 1,
                   what="every request in the access log")
    finally:
        proc.terminate()
        assert proc.wait(15) == 0
    text = err.read_text()
    assert text.count("ticker: health board failed") == 1, text
    assert text.count("Traceback") == 1 and "RuntimeError: the board is broken" in text


def _with_cache(tmp_path):
    """A caching route and its cache directory: each new worker opens it
    (after fork), so turning the path into a file makes new workers fail
    at start-up while the running ones keep the store they opened."""
    cache = tmp_path / "cache"
    extra = (f'[[route]]\npath = "/cached/"\npool = "web"\ncache = true\n\n'
             f'[cache]\npath = "{cache}"\nmax_size = "16MiB"\nmax_object = "1MiB"\n')

    def block():
        cache.rename(tmp_path / "cache.away")
        cache.write_text("not a directory")

    def unblock():
        cache.unlink()
        (tmp_path / "cache.away").rename(cache)

    return extra, block, unblock


def _settled(admin_port):
    """Wait until every worker has lived past the quick-death time, so that
    killing one is an ordinary death (replaced at once)."""
    wait_until(lambda: all(w["uptime"] > 1.2 for w in status(admin_port)["workers"]),
               what="workers older than a second")


def test_workers_that_die_before_ready_are_replaced_with_back_off(proxy_factory, tmp_path, origin):
    extra, block, unblock = _with_cache(tmp_path)
    proxy, admin_port = start(proxy_factory, tmp_path, origin.url, workers=2, admin=True,
                              extra=extra)
    pids = wait_until(lambda: len(p := worker_pids(admin_port)) == 2 and p, what="two workers")
    _settled(admin_port)
    block()
    os.kill(pids[0], signal.SIGKILL)
    # its replacements fail at start-up; each is replaced after a longer delay
    wait_until(lambda: "starting another in 1s (quick death 2 in a row)" in proxy.log(),
               what="two quick deaths")
    assert "starting another in 0.5s (quick death 1 in a row)" in proxy.log()
    unblock()
    wait_until(lambda: len(p := [w for w in status(admin_port)["workers"]
                                 if w["state"] == "serving"]) == 2 and pids[0] not in p,
               timeout=15, what="two workers serving again")
    log = proxy.log()
    assert "exists and is not a directory" in log
    # a worker that chose to exit (SystemExit(1)) is no crash: no traceback
    assert "crashed" not in log and "Traceback" not in log
    for line in log.splitlines():
        if "exited before it was ready" in line:
            pid = line.split("worker ")[1].split()[0]
            assert log.count(f"worker {pid} exited before it was ready") == 1
    assert proxy.proc.poll() is None
    for _ in range(4):
        with Client(proxy.port) as c:
            assert c.request("GET", "/size/3").status == 200


def test_no_worker_can_start_exits_non_zero(proxy_factory, tmp_path, origin):
    extra, block, _ = _with_cache(tmp_path)
    proxy, admin_port = start(proxy_factory, tmp_path, origin.url, admin=True, extra=extra)
    [pid] = worker_pids(admin_port)
    _settled(admin_port)
    block()
    os.kill(pid, signal.SIGKILL)
    # replaced at once, then after 0.5, 1, 2 and 4 s; the fifth quick death ends it
    assert proxy.proc.wait(30) == 1
    log = proxy.log()
    assert log.count("none serves; exiting") == 1
    assert "5 workers in a row died within 1s of their start and none serves; exiting" in log
    assert "signal SIGTERM" not in log and "Traceback" not in log
    with pytest.raises(ConnectionRefusedError):
        Client(proxy.port)


def _run_to_exit(tmp_path, body: str, timeout: float = 30) -> tuple[int, str]:
    """`edgeproxy run` on a config that must not start: (exit code, its log)."""
    cfg = tmp_path / "fails.toml"
    cfg.write_text(f'[server]\npid_file = "{tmp_path}/fails.pid"\n' + body)
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    out = subprocess.run([sys.executable, "-m", "edgeproxy", "run", "-c", str(cfg)],
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                         env=env, timeout=timeout)
    return out.returncode, out.stderr


def test_an_admin_port_in_use_fails_the_start(tmp_path, origin):
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen(1)
    try:
        admin_port = taken.getsockname()[1]
        port = free_port()
        code, log = _run_to_exit(tmp_path, f'admin = "127.0.0.1:{admin_port}"\n\n'
                                 f'[[listen]]\nbind = "127.0.0.1:{port}"\n\n'
                                 + simple_config(origin.url))
    finally:
        taken.close()
    assert code == 1, log
    errors = [line for line in log.splitlines() if " ERROR " in line]
    assert len(errors) == 1 and errors[0].endswith(
        f"admin listener 127.0.0.1:{admin_port}: Address already in use"), log
    assert "SIGTERM" not in log and "worker" not in log       # no worker was started
    with pytest.raises(ConnectionRefusedError):
        Client(port)


def test_a_worker_that_cannot_start_is_reported_once(tmp_path, origin):
    # a cache the worker cannot open (run's preflight only sees that the directory is
    # writable: edgeproxy/server/preflight.py)
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / "data.mdb").write_bytes(b"not an LMDB file" * 4096)
    port = free_port()
    code, log = _run_to_exit(tmp_path, f'\n[[listen]]\nbind = "127.0.0.1:{port}"\n\n'
                             + simple_config(origin.url, f'[[route]]\npath = "/c/"\npool = "web"\n'
                                             f'cache = true\n\n[cache]\npath = "{tmp_path}/cache"\n'
                                             'max_size = "16MiB"\nmax_object = "1MiB"\n'))
    assert code == 1, log
    assert "is not a usable LMDB environment" in log
    # SystemExit(1) from the worker is its chosen exit, not a crash
    assert "crashed" not in log and "Traceback" not in log, log
    assert log.count("exited before it was ready (exit code 1)") == 1, log
