"""Start the servers the bench measures, wait until they answer, and stop them by PID."""
from __future__ import annotations

import ctypes
import http.client
import os
import signal
import socket
import ssl
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Self

from bench import procfs

_PR_SET_PDEATHSIG = 1


class StartError(RuntimeError):
    """A server did not start or did not answer; the message says why."""


@dataclass(frozen=True)
class Pinning:
    """Which CPUs the proxies and the load (origin, wrk, this process) run on."""
    proxy_cpus: str | None = "0"
    load_cpus: str | None = "1"

    def for_proxy(self, argv: list[str]) -> list[str]:
        return _taskset(self.proxy_cpus, argv)

    def for_load(self, argv: list[str]) -> list[str]:
        return _taskset(self.load_cpus, argv)

    def describe(self) -> dict[str, str | None]:
        return {"proxy_cpus": self.proxy_cpus, "load_cpus": self.load_cpus}


def _taskset(cpus: str | None, argv: list[str]) -> list[str]:
    return ["taskset", "-c", cpus, *argv] if cpus else argv


def parse_cpu_list(cpus: str) -> set[int]:
    """'0', '0,2' or '0-3' as a set of CPU numbers."""
    found: set[int] = set()
    for part in cpus.split(","):
        lo, _, hi = part.strip().partition("-")
        found.update(range(int(lo), int(hi or lo) + 1))
    return found


def die_with_parent() -> None:
    # Runs in the child before exec: if the bench dies without cleaning up
    # (SIGKILL), the kernel sends the server SIGTERM instead of orphaning it.
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    except OSError:
        pass


class Server:
    """One started server process (and the children it forks), known by PID."""

    def __init__(self, name: str, argv: list[str], port: int, log_path: Path,
                 env: dict[str, str] | None = None, cwd: str | None = None,
                 client_tls: ssl.SSLContext | None = None) -> None:
        self.name = name
        self.argv = argv
        self.port = port
        self.log_path = log_path
        self.client_tls = client_tls   # set: the server speaks HTTPS; this context checks it
        self._env = env
        self._cwd = cwd
        self._popen: subprocess.Popen[bytes] | None = None
        self._seen: dict[int, int | None] = {}   # pid -> start time, for a safe kill later

    @property
    def pid(self) -> int:
        assert self._popen is not None
        return self._popen.pid

    def start(self) -> None:
        with open(self.log_path, "ab") as log:
            try:
                self._popen = subprocess.Popen(
                    self.argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                    env=self._env, cwd=self._cwd, start_new_session=True,
                    preexec_fn=die_with_parent)  # noqa: PLW1509 (no threads)
            except OSError as exc:
                raise StartError(f"{self.name}: cannot run {self.argv[0]}: {exc}") from exc
        self._seen[self.pid] = procfs.start_time(self.pid)

    def alive(self) -> bool:
        return self._popen is not None and self._popen.poll() is None

    def exit_status(self) -> int | None:
        return None if self._popen is None else self._popen.poll()

    def pids(self) -> list[int]:
        """The living process tree; every PID seen is remembered for stop()."""
        if not self.alive():
            return []
        pids = procfs.tree(self.pid)
        for pid in pids:
            self._seen.setdefault(pid, procfs.start_time(pid))
        return pids

    def cpu_ticks(self) -> int:
        return sum(self.cpu_split())

    def cpu_split(self) -> tuple[int, int]:
        """(user, system) clock ticks of the whole process tree."""
        split = [procfs.cpu_ticks(p) for p in self.pids()]
        return sum(u for u, _ in split), sum(s for _, s in split)

    def rss_kib(self) -> int:
        return sum(procfs.status_kib(p, "VmRSS") for p in self.pids())

    def peak_rss_kib(self) -> int:
        return sum(procfs.status_kib(p, "VmHWM") for p in self.pids())

    def reset_peak_rss(self) -> bool:
        return all([procfs.reset_peak_rss(p) for p in self.pids()])  # noqa: C419 (reset each)

    def open_files_limit(self) -> int | None:
        limits = [procfs.open_files_limit(p) for p in self.pids()]
        known = [n for n in limits if n is not None]
        return min(known) if known else None

    def log_tail(self, lines: int = 12) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def stop(self, grace_s: float = 5.0) -> None:
        """SIGTERM, then SIGKILL after the grace time; leftover children are killed too."""
        if self._popen is None:
            return
        self.pids()  # remember the children as they are now
        if self._popen.poll() is None:
            self._popen.send_signal(signal.SIGTERM)
            try:
                self._popen.wait(grace_s)
            except subprocess.TimeoutExpired:
                self._popen.kill()
                self._popen.wait()
        deadline = time.monotonic() + grace_s
        for pid, started in self._seen.items():
            if pid == self._popen.pid:
                continue
            while self._is_same(pid, started) and time.monotonic() < deadline:
                time.sleep(0.05)  # children usually leave on their own after the parent
            if self._is_same(pid, started):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass

    @staticmethod
    def _is_same(pid: int, started: int | None) -> bool:
        # A PID can be reused: it is ours only if it started at the same tick.
        return procfs.is_alive(pid) and started is not None and procfs.start_time(pid) == started


class StartedServers:
    """Every server the run started, stopped in reverse order on the way out."""

    def __init__(self) -> None:
        self._servers: list[Server] = []

    def start(self, server: Server) -> Server:
        self._servers.append(server)
        server.start()
        return server

    def stop(self, server: Server) -> None:
        if server in self._servers:
            self._servers.remove(server)
        server.stop()

    def stop_all(self) -> None:
        while self._servers:
            self._servers.pop().stop()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop_all()


@dataclass(frozen=True)
class Fetched:
    status: int
    headers: http.client.HTTPMessage
    body: bytes
    tls: tuple[str, str] | None     # (protocol version, cipher) over HTTPS


def http_get(server: Server, path: str, timeout: float = 2.0) -> Fetched:
    """One GET on a new connection (HTTPS when the server has client_tls)."""
    if server.client_tls is None:
        conn: http.client.HTTPConnection = http.client.HTTPConnection(
            "127.0.0.1", server.port, timeout=timeout)
    else:
        conn = http.client.HTTPSConnection("127.0.0.1", server.port, timeout=timeout,
                                           context=server.client_tls)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        body = response.read()
        tls = None
        if isinstance(conn.sock, ssl.SSLSocket):
            tls = (conn.sock.version() or "", conn.sock.cipher()[0])  # type: ignore[index]
        return Fetched(response.status, response.headers, body, tls)
    finally:
        conn.close()


def tls_session_resumed(server: Server, path: str, timeout: float = 5.0) -> bool:
    """Whether a second connection resumes the session of a first (tickets or a
    session cache), as wrk's reconnections do."""
    assert server.client_tls is not None
    request = f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n".encode()
    session = None
    for attempt in range(2):
        raw = socket.create_connection(("127.0.0.1", server.port), timeout=timeout)
        with server.client_tls.wrap_socket(raw, server_hostname="127.0.0.1",
                                           session=session) as tls:
            if attempt:
                return tls.session_reused
            tls.sendall(request)
            while tls.recv(65536):  # to the end: TLS 1.3 tickets come after the handshake
                pass
            session = tls.session
    return False


def wait_until_serving(server: Server, path: str, expect_length: int,
                       time_limit_s: float = 15.0) -> None:
    """Return once a real GET through the server gets a 200 with the whole body."""
    deadline = time.monotonic() + time_limit_s
    last = "no answer"
    while time.monotonic() < deadline:
        if not server.alive():
            raise StartError(f"{server.name} exited with status {server.exit_status()} "
                             f"before serving; its log ends with:\n{server.log_tail()}")
        try:
            got = http_get(server, path)
            if got.status == 200 and len(got.body) == expect_length:
                return
            last = (f"GET {path} answered {got.status} with {len(got.body)} bytes, "
                    f"expected 200 with {expect_length}")
        except ssl.SSLCertVerificationError as exc:  # a wrong certificate: no use waiting
            raise StartError(f"{server.name}: its certificate did not verify: {exc}") from exc
        except (OSError, http.client.HTTPException) as exc:
            last = f"GET {path}: {exc}"
        time.sleep(0.1)
    raise StartError(f"{server.name} did not serve within {time_limit_s:.0f} s ({last}); "
                     f"its log ends with:\n{server.log_tail()}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
