"""The shared-memory board between the health prober and the workers.

One anonymous MAP_SHARED mapping is made before the workers fork, so every
process of the proxy sees the same bytes.  It holds, for each backend of the
configuration (pools and backends in file order):

- a health slot, written by the one process that runs the active checks and
  read by every worker's compiled picker through a pointer
  (`Backend.attach_health`; the layout is `HealthSlot` in ext/balance.pyx);
- per worker, a row of counters (outstanding requests, passive failures,
  ejection) that the worker rewrites once a second, for `edgeproxy status`.

A one-byte `up` flag needs no lock: it is written by one process and a
reader sees either value.  Counter rows are only for display.
"""
from __future__ import annotations

import mmap
import struct
import time
from dataclasses import dataclass

from edgeproxy import _ext
from edgeproxy.config.model import Config

HEALTH = struct.Struct("=BBHIIId")     # up, checked, streak, status, changes, reserved, when
WORKER_HEAD = struct.Struct("=iiq")    # pid, reserved, written (wall-clock ms)
STAT = struct.Struct("=iiqqd")         # active, fails, requests, failures, ejected seconds left

assert HEALTH.size == _ext.HEALTH_SLOT_SIZE, "HEALTH must match HealthSlot in ext/balance.pyx"

CHECK_NONE, CHECK_PASS, CHECK_FAIL = 0, 1, 2


@dataclass
class Health:
    """One backend's active-check verdict as the board holds it."""
    up: bool
    checked: int          # CHECK_NONE, CHECK_PASS or CHECK_FAIL
    streak: int
    status: int
    changes: int
    when: float


@dataclass
class WorkerStat:
    """One worker's counters for one backend."""
    active: int
    fails: int
    requests: int
    failures: int
    ejected_left: float   # seconds until its ejection ends; 0 = not ejected


class HealthBoard:
    """The shared region for one configuration and a number of workers."""

    def __init__(self, config: Config, workers: int):
        self._config = config
        self.keys = [(name, i) for name, pc in config.pools.items() for i in range(len(pc.backends))]
        self.index = {key: k for k, key in enumerate(self.keys)}
        self.workers = workers
        n = len(self.keys)
        self._row = WORKER_HEAD.size + n * STAT.size
        self._rows_at = n * HEALTH.size
        size = max(self._rows_at + workers * self._row, 1)
        self.map = mmap.mmap(-1, size, flags=mmap.MAP_SHARED,
                             prot=mmap.PROT_READ | mmap.PROT_WRITE)
        for k in range(n):
            HEALTH.pack_into(self.map, k * HEALTH.size, 1, CHECK_NONE, 0, 0, 0, 0, 0.0)
        self._mem = None

    # -- health slots --

    def health_offset(self, pool: str, i: int) -> int:
        return self.index[(pool, i)] * HEALTH.size

    def read_health(self, pool: str, i: int) -> Health:
        up, checked, streak, status, changes, _, when = HEALTH.unpack_from(
            self.map, self.health_offset(pool, i))
        return Health(bool(up), checked, streak, status, changes, when)

    def write_health(self, pool: str, i: int, h: Health) -> None:
        # the `up` byte goes last, as one byte, after the fields it summarises
        off = self.health_offset(pool, i)
        HEALTH.pack_into(self.map, off, self.map[off], h.checked, min(h.streak, 65535),
                         h.status, h.changes & 0xFFFFFFFF, 0, h.when)
        self.map[off] = 1 if h.up else 0

    def carry_over(self, old_config: Config, old: HealthBoard) -> None:
        """Take each backend's health from the board of the previous
        configuration (same pool name, host and port), so a reload neither
        forgets a dead backend nor takes a live one out."""
        where = {(name, b.host, b.port): i for name, pc in old_config.pools.items()
                 for i, b in enumerate(pc.backends)}
        for name, i in self.keys:
            b = self._config.pools[name].backends[i]
            j = where.get((name, b.host, b.port))
            if j is not None:
                self.write_health(name, i, old.read_health(name, j))

    def attach(self, pools: dict) -> None:
        """Point every backend of the built pools at its health slot."""
        if self._mem is None:
            self._mem = _ext.SharedMemory(self.map)
        for name, pool in pools.items():
            for i, backend in enumerate(pool.backends):
                backend.attach_health(self._mem, self.health_offset(name, i))

    # -- worker rows --

    def _row_offset(self, slot: int) -> int:
        return self._rows_at + slot * self._row

    def write_worker(self, slot: int, pid: int, pools: dict) -> None:
        """A worker's counters for every backend (called once a second)."""
        if not 0 <= slot < self.workers:
            return
        base = self._row_offset(slot)
        now = _ext.clock()
        for name, pool in pools.items():
            for i, b in enumerate(pool.backends):
                left = max(0.0, b.eject_until - now) if b.ejected else 0.0
                STAT.pack_into(self.map, base + WORKER_HEAD.size + self.index[(name, i)] * STAT.size,
                               b.active, b.fails, b.requests, b.failures_total, left)
        WORKER_HEAD.pack_into(self.map, base, pid, 0, int(time.time() * 1000))

    def read_worker(self, slot: int) -> tuple[int, float, list[WorkerStat]]:
        """(pid, when written, counters per backend in board order); pid 0 = never written."""
        base = self._row_offset(slot)
        pid, _, ms = WORKER_HEAD.unpack_from(self.map, base)
        stats = [WorkerStat(*STAT.unpack_from(self.map, base + WORKER_HEAD.size + k * STAT.size))
                 for k in range(len(self.keys))]
        return pid, ms / 1000.0, stats
