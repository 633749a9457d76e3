"""One worker process: an event loop on uvloop serving every listener of the
config through the compiled core, with its ticker (clock, Date line,
timeouts, access-log flushes, metrics gauges), its signals and its control
channel to the supervisor.  `serve` runs the supervisor
(edgeproxy.server.supervisor) or, without one, a single worker in this
process."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import socket
import sys
import time
from collections.abc import Callable
from email.utils import formatdate

from edgeproxy import _ext
from edgeproxy.config.model import Config, ListenConfig
from edgeproxy.health import HealthBoard, HealthChecker, StateWriter
from edgeproxy.metrics.region import route_labels
from edgeproxy.proxy import build_listener_factory, build_pools, build_router, build_settings
from edgeproxy.proxy.build import Hooks
from edgeproxy.server.accept import AcceptGuard
from edgeproxy.server.accesslog import AccessLog
from edgeproxy.server.loop import check_descriptors, new_event_loop, on_accept_exhausted
from edgeproxy.server.memory import HeapTrimmer

log = logging.getLogger("edgeproxy.server")

# A draining worker closes a keep-alive connection once it has been idle this
# long; one in use gets "Connection: close" on its next response instead, so
# a request is never cut by the close racing it.
DRAIN_IDLE_CLOSE = 1.0
EXPIRY_CHECK_INTERVAL = 86400.0  # seconds between two certificate expiry checks (after the one at load)
# The signals a worker handles.  Without a supervisor they are held (blocked)
# from before the sockets listen until run() has its handlers: a SIGHUP sent
# as soon as the port accepts would otherwise take its default action (exit).
HANDLED_SIGNALS = {signal.SIGTERM, signal.SIGINT, signal.SIGQUIT, signal.SIGHUP, signal.SIGUSR1}
HOT_INDEX_MAX = 64 << 20     # bytes a worker's hot index of cache hits holds at most
HOT_BODY_MAX = 1 << 20       # larger bodies are served by the cache phase


def bind_socket(lc: ListenConfig) -> socket.socket:
    """A listening socket for one [[listen]] entry (bound by the parent, so
    every worker shares it)."""
    host = lc.host or "0.0.0.0"
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind((host, lc.port))
        sock.listen(lc.backlog)
    except OSError:
        sock.close()
        raise
    sock.setblocking(False)
    return sock


def _tick_interval(config: Config) -> float:
    t = config.timeout
    shortest = min(t.connect, t.read, t.send, t.header, t.keepalive, t.body)
    # pool ticks end ejections, notice health changes and expire queued requests
    for pc in config.pools.values():
        shortest = min(shortest, pc.queue_timeout)
        if pc.health is not None:
            shortest = min(shortest, pc.health.interval * 2)
    return max(0.02, min(1.0, shortest / 4))


class Worker:
    """The state of one worker process's loop.

    `control` is this worker's end of a socket pair to the supervisor:
    JSON lines, {"ready": true} or {"error": ...} up once at start, commands
    down ({"cmd": "retire"} on reload, {"cmd": "backend", ...} from the
    admin API).  Its EOF means the supervisor is gone: the worker drains and
    exits.  `slot` is its metrics slot; `ops` the run-time backend changes
    made since the configuration was loaded; `tls` the ServerTLS of each
    HTTPS listener (by index), built by the parent before the fork.
    `board` is the health state shared with the other processes and
    `board_row` this worker's row in it; `monitor` says whether this loop
    runs the health checks and the state file itself (a lone worker)."""

    def __init__(self, config: Config, socks: list[socket.socket], *,
                 control: socket.socket | None = None, slot=None, ops: list[dict] = (),
                 tls: dict | None = None, board: HealthBoard | None = None,
                 board_row: int = 0, monitor: bool = True):
        self.config = config
        self.socks = socks
        self.control = control
        self.slot = slot
        self.ops = list(ops)
        self.tls = tls or {}
        # Loading the certificates checked them and logged any expiry (once,
        # in the process that loaded them): the daily check starts a day later.
        self._next_expiry_check = time.time() + EXPIRY_CHECK_INTERVAL
        self.board = board or HealthBoard(config, 1)
        self.board_row = board_row
        self.monitor = monitor
        self.checker: HealthChecker | None = None
        self.state_writer: StateWriter | None = None
        self.loop = new_event_loop()
        # the listeners' servers, paused when nearly out of descriptors
        self.accept = AcceptGuard(self.loop, config.server.fd_reserve)
        on_accept_exhausted[:] = [self.accept.out_of_descriptors]
        try:
            self.access_log = (AccessLog(config.log.access_log, config.log.access_format,
                                         [route for route, _ in route_labels(config)])
                               if config.log.access_log else None)
        except OSError as exc:          # one line, not a traceback (a reload to a bad path)
            log.error("log.access_log: cannot open %s: %s", config.log.access_log,
                      exc.strerror or exc)
            raise SystemExit(1) from None
        self.pools: dict = {}
        self.backends: list = []      # metrics table: config order, then added ones
        self.exit_code = 0
        self._drain_deadline: float | None = None
        self._date_second = -1
        self._ticker: asyncio.Task | None = None
        self._each_second: list = []       # the ticker's steps (_tick_steps)
        self._each_tick: list = []
        self._failed_steps: set[str] = set()
        self.cache = None        # EdgeCache, opened in start() (after fork)
        self.heap = HeapTrimmer()

    # -- clock --

    def _tick(self) -> None:
        now = self.loop.time()
        wall = int(time.time())
        if wall != self._date_second:
            self._date_second = wall
            _ext.set_clock(now, b"Date: " + formatdate(wall, usegmt=True).encode() + b"\r\n")
            self._run_steps(self._each_second)
        else:
            _ext.set_clock(now, None)
        self._run_steps(self._each_tick)

    def _run_steps(self, steps: list[tuple[str, Callable[[], object]]]) -> None:
        # One failing step must not stop the others, nor the ticker: the
        # clock, timeouts and log flushes of every connection depend on it.
        for name, step in steps:
            try:
                step()
            except Exception:
                if name not in self._failed_steps:   # once, not on every tick
                    self._failed_steps.add(name)
                    log.exception("ticker: %s failed (the ticker goes on; not logged again)",
                                  name)

    def _tick_steps(self) -> None:
        """What the ticker does besides the clock: only what this worker
        uses (set once start() has built it)."""
        second: list[tuple[str, Callable[[], object]]] = []
        if self.access_log is not None:
            second.append(("access log flush", self.access_log.flush))
        if self.tls and self.board_row == 0:    # one worker warns, not every one
            second.append(("certificate expiry check", self._check_expiry))
        second.append(("health board", self._write_board))
        second.append(("descriptor check", check_descriptors))
        second.append(("heap trim", self.heap.tick))
        tick: list[tuple[str, Callable[[], object]]] = [
            ("timeouts", _ext.expire_timeouts), ("pools", _ext.pools_tick),
            ("accept guard", self.accept.tick)]
        if self.cache is not None:
            tick.append(("cache sync", self.cache.sync_hot))
        if self.slot is not None:
            tick.append(("metrics", self._publish))
        self._each_second, self._each_tick = second, tick

    def _check_expiry(self) -> None:
        wall = self._date_second
        if wall >= self._next_expiry_check:
            self._next_expiry_check = wall + EXPIRY_CHECK_INTERVAL
            for stls in self.tls.values():
                for warning in stls.expiry_warnings():
                    log.warning("%s", warning)

    def _write_board(self) -> None:
        self.board.write_worker(self.board_row, os.getpid(), self.pools)

    def _publish(self) -> None:
        self.slot.publish(self.backends)

    async def _run_ticker(self, interval: float) -> None:
        while True:
            self._tick()
            await asyncio.sleep(interval)

    # -- start and stop --

    async def start(self) -> None:
        # The loop shares the GIL with helper threads (cache writes and
        # upkeep, certificate loading).  Python hands the GIL over every 5 ms
        # by default, which a waiting loop turns into tail latency; hand it
        # over every 0.5 ms instead.  With no other thread running it costs
        # nothing.
        sys.setswitchinterval(0.0005)
        _ext.set_request_id_prefix(os.urandom(6).hex().encode())
        self._tick()
        settings = build_settings(self.config, self.access_log)
        self.pools = build_pools(self.config, client_tls=_client_tls)
        self.backends = [b for pool in self.pools.values() for b in pool.backends]
        self.board.attach(self.pools)
        _ext.set_pools(self.pools.values())
        if self.monitor:
            self.checker = HealthChecker(self.config, self.board)
            self.checker.start()
            self.state_writer = StateWriter(self.config, self.board, self.checker)
            self.state_writer.start()
        self.cache = _open_cache(self.config)
        hooks = Hooks(self.config, self.pools, self.loop)
        router = build_router(self.config, self.pools, self.cache, hooks, settings=settings)
        for op in self.ops:
            self.apply(op)
        for i, (lc, sock) in enumerate(zip(self.config.listen, self.socks, strict=True)):
            ssl_ctx = self.tls[i].context if i in self.tls else None
            # TLS is run by the listener's own protocol (_ext.TLSServerConn) on a plain
            # TCP server; the handshake deadline is timeout.header
            factory = build_listener_factory(settings, router, lc, self.config, ssl_ctx, hooks)
            await self.accept.add(sock, factory, lc.backlog)
            log.info("listening on %s://%s (pid %d)", "https" if ssl_ctx else "http", lc.bind,
                     os.getpid())
        self._tick_steps()
        self._ticker = self.loop.create_task(self._run_ticker(_tick_interval(self.config)))

    def drain(self, timeout: float) -> None:
        """Stop accepting and let requests in flight finish, for at most
        `timeout` seconds (a later, shorter timeout wins); then exit."""
        deadline = self.loop.time() + timeout
        if self._drain_deadline is not None:
            self._drain_deadline = min(self._drain_deadline, deadline)
            return
        self._drain_deadline = deadline
        self.accept.close()
        _ext.set_draining(True)
        self.loop.create_task(self._drain()).add_done_callback(lambda _: self.loop.stop())

    async def _drain(self) -> None:
        while True:
            self._tick()
            _ext.close_idle_clients(DRAIN_IDLE_CLOSE)
            if not _ext.stats()["client_connections"]:
                return
            if self.loop.time() >= self._drain_deadline:
                log.info("drain: %d connections still open after the timeout; closing them",
                         _ext.stats()["client_connections"])
                return
            await asyncio.sleep(0.05)

    def _on_signal(self, signum: int) -> None:
        if signum == signal.SIGQUIT:
            log.info("signal SIGQUIT: exiting now")
            self.loop.stop()
            return
        log.info("signal %s: stopping (grace %gs)", signal.Signals(signum).name,
                 self.config.server.grace)
        self.drain(self.config.server.grace)

    # -- control channel --

    def _send(self, msg: dict) -> None:
        if self.control is not None:
            try:
                self.control.sendall(json.dumps(msg).encode() + b"\n")
            except OSError:
                pass

    def _on_control(self) -> None:
        try:
            data = self.control.recv(65536)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self.loop.remove_reader(self.control.fileno())
            log.warning("supervisor gone: draining")
            self.drain(self.config.server.grace)
            return
        self._ctl_buf += data
        while b"\n" in self._ctl_buf:
            line, _, self._ctl_buf = self._ctl_buf.partition(b"\n")
            try:
                msg = json.loads(line)
                if msg.get("cmd") == "retire":
                    log.info("retiring (configuration reloaded): draining for up to %gs",
                             self.config.server.drain_timeout)
                    self.drain(self.config.server.drain_timeout)
                elif msg.get("cmd") == "backend":
                    self.apply(msg["op"])
            except Exception:
                log.exception("bad control message %r", line[:200])

    def apply(self, op: dict) -> None:
        """A run-time backend change from the admin API (checked by the
        supervisor): {"op": "drain"|"enable"|"add"|"remove", "pool", "backend", ...}."""
        pool = self.pools[op["pool"]]
        kind, name = op["op"], op["backend"]
        if kind == "add":
            pc = self.config.pools[op["pool"]]
            b = _ext.Backend(op["host"], op["port"], weight=op.get("weight", 1),
                             idle_max=pc.keepalive, idle_timeout=pc.keepalive_timeout,
                             t_connect=self.config.timeout.connect, path=op.get("path"))
            b.proxy_protocol = {"": 0, "v1": 1, "v2": 2}[pc.proxy_protocol]
            # its health slot: the supervisor gave it one on the shared board
            self.board.place(op["pool"], name, op["slot"])
            self.board.attach_backend(op["pool"], b)
            pool.set_backends(pool.backends + [b])
            self.backends.append(b)
            return
        for b in list(pool.backends):
            if b.name != name:
                continue
            if kind == "remove":
                pool.set_backends([x for x in pool.backends if x is not b])
                self.backends[self.backends.index(b)] = None
            else:
                b.up = kind == "enable"

    def _on_hup(self) -> None:
        """Reload changed certificates (off the loop); new handshakes use
        them, established connections keep theirs."""
        for i, stls in self.tls.items():
            fut = self.loop.run_in_executor(None, stls.reload)
            bind = self.config.listen[i].bind
            fut.add_done_callback(lambda f, bind=bind: log.info(
                "listen %s: certificates %s", bind,
                "reloaded" if f.result() else "NOT reloaded (the old ones stay in service)"))

    def run(self) -> int:
        asyncio.set_event_loop(self.loop)
        for s in (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT):
            self.loop.add_signal_handler(s, self._on_signal, s)
        if self.access_log is not None:
            self.loop.add_signal_handler(signal.SIGUSR1, self.access_log.reopen)
        self.loop.add_signal_handler(signal.SIGHUP, self._on_hup)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, HANDLED_SIGNALS)   # held ones arrive now
        try:
            try:
                self.loop.run_until_complete(self.start())
            except Exception as exc:
                log.exception("worker failed to start")
                self._send({"error": f"worker failed to start: {exc}"})
                return 1
            if self.control is not None:
                self._ctl_buf = b""
                self.control.setblocking(False)
                self.loop.add_reader(self.control.fileno(), self._on_control)
            self._send({"ready": True})
            self.loop.run_forever()
        finally:
            if self._ticker is not None:
                self._ticker.cancel()
            if self.slot is not None:
                self.slot.publish(self.backends)
            if self.checker is not None:
                self.checker.stop()
            if self.state_writer is not None:
                self.state_writer.stop()
            _finish_tasks(self.loop)
            if self.access_log is not None:
                self.access_log.close()
            if self.cache is not None:
                self.cache.close()
            self.loop.close()
        return self.exit_code


def _finish_tasks(loop: asyncio.AbstractEventLoop) -> None:
    """Cancel what is still pending on a stopped loop and let it unwind, so
    closing the loop leaves no task behind."""
    pending = [t for t in asyncio.all_tasks(loop) if not t.done()]
    for t in pending:
        t.cancel()
    if pending:
        loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))


def _open_cache(config: Config):
    """This worker's EdgeCache when a route caches, else None.  Each worker
    opens the LMDB store itself, after fork (docs/cache.md)."""
    if config.cache is None or not any(r.cache for r in config.routes):
        return None
    from edgeproxy.cache.phase import EdgeCache
    from edgeproxy.cache.store import CacheDiskFull, CacheError, CacheStore
    try:
        store = CacheStore.open(config.cache)
    except CacheDiskFull as exc:     # a disk problem: serve, uncached, rather than not at all
        log.error("%s", exc)
        return None
    except CacheError as exc:
        log.error("%s", exc)
        raise SystemExit(1) from None
    # the hot index: plain fresh hits served without entering Python
    hot = _ext.HotIndex(min(HOT_INDEX_MAX, config.cache.max_size // 16), HOT_BODY_MAX)
    cache = EdgeCache(store, config.cache,
                      fetch_timeout=config.timeout.connect + config.timeout.read, hot=hot)
    cache.spawn(cache.store.maintain_forever())
    return cache


def _client_tls(pool_config):
    from edgeproxy.tls import build_client_context  # only when https backends exist
    return build_client_context(pool_config.tls)


def build_tls(config: Config) -> dict:
    """ServerTLS per HTTPS listener (by index), built before workers fork so
    they share session ticket keys; raises TLSConfigError naming the file."""
    tls = {}
    for i, lc in enumerate(config.listen):
        if lc.tls is not None:
            from edgeproxy.tls import build_server_context
            tls[i] = build_server_context(lc.tls)
    return tls



def serve(config: Config, *, supervise: bool = True,
          load: Callable[[], Config] | None = None) -> int:
    """Run the proxy until a signal stops it; returns the exit code.

    With `supervise` (the default) a supervisor process owns the listening
    sockets and runs the workers, and can reload: `load` reads the
    configuration again (None: reload reuses `config`).  Without it, one
    worker runs in this process (no reload, no admin listener)."""
    if supervise:
        from edgeproxy.server.supervisor import Supervisor
        return Supervisor(config, load or (lambda: config)).run()
    tls = build_tls(config)
    signal.pthread_sigmask(signal.SIG_BLOCK, HANDLED_SIGNALS)      # until run() handles them
    socks = []
    for lc in config.listen:
        try:
            socks.append(bind_socket(lc))
        except OSError as exc:
            raise OSError(exc.errno, f"listen {lc.bind}: {exc.strerror}") from None
    return Worker(config, socks, tls=tls).run()


if __name__ == "__main__":  # pragma: no cover
    sys.exit("use: edgeproxy run")
