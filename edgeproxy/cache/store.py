"""The LMDB cache file all worker processes share: entries, chunked bodies, tags, counters.

Layout (one LMDB environment, six named databases):

- ``meta``: primary key -> entry record, or -> vary record (the Vary field
  names) with the variants at primary key + b"\\x01" + 16-byte variant key.
  Keys longer than 400 bytes are cut and end in b"\\x00" + a hash.
- ``body``: body id (8 bytes) + chunk number (4 bytes) -> up to
  `chunk_size` bytes of body. A new body gets a new random id, so a reader
  holding an old entry never reads a mix of two bodies.
- ``lru``: last access (microseconds) + body id -> meta key: eviction order.
- ``tags`` (dupsort): purge tag -> meta keys.
- ``pending``: body id -> (pid, start time, bytes) of a body being written.
- ``info``: the format marker and the shared counters.

All writes go through one write transaction at a time (LMDB's writer lock,
shared by every process). Storage failures never reach the caller of a
write: it logs one line and the response is simply not stored.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import errno
import hashlib
import logging
import mmap
import os
import struct
import threading
import time
import weakref
import zlib
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple, Self, TypeVar

import lmdb

from edgeproxy.cache.entry import (
    FLAG_INVALIDATED,
    CacheEntry,
    VaryRecord,
    decode_record,
    encode_entry,
    encode_vary,
    patch_flags,
    patch_last_access,
)
from edgeproxy.cache.fills import FILLS_FILE, FillLocks, preallocate
from edgeproxy.cache.keys import variant_key
from edgeproxy.config.model import CacheConfig

__all__ = ["CHUNK_SIZE", "CacheCorrupt", "CacheDiskFull", "CacheError", "CacheStore",
           "CacheWriter", "StoredLookup"]

log = logging.getLogger("edgeproxy.cache")

FORMAT = b"edgeproxy-cache 1"
CHUNK_SIZE = 256 * 1024      # body bytes per LMDB value
HIGH_WATER = 0.80            # evict when the bytes in use pass this fraction of max_size...
LOW_WATER = 0.65             # ...down to this fraction
# The map is larger than max_size by this fraction of it: room for what the
# `bytes` estimate does not see (B-tree and free-list pages, pages freed but
# still visible to a reader, runs of free pages too short for a large value),
# so that a write, and above all the eviction making room, does not find the
# map full.
MAP_MARGIN = 0.25
MAP_FULL_FREE = 0.10         # on MDB_MAP_FULL: evict this fraction of max_size and retry,
MAP_FULL_RETRIES = 2         # twice, freeing more each time (large values need contiguous pages)
OBJECT_FRACTION = 8          # one object may use at most 1/8 of max_size
LOG_INTERVAL = 60.0          # a storage problem is logged at most once per reason this often
TOUCH_INTERVAL = 60.0        # a hit moves an entry in the eviction order at most this often
PENDING_MAX_AGE = 3600.0     # a body still being written after this is abandoned
UPKEEP_INTERVAL = 30.0       # reader check, abandoned bodies, sync to disk
BATCH = 256                  # entries per write transaction when purging or evicting
MAX_READERS = 1024           # reader slots: threads x processes reading at once

_MAX_KEY = 400
_DB_NAMES = (b"meta", b"body", b"lru", b"tags", b"pending", b"info")
COUNTERS = ("entries", "bytes", "hits", "misses", "stale", "revalidated", "stores",
            "store_failures", "evictions", "purges", "hot_hits", "corrupt", "range_fills",
            "bus_published", "bus_applied", "bus_gaps", "bus_missed")

_BODY_ID = struct.Struct(">Q")
_CHUNK_KEY = struct.Struct(">QI")
_LRU_KEY = struct.Struct(">QQ")
_PENDING = struct.Struct("<Idq")
_COUNTER = struct.Struct("<q")
# The change log read by the workers' hot indexes (phase.EdgeCache.sync_hot):
# every write that replaces, updates or removes entries adds the primary key
# (b"" for "anything may have changed": purges by prefix or tag) under the
# next generation number, in a ring of CHANGE_RING slots of the info db.
_CHANGES = b"g:changes"
_PID = struct.Struct("<I")
CHANGE_RING = 4096
# The generation is also kept in a small shared file beside the environment,
# written inside the write transaction (so under LMDB's writer lock): the
# compiled hit path reads it with one load and leaves requests to the
# phase until the worker has read the change log (ext/hotcache.pyx).
CHANGES_FILE = "changes"
CHANGE_KEY_MAX = 1024
# The files mapped read-write (LMDB's lock.mdb, `changes`, `fills`) get all
# their blocks before they are mapped: a store to a page the filesystem
# cannot back is a SIGBUS that kills the worker (a full disk, a small
# tmpfs). LMDB sizes lock.mdb (MAX_READERS - 1) * 64 + 192 bytes on x86-64
# Linux; a larger file it takes as it is (more reader slots), a smaller one
# it extends.
LOCK_FILE = "lock.mdb"
LOCK_SIZE = (MAX_READERS - 1) * 64 + 192
MIN_FREE = 1 << 20           # below this much free space at open, run without the cache
_DISK_FULL = (errno.ENOSPC, errno.EDQUOT)

T = TypeVar("T")


class CacheError(Exception):
    """The cache cannot be opened or read; the message names the path and the cause."""


class CacheCorrupt(CacheError):
    """A stored body does not match the checksum stored with its entry."""


class CacheDiskFull(CacheError):
    """The filesystem under the cache has no room to open it: the worker
    runs without the cache (a disk problem, not a configuration error)."""


class _WriterExpired(Exception):
    """The pending body of a writer was reclaimed (abandoned too long)."""


class StoredLookup(NamedTuple):
    entry: CacheEntry | None
    vary_miss: bool  # the URI is stored, but not the variant this request selects


_MISS = StoredLookup(None, False)
_VARY_MISS = StoredLookup(None, True)

# LMDB allows one environment per file per process, and a child of fork()
# must not use its parent's: not even close it (releasing its read
# transactions would free the parent's reader slots in the shared lock
# file). So a child keeps the inherited environments referenced, unused,
# and cannot open those paths itself.
_open_paths: dict[str, int] = {}
_stores: weakref.WeakSet[CacheStore] = weakref.WeakSet()
_inherited: list[Any] = []
_inherited_paths: set[str] = set()


def _after_fork_in_child() -> None:
    _inherited_paths.update(_open_paths)
    _open_paths.clear()
    for store in list(_stores):
        _inherited.append(store._env)
        store._env = store._pool = None


os.register_at_fork(after_in_child=_after_fork_in_child)


def _db_key(primary: bytes) -> bytes:
    if len(primary) <= _MAX_KEY:
        return primary
    return primary[:_MAX_KEY] + b"\x00" + hashlib.blake2b(primary, digest_size=16).digest()


def _entry_db_key(entry: CacheEntry) -> bytes:
    key = _db_key(entry.key)
    return key + b"\x01" + entry.variant if entry.variant else key


def _lru_key(last_access: float, body_id: int) -> bytes:
    return _LRU_KEY.pack(int(last_access * 1_000_000), body_id)


def _new_body_id() -> int:
    return int.from_bytes(os.urandom(8), "big") or 1


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class CacheStore:
    """The shared LMDB cache. Open one per process (after fork) with
    `CacheStore.open(config)`; every method may be called from the event
    loop thread or from worker threads."""

    def __init__(self, env: lmdb.Environment, dbs: dict[bytes, Any], path: str,
                 config: CacheConfig, chunk_size: int, touch_interval: float) -> None:
        self.path = path
        self.config = config
        self.chunk_size = chunk_size
        self.touch_interval = touch_interval
        self.map_size = env.info()["map_size"]
        self.max_size = config.max_size        # what eviction keeps the bytes in use under
        # One object may take 1/8 of max_size at most, so that storing it
        # never has to empty the cache.
        self.max_object = min(config.max_object, self.max_size // OBJECT_FRACTION)
        self.log = LogLimiter(LOG_INTERVAL)
        self._env: lmdb.Environment | None = env
        self._meta, self._body, self._lru = dbs[b"meta"], dbs[b"body"], dbs[b"lru"]
        self._tags, self._pending, self._info = dbs[b"tags"], dbs[b"pending"], dbs[b"info"]
        stat = env.stat()
        self._page = stat["psize"]
        self._node_max = ((self._page - 16) // 2) & ~1  # larger values go to overflow pages
        self._lock = threading.Lock()
        self._counts: dict[str, int] = {}
        self._touches: dict[bytes, tuple[int, float]] = {}
        self._live: set[int] = set()        # body ids of this process's open writers
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None
        self._next_upkeep = 0.0
        self.changes_map: mmap.mmap | None = None   # 8 bytes: the change generation
        self.fills: FillLocks | None = None          # claims on fetching a missing entry

    # --- opening and closing ----------------------------------------------------

    @classmethod
    def open(cls, config: CacheConfig, *, chunk_size: int = CHUNK_SIZE,
             touch_interval: float = TOUCH_INTERVAL) -> CacheStore:
        """Open (creating if needed) the cache directory `config.path`.

        Raises CacheError when the path is not a directory, holds a file
        that is not LMDB or an LMDB environment that is not an edgeproxy
        cache (or of another format version), or is already open in this
        process.
        """
        path = os.path.realpath(config.path)
        if os.path.lexists(path) and not os.path.isdir(path):
            raise CacheError(f"cache: {path} exists and is not a directory")
        try:
            os.makedirs(path, exist_ok=True)
        except OSError as exc:
            raise CacheError(f"cache: cannot create the directory {path}: {exc.strerror}") from None
        if _open_paths.get(path) == os.getpid():
            raise CacheError(f"cache: {path} is already open in this process")
        if path in _inherited_paths:
            raise CacheError(f"cache: {path} was open when this process was forked, so it "
                             "cannot be opened here: open the cache in each worker, not "
                             "before fork()")
        _check_room(path, map_size_for(config.max_size))
        _allocate(path, LOCK_FILE, LOCK_SIZE)
        try:
            # lock=True: readers and the writer coordinate through lock.mdb
            #   across processes; writemap=False: pages are written with
            #   write(), so a stray pointer cannot corrupt the file;
            # sync/metasync=False: commits do not fsync (maintain() syncs
            #   every UPKEEP_INTERVAL): a power loss may lose the last
            #   writes of a cache, a crashed process loses nothing;
            # readahead=False: the map is larger than RAM, hits are random;
            # meminit=False: no zeroing of buffers we fill completely.
            env = lmdb.open(path, map_size=map_size_for(config.max_size), subdir=True, create=True,
                            max_dbs=len(_DB_NAMES) + 2, lock=True, readahead=False,
                            writemap=False, sync=False, metasync=False, meminit=False,
                            max_readers=MAX_READERS, max_spare_txns=4)
        except lmdb.Error as exc:
            raise CacheError(f"cache: {path} is not a usable LMDB environment: {exc}") from None
        try:
            dbs = cls._open_dbs(env, path)
            env.reader_check()  # free the reader slots of processes that died
        except BaseException:
            env.close()
            raise
        store = cls(env, dbs, path, config, chunk_size, touch_interval)
        try:
            store.changes_map = _map_changes_file(os.path.join(path, CHANGES_FILE))
        except OSError as exc:
            env.close()
            if exc.errno in _DISK_FULL:
                raise _disk_full(path, exc) from None
            raise CacheError(f"cache: cannot open {os.path.join(path, CHANGES_FILE)}: "
                             f"{exc.strerror}") from None
        try:
            store.fills = FillLocks.open(os.path.join(path, FILLS_FILE))
        except OSError as exc:
            log.warning("cache: cannot open %s (%s): concurrent misses collapse within each "
                        "worker only", os.path.join(path, FILLS_FILE), exc.strerror or exc)
        _open_paths[path] = os.getpid()
        _stores.add(store)
        try:
            store._reap_pending()
        except lmdb.Error as exc:
            log.warning("cache: could not remove unfinished bodies: %s", exc)
        return store

    @staticmethod
    def _open_dbs(env: lmdb.Environment, path: str) -> dict[bytes, Any]:
        try:
            with env.begin() as txn:
                names = [key for key, _ in txn.cursor()]
            foreign = [n for n in names if n not in _DB_NAMES]
            if foreign:
                raise CacheError(f"cache: {path} holds an LMDB environment that is not an "
                                 f"edgeproxy cache (it has {foreign[0][:40]!r}); "
                                 "point cache.path at an empty or new directory")
            with env.begin(write=True) as txn:
                dbs = {name: env.open_db(name, txn=txn, dupsort=(name == b"tags"))
                       for name in _DB_NAMES}
                found = txn.get(b"format", db=dbs[b"info"])
                if found is None and names:
                    raise CacheError(f"cache: {path} holds an LMDB environment without "
                                     "an edgeproxy cache format marker")
                if found is None:
                    txn.put(b"format", FORMAT, db=dbs[b"info"])
                elif found != FORMAT:
                    raise CacheError(f"cache: {path} has format {found[:40]!r}, this version "
                                     f"reads {FORMAT!r}; delete the directory to start afresh")
        except lmdb.Error as exc:
            raise CacheError(f"cache: {path} cannot be read: {exc}") from None
        return dbs

    def close(self) -> None:
        """Write the pending counters and close. Idempotent."""
        env = self._env
        if env is None:
            return
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
        try:
            self.flush()
        except CacheError as exc:
            log.warning("%s", exc)
        self._env = None
        env.close()
        if self.changes_map is not None:
            try:
                self.changes_map.close()
            except BufferError:      # a hot index still reads it; it goes with the process
                pass
            self.changes_map = None
        if self.fills is not None:
            self.fills.close()
            self.fills = None
        if _open_paths.get(self.path) == os.getpid():
            del _open_paths[self.path]

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _environment(self) -> lmdb.Environment:
        env = self._env
        if env is None:
            raise CacheError(f"cache: {self.path} is closed (or was opened before fork(): "
                             "open the store in each worker)")
        return env

    # --- reading (the hit path) ------------------------------------------------------

    def lookup(self, key: bytes, request_headers: list[tuple[bytes, bytes]]) -> StoredLookup:
        """The entry stored for primary key `key` and the variant the
        request selects (following a vary record). Marks the entry used
        (sparsely) for eviction. Raises CacheError only if the file cannot
        be read."""
        primary = _db_key(key)
        try:
            with self._environment().begin(db=self._meta) as txn:
                raw = txn.get(primary)
                if raw is None:
                    return _MISS
                record = decode_record(raw)
                db_key = primary
                if isinstance(record, VaryRecord):
                    db_key = primary + b"\x01" + variant_key(record.vary, request_headers)
                    raw = txn.get(db_key)
                    if raw is None:
                        return _VARY_MISS
                    record = decode_record(raw)
        except ValueError as exc:
            self.log.log(logging.WARNING, "unreadable", "cache: unreadable record for %r: %s",
                         key[:200], exc)
            return _MISS
        except lmdb.Error as exc:
            raise CacheError(f"cache: {self.path}: read failed: {exc}") from None
        if not isinstance(record, CacheEntry) or record.key != key:
            return _MISS
        self._note_access(db_key, record)
        return StoredLookup(record, False)

    def get(self, key: bytes, variant: bytes = b"") -> CacheEntry | None:
        """The entry stored at exactly this primary key and variant key
        (b"" for a response without Vary)."""
        db_key = _db_key(key) + (b"\x01" + variant if variant else b"")
        try:
            with self._environment().begin(db=self._meta) as txn:
                raw = txn.get(db_key)
            record = decode_record(raw) if raw is not None else None
        except ValueError:
            return None
        except lmdb.Error as exc:
            raise CacheError(f"cache: {self.path}: read failed: {exc}") from None
        if not isinstance(record, CacheEntry) or record.key != key:
            return None
        return record

    def read_body(self, entry: CacheEntry, start: int = 0, end: int | None = None, *,
                  verify: bool = False) -> bytes | None:
        """Bytes [start, end) of the entry's body (end defaults to its
        length), read in one snapshot. None when the body is gone (the
        entry was replaced, purged or evicted since it was looked up):
        before anything was sent, treat that as a miss; in the middle of a
        response, close the connection. With `verify`, the whole body is
        checked against its checksum first: CacheCorrupt when it differs."""
        try:
            with self.pin() as txn:
                if verify:
                    intact = self.body_intact(txn, entry)
                    if intact is None:
                        return None
                    if not intact:
                        raise CacheCorrupt(f"cache: {self.path}: the body of "
                                           f"{entry.key[:200]!r} does not match its checksum")
                parts = self.body_parts(txn, entry, start, end)
                if parts is None:
                    return None
                return b"".join(parts) if len(parts) != 1 else bytes(parts[0])
        except lmdb.Error as exc:
            raise CacheError(f"cache: {self.path}: read failed: {exc}") from None

    def pin(self) -> Any:
        """A read transaction over the bodies whose `body_parts` are slices
        of the map: LMDB does not reuse the pages it sees until it ends, so
        they stay valid that long, and no longer (end it with `abort`, or
        use it as a context manager). One thread at a time."""
        try:
            return self._environment().begin(db=self._body, buffers=True)
        except lmdb.Error as exc:
            raise CacheError(f"cache: {self.path}: read failed: {exc}") from None

    def lasting(self, parts: tuple[memoryview, ...]) -> tuple[memoryview | bytes, ...]:
        """Whole chunks from `body_parts`, made to outlive their snapshot for
        as long as the entry is stored: a value on overflow pages of its
        own stays at its place in the map until it is removed, but a small
        one lives inside a leaf page, which a write near it moves: those
        (under a page) are copied."""
        page = self._page
        return tuple(p if len(p) >= page else bytes(p) for p in parts)

    def body_parts(self, txn: Any, entry: CacheEntry, start: int = 0,
                   end: int | None = None) -> tuple[memoryview, ...] | None:
        """Bytes [start, end) of the entry's body as slices of the map seen
        by txn (from `pin`), one per stored chunk: () when the range is
        empty, None when the body is not in that snapshot."""
        length = entry.body_length
        end = length if end is None else min(end, length)
        if start >= end:
            return ()
        size = entry.chunk_size
        if size <= 0:
            return None
        first, last = start // size, (end - 1) // size
        parts = []
        try:
            for i in range(first, last + 1):
                chunk = txn.get(_CHUNK_KEY.pack(entry.body_id, i))
                lo = start - i * size if i == first else 0
                hi = end - i * size if i == last else size
                if chunk is None or len(chunk) < hi:
                    return None
                parts.append(chunk[lo:hi])
        except lmdb.Error as exc:
            raise CacheError(f"cache: {self.path}: read failed: {exc}") from None
        return tuple(parts)

    async def read_body_async(self, entry: CacheEntry, start: int = 0,
                              end: int | None = None, *, verify: bool = False) -> bytes | None:
        """`read_body` in a thread (for large ranges: page faults may wait for the disk)."""
        return await asyncio.get_running_loop().run_in_executor(
            None, lambda: self.read_body(entry, start, end, verify=verify))

    def body_intact(self, txn: Any, entry: CacheEntry) -> bool | None:
        """Whether the entry's body in txn's snapshot matches the CRC-32
        stored with the entry (True when it has none: stored by a version
        without checksums); None when the body is not in that snapshot.
        Reads the whole body: callers check a body once (a body id is
        never reused), not on every hit."""
        if entry.body_crc is None:
            return True
        parts = self.body_parts(txn, entry)
        if parts is None:
            return None
        crc = 0
        for part in parts:
            crc = zlib.crc32(part, crc)
        return crc == entry.body_crc

    def _note_access(self, db_key: bytes, entry: CacheEntry) -> None:
        if time.time() - entry.last_access >= self.touch_interval:
            with self._lock:
                self._touches[db_key] = (entry.body_id, entry.last_access)

    def count(self, name: str, n: int = 1) -> None:
        """Add to a shared counter ("hits", "misses", "stale", "revalidated",
        ...). Kept in memory and added to the file by `flush`."""
        with self._lock:
            self._counts[name] = self._counts.get(name, 0) + n

    # --- writing -------------------------------------------------------------------

    def begin(self, entry: CacheEntry) -> CacheWriter:
        """A writer storing `entry` (from `policy.new_entry`) and its body.
        Feed it the body with `write`/`write_async`, then `commit` (or
        `abort`). Nothing is visible to readers before the commit."""
        entry.body_id = _new_body_id()
        entry.chunk_size = self.chunk_size
        self._live.add(entry.body_id)
        return CacheWriter(self, entry)

    def _footprint(self, key_len: int, value_len: int) -> int:
        """Estimated bytes a key/value takes in the map (for the `bytes` counter)."""
        if key_len + value_len + 8 > self._node_max:
            pages = (value_len + 16 + self._page - 1) // self._page
            return pages * self._page + key_len + 16
        return (key_len + value_len + 10) * 3 // 2  # leaf pages are ~2/3 full

    def _body_bytes(self, entry: CacheEntry) -> int:
        size = entry.chunk_size or self.chunk_size
        full, rest = divmod(entry.body_length, size)
        return full * self._footprint(12, size) + (self._footprint(12, rest) if rest else 0)

    def _entry_bytes(self, db_key: bytes, record_len: int, entry: CacheEntry) -> int:
        return (self._footprint(len(db_key), record_len) + self._footprint(16, len(db_key))
                + sum(self._footprint(len(_tag_key(t)), len(db_key)) for t in entry.tags)
                + self._body_bytes(entry))

    def _counter(self, txn: lmdb.Transaction, name: str) -> int:
        raw = txn.get(b"n:" + name.encode(), db=self._info)
        return _COUNTER.unpack(raw)[0] if raw else 0

    def _add(self, txn: lmdb.Transaction, name: str, delta: int) -> int:
        value = self._counter(txn, name) + delta
        txn.put(b"n:" + name.encode(), _COUNTER.pack(value), db=self._info)
        return value

    def _write(self, fn: Callable[[lmdb.Transaction], T], need: int = 0) -> T:
        """fn(txn) in one write transaction; on a full map, evict and retry."""
        for attempt in range(MAP_FULL_RETRIES + 1):
            env = self._environment()
            try:
                with env.begin(write=True) as txn:
                    return fn(txn)
            except lmdb.MapFullError:
                if attempt == MAP_FULL_RETRIES:
                    raise
                self.log.log(logging.INFO, "map-full", "cache: map full; evicting")
                self._evict(free=max(need, int((attempt + 1) * MAP_FULL_FREE * self.max_size)))
            except lmdb.MapResizedError:
                if attempt == MAP_FULL_RETRIES:
                    raise
                env.set_mapsize(0)  # another process grew the map: adopt its size
        raise AssertionError("unreachable")

    def _take_pending(self) -> tuple[dict[str, int], dict[bytes, tuple[int, float]]]:
        with self._lock:
            counts, touches = self._counts, self._touches
            self._counts, self._touches = {}, {}
        return counts, touches

    def _restore_pending(self, counts: dict[str, int]) -> None:
        """Put back counters a failed transaction did not write."""
        with self._lock:
            for name, n in counts.items():
                self._counts[name] = self._counts.get(name, 0) + n

    def _put_chunks(self, writer: CacheWriter, chunks: list[bytes]) -> None:
        entry = writer.entry
        pending_key = _BODY_ID.pack(entry.body_id)
        added = sum(self._footprint(12, len(c)) for c in chunks)
        crc = writer.crc
        for chunk in chunks:
            crc = zlib.crc32(chunk, crc)

        def put(txn: lmdb.Transaction) -> None:
            if writer.registered:
                raw = txn.get(pending_key, db=self._pending)
                if raw is None:
                    raise _WriterExpired()
                pid, started, nbytes = _PENDING.unpack(raw)
            else:
                pid, started, nbytes = os.getpid(), time.time(), 0
            for i, chunk in enumerate(chunks, start=writer.chunks):
                txn.put(_CHUNK_KEY.pack(entry.body_id, i), chunk, db=self._body)
            txn.put(pending_key, _PENDING.pack(pid, started, nbytes + added), db=self._pending)
            self._add(txn, "bytes", added)

        self._write(put, need=added)
        writer.registered = True
        writer.chunks += len(chunks)
        writer.crc = crc

    def _commit(self, writer: CacheWriter, last_chunk: bytes) -> None:
        entry = writer.entry
        entry.body_length = writer.size
        entry.body_crc = zlib.crc32(last_chunk, writer.crc)
        db_key = _entry_db_key(entry)
        primary = _db_key(entry.key)
        pending_key = _BODY_ID.pack(entry.body_id)
        counts, touches = self._take_pending()

        def commit(txn: lmdb.Transaction) -> int:
            if writer.registered:
                if txn.get(pending_key, db=self._pending) is None:
                    raise _WriterExpired()
                txn.delete(pending_key, db=self._pending)
            added = 0
            if last_chunk:
                txn.put(_CHUNK_KEY.pack(entry.body_id, writer.chunks), last_chunk, db=self._body)
                added += self._footprint(12, len(last_chunk))
            # Replace what this URI (and variant) held.
            raw = txn.get(primary, db=self._meta)
            old = self._decode(raw, primary)
            if entry.variant:
                if isinstance(old, CacheEntry):
                    self._remove_entry(txn, primary, old, len(raw))
                elif isinstance(old, VaryRecord) and old.vary != entry.vary:
                    self._remove_variants(txn, primary)  # unreachable under the new Vary
                if not isinstance(old, VaryRecord) or old.vary != entry.vary:
                    if isinstance(old, VaryRecord):
                        added -= self._footprint(len(primary), len(raw))
                    record = encode_vary(entry.key, entry.vary)
                    txn.put(primary, record, db=self._meta)
                    added += self._footprint(len(primary), len(record))
                raw = txn.get(db_key, db=self._meta)
                old = self._decode(raw, db_key)
            elif isinstance(old, VaryRecord):
                self._remove_primary(txn, primary)
                old = None
            if isinstance(old, CacheEntry):
                self._remove_entry(txn, db_key, old, len(raw))
            record = self._put_entry(txn, db_key, entry)
            added += self._entry_bytes(db_key, len(record), entry) - self._body_bytes(entry)
            self._log_change(txn, entry.key)
            self._add(txn, "entries", 1)
            self._add(txn, "stores", 1)
            self._apply(txn, counts, touches)
            return self._add(txn, "bytes", added)

        try:
            used = self._write(commit, need=len(last_chunk) + 4096)
        except BaseException:
            self._restore_pending(counts)
            raise
        if used > HIGH_WATER * self.max_size:
            self._evict()

    def _discard_body(self, body_id: int) -> None:
        """Delete a body that will not be committed, and its pending record."""
        self._live.discard(body_id)
        try:
            self._write(lambda txn: self._drop_pending(txn, _BODY_ID.pack(body_id)))
        except (lmdb.Error, CacheError) as exc:
            self.log.log(logging.WARNING, "discard",
                         "cache: could not discard an unfinished body: %s", exc)

    def _drop_pending(self, txn: lmdb.Transaction, pending_key: bytes) -> None:
        raw = txn.get(pending_key, db=self._pending)
        if raw is None:
            return
        txn.delete(pending_key, db=self._pending)
        with txn.cursor(db=self._body) as cursor:
            keys = []
            if cursor.set_range(pending_key):
                for key in cursor.iternext(values=False):
                    if key[:8] != pending_key:
                        break
                    keys.append(key)
        for key in keys:
            txn.delete(key, db=self._body)
        self._add(txn, "bytes", -_PENDING.unpack(raw)[2])

    def _put_entry(self, txn: lmdb.Transaction, db_key: bytes, entry: CacheEntry) -> bytes:
        """Write entry's metadata with its LRU position and tag index rows,
        accessed now; return the encoded record."""
        entry.last_access = time.time()
        record = encode_entry(entry)
        txn.put(db_key, record, db=self._meta)
        txn.put(_lru_key(entry.last_access, entry.body_id), db_key, db=self._lru)
        for tag in entry.tags:
            txn.put(_tag_key(tag), db_key, db=self._tags)
        return record

    def _log_change(self, txn: lmdb.Transaction, key: bytes) -> None:
        """Log key as changed (with the writing pid, for debugging)."""
        raw = txn.get(_CHANGES, db=self._info)
        gen = (_COUNTER.unpack(raw)[0] if raw else 0) + 1
        txn.put(_CHANGES, _COUNTER.pack(gen), db=self._info)
        if len(key) > CHANGE_KEY_MAX:
            key = b""        # keeps the ring small; readers forget everything instead
        txn.put(b"c:%d" % (gen % CHANGE_RING), _PID.pack(os.getpid()) + key, db=self._info)
        if self.changes_map is not None:
            _COUNTER.pack_into(self.changes_map, 0, gen)

    def generation(self) -> int:
        """The change generation now (one load from the shared `changes`
        file; -1 when closed): it moves with every commit, update or removal."""
        m = self.changes_map
        return _COUNTER.unpack_from(m, 0)[0] if m is not None else -1

    def changes_since(self, generation: int) -> tuple[int, list[bytes] | None]:
        """The change generation now, and the primary keys replaced, updated
        or removed after `generation` (None: anything may have changed,
        forget everything), by any process: this one's too, for a hot index
        must have dropped what a write freed before the snapshot that kept
        the freed pages ends (EdgeCache.sync_hot), even when the write's own
        caller has not heard back yet. One read transaction; cheap when
        nothing changed."""
        try:
            with self._environment().begin(db=self._info) as txn:
                raw = txn.get(_CHANGES)
                now = _COUNTER.unpack(raw)[0] if raw else 0
                if now == generation:
                    return now, []
                if now < generation or now - generation > CHANGE_RING:
                    return now, None
                keys = []
                for gen in range(generation + 1, now + 1):
                    value = txn.get(b"c:%d" % (gen % CHANGE_RING))
                    if value is None or len(value) < _PID.size:
                        return now, None
                    if len(value) == _PID.size:
                        return now, None
                    keys.append(value[_PID.size:])
                return now, keys
        except lmdb.Error as exc:
            raise CacheError(f"cache: {self.path}: read failed: {exc}") from None

    def update_entry(self, entry: CacheEntry) -> bool:
        """Rewrite the metadata of a stored entry (after `policy.apply_304`)
        keeping its body. False (and nothing written) when the entry was
        replaced or removed meanwhile, or on a storage error (logged)."""
        db_key = _entry_db_key(entry)

        def update(txn: lmdb.Transaction) -> bool:
            raw = txn.get(db_key, db=self._meta)
            old = self._decode(raw, db_key)
            if not isinstance(old, CacheEntry) or old.body_id != entry.body_id:
                return False
            txn.delete(_lru_key(old.last_access, old.body_id), db=self._lru)
            for tag in old.tags:
                txn.delete(_tag_key(tag), db_key, db=self._tags)
            record = self._put_entry(txn, db_key, entry)
            self._add(txn, "bytes", self._entry_bytes(db_key, len(record), entry)
                      - self._entry_bytes(db_key, len(raw), old))
            self._log_change(txn, entry.key)
            return True

        try:
            return self._write(update)
        except (lmdb.Error, CacheError) as exc:
            self.log.log(logging.WARNING, "update", "cache: could not update %r: %s",
                         entry.key[:200], exc)
            return False

    async def update_entry_async(self, entry: CacheEntry) -> bool:
        return await self._in_thread(self.update_entry, entry)

    # --- removing --------------------------------------------------------------------

    def _decode(self, raw: bytes | None, db_key: bytes) -> CacheEntry | VaryRecord | None:
        if raw is None:
            return None
        try:
            return decode_record(raw)
        except ValueError as exc:
            self.log.log(logging.WARNING, "unreadable", "cache: dropping an unreadable record "
                         "%r: %s", db_key[:200], exc)
            return None

    def _remove_entry(self, txn: lmdb.Transaction, db_key: bytes, entry: CacheEntry,
                      record_len: int) -> int:
        txn.delete(db_key, db=self._meta)
        size = entry.chunk_size or 1
        for i in range((entry.body_length + size - 1) // size):
            txn.delete(_CHUNK_KEY.pack(entry.body_id, i), db=self._body)
        txn.delete(_lru_key(entry.last_access, entry.body_id), db=self._lru)
        for tag in entry.tags:
            txn.delete(_tag_key(tag), db_key, db=self._tags)
        freed = self._entry_bytes(db_key, record_len, entry)
        self._add(txn, "entries", -1)
        self._add(txn, "bytes", -freed)
        return freed

    def _scan(self, txn: lmdb.Transaction, prefix: bytes, start: bytes | None = None,
              limit: int = 0) -> list[tuple[bytes, bytes]]:
        out = []
        with txn.cursor(db=self._meta) as cursor:
            if cursor.set_range(start or prefix):
                for key, raw in cursor:
                    if not key.startswith(prefix) or (limit and len(out) >= limit):
                        break
                    out.append((key, raw))
        return out

    def _remove_variants(self, txn: lmdb.Transaction, primary: bytes) -> int:
        n = 0
        for key, raw in self._scan(txn, primary + b"\x01"):
            record = self._decode(raw, key)
            if isinstance(record, CacheEntry):
                self._remove_entry(txn, key, record, len(raw))
                n += 1
            else:
                txn.delete(key, db=self._meta)
        return n

    def _remove_primary(self, txn: lmdb.Transaction, primary: bytes) -> int:
        """Remove what a primary key holds: an entry, or a vary record and its variants."""
        raw = txn.get(primary, db=self._meta)
        if raw is None:
            return 0
        record = self._decode(raw, primary)
        if isinstance(record, CacheEntry):
            self._remove_entry(txn, primary, record, len(raw))
            return 1
        txn.delete(primary, db=self._meta)
        self._add(txn, "bytes", -self._footprint(len(primary), len(raw)))
        return self._remove_variants(txn, primary)

    def _drop_empty_vary(self, txn: lmdb.Transaction, variant_db_key: bytes) -> None:
        primary = variant_db_key[:-17]
        if not self._scan(txn, primary + b"\x01", limit=1):
            raw = txn.get(primary, db=self._meta)
            if raw is not None and isinstance(self._decode(raw, primary), VaryRecord):
                txn.delete(primary, db=self._meta)
                self._add(txn, "bytes", -self._footprint(len(primary), len(raw)))

    def _mark(self, txn: lmdb.Transaction, db_key: bytes, raw: bytes) -> None:
        txn.put(db_key, patch_flags(raw, FLAG_INVALIDATED), db=self._meta)

    def delete(self, key: bytes, *, soft: bool = False) -> int:
        """Remove (or with `soft`, mark stale) what primary key `key` holds,
        every variant included. Returns the number of entries affected."""
        primary = _db_key(key)

        def delete(txn: lmdb.Transaction) -> int:
            raw = txn.get(primary, db=self._meta)
            record = self._decode(raw, primary)
            if record is None or record.key != key:
                return 0
            if not soft:
                n = self._remove_primary(txn, primary)
            elif isinstance(record, CacheEntry):
                self._mark(txn, primary, raw)
                n = 1
            else:
                n = 0
                for vkey, vraw in self._scan(txn, primary + b"\x01"):
                    if isinstance(self._decode(vraw, vkey), CacheEntry):
                        self._mark(txn, vkey, vraw)
                        n += 1
            self._add(txn, "purges", n)
            self._log_change(txn, key)
            return n

        return self._write(delete)

    def mark_stale(self, key: bytes) -> int:
        """Soft purge: the entries of `key` become stale (revalidated before
        use; stale-while-revalidate and stale-if-error still apply)."""
        return self.delete(key, soft=True)

    def purge_prefix(self, prefix: bytes, *, soft: bool = False) -> int:
        """Remove (or mark stale) every entry whose primary key starts with
        `prefix` (e.g. b"https://example.com/static/"). Returns the count."""
        scan = prefix[:_MAX_KEY]
        total, start = 0, scan

        def batch(txn: lmdb.Transaction) -> tuple[int, bytes | None]:
            found = self._scan(txn, scan, start, limit=BATCH)
            n = 0
            for key, raw in found:
                record = self._decode(raw, key)
                if record is None:
                    txn.delete(key, db=self._meta)
                elif not record.key.startswith(prefix):
                    continue
                elif isinstance(record, VaryRecord):
                    if not soft:  # its variants follow it in the scan
                        txn.delete(key, db=self._meta)
                        self._add(txn, "bytes", -self._footprint(len(key), len(raw)))
                elif soft:
                    self._mark(txn, key, raw)
                    n += 1
                else:
                    self._remove_entry(txn, key, record, len(raw))
                    n += 1
            self._add(txn, "purges", n)
            return n, (found[-1][0] + b"\x00" if len(found) == BATCH else None)

        while True:
            n, resume = self._write(batch)
            total += n
            if resume is None:
                break
            start = resume
        if total:
            self._write(lambda txn: self._log_change(txn, b""))
        return total

    def purge_tag(self, tag: bytes, *, soft: bool = False) -> int:
        """Remove (or mark stale) every entry whose response listed `tag` in
        Surrogate-Key or Cache-Tag. Returns the count."""
        tag_key = _tag_key(tag)
        with self._environment().begin(db=self._tags) as txn, txn.cursor() as cursor:
            keys = list(cursor.iternext_dup()) if cursor.set_key(tag_key) else []
        total = 0
        for i in range(0, len(keys), BATCH):
            def batch(txn: lmdb.Transaction, keys: list[bytes] = keys[i:i + BATCH]) -> int:
                n = 0
                for key in keys:
                    raw = txn.get(key, db=self._meta)
                    record = self._decode(raw, key)
                    if not isinstance(record, CacheEntry) or tag not in record.tags:
                        txn.delete(tag_key, key, db=self._tags)
                        continue
                    if soft:
                        self._mark(txn, key, raw)
                    else:
                        self._remove_entry(txn, key, record, len(raw))
                        if record.variant:
                            self._drop_empty_vary(txn, key)
                    n += 1
                self._add(txn, "purges", n)
                return n
            total += self._write(batch)
        if total:
            self._write(lambda txn: self._log_change(txn, b""))
        return total

    def entries(self, prefix: bytes = b"", batch: int = BATCH) -> Iterator[CacheEntry]:
        """Every stored entry (variants included) whose primary key starts with
        `prefix`, in key order.  Read `batch` records per read transaction, so
        a slow consumer (a pager) never holds one snapshot for long."""
        scan = prefix[:_MAX_KEY]
        start: bytes | None = scan
        while start is not None:
            with self._environment().begin(db=self._meta) as txn:
                found = self._scan(txn, scan, start, limit=batch)
            start = found[-1][0] + b"\x00" if len(found) == batch else None
            for db_key, raw in found:
                record = self._decode(raw, db_key)
                if isinstance(record, CacheEntry) and record.key.startswith(prefix):
                    yield record

    # --- records of other modules (the purge bus: b"bus:") ----------------------------

    def info_write(self, fn: Callable[[lmdb.Transaction, Any], T]) -> T:
        """fn(txn, info_db) in one write transaction, for records another
        module keeps in the `info` database under a prefix of its own
        (edgeproxy/cache/bus.py: b"bus:")."""
        return self._write(lambda txn: fn(txn, self._info))

    def info_items(self, prefix: bytes) -> list[tuple[bytes, bytes]]:
        """The `info` records whose key starts with prefix, in key order."""
        try:
            with self._environment().begin(db=self._info) as txn, txn.cursor() as cursor:
                out = []
                if cursor.set_range(prefix):
                    for key, value in cursor:
                        if not key.startswith(prefix):
                            break
                        out.append((bytes(key), bytes(value)))
                return out
        except lmdb.Error as exc:
            raise CacheError(f"cache: {self.path}: read failed: {exc}") from None

    async def delete_async(self, key: bytes, *, soft: bool = False) -> int:
        return await self._in_thread(lambda: self.delete(key, soft=soft))

    async def purge_prefix_async(self, prefix: bytes, *, soft: bool = False) -> int:
        return await self._in_thread(lambda: self.purge_prefix(prefix, soft=soft))

    async def purge_tag_async(self, tag: bytes, *, soft: bool = False) -> int:
        return await self._in_thread(lambda: self.purge_tag(tag, soft=soft))

    # --- eviction --------------------------------------------------------------------

    def _evict(self, free: int = 0) -> int:
        """Drop the least recently used entries until the bytes in use are
        at most LOW_WATER of max_size (or, with `free`, that many fewer).
        Each removal goes to the change log (the hot indexes hold slices of
        the map that the removal frees)."""
        evicted, target = 0, None
        while True:
            def batch(txn: lmdb.Transaction) -> tuple[int, bool]:
                nonlocal target
                used = self._counter(txn, "bytes")
                if target is None:
                    target = int(LOW_WATER * self.max_size)
                    if free:
                        target = min(target, used - free)
                n, empty = 0, False
                while used > target and n < BATCH:
                    with txn.cursor(db=self._lru) as cursor:
                        if not cursor.first():
                            empty = True
                            break
                        lru_key, db_key = cursor.item()
                    raw = txn.get(db_key, db=self._meta)
                    record = self._decode(raw, db_key)
                    if (isinstance(record, CacheEntry)
                            and _LRU_KEY.unpack(lru_key)[1] == record.body_id):
                        used -= self._remove_entry(txn, db_key, record, len(raw))
                        if record.variant:
                            self._drop_empty_vary(txn, db_key)
                        self._log_change(txn, record.key)
                        n += 1
                    else:
                        txn.delete(lru_key, db=self._lru)  # left behind: drop it
                self._add(txn, "evictions", n)
                return n, empty or used <= target

            try:
                with self._environment().begin(write=True) as txn:
                    n, done = batch(txn)
            except (lmdb.Error, CacheError) as exc:
                self.log.log(logging.ERROR, "eviction-failed", "cache: eviction failed: %s", exc)
                return evicted
            evicted += n
            if done:
                break
        if evicted:
            self.log.log(logging.INFO, "evicted", "cache: evicted %d entries", evicted)
        return evicted

    # --- counters, upkeep ------------------------------------------------------------------

    def _apply(self, txn: lmdb.Transaction, counts: dict[str, int],
               touches: dict[bytes, tuple[int, float]]) -> None:
        for name, n in counts.items():
            self._add(txn, name, n)
        now = time.time()
        for db_key, (body_id, _) in touches.items():
            raw = txn.get(db_key, db=self._meta)
            record = self._decode(raw, db_key)
            if not isinstance(record, CacheEntry) or record.body_id != body_id:
                continue
            txn.delete(_lru_key(record.last_access, body_id), db=self._lru)
            txn.put(db_key, patch_last_access(raw, now), db=self._meta)
            txn.put(_lru_key(now, body_id), db_key, db=self._lru)

    def flush(self) -> None:
        """Add this process's counters and access times to the file."""
        counts, touches = self._take_pending()
        if not counts and not touches:
            return
        try:
            self._write(lambda txn: self._apply(txn, counts, touches))
        except lmdb.Error as exc:
            self._restore_pending(counts)
            self.log.log(logging.WARNING, "counters", "cache: could not write counters: %s", exc)

    def _reap_pending(self) -> int:
        """Delete bodies whose writer died or gave up (PENDING_MAX_AGE)."""
        now, me = time.time(), os.getpid()
        with self._environment().begin(db=self._pending) as txn:
            pending = [(key, _PENDING.unpack(raw)) for key, raw in txn.cursor()]
        reaped = 0
        for key, (pid, started, _) in pending:
            body_id = _BODY_ID.unpack(key)[0]
            alive = body_id in self._live if pid == me else _pid_alive(pid)
            if not alive or now - started > PENDING_MAX_AGE:
                self._write(lambda txn, key=key: self._drop_pending(txn, key))
                reaped += 1
        if reaped:
            log.info("cache: removed %d unfinished bodies", reaped)
        return reaped

    def maintain(self) -> None:
        """Upkeep, to run every second or so in each worker (off the event
        loop; `maintain_forever` does that): write counters and access
        times, evict above the high-water mark, and every UPKEEP_INTERVAL
        free dead readers' slots, remove abandoned bodies and sync to disk."""
        self.flush()
        env = self._environment()
        try:
            if time.monotonic() >= self._next_upkeep:
                self._next_upkeep = time.monotonic() + UPKEEP_INTERVAL
                env.reader_check()
                self._reap_pending()
                env.sync(True)
            with env.begin(db=self._info) as txn:
                used = self._counter(txn, "bytes")
        except lmdb.Error as exc:
            self.log.log(logging.WARNING, "upkeep", "cache: upkeep failed: %s", exc)
            return
        if used > HIGH_WATER * self.max_size:
            self._evict()

    async def maintain_forever(self, interval: float = 1.0) -> None:
        """Run `maintain` every `interval` seconds until cancelled or closed."""
        while self._env is not None:
            try:
                await self._in_thread(self.maintain)
            except CacheError:
                return
            except Exception:  # upkeep must never stop the worker
                log.exception("cache: upkeep failed")
            await asyncio.sleep(interval)

    def disk_full(self) -> bool:
        """Whether the filesystem under the cache is (nearly) full: LMDB
        reports a short write as EIO, so a failed write asks."""
        try:
            st = os.statvfs(self.path)
        except OSError:
            return False
        return st.f_bavail * st.f_frsize < MIN_FREE

    def stats(self) -> dict[str, int]:
        """The shared counters (every process's, once flushed), plus
        max_size, map_size, file_bytes (pages in use, high mark) and readers."""
        self.flush()
        env = self._environment()
        with env.begin(db=self._info) as txn:
            out = {name: self._counter(txn, name) for name in COUNTERS}
        info = env.info()
        out["max_size"] = self.max_size
        out["map_size"] = info["map_size"]
        out["file_bytes"] = (info["last_pgno"] + 1) * self._page
        out["readers"] = info["num_readers"]
        return out

    async def in_writer(self, fn: Callable[..., T], *args: Any) -> T:
        """fn(*args) in the store's writer thread, for callers outside the
        store that write to it (the purge bus)."""
        return await self._in_thread(fn, *args)

    async def _in_thread(self, fn: Callable[..., T], *args: Any) -> T:
        """Run fn in this store's writer thread: LMDB admits one writer at a
        time anyway, and the event loop never waits for the writer lock."""
        if self._pool is None:
            self._environment()
            self._pool = concurrent.futures.ThreadPoolExecutor(
                max_workers=1, thread_name_prefix="edgeproxy-cache")
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)


def map_size_for(max_size: int) -> int:
    """The LMDB map size for a cache of max_size: MAP_MARGIN above it, in whole pages."""
    size = max_size + int(max_size * MAP_MARGIN)
    return (size + 65535) & ~65535


class LogLimiter:
    """Logs a line at most once per `interval` for each reason: a full map
    or a failing disk fails every write, and must not flood the log. The
    next line of a reason says how many were left out."""

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self._lock = threading.Lock()
        self._last: dict[str, float] = {}
        self._skipped: dict[str, int] = {}

    def log(self, level: int, reason: str, msg: str, *args: Any) -> None:
        if not log.isEnabledFor(level):
            return
        now = time.monotonic()
        with self._lock:
            last = self._last.get(reason)
            if last is not None and now - last < self.interval:
                self._skipped[reason] = self._skipped.get(reason, 0) + 1
                return
            self._last[reason] = now
            skipped = self._skipped.pop(reason, 0)
        if skipped:
            msg += " (and %d more like it in the last %.0fs)"
            args += (skipped, now - last)
        log.log(level, msg, *args)


def _map_changes_file(path: str) -> mmap.mmap:
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        preallocate(fd, _COUNTER.size)
        return mmap.mmap(fd, _COUNTER.size)
    finally:
        os.close(fd)


def _disk_full(path: str, exc: OSError | None = None) -> CacheDiskFull:
    why = f" ({exc.strerror})" if exc is not None else ""
    return CacheDiskFull(f"cache: the filesystem of {path} is full{why}: running without "
                         "the cache; free some space and reload")


def _check_room(path: str, map_size: int) -> None:
    """Refuse to open on a (nearly) full filesystem; warn when the cache may
    outgrow the free space."""
    try:
        st = os.statvfs(path)
    except OSError:
        return                   # nothing to tell; opening will say what is wrong
    free = st.f_bavail * st.f_frsize
    if free < MIN_FREE:
        raise _disk_full(path)
    try:
        used = os.stat(os.path.join(path, "data.mdb")).st_blocks * 512
    except OSError:
        used = 0
    if free + used < map_size:
        log.warning("cache: %s may grow to %d bytes but its filesystem has %d bytes free: "
                    "storing will fail once it fills up", path, map_size, free + used)


def _allocate(path: str, name: str, size: int) -> None:
    """Give the file `name` under path its blocks (see LOCK_SIZE); an existing
    file keeps its size (other processes may have it mapped)."""
    file = os.path.join(path, name)
    try:
        fd = os.open(file, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError as exc:
        raise CacheError(f"cache: cannot open {file}: {exc.strerror}") from None
    try:
        preallocate(fd, os.fstat(fd).st_size or size)
    except OSError as exc:
        if exc.errno in _DISK_FULL:
            raise _disk_full(path, exc) from None
        raise CacheError(f"cache: cannot allocate {file}: {exc.strerror}") from None
    finally:
        os.close(fd)


def _tag_key(tag: bytes) -> bytes:
    return _db_key(tag)


class CacheWriter:
    """Stores one response body as it streams, then its entry on `commit`.

    Never raises for a storage problem (full map, disk full, body over
    `max_object`): it logs one line, drops what it wrote, and `failed`
    says why ("too-large", "storage", "expired", "aborted"). The sync
    methods do LMDB writes in the calling thread; the async ones in the
    store's writer thread. Use one writer from one task at a time.
    """

    def __init__(self, store: CacheStore, entry: CacheEntry) -> None:
        self.entry = entry
        self.failed: str | None = None
        self.size = 0          # body bytes received so far
        self.chunks = 0        # chunks written to the file
        self.crc = 0           # CRC-32 of the chunks written (in the writer's thread)
        self.registered = False
        self._store = store
        self._buffer = bytearray()
        self._done = False

    def _take(self, data: bytes) -> list[bytes]:
        if self.failed or self._done:
            return []
        self.size += len(data)
        if self.size > self._store.max_object:
            self._fail("too-large", drop=False)  # the caller drops, in its thread
            self._buffer = bytearray()
            return []
        self._buffer += data
        size = self._store.chunk_size
        n = len(self._buffer) // size
        if not n:
            return []
        chunks = [bytes(self._buffer[i * size:(i + 1) * size]) for i in range(n)]
        del self._buffer[:n * size]
        return chunks

    def _put(self, chunks: list[bytes]) -> None:
        try:
            self._store._put_chunks(self, chunks)
        except _WriterExpired:
            self._fail("expired")
        except (lmdb.Error, OSError, CacheError) as exc:
            self._fail("storage", exc)

    def write(self, data: bytes) -> bool:
        """Add body bytes; a full chunk is written at once. False once the
        writer has failed (keep streaming to the client regardless)."""
        was_failed = self.failed
        chunks = self._take(data)
        if chunks:
            self._put(chunks)
        elif self.failed and not was_failed:
            self._drop()
        return self.failed is None

    async def write_async(self, data: bytes) -> bool:
        """`write`, with any chunk written in the store's writer thread."""
        was_failed = self.failed
        chunks = self._take(data)
        try:
            if chunks:
                await self._store._in_thread(self._put, chunks)
            elif self.failed and not was_failed and self.registered:
                await self._store._in_thread(self._drop)
            elif self.failed and not was_failed:
                self._drop()
        except CacheError as exc:  # the store was closed meanwhile
            self._fail("storage", exc, drop=False)
        return self.failed is None

    def commit(self) -> bool:
        """Write the rest and the entry, replacing what the key held; True
        when stored. Evicts afterwards if the map is above the high-water mark."""
        if self.failed or self._done:
            return False
        self._done = True
        last = bytes(self._buffer)
        self._buffer = bytearray()
        try:
            self._store._commit(self, last)
        except _WriterExpired:
            self._fail("expired")
            return False
        except (lmdb.Error, OSError, CacheError) as exc:
            self._fail("storage", exc)
            return False
        self._store._live.discard(self.entry.body_id)
        return True

    async def commit_async(self) -> bool:
        try:
            return await self._store._in_thread(self.commit)
        except CacheError as exc:  # closed before the commit ran
            self._fail("storage", exc)
            return False

    def abort(self) -> None:
        """Give up (the response broke off): drop what was written."""
        if self._done:
            return
        self._done = True
        if self.failed is None:
            self.failed = "aborted"
            self._drop()

    async def abort_async(self) -> None:
        try:
            await self._store._in_thread(self.abort)
        except CacheError:
            self._done = True

    async def fail_async(self, reason: str) -> None:
        """Give up for a reason the caller found (the body passed
        max_object before it reached the writer): logged and counted like
        the writer's own failures; what was written is dropped."""
        if self.failed is not None or self._done:
            return
        try:
            if self.registered:
                await self._store._in_thread(self._fail, reason)
            else:
                self._fail(reason)
        except CacheError:       # the store was closed meanwhile
            self._done = True

    def _drop(self) -> None:
        self._buffer = bytearray()
        if self.registered:
            self._store._discard_body(self.entry.body_id)
        else:
            self._store._live.discard(self.entry.body_id)

    def _fail(self, reason: str, exc: BaseException | None = None, drop: bool = True) -> None:
        if self.failed is not None:
            return
        self.failed = reason
        self._done = True
        key = self.entry.key[:200].decode("latin-1")
        if reason == "too-large":
            self._store.log.log(logging.INFO, reason, "cache: not storing %s: larger than %d bytes",
                                key, self._store.max_object)
        elif reason == "storage" and self._store.disk_full():
            self._store.log.log(logging.WARNING, "disk-full", "cache: not storing %s: the "
                                "filesystem of %s is full (%s)", key, self._store.path, exc)
        else:
            self._store.log.log(logging.WARNING, reason, "cache: not storing %s: %s%s", key,
                                reason, f" ({exc})" if exc else "")
        self._store.count("store_failures")
        if drop:
            self._drop()
