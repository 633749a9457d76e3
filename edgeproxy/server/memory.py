"""Giving the system back the heap memory a worker has stopped using.

glibc keeps freed memory in its heap for reuse and returns by itself only
what lies at the top of it.  The buffers of slow clients (what a transport
holds for a client that reads slowly, TLS records) are large and live as
long as the client does, so once a crowd of them has left, tens of MiB stay
in the worker's RSS, free but not returned (200 slow readers: 130 MiB, and
on the standard asyncio loop growing from one crowd to the next).  The
worker's ticker calls `HeapTrimmer.tick` once a second: it asks glibc how
much of its heap is free (mallinfo2, a walk of the free lists: microseconds)
and, when that grew by at least `min_freed` since the last trim, has
malloc_trim hand the free pages back.  A steady load frees and reuses about
as much as it allocates, so it is not trimmed again and again.  Without
glibc (or before 2.33) this does nothing."""

from __future__ import annotations

import ctypes
import logging

log = logging.getLogger("edgeproxy.server")

MIN_FREED = 16 << 20         # bytes newly free in the heap before a trim is worth it


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks",
        "uordblks", "fordblks", "keepcost")]


def _libc():
    try:
        libc = ctypes.CDLL(None)
        mallinfo2, malloc_trim = libc.mallinfo2, libc.malloc_trim
    except (OSError, AttributeError):
        return None
    mallinfo2.restype = _MallInfo2
    mallinfo2.argtypes = []
    malloc_trim.restype = ctypes.c_int
    malloc_trim.argtypes = [ctypes.c_size_t]
    return mallinfo2, malloc_trim


class HeapTrimmer:
    """Trims the heap when enough of it has become free since the last trim."""

    def __init__(self, min_freed: int = MIN_FREED):
        self.min_freed = min_freed
        self._fns = _libc()
        self._base = self.free_bytes()    # what was free after the last trim (or at start)

    def free_bytes(self) -> int:
        """Bytes free inside the heap (0 without glibc)."""
        return self._fns[0]().fordblks if self._fns is not None else 0

    def tick(self) -> bool:
        """Trim if the heap's free bytes grew by min_freed; True when it did."""
        if self._fns is None:
            return False
        free = self.free_bytes()
        if free < self._base:
            self._base = free             # reused: count new frees from here
            return False
        if free - self._base < self.min_freed:
            return False
        self._fns[1](0)
        # the trimmed pages stay in the free lists (only their memory went back),
        # so the free bytes now are the base the next trim is measured from
        self._base = self.free_bytes()
        log.debug("returned free heap memory to the system (%d MiB free in the heap)",
                  free >> 20)
        return True
