# The hot index: this worker's copies of plain fresh cache hits, served by
# ClientConn without entering Python (see docs/cache.md, "The hot index").
#
# The cache phase (edgeproxy/cache/phase.py) decides what goes in: only
# entries whose answer does not depend on the request beyond its method and
# key (no Vary, explicit freshness, no no-cache, not soft-purged), with the
# head it would send already built.  ClientConn serves them only to requests
# that could not change that answer (GET/HEAD, no body, no conditionals,
# Range, Cache-Control, Pragma or Authorization), and only while fresh;
# everything else goes to the phase.  Entries are looked up by a 64-bit
# FNV-1a hash of the primary cache key (keys.cache_key), confirmed by
# comparing the whole key.
#
# An entry's body is `parts`: a tuple of buffers.  In a worker they are
# slices of the LMDB map, read in the read transaction the cache phase
# keeps open for the hot index (EdgeCache.pin), so a hit is written from
# the map to the socket without a copy (ClientConn._send_parts).  LMDB
# never reuses the pages a live read transaction sees, so the slices stay
# valid until the phase renews that transaction; it then rebinds every
# entry to the new one (`rebind`) or drops it.

cimport cython
from posix.time cimport clock_gettime, timespec, CLOCK_REALTIME

cdef enum:
    HOT_BUCKETS = 4096            # hash buckets (a power of two)
    HOT_ENTRY_OVERHEAD = 256      # bytes counted per entry beyond its key, head and body

cdef long long _hot_hits = 0      # requests answered from a hot index (_ext.stats())


cdef inline unsigned long long _fnv(unsigned long long h, const char *p, size_t n) noexcept nogil:
    cdef size_t i
    for i in range(n):
        h ^= <unsigned char>p[i]
        h *= 1099511628211ULL
    return h


cdef inline unsigned long long _fnv_lower(unsigned long long h, const char *p,
                                          size_t n) noexcept nogil:
    cdef size_t i
    cdef unsigned char c
    for i in range(n):
        c = <unsigned char>p[i]
        if b'A' <= c <= b'Z':
            c += 32
        h ^= c
        h *= 1099511628211ULL
    return h


cdef unsigned long long FNV_BASIS = 14695981039346656037ULL


cdef inline double _wall() noexcept nogil:
    # POSIX time, as time.time() (the cache's times are POSIX seconds); vDSO
    cdef timespec ts
    clock_gettime(CLOCK_REALTIME, &ts)
    return ts.tv_sec + ts.tv_nsec * 1e-9


@cython.final
cdef class HotEntry:
    """One hit ready to send: `head` is the status line and fields up to
    Content-Length (what policy.hit_head builds), without Age, Cache-Status,
    Date or the core's own fields, which are added per request."""
    cdef readonly bytes key          # the primary cache key
    cdef unsigned long long h
    cdef readonly bytes head
    cdef readonly tuple parts        # the body: buffers (slices of the LMDB map, or bytes)
    cdef readonly Py_ssize_t body_len
    cdef readonly int status
    cdef readonly double age_base    # Age at time t is age_base + t (policy.current_age)
    cdef readonly double expires     # fresh while t < expires (POSIX seconds)
    cdef readonly bint has_date      # head has a Date field
    cdef Py_ssize_t size
    cdef HotEntry next               # the next entry in its bucket

    @property
    def body(self):
        """The body as one bytes object (a copy: for tests and tools)."""
        return b"".join([bytes(p) for p in self.parts])


@cython.final
cdef class HotIndex:
    """A bounded map from cache key to HotEntry, for one worker.  `budget`
    bounds the bytes held (keys, heads, bodies); when an offer would pass
    it, the oldest entries go first.  `body_max` bounds one body."""
    cdef list buckets
    cdef dict order                  # key -> HotEntry, oldest first
    cdef readonly Py_ssize_t budget
    cdef readonly Py_ssize_t body_max
    cdef readonly Py_ssize_t used
    cdef readonly double margin      # not served when fresh for less than this (seconds)
    cdef readonly long long hits     # requests answered from here
    cdef long long hits_reported
    # the store's change generation (a shared 8-byte map), and the one
    # whose changes were applied here: while they differ nothing is served
    cdef const unsigned char[::1] gen_view
    cdef const long long *gen
    cdef public long long synced

    def __init__(self, Py_ssize_t budget=64 << 20, Py_ssize_t body_max=1 << 20,
                 double margin=0.25):
        if budget < 0 or body_max < 0:
            raise ValueError("hot index budget and body_max must not be negative")
        self.buckets = [None] * HOT_BUCKETS
        self.order = {}
        self.budget = budget
        self.body_max = body_max
        self.margin = margin

    def attach_generation(self, buffer):
        """Serve nothing while the 8 bytes at the start of buffer (the
        store's change generation) differ from `synced`."""
        cdef const unsigned char[::1] v = buffer
        if v.shape[0] < 8 or (<size_t>&v[0]) % 8:
            raise ValueError("the generation must be 8 aligned bytes")
        self.gen_view = v
        self.gen = <const long long *>&v[0]

    def detach_generation(self):
        self.gen = NULL
        self.gen_view = None

    def generation_changed(self):
        """The store changed since the last `synced` value."""
        return self.gen != NULL and self.gen[0] != self.synced

    def __len__(self):
        return len(self.order)

    cdef inline HotEntry find(self, unsigned long long h, const char *key, size_t n):
        cdef object e = self.buckets[h & (HOT_BUCKETS - 1)]
        cdef HotEntry he
        while e is not None:
            he = <HotEntry>e
            if he.h == h and <size_t>len(he.key) == n and memcmp(<const char *>he.key, key, n) == 0:
                return he
            e = he.next
        return None

    def offer(self, bytes key, bytes head, object body, int status, double age_base,
              double expires):
        """Keep a hit (replacing what key held); False when it does not fit.
        body: bytes, or a tuple of buffers that stay valid until the next
        `rebind` or `clear` (slices of the map in the pinned snapshot)."""
        cdef HotEntry e
        cdef tuple parts = (body,) if isinstance(body, bytes) else tuple(body)
        cdef Py_ssize_t body_len = sum([len(b) for b in parts])
        cdef Py_ssize_t size = len(key) + len(head) + body_len + HOT_ENTRY_OVERHEAD
        self.drop(key)
        if body_len > self.body_max or size > self.budget or len(parts) > SEND_PARTS_MAX:
            return False
        while self.used + size > self.budget and self.order:
            self.drop(next(iter(self.order)))
        e = HotEntry.__new__(HotEntry)
        e.key = key
        e.h = _fnv(FNV_BASIS, key, len(key))
        e.head = head
        e.parts = parts
        e.body_len = body_len
        e.status = status
        e.age_base = age_base
        e.expires = expires
        e.has_date = b"\r\ndate:" in head.lower()
        e.size = size
        e.next = self.buckets[e.h & (HOT_BUCKETS - 1)]
        self.buckets[e.h & (HOT_BUCKETS - 1)] = e
        self.order[key] = e
        self.used += size
        return True

    def drop(self, bytes key):
        """Forget key; True when it was held."""
        cdef HotEntry e = self.order.pop(key, None)
        cdef HotEntry prev
        cdef object cur
        cdef size_t b
        if e is None:
            return False
        b = e.h & (HOT_BUCKETS - 1)
        prev = None
        cur = self.buckets[b]
        while cur is not None and cur is not e:
            prev = <HotEntry>cur
            cur = prev.next
        if prev is None:
            self.buckets[b] = e.next
        else:
            prev.next = e.next
        e.next = None
        self.used -= e.size
        return True

    def keys(self):
        """The keys held, oldest first."""
        return list(self.order)

    def rebind(self, bytes key, object body):
        """Point key's entry at body (the same bytes, read in a newer
        snapshot); drop the entry when body is None or of another length.
        True when the entry is still held."""
        cdef HotEntry e = self.order.get(key)
        cdef tuple parts
        if e is None:
            return False
        parts = None if body is None else ((body,) if isinstance(body, bytes) else tuple(body))
        if parts is None or sum([len(b) for b in parts]) != e.body_len:
            self.drop(key)
            return False
        e.parts = parts
        return True

    def clear(self):
        self.buckets = [None] * HOT_BUCKETS
        self.order.clear()
        self.used = 0

    def get(self, bytes key):
        """The HotEntry held for key, or None (for tests and tools)."""
        return self.order.get(key)

    def take_hits(self):
        """Hits answered since the last call (the ticker adds them to the
        store's shared counters)."""
        cdef long long n = self.hits - self.hits_reported
        self.hits_reported = self.hits
        return n
