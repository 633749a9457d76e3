"""The active health checker: probes every backend of every pool that has
`health.path` on its interval, applies the rise/fall thresholds, and
publishes each verdict on the shared board.  One instance runs per proxy
(in the only worker, or in the monitor process when there are several), so
a backend sees one probe per interval whatever the number of workers."""
from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field

from edgeproxy.config.model import Config, PoolConfig
from edgeproxy.health.board import CHECK_FAIL, CHECK_PASS, Health, HealthBoard
from edgeproxy.health.probe import ProbeResult, probe

log = logging.getLogger("edgeproxy.health")


@dataclass
class Verdict:
    """What the checker knows of one backend."""
    up: bool = True
    passes: int = 0       # consecutive
    failures: int = 0     # consecutive
    changes: int = 0
    last: ProbeResult | None = None
    when: float = 0.0     # wall-clock time of the last probe


@dataclass
class HealthChecker:
    config: Config
    board: HealthBoard
    verdicts: dict[tuple[str, int], Verdict] = field(default_factory=dict)
    _tasks: list[asyncio.Task] = field(default_factory=list)

    def start(self) -> None:
        """One task per checked backend, on the running loop."""
        loop = asyncio.get_running_loop()
        for name, pc in self.config.pools.items():
            if pc.health is None:
                continue
            ctx = self._tls_context(name, pc)
            for i, bc in enumerate(pc.backends):
                if bc.scheme == "https" and ctx is None:
                    continue
                self.verdicts[(name, i)] = Verdict()
                self._tasks.append(loop.create_task(self._watch(name, i, pc, ctx)))

    def stop(self) -> None:
        for t in self._tasks:
            t.cancel()
        self._tasks.clear()

    def _tls_context(self, name: str, pc: PoolConfig):
        if not any(b.scheme == "https" for b in pc.backends):
            return None
        try:
            from edgeproxy.tls import build_client_context
        except ImportError:
            log.error("pool %s: https backends are not health-checked (no TLS support "
                      "in this build); they stay up", name)
            return None
        return build_client_context(pc.tls)

    async def _watch(self, name: str, i: int, pc: PoolConfig, ctx) -> None:
        hc = pc.health
        bc = pc.backends[i]
        host_header = pc.tls.server_name if (ctx is not None and pc.tls.server_name) else (
            f"[{bc.host}]:{bc.port}" if ":" in bc.host else f"{bc.host}:{bc.port}")
        loop = asyncio.get_running_loop()
        while True:
            started = loop.time()
            result = await probe(bc.host, bc.port, hc.path, timeout=hc.timeout,
                                 expect=hc.expect, host_header=host_header,
                                 ssl=ctx if bc.scheme == "https" else None,
                                 server_hostname=pc.tls.server_name)
            self.record(name, i, result)
            await asyncio.sleep(max(0.0, hc.interval - (loop.time() - started)))

    def record(self, name: str, i: int, result: ProbeResult) -> None:
        """Apply one probe's result to the backend's verdict and the board."""
        pc = self.config.pools[name]
        hc = pc.health
        v = self.verdicts[(name, i)]
        v.last = result
        v.when = time.time()
        if result.ok:
            v.passes += 1
            v.failures = 0
            if not v.up and v.passes >= hc.rise:
                v.up = True
                v.changes += 1
                log.warning("pool %s: backend %s is up (%d checks passed: %s)",
                            name, pc.backends[i].url, v.passes, result.detail)
        else:
            v.failures += 1
            v.passes = 0
            if v.up and v.failures >= hc.fall:
                v.up = False
                v.changes += 1
                log.warning("pool %s: backend %s is down (%d checks failed: %s)",
                            name, pc.backends[i].url, v.failures, result.detail)
        self.board.write_health(name, i, Health(
            up=v.up, checked=CHECK_PASS if result.ok else CHECK_FAIL,
            streak=v.passes or v.failures, status=result.status, changes=v.changes,
            when=v.when))
