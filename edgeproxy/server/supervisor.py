"""The supervisor: the parent process that owns the listening sockets and
the metrics region, forks the workers, replaces a worker that dies, reloads
the configuration without dropping a request, stops gracefully, and serves
the admin listener.  It does no request work.

A reload starts a new *generation* of workers on the new configuration
(sockets of binds that stay are kept and shared, new binds are opened,
removed ones closed), waits until every new worker is ready, then tells the
old ones to retire: they stop accepting, answer requests in flight with
"Connection: close", close idle keep-alive connections and exit when the
last connection ends or after server.drain_timeout.  Connections waiting in
a listening socket's queue are never lost: the socket itself is shared.

A worker that dies is replaced.  One that dies quickly (before it is
ready, or within RESPAWN_QUICK_DEATH of its start) is replaced after a
delay that doubles with each quick death in a row (RESPAWN_DELAYS); after
RESPAWN_GIVE_UP of them in a row with no worker serving, the supervisor
says why and exits 1 rather than hold a port nobody answers on.

Signals: SIGHUP reloads, SIGTERM/SIGINT stop gracefully (server.grace),
SIGQUIT stops at once, SIGUSR1 is passed to the workers (reopen logs).
"""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import hashlib
import json
import logging
import os
import resource
import signal
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from edgeproxy.cache.busproc import BusProcess
from edgeproxy.config import ConfigError
from edgeproxy.config.load import normal_host
from edgeproxy.config.model import BackendConfig, Config, ListenConfig
from edgeproxy.config.runtime import runtime_dir
from edgeproxy.health import HealthBoard, HealthChecker, StateWriter
from edgeproxy.limits import prepare_shared
from edgeproxy.metrics import MetricsRegion, Totals, WorkerSlot, render_prometheus, route_labels
from edgeproxy.metrics.exposition import COLLECTORS, SlotLabels
from edgeproxy.server.preflight import file_problems
from edgeproxy.server.worker import Worker, _finish_tasks, bind_socket, build_tls
from edgeproxy.tls import TLSConfigError

log = logging.getLogger("edgeproxy.supervisor")

READY_TIMEOUT = 20.0        # a new worker must be serving within this
RESPAWN_QUICK_DEATH = 1.0   # a worker dying sooner than this (or before it is ready) died quickly
RESPAWN_DELAYS = (0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0)  # before replacing it, by quick deaths in a row
RESPAWN_GIVE_UP = 5         # quick deaths in a row with no worker serving: exit 1
KILL_AFTER = 5.0            # beyond grace, workers still alive get SIGKILL


def default_pid_file(config: Config) -> str:
    """<runtime dir>/edgeproxy-<hash>.pid, the hash of the config file's absolute
    path (or, without a file, of the listen addresses); the directory is
    /run/edgeproxy under systemd, else /tmp (edgeproxy.config.runtime)."""
    if config.source:
        key = os.path.abspath(config.source)
    else:
        key = " ".join(lc.bind for lc in config.listen)
    return os.path.join(runtime_dir(),
                        f"edgeproxy-{hashlib.sha256(key.encode()).hexdigest()[:12]}.pid")


def pid_file_of(config: Config) -> str:
    return config.server.pid_file or default_pid_file(config)


def worker_count(config: Config) -> int:
    n = config.server.workers
    return n if n > 0 else (os.cpu_count() or 1)


def config_checksum(config: Config) -> str:
    """sha256 of the file's bytes (what an operator can compare with
    `sha256sum`; with includes, of every file read, in the order read:
    `cat FILE conf.d/*.toml | sha256sum`), or of the dataclasses without a file."""
    if config.source:
        digest = hashlib.sha256()
        try:
            for path in config.files or (config.source,):
                with open(path, "rb") as f:
                    digest.update(f.read())
            return digest.hexdigest()
        except OSError:
            pass
    return hashlib.sha256(repr(config).encode()).hexdigest()


def _bind_key(lc: ListenConfig) -> tuple:
    # port 0 (any free port) never matches another bind
    return (normal_host(lc.host), lc.port) if lc.port else ("port0", lc.bind)


@dataclass
class Generation:
    """The workers started from one configuration."""
    number: int
    config: Config
    socks: list[socket.socket]
    labels: SlotLabels
    checksum: str
    loaded_at: float
    ops: list[dict] = field(default_factory=list)   # admin changes since the load
    live: Config | None = None                      # config with the admin's added/removed backends
    tls: dict = field(default_factory=dict)         # listen index -> ServerTLS, built here
    board: HealthBoard | None = None                # backend health shared with its workers


@dataclass
class WorkerProcess:
    pid: int
    gen: Generation
    slot: int | None
    control: socket.socket
    started: float
    ready: asyncio.Future
    retiring: bool = False
    buf: bytes = b""
    row: int = 0            # its row in the generation's health board
    replacement: bool = False   # started to replace one that died (not by a generation start)

    @property
    def serving(self) -> bool:
        # (a start that timed out cancels the future)
        return self.ready.done() and not self.ready.cancelled() and self.ready.exception() is None


class Supervisor:
    def __init__(self, config: Config, load: Callable[[], Config]):
        self.config = config
        self.load = load
        self.pid_file = pid_file_of(config)
        self.socks: dict[tuple, socket.socket] = {}
        self.gen: Generation | None = None
        self.gen_count = 0
        self.workers: dict[int, WorkerProcess] = {}
        self.totals = Totals()
        self.region: MetricsRegion | None = None
        self.stopping = False
        self.restarts = 0
        self.quick_deaths = 0       # in a row, in the current generation
        self.exit_code = 0
        self.reloads_ok = 0
        self.reloads_failed = 0
        self.last_reload: dict = {}
        self.reload_seq = 0
        self.admin = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self._reload_lock: asyncio.Lock | None = None
        self._done: asyncio.Future | None = None
        self._kill_handle = None
        self.bus: BusProcess | None = None      # the purge bus process (cache.purge_bus)
        self._bus_settings: tuple | None = None  # what it was started for
        self._old_buses: dict[int, BusProcess] = {}   # stopped, not reaped yet

    # -- sockets --

    def _sockets_for(self, config: Config) -> tuple[list[socket.socket], list[socket.socket]]:
        """The sockets of config's binds, in order, and those newly bound
        (closed again if anything fails)."""
        out, new = [], []
        try:
            for lc in config.listen:
                key = _bind_key(lc)
                sock = self.socks.get(key)
                if sock is None:
                    try:
                        sock = bind_socket(lc)
                    except OSError as exc:
                        raise OSError(exc.errno, f"listen {lc.bind}: {exc.strerror}") from None
                    new.append(sock)
                else:
                    sock.listen(lc.backlog)
                out.append(sock)
        except OSError:
            for sock in new:
                sock.close()
            raise
        return out, new

    def _adopt_sockets(self, config: Config, socks: list[socket.socket]) -> None:
        """Make config's sockets the supervisor's; close the others."""
        keep = {_bind_key(lc): s for lc, s in zip(config.listen, socks, strict=True)}
        for key, sock in self.socks.items():
            if keep.get(key) is not sock:
                log.info("closing listener %s", key[1] if key[0] == "port0" else f"{key[0]}:{key[1]}")
                sock.close()
        self.socks = keep

    # -- workers --

    def _new_generation(self, config: Config, socks: list[socket.socket],
                        tls: dict) -> Generation:
        self.gen_count += 1
        labels = SlotLabels(route_labels(config),
                            [(name, b.name)
                             for name, pc in config.pools.items() for b in pc.backends])
        board = HealthBoard(config, worker_count(config))   # shared memory: before any fork
        prepare_shared(config)         # the limits' zones and counters: before any fork too
        if self.gen is not None and self.gen.board is not None:
            board.carry_over(self.gen.board)  # health survives a reload
        return Generation(self.gen_count, config, socks, labels, config_checksum(config),
                          time.time(), tls=tls, board=board, live=config)

    def _spawn(self, gen: Generation, replacement: bool = False) -> WorkerProcess:
        slot = self.region.take()
        if slot is None:
            log.warning("no free metrics slot: this worker's requests are not counted")
        used = {w.row for w in self.workers.values() if w.gen is gen and not w.retiring}
        row = min(set(range(worker_count(gen.config))) - used, default=0)
        parent_end, child_end = socket.socketpair()
        keep = {0, 1, 2, child_end.fileno(), *(s.fileno() for s in gen.socks)}
        pid = os.fork()
        if pid == 0:  # the worker
            code = 1
            try:
                gc.freeze()   # nothing of the supervisor's is finalised here
                asyncio.events._set_running_loop(None)
                for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT, signal.SIGHUP,
                            signal.SIGUSR1, signal.SIGUSR2, signal.SIGCHLD):
                    signal.signal(sig, signal.SIG_DFL)
                signal.set_wakeup_fd(-1)
                _close_fds_except(keep)
                ws = WorkerSlot(self.region, slot) if slot is not None else None
                code = Worker(gen.config, gen.socks, control=child_end, slot=ws,
                              ops=gen.ops, tls=gen.tls, board=gen.board, board_row=row,
                              monitor=False).run()
            except SystemExit as exc:   # a chosen exit: the worker logged why
                if isinstance(exc.code, int):
                    code = exc.code
                elif exc.code is not None:
                    log.error("%s", exc.code)
            except BaseException:
                log.exception("worker %d crashed", os.getpid())
            finally:
                os._exit(code)
        child_end.close()
        parent_end.setblocking(False)
        w = WorkerProcess(pid, gen, slot, parent_end, time.monotonic(),
                          self.loop.create_future(), row=row, replacement=replacement)
        self.workers[pid] = w
        self.loop.add_reader(parent_end.fileno(), self._on_control, w)
        log.info("worker %d started (generation %d)", pid, gen.number)
        return w

    def _on_control(self, w: WorkerProcess) -> None:
        try:
            data = w.control.recv(65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self.loop.remove_reader(w.control.fileno())
            return
        w.buf += data
        while b"\n" in w.buf:
            line, _, w.buf = w.buf.partition(b"\n")
            try:
                msg = json.loads(line)
            except ValueError:
                continue
            if not w.ready.done():
                if msg.get("ready"):
                    w.ready.set_result(True)
                elif "error" in msg:
                    w.ready.set_exception(RuntimeError(msg["error"]))

    def _send(self, w: WorkerProcess, msg: dict) -> None:
        try:
            w.control.send(json.dumps(msg).encode() + b"\n")
        except OSError:
            pass   # it is exiting; the reaper handles it

    def _reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            bus = self._old_buses.pop(pid, None) or (
                self.bus if self.bus is not None and pid == self.bus.pid else None)
            if bus is not None:
                bus.exited(status)
                continue
            w = self.workers.pop(pid, None)
            if w is None:
                continue
            self._forget(w)
            cause = _exit_cause(status)
            ready = w.serving
            if not w.ready.done():
                w.ready.set_exception(RuntimeError(f"worker {pid} exited before it was ready ({cause})"))
                w.ready.exception()   # retrieved: the waiter may be gone
            if self.stopping or w.retiring:
                log.info("worker %d exited (%s)", pid, cause)
            elif not ready and not w.replacement:
                pass    # its generation's start fails and says why, once
            elif w.gen is self.gen:
                self.restarts += 1
                self._replace(w, cause, ready)
            else:
                log.warning("worker %d of an old generation exited (%s)", pid, cause)
        if self.stopping and not self.workers and self._done is not None and not self._done.done():
            self._done.set_result(None)

    def _replace(self, w: WorkerProcess, cause: str, ready: bool) -> None:
        """Start a worker in place of w, which died; after a delay when it
        died quickly, and not at all (the supervisor exits 1) when quick
        deaths keep coming with no worker serving."""
        what = "died" if ready else "exited before it was ready"
        if ready and time.monotonic() - w.started >= RESPAWN_QUICK_DEATH:
            self.quick_deaths = 0
            log.error("worker %d %s (%s); starting another", w.pid, what, cause)
            self._spawn(w.gen, replacement=True)
            return
        self.quick_deaths += 1
        serving = sum(1 for x in self.workers.values()
                      if x.gen is w.gen and not x.retiring and x.serving)
        if self.quick_deaths >= RESPAWN_GIVE_UP and not serving:
            log.error("worker %d %s (%s): %d workers in a row died within %gs of their start "
                      "and none serves; exiting", w.pid, what, cause, self.quick_deaths,
                      RESPAWN_QUICK_DEATH)
            self.exit_code = 1
            self._stop(quick=False)
            return
        delay = RESPAWN_DELAYS[min(self.quick_deaths, len(RESPAWN_DELAYS)) - 1]
        log.error("worker %d %s (%s); starting another in %gs (quick death %d in a row)",
                  w.pid, what, cause, delay, self.quick_deaths)
        self.loop.call_later(delay, self._respawn, w.gen)

    def _respawn(self, gen: Generation) -> None:
        if gen is self.gen and not self.stopping:
            self._spawn(gen, replacement=True)

    def _forget(self, w: WorkerProcess) -> None:
        try:
            self.loop.remove_reader(w.control.fileno())
        except (ValueError, OSError):
            pass
        w.control.close()
        if w.slot is not None:
            self.totals.retire(self.region.slot(w.slot), w.gen.labels)
            self.region.release(w.slot)

    async def _start_generation(self, gen: Generation) -> None:
        """Fork gen's workers and wait until all serve; on failure stop them
        and raise RuntimeError with the first worker's error."""
        started = [self._spawn(gen) for _ in range(worker_count(gen.config))]
        try:
            await asyncio.wait_for(asyncio.gather(*(w.ready for w in started)), READY_TIMEOUT)
        except (TimeoutError, Exception) as exc:
            for w in started:
                if w.pid in self.workers:
                    w.retiring = True
                    _kill(w.pid, signal.SIGKILL)
            if isinstance(exc, asyncio.TimeoutError):
                raise RuntimeError(f"new workers not ready within {READY_TIMEOUT:g}s") from None
            raise RuntimeError(str(exc)) from None

    # -- health: one prober for all workers, in this process's loop --

    def _start_health(self, gen: Generation) -> None:
        """Probe gen's backends (once per interval, whatever the number of
        workers) and keep the state file; stops the previous generation's."""
        self._stop_health()
        self.checker = HealthChecker(gen.config, gen.board)
        self.checker.start()
        self.state_writer = StateWriter(gen.config, gen.board, self.checker, pid=os.getpid(),
                                        view=self._state_view)
        self.state_writer.start()

    def _state_view(self):
        # what /status shows too: the admin's changes, and requests counted
        # since the start (across reloads and restarts)
        gen = self.gen
        return gen.live, _drained(gen), self.snapshot().counts.backend_requests

    def _stop_health(self) -> None:
        if getattr(self, "checker", None) is not None:
            self.checker.stop()
            self.checker = None
        if getattr(self, "state_writer", None) is not None:
            self.state_writer.stop()
            self.state_writer = None

    # -- reload --

    async def reload(self) -> tuple[bool, str]:
        """Load the configuration again and switch to it; (ok, message)."""
        async with self._reload_lock:
            if self.stopping:
                return False, "stopping"
            ok, message = await self._reload()
            if ok:
                self.reloads_ok += 1
                log.info("reload: %s", message)
            else:
                self.reloads_failed += 1
                log.error("reload failed, nothing changed: %s", message)
            self.reload_seq += 1
            self.last_reload = {"seq": self.reload_seq, "ok": ok, "message": message,
                                "time": time.time()}
            self._write_reload_result()
            return ok, message

    async def _reload(self) -> tuple[bool, str]:
        try:
            config = await self.loop.run_in_executor(None, self.load)
        except ConfigError as exc:
            return False, str(exc)
        except Exception as exc:  # an unreadable file, ...
            return False, f"cannot load the configuration: {exc}"
        # what the new workers would open (log and cache directories): refused
        # here in one message rather than by workers that fail to start
        problems = await self.loop.run_in_executor(None, file_problems, config)
        if problems:
            return False, "; ".join(problems)
        try:
            # certificates load (and are checked) here, before any worker:
            # a bad one fails the reload and the old workers keep serving
            tls = await self.loop.run_in_executor(None, build_tls, config)
        except TLSConfigError as exc:
            return False, str(exc)
        try:
            socks, new = self._sockets_for(config)
        except OSError as exc:
            return False, str(exc.strerror or exc)
        gen = self._new_generation(config, socks, tls)
        try:
            await self._start_generation(gen)
        except RuntimeError as exc:
            for sock in new:
                sock.close()
            return False, str(exc)
        old = self.gen
        self.gen = gen
        self.config = config
        self.quick_deaths = 0
        self._start_health(gen)
        for w in list(self.workers.values()):
            if w.gen is old:
                w.retiring = True
                self._send(w, {"cmd": "retire"})
        self._adopt_sockets(config, socks)
        self._start_bus(config)
        return True, (f"generation {gen.number} serving with {worker_count(config)} workers; "
                      f"config sha256 {gen.checksum[:12]}")

    # -- the purge bus (edgeproxy/cache/bus.py) --

    def _start_bus(self, config: Config) -> None:
        """Run the purge bus process when config has cache.purge_bus; on a
        reload, start it again only when its settings changed."""
        cache = config.cache
        want = (cache.path, cache.purge_bus, cache.purge_bus_stream, cache.purge_bus_maxlen) \
            if cache is not None and cache.purge_bus else None
        if want == self._bus_settings and (want is None or self.bus is not None):
            return
        self._bus_settings = want
        if self.bus is not None:
            self.bus.stop()
            COLLECTORS.remove(self.bus.metrics)
            if self.bus.pid is not None:
                self._old_buses[self.bus.pid] = self.bus
            self.bus = None
        if want is None:
            return
        if not config.source:
            log.error("cache.purge_bus needs the configuration in a file: not started")
            return
        level = logging.getLevelName(logging.getLogger().getEffectiveLevel()).lower()
        self.bus = BusProcess(os.path.abspath(config.source), self.loop, log_level=level)
        COLLECTORS.append(self.bus.metrics)
        self.bus.start()

    def _write_reload_result(self) -> None:
        path = self.pid_file + ".reload"
        try:
            with open(path + ".tmp", "w") as f:
                json.dump(self.last_reload, f)
            os.replace(path + ".tmp", path)
        except OSError as exc:
            log.warning("cannot write %s: %s", path, exc.strerror)

    # -- admin: run-time backend changes --

    def backend_op(self, op: dict) -> tuple[int, str]:
        """Apply an admin change to every worker of the current generation
        (and to the ones started later, until the next reload).  (HTTP
        status, message)."""
        gen = self.gen
        pool = gen.config.pools.get(op["pool"])
        if pool is None:
            return 404, f"no pool named {op['pool']!r}"
        current = self._backends_of(gen, op["pool"])
        name = op["backend"]
        if op["op"] == "add":
            if name in current:
                return 409, f"{name} is already in pool {op['pool']}"
            if len(current) >= 64:
                return 409, f"pool {op['pool']} has 64 backends, the most a pool can have"
            if len(gen.labels.backends) >= 1024:
                return 507, "too many backends"
            slot = gen.board.add(op["pool"], name)   # its health slot, shared with the workers
            if slot is None:
                return 507, "too many backends"
            op = {**op, "slot": slot}
            gen.labels.backends.append((op["pool"], name))
            bc = BackendConfig(name if op.get("path") else f"http://{name}", "http", op["host"],
                               op["port"], weight=op.get("weight", 1), path=op.get("path"))
            gen.live = _with_backends(gen.live, op["pool"], gen.live.pools[op["pool"]].backends + (bc,))
            if self.checker is not None:
                self.checker.add(op["pool"], bc)
        elif name not in current:
            return 404, f"no backend {name} in pool {op['pool']}"
        elif op["op"] == "remove":
            if len(current) == 1:
                return 409, f"{name} is the last backend of pool {op['pool']}"
            for j, key in enumerate(gen.labels.backends):
                if key == (op["pool"], name) and j not in gen.labels.removed:
                    gen.labels.removed.add(j)
            gen.live = _with_backends(gen.live, op["pool"], tuple(
                b for b in gen.live.pools[op["pool"]].backends if b.name != name))
            if self.checker is not None:
                self.checker.remove(op["pool"], name)
        gen.ops.append(op)
        for w in self.workers.values():
            if w.gen is gen:
                self._send(w, {"cmd": "backend", "op": op})
        log.info("admin: %s backend %s in pool %s", op["op"], name, op["pool"])
        return 200, f"{op['op']}: {name} in pool {op['pool']}"

    def _backends_of(self, gen: Generation, pool: str) -> set[str]:
        return {name for j, (p, name) in enumerate(gen.labels.backends)
                if p == pool and j not in gen.labels.removed}

    # -- metrics and status --

    def snapshot(self):
        live = [(self.region.slot(w.slot), w.gen.labels, w.gen is self.gen)
                for w in self.workers.values() if w.slot is not None]
        return self.totals.snapshot(live)

    def info(self) -> dict:
        return {"restarts": self.restarts, "reloads_ok": self.reloads_ok,
                "reloads_failed": self.reloads_failed, "config_checksum": self.gen.checksum,
                "config_loaded_at": self.gen.loaded_at}

    def metrics_text(self) -> str:
        return render_prometheus(self.snapshot(), self.info())

    def status(self) -> dict:
        snap = self.snapshot()
        c = snap.counts
        by_class: dict[str, int] = {}
        routes: dict[str, dict] = {}
        for (route, pool, cls), n in c.requests.items():
            by_class[cls] = by_class.get(cls, 0) + n
            entry = routes.setdefault(route, {"route": route, "pool": pool, "requests": {}})
            entry["requests"][cls] = n
        drained = _drained(self.gen)
        backends = []
        for e in sorted(snap.backends.values(), key=lambda e: (e["pool"], e["backend"])):
            backends.append({**e, "drained": (e["pool"], e["backend"]) in drained})
        return {
            "pid": os.getpid(),
            "generation": self.gen.number,
            "config": {"source": self.gen.config.source, "checksum": self.gen.checksum,
                       "loaded_at": self.gen.loaded_at},
            "reloads": {"ok": self.reloads_ok, "failed": self.reloads_failed,
                        "last": self.last_reload or None},
            "workers": [{"pid": w.pid, "generation": w.gen.number,
                         "state": "retiring" if w.retiring else
                         ("serving" if w.serving else "starting"),
                         "uptime": round(time.monotonic() - w.started, 3)}
                        for w in sorted(self.workers.values(), key=lambda w: w.pid)],
            "worker_restarts": self.restarts,
            "requests": {"total": sum(by_class.values()), "by_class": by_class,
                         "routes": sorted(routes.values(), key=lambda r: r["route"])},
            "connections": snap.gauges,
            "bytes": {"in": c.bytes_in, "out": c.bytes_out},
            "backends": backends,
            "purge_bus": None if self.bus is None else {
                "pid": self.bus.pid, "restarts": self.bus.restarts, **self.bus.state},
            "time": time.time(),
        }

    # -- stop --

    def _on_stop(self, signum: int) -> None:
        quick = signum == signal.SIGQUIT
        if self.stopping and not quick:
            return
        log.info("signal %s: %s", signal.Signals(signum).name,
                 "exiting now" if quick else f"stopping (grace {self.config.server.grace:g}s)")
        self._stop(quick)

    def _stop(self, quick: bool) -> None:
        """Stop the workers (at once, or within server.grace) and then exit."""
        self.stopping = True
        if self.bus is not None:
            self.bus.stop()
        for sock in self.socks.values():
            sock.close()      # the workers keep their own copies while they drain
        self.socks = {}
        for pid in list(self.workers):
            _kill(pid, signal.SIGQUIT if quick else signal.SIGTERM)
        delay = 1.0 if quick else self.config.server.grace + KILL_AFTER
        if self._kill_handle is not None:
            self._kill_handle.cancel()
        self._kill_handle = self.loop.call_later(delay, self._kill_all)
        self._reap()

    def _kill_all(self) -> None:
        for pid in list(self.workers):
            log.warning("worker %d did not stop: SIGKILL", pid)
            _kill(pid, signal.SIGKILL)

    def _forward(self, signum: int) -> None:
        for pid in list(self.workers):
            _kill(pid, signum)

    # -- main --

    def run(self) -> int:
        self.loop = asyncio.new_event_loop()
        asyncio.set_event_loop(self.loop)
        try:
            return self.loop.run_until_complete(self._main())
        finally:
            self._stop_health()
            _finish_tasks(self.loop)
            self.loop.close()

    async def _main(self) -> int:
        self._reload_lock = asyncio.Lock()
        try:
            self.tls = build_tls(self.config)   # in the parent: workers share ticket keys
        except TLSConfigError as exc:
            log.error("%s", exc)
            return 2
        self._done = self.loop.create_future()
        n = worker_count(self.config)
        self.region = MetricsRegion(max(64, 8 * n))
        _raise_nofile_limit()
        # Signals are handled before the listeners accept: a client (or a test)
        # that sees the port open may send SIGHUP at once, and SIGHUP's default
        # action would kill the supervisor.  A reload asked for during startup
        # waits for the first generation (the lock).
        await self._reload_lock.acquire()
        try:
            self.loop.add_signal_handler(signal.SIGCHLD, self._reap)
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT):
                self.loop.add_signal_handler(sig, self._on_stop, sig)
            self.loop.add_signal_handler(signal.SIGHUP, lambda: self.loop.create_task(self.reload()))
            self.loop.add_signal_handler(signal.SIGUSR1, self._forward, signal.SIGUSR1)
            try:
                socks, _ = self._sockets_for(self.config)
            except OSError as exc:
                log.error("%s", exc.strerror or exc)
                return 1
            admin_sock = None
            if self.config.server.admin:
                from edgeproxy.admin import bind_admin
                try:
                    admin_sock = bind_admin(self.config.server.admin_host,
                                            self.config.server.admin_port)
                except OSError as exc:
                    log.error("admin listener %s: %s", self.config.server.admin,
                              exc.strerror or exc)
                    for sock in socks:
                        sock.close()
                    return 1
            self._adopt_sockets(self.config, socks)
            self.gen = self._new_generation(self.config, socks, self.tls)
            self._start_health(self.gen)
            try:
                await self._start_generation(self.gen)
            except RuntimeError as exc:
                log.error("%s", exc)
                self.stopping = True
                if admin_sock is not None:
                    admin_sock.close()
                if self.workers:
                    await asyncio.sleep(0.5)
                    self._reap()
                return 1
        finally:
            self._reload_lock.release()
        if admin_sock is not None:
            from edgeproxy.admin import start_admin
            self.admin = await start_admin(self, admin_sock)
        self._write_pid_file()
        self._start_bus(self.config)
        log.info("supervisor %d: %d workers, pid file %s", os.getpid(), n, self.pid_file)
        try:
            await self._done
        finally:
            if self.admin is not None:
                self.admin.close()
            self._remove_pid_file()
        log.info("supervisor %d: stopped", os.getpid())
        return self.exit_code

    def _write_pid_file(self) -> None:
        try:
            with open(self.pid_file + ".tmp", "w") as f:
                f.write(f"{os.getpid()}\n")
            os.replace(self.pid_file + ".tmp", self.pid_file)
        except OSError as exc:
            log.warning("cannot write the pid file %s: %s (edgeproxy reload will not find "
                        "this process)", self.pid_file, exc.strerror)

    def _remove_pid_file(self) -> None:
        for path in (self.pid_file, self.pid_file + ".reload"):
            try:
                with open(path) as f:
                    mine = path.endswith(".reload") or f.read().strip() == str(os.getpid())
                if mine:
                    os.unlink(path)
            except OSError:
                pass


def _with_backends(config: Config, pool: str, backends: tuple[BackendConfig, ...]) -> Config:
    """config with the backends of one pool replaced (an admin change)."""
    pools = dict(config.pools)
    pools[pool] = dataclasses.replace(pools[pool], backends=backends)
    return dataclasses.replace(config, pools=pools)


def _drained(gen: Generation) -> set[tuple[str, str]]:
    """(pool, backend) drained through the admin API and not enabled,
    removed or added again since."""
    drained: set[tuple[str, str]] = set()
    for op in gen.ops:
        if op["op"] == "drain":
            drained.add((op["pool"], op["backend"]))
        else:
            drained.discard((op["pool"], op["backend"]))
    return drained


def _exit_cause(status: int) -> str:
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        try:
            name = signal.Signals(sig).name
        except ValueError:
            name = str(sig)
        return f"killed by signal {sig} ({name})"
    return f"exit code {os.waitstatus_to_exitcode(status)}"


def _kill(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def _close_fds_except(keep: set[int]) -> None:
    """In a new worker: close the supervisor's descriptors (other workers'
    control sockets, the admin listener, removed listeners, the event loop's)."""
    try:
        fds = sorted(int(name) for name in os.listdir("/proc/self/fd"))
    except OSError:
        fds = list(range(3, 1024))
    for fd in fds:
        if fd not in keep:
            try:
                os.close(fd)
            except OSError:
                pass


def _raise_nofile_limit() -> None:
    """Take the hard limit of open files as the soft one (each connection
    costs one or two descriptors); LimitNOFILE in the unit sets the hard one."""
    try:
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if hard == resource.RLIM_INFINITY:
            hard = 1 << 20
        if soft < hard:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (ValueError, OSError):
        pass
