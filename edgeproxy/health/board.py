"""The shared-memory board between the health prober and the workers.

One anonymous MAP_SHARED mapping is made before the workers fork, so every
process of the proxy sees the same bytes.  It holds, for each backend (those
of the configuration in file order, then those the admin API adds at run
time, up to `capacity` in all; a backend is known by its pool and its name,
"127.0.0.1:5000"):

- a health slot, written by the one process that runs the active checks and
  read by every worker's compiled picker through a pointer
  (`Backend.attach_health`; the layout is `HealthSlot` in ext/balance.pyx);
- per worker, a row of counters (outstanding requests, passive failures,
  ejection) that the worker rewrites once a second, for `edgeproxy status`.

A one-byte `up` flag needs no lock: it is written by one process and a
reader sees either value.  Counter rows are only for display.

The mapping has room for backends added later because it cannot grow once
the workers have forked; the supervisor gives an added backend its slot
(`add`) and tells the workers where it is (`place`).
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
# as many backends as the metrics table has rows: the admin API refuses more
CAPACITY = _ext.metrics_layout()["backend_max"]


def backend_name(host: str, port: int) -> str:
    """A backend's name, as edgeproxy._ext.Backend.name spells it."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


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
        self.keys = [(name, b.name)
                     for name, pc in config.pools.items() for b in pc.backends]
        self.index = {key: k for k, key in enumerate(self.keys)}
        self.workers = workers
        self.capacity = max(CAPACITY, len(self.keys))
        self._row = WORKER_HEAD.size + self.capacity * STAT.size
        self._rows_at = self.capacity * HEALTH.size
        # pages of slots never used are never touched: they cost no memory
        self.map = mmap.mmap(-1, self._rows_at + workers * self._row, flags=mmap.MAP_SHARED,
                             prot=mmap.PROT_READ | mmap.PROT_WRITE)
        for k in range(len(self.keys)):
            self._reset(k)
        self._mem = None

    def _reset(self, k: int) -> None:
        HEALTH.pack_into(self.map, k * HEALTH.size, 1, CHECK_NONE, 0, 0, 0, 0, 0.0)

    # -- backends added at run time --

    def add(self, pool: str, name: str) -> int | None:
        """Give a backend added through the admin API a slot (its own again
        if it was removed and comes back), up until checked; None when the
        board is full.  Only the supervisor calls it, before the workers
        hear of the backend."""
        k = self.index.get((pool, name))
        if k is None:
            if len(self.keys) >= self.capacity:
                return None
            k = len(self.keys)
            self.keys.append((pool, name))
            self.index[(pool, name)] = k
        self._reset(k)
        return k

    def place(self, pool: str, name: str, k: int) -> None:
        """In a worker: the slot the supervisor gave an added backend."""
        if k >= len(self.keys):
            self.keys.extend([("", "")] * (k + 1 - len(self.keys)))
        self.keys[k] = (pool, name)
        self.index[(pool, name)] = k

    # -- health slots --

    def health_offset(self, pool: str, name: str) -> int:
        return self.index[(pool, name)] * HEALTH.size

    def read_health(self, pool: str, name: str) -> Health:
        up, checked, streak, status, changes, _, when = HEALTH.unpack_from(
            self.map, self.health_offset(pool, name))
        return Health(bool(up), checked, streak, status, changes, when)

    def write_health(self, pool: str, name: str, h: Health) -> None:
        # the `up` byte goes last, as one byte, after the fields it summarises
        off = self.health_offset(pool, name)
        HEALTH.pack_into(self.map, off, self.map[off], h.checked, min(h.streak, 65535),
                         h.status, h.changes & 0xFFFFFFFF, 0, h.when)
        self.map[off] = 1 if h.up else 0

    def carry_over(self, old: HealthBoard) -> None:
        """Take each backend's health from the board of the previous
        configuration (same pool and backend), so a reload neither forgets
        a dead backend nor takes a live one out."""
        for pool, name in self.keys:
            if (pool, name) in old.index:
                self.write_health(pool, name, old.read_health(pool, name))

    def attach(self, pools: dict) -> None:
        """Point every backend of the built pools at its health slot."""
        for name, pool in pools.items():
            for backend in pool.backends:
                self.attach_backend(name, backend)

    def attach_backend(self, pool: str, backend) -> None:
        if self._mem is None:
            self._mem = _ext.SharedMemory(self.map)
        backend.attach_health(self._mem, self.health_offset(pool, backend.name))

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
            for b in pool.backends:
                left = max(0.0, b.eject_until - now) if b.ejected else 0.0
                STAT.pack_into(self.map, base + WORKER_HEAD.size
                               + self.index[(name, b.name)] * STAT.size,
                               b.active, b.fails, b.requests, b.failures_total, left)
        WORKER_HEAD.pack_into(self.map, base, pid, 0, int(time.time() * 1000))

    def read_worker(self, slot: int) -> tuple[int, float, list[WorkerStat]]:
        """(pid, when written, counters per backend in board order); pid 0 = never written."""
        base = self._row_offset(slot)
        pid, _, ms = WORKER_HEAD.unpack_from(self.map, base)
        stats = [WorkerStat(*STAT.unpack_from(self.map, base + WORKER_HEAD.size + k * STAT.size))
                 for k in range(len(self.keys))]
        return pid, ms / 1000.0, stats
