"""Which process is fetching a missing cache entry: claims on a small lock file beside the store, so concurrent misses for one key in different workers cause one backend request.

The file `fills` holds SLOTS records of 16 bytes: the 8-byte hash of the key
being fetched and when its fetch began (time.monotonic(), shared by every
process on the machine). A key maps to one slot (hash % SLOTS). Claiming a
slot is a POSIX record lock on its first byte, taken without waiting
(`fcntl.lockf(LOCK_EX | LOCK_NB)`): such locks belong to the process and
the kernel drops them when it dies, so a crashed worker never strands the
ones waiting for it. The holder writes its key's hash after locking and
clears it (0) before unlocking; a process that finds the slot locked reads
the hash to tell a fetch of its key (wait for it) from another key that
hashes to the same slot (do not wait). Only the loop thread calls these
methods; each is one or two system calls that never block.

The file's blocks are allocated when it is opened (`preallocate`): the
slots are written through a shared map, and a page the filesystem cannot
back (a full disk) would be a SIGBUS.

Caveat of POSIX locks: closing *any* descriptor of the file drops all of
the process's locks on it, so a process opens the file once (`CacheStore`).
"""
from __future__ import annotations

import enum
import errno
import fcntl
import hashlib
import logging
import mmap
import os
import struct
import time

__all__ = ["FILLS_FILE", "SLOTS", "Claim", "FillLocks", "preallocate"]

log = logging.getLogger("edgeproxy.cache")

FILLS_FILE = "fills"
SLOTS = 4096
_SLOT = struct.Struct("<Qd")     # key hash (0: none), monotonic start of the fetch
_HASH = struct.Struct("<Q")
_START = struct.Struct("<d")
_BUSY = (errno.EACCES, errno.EAGAIN)


class Claim(enum.Enum):
    OWN = "own"       # this process fetches the key (release it when done)
    WAIT = "wait"     # another process fetches this key: wait for its entry
    NONE = "none"     # fetch without a claim (slot busy with another key, fetch too old)


def preallocate(fd: int, size: int) -> None:
    """Make the file at least size bytes with every block allocated, so that
    storing into a map of it never faults on a full filesystem (a SIGBUS
    that kills the process). Raises OSError (ENOSPC when there is no room)."""
    try:
        os.posix_fallocate(fd, 0, size)
    except OSError as exc:
        if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
            raise
        # no fallocate here: write the blocks ourselves where the file is short
        have = os.fstat(fd).st_size
        if have < size:
            os.pwrite(fd, bytes(size - have), have)


def key_hash(key: bytes) -> int:
    return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little") or 1


class FillLocks:
    """This process's handle on the `fills` file of one cache directory."""

    def __init__(self, fd: int, path: str):
        self.path = path
        self._fd = fd
        self._map: mmap.mmap | None = mmap.mmap(fd, SLOTS * _SLOT.size)
        self._held: dict[int, int] = {}     # slot -> hash of the key this process fetches

    @classmethod
    def open(cls, path: str) -> FillLocks:
        """Open (creating if needed) the file at path; raises OSError."""
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            preallocate(fd, SLOTS * _SLOT.size)
            return cls(fd, path)
        except BaseException:
            os.close(fd)
            raise

    @property
    def held(self) -> int:
        """How many claims this process holds."""
        return len(self._held)

    def claim(self, key: bytes, max_wait: float) -> Claim:
        """Claim the fetch of key. WAIT only when another process has been
        fetching this same key for less than max_wait seconds (a fetch that
        runs longer is not waited for: its waiters have given up already)."""
        if self._map is None:
            return Claim.NONE
        h = key_hash(key)
        slot = h % SLOTS
        if slot in self._held:       # this process fetches a key of the same slot
            return Claim.NONE
        offset = slot * _SLOT.size
        try:
            fcntl.lockf(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, offset)
        except OSError as exc:
            if exc.errno not in _BUSY:
                self._fail(exc)
                return Claim.NONE
            other, started = _SLOT.unpack_from(self._map, offset)
            if other == 0:       # the holder has just locked (or is about to unlock)
                return Claim.WAIT
            if other == h and time.monotonic() - started < max_wait:
                return Claim.WAIT
            return Claim.NONE
        _START.pack_into(self._map, offset + _HASH.size, time.monotonic())
        _HASH.pack_into(self._map, offset, h)      # the start first: it goes with the hash
        self._held[slot] = h
        return Claim.OWN

    def busy(self, key: bytes) -> bool:
        """Whether another process still holds the claim on key's slot for
        this key (or is between locking and writing the hash)."""
        if self._map is None:
            return False
        h = key_hash(key)
        slot = h % SLOTS
        if slot in self._held:       # we hold it, so nobody else does
            return False
        offset = slot * _SLOT.size
        other = _HASH.unpack_from(self._map, offset)[0]
        if other != h and other != 0:
            return False
        try:
            fcntl.lockf(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, offset)
        except OSError as exc:
            if exc.errno in _BUSY:
                return True
            self._fail(exc)
            return False
        fcntl.lockf(self._fd, fcntl.LOCK_UN, 1, offset)
        return False

    def release(self, key: bytes) -> None:
        """End this process's claim on key (no-op without one)."""
        h = key_hash(key)
        slot = h % SLOTS
        if self._held.get(slot) != h or self._map is None:
            return
        del self._held[slot]
        offset = slot * _SLOT.size
        _HASH.pack_into(self._map, offset, 0)
        try:
            fcntl.lockf(self._fd, fcntl.LOCK_UN, 1, offset)
        except OSError as exc:
            self._fail(exc)

    def _fail(self, exc: OSError) -> None:
        log.warning("cache: record locks on %s failed (%s): concurrent misses now collapse "
                    "within each worker only", self.path, exc.strerror or exc)
        self.close()

    def close(self) -> None:
        """Close the file (which drops every claim this process holds). Idempotent."""
        if self._map is None:
            return
        self._held.clear()
        try:
            self._map.close()
        except BufferError:
            pass
        self._map = None
        os.close(self._fd)
