"""The supervisor's side of the purge bus: starts the bus process (edgeproxy/cache/bus.py) for `cache.purge_bus`, restarts it when it dies, reads its status lines and exports them as metrics.

The bus process is a fresh interpreter (`python -m edgeproxy.cache.bus
CONFIG`), not a fork: the supervisor must never open the cache (LMDB after
fork), and this process opens it itself. The supervisor's reaper collects
its exit (`exited`).
"""
from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from collections.abc import Iterable
from typing import Any

__all__ = ["BusProcess"]

log = logging.getLogger("edgeproxy.cache.bus")

RESTART_DELAY = 1.0


class BusProcess:
    def __init__(self, config_path: str, loop: Any, *, log_level: str = "info"):
        self.config_path = config_path
        self.loop = loop
        self.log_level = log_level
        self.proc: subprocess.Popen | None = None
        self.state: dict = {"connected": False, "published": 0, "applied": 0, "gaps": 0,
                            "missed": 0}
        self.restarts = 0
        self.stopping = False
        self._buf = b""
        self._timer = None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def start(self) -> None:
        self._timer = None
        if self.stopping:
            return
        env = dict(os.environ, EDGEPROXY_LOG_LEVEL=self.log_level)
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "edgeproxy.cache.bus", self.config_path],
                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, env=env, close_fds=True)
        except OSError as exc:
            log.error("purge bus: cannot start its process: %s", exc)
            self._timer = self.loop.call_later(RESTART_DELAY * 5, self.start)
            return
        os.set_blocking(self.proc.stdout.fileno(), False)
        self.loop.add_reader(self.proc.stdout.fileno(), self._on_status)
        log.info("purge bus process %d started", self.proc.pid)

    def _on_status(self) -> None:
        proc = self.proc
        try:
            data = os.read(proc.stdout.fileno(), 65536)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self.loop.remove_reader(proc.stdout.fileno())
            return
        self._buf += data
        *lines, self._buf = self._buf.split(b"\n")
        for line in lines:
            try:
                state = json.loads(line)
            except ValueError:
                continue
            if isinstance(state, dict):
                self.state.update(state)

    def exited(self, status: int) -> None:
        """Called by the supervisor's reaper with the process's wait status."""
        proc, self.proc = self.proc, None
        if proc is not None:
            proc.returncode = os.waitstatus_to_exitcode(status)
            try:
                self.loop.remove_reader(proc.stdout.fileno())
            except (ValueError, OSError):
                pass
            proc.stdout.close()
        self.state["connected"] = False
        if self.stopping:
            return
        self.restarts += 1
        log.warning("purge bus process exited (status %s); starting it again in %gs",
                    proc.returncode if proc is not None else "?", RESTART_DELAY)
        self._timer = self.loop.call_later(RESTART_DELAY, self.start)

    def stop(self) -> None:
        self.stopping = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self.proc is not None and self.proc.poll() is None:
            try:
                self.proc.terminate()
            except ProcessLookupError:
                pass

    def wait_stopped(self, timeout: float = 3.0) -> None:
        """After stop(): wait for the process to end (SIGKILL after timeout)."""
        proc = self.proc
        if proc is None:
            return
        deadline = time.monotonic() + timeout
        while proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        if proc.poll() is None:
            proc.kill()
            proc.wait(2)

    def metrics(self) -> Iterable[str]:
        s = self.state
        yield "# HELP edgeproxy_purge_bus_connected Whether this edge's purge bus is connected to Redis."
        yield "# TYPE edgeproxy_purge_bus_connected gauge"
        yield f"edgeproxy_purge_bus_connected {1 if s.get('connected') else 0}"
        for name, what in (("published", "purges made here and published"),
                           ("applied", "purges from other edges applied here"),
                           ("gaps", "times this edge found it missed purges"),
                           ("missed", "purges from other edges known missed")):
            yield f"# HELP edgeproxy_purge_bus_{name}_total The {what} (since the bus process started)."
            yield f"# TYPE edgeproxy_purge_bus_{name}_total counter"
            yield f"edgeproxy_purge_bus_{name}_total {int(s.get(name, 0))}"
