"""The active health checker: probes every backend of every pool that has
`health.path` on its interval, applies the rise/fall thresholds, and
publishes each verdict on the shared board.  One instance runs per proxy
(in the only worker, or in the monitor process when there are several), so
a backend sees one probe per interval whatever the number of workers.
A backend added through the admin API to a checked pool is checked too."""
from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field

from edgeproxy.config.model import BackendConfig, Config, PoolConfig
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
    verdicts: dict[tuple[str, str], Verdict] = field(default_factory=dict)   # (pool, backend)
    _tasks: dict[tuple[str, str], asyncio.Task] = field(default_factory=dict)
    _contexts: dict[str, object] = field(default_factory=dict)   # pool -> TLS context for https

    def start(self) -> None:
        """One task per checked backend, on the running loop."""
        for name, pc in self.config.pools.items():
            for bc in pc.backends:
                self.add(name, bc)

    def add(self, name: str, bc: BackendConfig) -> None:
        """Check this backend of pool `name` too (if the pool has checks)."""
        pc = self.config.pools[name]
        if pc.health is None:
            return
        ctx = self._tls_context(name, pc) if bc.scheme == "https" else None
        if bc.scheme == "https" and ctx is None:
            return
        key = (name, bc.name)
        self.remove(*key)
        self.verdicts[key] = Verdict()
        self._tasks[key] = asyncio.get_running_loop().create_task(self._watch(name, bc, pc, ctx))

    def remove(self, name: str, backend: str) -> None:
        task = self._tasks.pop((name, backend), None)
        if task is not None:
            task.cancel()
        self.verdicts.pop((name, backend), None)

    def stop(self) -> None:
        for t in self._tasks.values():
            t.cancel()
        self._tasks.clear()

    def _tls_context(self, name: str, pc: PoolConfig):
        if name in self._contexts:
            return self._contexts[name]
        self._contexts[name] = None
        try:
            from edgeproxy.tls import build_client_context
        except ImportError:
            log.error("pool %s: https backends are not health-checked (no TLS support "
                      "in this build); they stay up", name)
            return None
        self._contexts[name] = build_client_context(pc.tls)
        return self._contexts[name]

    async def _watch(self, name: str, bc: BackendConfig, pc: PoolConfig, ctx) -> None:
        hc = pc.health
        if bc.path is not None:
            host_header = "localhost"       # as the proxy sends for a client without Host
        elif ctx is not None and pc.tls.server_name:
            host_header = pc.tls.server_name
        else:
            host_header = bc.name
        loop = asyncio.get_running_loop()
        while True:
            started = loop.time()
            result = await probe(bc.host, bc.port, hc.path, timeout=hc.timeout,
                                 expect=hc.expect, host_header=host_header,
                                 ssl=ctx if bc.scheme == "https" else None,
                                 server_hostname=pc.tls.server_name, unix_path=bc.path)
            self.record(name, bc, result)
            await asyncio.sleep(max(0.0, hc.interval - (loop.time() - started)))

    def record(self, name: str, bc: BackendConfig, result: ProbeResult) -> None:
        """Apply one probe's result to the backend's verdict and the board."""
        hc = self.config.pools[name].health
        key = (name, bc.name)
        v = self.verdicts[key]
        v.last = result
        v.when = time.time()
        if result.ok:
            v.passes += 1
            v.failures = 0
            if not v.up and v.passes >= hc.rise:
                v.up = True
                v.changes += 1
                log.warning("pool %s: backend %s is up (%d checks passed: %s)",
                            name, bc.url, v.passes, result.detail)
        else:
            v.failures += 1
            v.passes = 0
            if v.up and v.failures >= hc.fall:
                v.up = False
                v.changes += 1
                log.warning("pool %s: backend %s is down (%d checks failed: %s)",
                            name, bc.url, v.failures, result.detail)
        self.board.write_health(*key, Health(
            up=v.up, checked=CHECK_PASS if result.ok else CHECK_FAIL,
            streak=v.passes or v.failures, status=result.status, changes=v.changes,
            when=v.when))
