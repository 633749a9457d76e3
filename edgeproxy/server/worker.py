"""One worker process: an event loop on uvloop serving every listener of the
config through the compiled core, with its ticker (clock, Date line,
timeouts, access-log flushes) and its signals.  `serve` starts one worker in
this process, or forks N that share the listening sockets."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import sys
import time
from email.utils import formatdate

import uvloop

from edgeproxy import _ext
from edgeproxy.config.model import Config, ListenConfig
from edgeproxy.proxy import build_listener_factory, build_pools, build_router, build_settings
from edgeproxy.server.accesslog import AccessLog

log = logging.getLogger("edgeproxy.server")

GRACE_DEFAULT = 30.0


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
    shortest = min(t.connect, t.read, t.send, t.header, t.keepalive)
    return max(0.02, min(1.0, shortest / 4))


class Worker:
    """The state of one worker process's loop."""

    def __init__(self, config: Config, socks: list[socket.socket]):
        self.config = config
        self.socks = socks
        self.loop = uvloop.new_event_loop()
        self.servers: list[asyncio.AbstractServer] = []
        self.access_log = (AccessLog(config.log.access_log, config.log.access_format)
                           if config.log.access_log else None)
        self.exit_code = 0
        self._stopping = False
        self._date_second = -1
        self._ticker: asyncio.Task | None = None
        self.cache = None        # EdgeCache, opened in start() (after fork)

    # -- clock --

    def _tick(self) -> None:
        now = self.loop.time()
        wall = int(time.time())
        if wall != self._date_second:
            self._date_second = wall
            _ext.set_clock(now, b"Date: " + formatdate(wall, usegmt=True).encode() + b"\r\n")
            if self.access_log is not None:
                self.access_log.flush()
        else:
            _ext.set_clock(now, None)
        _ext.expire_timeouts()

    async def _run_ticker(self, interval: float) -> None:
        while True:
            self._tick()
            await asyncio.sleep(interval)

    # -- start and stop --

    async def start(self) -> None:
        self._tick()
        settings = build_settings(self.config, self.access_log)
        pools = build_pools(self.config, client_tls=_client_tls)
        self.cache = _open_cache(self.config)
        router = build_router(self.config, pools, self.cache)
        for lc, sock in zip(self.config.listen, self.socks):
            ssl_ctx, extra = _server_tls(lc)
            factory = build_listener_factory(settings, router, lc, extra)
            srv = await self.loop.create_server(factory, sock=sock, backlog=lc.backlog, ssl=ssl_ctx)
            self.servers.append(srv)
            log.info("listening on %s://%s (pid %d)", "https" if ssl_ctx else "http", lc.bind,
                     os.getpid())
        self._ticker = self.loop.create_task(self._run_ticker(_tick_interval(self.config)))

    async def drain(self, grace: float) -> None:
        """Stop accepting, let requests in flight finish (up to grace
        seconds), close idle connections."""
        for srv in self.servers:
            srv.close()
        _ext.set_draining(True)
        _ext.close_idle_clients()
        deadline = self.loop.time() + grace
        while _ext.stats()["client_connections"] and self.loop.time() < deadline:
            await asyncio.sleep(0.05)

    def _on_signal(self, signum: int) -> None:
        if self._stopping:
            return
        self._stopping = True
        log.info("signal %s: stopping", signal.Signals(signum).name)
        if signum == signal.SIGQUIT:
            self.loop.stop()
            return
        task = self.loop.create_task(self.drain(GRACE_DEFAULT))
        task.add_done_callback(lambda _: self.loop.stop())

    def run(self) -> int:
        asyncio.set_event_loop(self.loop)
        for s in (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT):
            self.loop.add_signal_handler(s, self._on_signal, s)
        if self.access_log is not None:
            self.loop.add_signal_handler(signal.SIGUSR1, self.access_log.reopen)
        try:
            self.loop.run_until_complete(self.start())
            self.loop.run_forever()
        finally:
            if self._ticker is not None:
                self._ticker.cancel()
            if self.access_log is not None:
                self.access_log.close()
            if self.cache is not None:
                self.cache.close()
            self.loop.close()
        return self.exit_code


def _open_cache(config: Config):
    """This worker's EdgeCache when a route caches, else None.  Each worker
    opens the LMDB store itself, after fork (docs/cache.md)."""
    if config.cache is None or not any(r.cache for r in config.routes):
        return None
    from edgeproxy.cache.phase import EdgeCache
    from edgeproxy.cache.store import CacheError, CacheStore
    try:
        store = CacheStore.open(config.cache)
    except CacheError as exc:
        log.error("%s", exc)
        raise SystemExit(1) from None
    cache = EdgeCache(store, config.cache,
                      fetch_timeout=config.timeout.connect + config.timeout.read)
    cache.spawn(cache.store.maintain_forever())
    return cache


def _client_tls(pool_config):
    from edgeproxy.tls import build_client_context  # only when https backends exist
    return build_client_context(pool_config.tls)


def _server_tls(lc: ListenConfig):
    """(ssl context or None, bytes of fields added to every response)."""
    if lc.tls is None:
        return None, b""
    from edgeproxy.tls import build_server_context
    stls = build_server_context(lc.tls)
    extra = b""
    if lc.tls.hsts:
        extra = b"Strict-Transport-Security: " + lc.tls.hsts.encode("latin-1") + b"\r\n"
    return stls.context, extra


def _worker_count(config: Config) -> int:
    n = config.server.workers
    return n if n > 0 else (os.cpu_count() or 1)


def serve(config: Config) -> int:
    """Run the proxy until a signal stops it; returns the exit code."""
    socks = [bind_socket(lc) for lc in config.listen]
    n = _worker_count(config)
    if n == 1:
        return Worker(config, socks).run()
    return _supervise(config, socks, n)


def _supervise(config: Config, socks: list[socket.socket], n: int) -> int:
    """Fork n workers sharing the sockets; forward stop signals; replace a
    worker that dies while not stopping."""
    children: dict[int, int] = {}
    stopping = False

    def spawn(slot: int) -> None:
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                code = Worker(config, socks).run()
            except BaseException:
                log.exception("worker %d crashed", os.getpid())
            finally:
                os._exit(code)
        children[pid] = slot

    def forward(signum, _frame):
        nonlocal stopping
        stopping = True
        for pid in list(children):
            try:
                os.kill(pid, signum)
            except ProcessLookupError:
                pass

    for s in (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT):
        signal.signal(s, forward)
    for i in range(n):
        spawn(i)
    log.info("supervisor %d: %d workers", os.getpid(), n)
    while children:
        try:
            pid, status = os.wait()
        except ChildProcessError:
            break
        except InterruptedError:
            continue
        slot = children.pop(pid, None)
        if slot is None:
            continue
        if not stopping:
            log.error("worker %d exited (%s); starting another", pid,
                      f"signal {-os.waitstatus_to_exitcode(status)}"
                      if os.WIFSIGNALED(status) else f"code {os.waitstatus_to_exitcode(status)}")
            spawn(slot)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit("use: edgeproxy run")
