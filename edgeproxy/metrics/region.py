"""The shared metrics region: one slot of int64 values per worker process,
mapped MAP_SHARED by the supervisor before it forks.  The compiled core
increments its counters in the slot (edgeproxy._ext.attach_metrics); the
worker's ticker writes the gauges; the supervisor reads every slot."""

from __future__ import annotations

import mmap

from edgeproxy import _ext
from edgeproxy.config.model import Config

LAYOUT = _ext.metrics_layout()
SLOT_LEN = LAYOUT["slot_len"]          # int64 values per slot
SLOT_BYTES = SLOT_LEN * 8
ROUTE_MAX = LAYOUT["route_max"]
BACKEND_MAX = LAYOUT["backend_max"]
BACKEND_WIDTH = 4                      # requests, active, up, (spare)

# gauges the worker's ticker writes, at LAYOUT["gauges"] + index
GAUGES = ("client_connections", "upstream_connections", "upstream_idle")


def route_labels(config: Config) -> list[tuple[str, str]]:
    """(route, pool) for each metrics row: row 0 is "no route", row i + 1 is
    config.routes[i] (as edgeproxy.proxy.build_router numbers them)."""
    rows = [("none", "")]
    for r in config.routes[:ROUTE_MAX - 1]:
        rows.append((f"{r.host or ''}{r.path}", r.pool))
    return rows


class MetricsRegion:
    """An anonymous shared mapping of `slots` slots, and which are in use."""

    def __init__(self, slots: int):
        self.slots = slots
        self.mm = mmap.mmap(-1, slots * SLOT_BYTES, flags=mmap.MAP_SHARED,
                            prot=mmap.PROT_READ | mmap.PROT_WRITE)
        self.values = memoryview(self.mm).cast("q")
        self._free = list(range(slots - 1, -1, -1))

    def take(self) -> int | None:
        """A zeroed slot for a new worker, or None when all are in use."""
        if not self._free:
            return None
        i = self._free.pop()
        self.values[i * SLOT_LEN:(i + 1) * SLOT_LEN] = memoryview(bytes(SLOT_BYTES)).cast("q")
        return i

    def release(self, i: int) -> None:
        self._free.append(i)

    def slot(self, i: int) -> memoryview:
        return self.values[i * SLOT_LEN:(i + 1) * SLOT_LEN]


class WorkerSlot:
    """A worker's side of its slot: points the compiled core's counters at
    it, and publishes the gauges (called by the ticker, at most once a
    tick: nothing here is on the request path)."""

    def __init__(self, region: MetricsRegion, index: int):
        self.values = region.slot(index)
        _ext.attach_metrics(region.mm, index * SLOT_BYTES)

    def publish(self, backends: list) -> None:
        v = self.values
        stats = _ext.stats()
        g = LAYOUT["gauges"]
        for k, name in enumerate(GAUGES):
            v[g + k] = stats[name]
        base = LAYOUT["backends"]
        for j, b in enumerate(backends[:BACKEND_MAX]):
            o = base + j * BACKEND_WIDTH
            if b is None:                  # removed at run time
                v[o + 1] = 0
                v[o + 2] = 0
                continue
            v[o] = b.requests
            v[o + 1] = b.active
            v[o + 2] = 1 if b.up else 0
