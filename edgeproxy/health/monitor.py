"""The monitor process of a proxy with several workers: forked by the
supervisor, it runs the one health checker and the state writer on its own
event loop, so backends are probed once per interval however many workers
there are.  (With one worker, the worker's loop runs them instead.)"""
from __future__ import annotations

import asyncio
import logging
import os
import signal

import uvloop

from edgeproxy.config.model import Config
from edgeproxy.health.board import HealthBoard
from edgeproxy.health.checker import HealthChecker
from edgeproxy.health.status import StateWriter

log = logging.getLogger("edgeproxy.health")


def run_monitor(config: Config, board: HealthBoard, supervisor_pid: int) -> int:
    """Probe and write the state file until SIGTERM, SIGINT or SIGQUIT."""
    loop = uvloop.new_event_loop()
    asyncio.set_event_loop(loop)
    checker = HealthChecker(config, board)
    writer = StateWriter(config, board, checker, pid=supervisor_pid)
    for s in (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT):
        loop.add_signal_handler(s, loop.stop)

    async def start() -> None:
        checker.start()
        writer.start()

    try:
        loop.run_until_complete(start())
        log.info("monitor %d: health checks and state file %s", os.getpid(), writer.path)
        loop.run_forever()
    finally:
        checker.stop()
        writer.stop()
        pending = [t for t in asyncio.all_tasks(loop) if not t.done()]
        for t in pending:
            t.cancel()
        if pending:
            loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
        loop.close()
    return 0
