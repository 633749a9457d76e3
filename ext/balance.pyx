# Backend selection: the pool of a route, its balancing algorithms, the
# per-worker passive health state, the retry budget and the max_conns queue.
#
# Everything here runs per request without making Python objects:
#   round_robin  smooth weighted round-robin (nginx's algorithm).  With all
#                backends available the schedule it produces is periodic, so
#                it is computed once (Group.sched) and pick() walks it: O(1).
#                While a recovered backend's weight ramps up (slow_start) the
#                weights change, and the same algorithm runs live, O(n).
#   least_conn   fewest outstanding requests (Backend.active) per unit of
#                weight; ties go round the group.
#   p2c          two random backends, the one with fewer outstanding requests.
#   hash         rendezvous hashing (highest random weight) of a 64-bit key
#                from the client address, a header or a cookie: when one of
#                N backends goes, only the keys it had (about 1/N) move.
# `backup` backends form a second group, used only when no primary is up.
#
# A backend is available when it is administratively up (Backend.up), the
# active checks say so (Backend.health, a slot of memory shared with the
# prober, edgeproxy/health/) and this worker has not ejected it after
# consecutive connection failures (passive checks).  Passive checks never
# take a pool down: they eject at most a share of it (max_ejected), never
# its last available backend, and when nothing else is left an ejected
# backend takes traffic again.

from libc.math cimport log as _c_log
from libc.stdlib cimport malloc, free
from cpython.buffer cimport PyObject_GetBuffer, PyBuffer_Release, PyBUF_WRITABLE
from collections import deque as _deque

cdef enum Balance:
    BAL_RR = 0
    BAL_LEAST
    BAL_P2C
    BAL_HASH

cdef enum HashKind:
    HK_IP = 0
    HK_HEADER
    HK_COOKIE

cdef enum:
    SCHED_MAX = 4096         # longer SWRR periods run live instead of from a table
    BUDGET_WINDOW = 10       # seconds of the retry budget's window
    BUDGET_FLOOR = 3         # retries a quiet worker may always make per window
    EJECT_DOUBLINGS = 6      # the ejection time doubles at most this often

cdef double BUDGET_RATIO = 0.2

cdef dict _BALANCE_NAMES = {"round_robin": BAL_RR, "least_conn": BAL_LEAST,
                            "p2c": BAL_P2C, "hash": BAL_HASH}

# What the health prober writes for each backend (edgeproxy/health/board.py
# packs the same layout with struct "=BBHIIId").
cdef struct HealthSlot:
    unsigned char up          # 1: take traffic (also before the first probe)
    unsigned char checked     # 0: no probe yet, 1: the last one passed, 2: it failed
    unsigned short streak     # consecutive results like the last one
    unsigned int status       # HTTP status of the last probe, 0 if it got none
    unsigned int changes      # up/down transitions so far
    unsigned int reserved
    double when               # wall-clock time of the last probe

HEALTH_SLOT_SIZE = sizeof(HealthSlot)

cdef HealthSlot _always_up      # the slot of a backend without a shared one
_always_up.up = 1


cdef class SharedMemory:
    """Keeps a writable buffer (an mmap shared with other processes) exported
    while backends read their health slots through pointers into it."""
    cdef Py_buffer view
    cdef bint held

    def __cinit__(self, obj):
        PyObject_GetBuffer(obj, &self.view, PyBUF_WRITABLE)
        self.held = 1

    def __dealloc__(self):
        if self.held:
            PyBuffer_Release(&self.view)

    cdef HealthSlot *slot_at(self, Py_ssize_t offset) except NULL:
        if offset < 0 or offset + <Py_ssize_t>sizeof(HealthSlot) > self.view.len:
            raise ValueError(f"health slot at {offset} is outside the shared memory")
        return <HealthSlot *>(<char *>self.view.buf + offset)


# ---- hashing --------------------------------------------------------------

cdef inline unsigned long long _mix64(unsigned long long x) noexcept nogil:
    # the splitmix64 finalizer: every input bit moves every output bit
    x ^= x >> 30
    x *= 0xbf58476d1ce4e5b9ULL
    x ^= x >> 27
    x *= 0x94d049bb133111ebULL
    x ^= x >> 31
    return x


cdef inline unsigned long long _hash_bytes(const char *p, size_t n) noexcept nogil:
    cdef unsigned long long h = 0xcbf29ce484222325ULL   # FNV-1a, then mixed
    cdef size_t i
    for i in range(n):
        h ^= <unsigned char>p[i]
        h *= 0x100000001b3ULL
    return _mix64(h ^ n)


def hash_key(bytes value):
    """The 64-bit key a request value (address, header or cookie) hashes to."""
    return _hash_bytes(value, len(value))


cdef bint _cookie_value(const char *v, size_t vl, const char *name, size_t nl,
                        const char **out, size_t *outl) noexcept:
    """Find `name=value` among the `;`-separated pairs of one Cookie field."""
    cdef size_t i = 0, s, e
    while i < vl:
        while i < vl and (v[i] == b' ' or v[i] == b'\t' or v[i] == b';'):
            i += 1
        s = i
        while i < vl and v[i] != b';':
            i += 1
        e = i
        if e - s > nl and v[s + nl] == b'=' and memcmp(v + s, name, nl) == 0:
            s += nl + 1
            while e > s and (v[e - 1] == b' ' or v[e - 1] == b'\t'):
                e -= 1
            out[0] = v + s
            outl[0] = e - s
            return 1
    return 0


cdef unsigned long long _rng = 0x9e3779b97f4a7c15ULL

cdef inline unsigned long long _random() noexcept nogil:
    global _rng
    _rng ^= _rng << 13
    _rng ^= _rng >> 7
    _rng ^= _rng << 17
    return _rng


# ---- retry budget (per worker) --------------------------------------------

cdef long long _bud_sec[BUDGET_WINDOW]
cdef long long _bud_req[BUDGET_WINDOW]
cdef long long _bud_retry[BUDGET_WINDOW]

cdef inline int _bud_slot() noexcept:
    cdef long long s = <long long>_now
    cdef int i = <int>(s % BUDGET_WINDOW)
    if _bud_sec[i] != s:
        _bud_sec[i] = s
        _bud_req[i] = 0
        _bud_retry[i] = 0
    return i

cdef inline void _budget_note_request() noexcept:
    _bud_req[_bud_slot()] += 1

cdef bint _budget_take() noexcept:
    """Spend one retry if retries stay under 20% of the requests of the last
    10 s (plus a small floor, so a quiet worker can retry at all)."""
    cdef int i = _bud_slot(), k
    cdef long long s = <long long>_now, req = 0, ret = 0
    for k in range(BUDGET_WINDOW):
        if s - _bud_sec[k] < BUDGET_WINDOW:
            req += _bud_req[k]
            ret += _bud_retry[k]
    if ret + 1 > BUDGET_RATIO * req + BUDGET_FLOOR:
        return 0
    _bud_retry[i] += 1
    return 1

def retry_budget():
    """(requests, retries) counted in the current window (for tests and status)."""
    cdef long long s = <long long>_now, req = 0, ret = 0
    cdef int k
    for k in range(BUDGET_WINDOW):
        if s - _bud_sec[k] < BUDGET_WINDOW:
            req += _bud_req[k]
            ret += _bud_retry[k]
    return req, ret


# ---- one backend's availability --------------------------------------------

cdef inline bint _available(Backend b) noexcept:
    return b.up and b.health.up and not b.ejected


cdef void _note_failure(Backend b, str what):
    """A connect error, a reset before any response byte, or a timeout."""
    cdef Pool pool = b.pool
    cdef double t
    cdef str refused
    b.fails += 1
    b.failures_total += 1
    b.last_error = what
    if pool is None or pool.fail_max == 0 or b.ejected or b.fails < pool.fail_max:
        return
    refused = pool.eject_refusal(b)
    if refused is not None:
        if b.fails == pool.fail_max:     # said once per run of failures
            _log.warning("pool %s: backend %s failed %d times in a row (%s); not ejected: %s",
                         pool.name, b.name, b.fails, what, refused)
        return
    t = pool.eject_base * (1 << (b.ejections if b.ejections < EJECT_DOUBLINGS else EJECT_DOUBLINGS))
    b.ejections += 1
    b.ejected = 1
    b.eject_until = _now + t
    b.fails = 0
    _log.warning("pool %s: backend %s ejected for %.1fs after %d failures in a row (%s)",
                 pool.name, b.name, t, pool.fail_max, what)


cdef inline void _note_success(Backend b) noexcept:
    b.fails = 0
    b.ejections = 0
    b.close_seen = 0


cdef unsigned long long _request_sig(bytes head):
    """What tells one request from another: a hash of its request line."""
    cdef const char *p = head
    cdef const char *e = <const char *>memchr(p, b'\r', len(head))
    return _hash_bytes(p, <size_t>(e - p) if e != NULL else <size_t>len(head))


cdef void _note_closed_before_answer(Backend b, bytes head):
    """A fresh connection was closed or reset before any response byte.  A
    backend may do that on purpose to one request (a handler that drops
    its connection), so it counts as a failure only once a different
    request has met the same since the backend last answered."""
    cdef unsigned long long sig = _request_sig(head) if head is not None else 0
    if b.close_seen and b.close_sig != sig:
        _note_failure(b, "closed before answering")
    b.close_seen = 1
    b.close_sig = sig


cdef inline double _weight_now(Backend b, double slow_start) noexcept:
    """The weight, scaled down while the backend is in its slow start."""
    cdef double f
    if slow_start > 0 and b.up_since > 0:
        f = (_now - b.up_since) / slow_start
        if f < 1.0:
            return b.weight * (0.05 if f < 0.05 else f)
    return b.weight


# ---- a group of backends (the primaries, or the backups) -------------------

cdef class Group:
    """Backends picked among by one algorithm, with that algorithm's state."""
    cdef list members
    cdef Py_ssize_t n
    cdef int *sched          # a period of the SWRR order (indexes into members)
    cdef Py_ssize_t sched_len
    cdef Py_ssize_t pos
    cdef Py_ssize_t rr
    cdef bint weighted       # weights differ
    cdef double ramp_until   # some member is in its slow start until then

    def __cinit__(self):
        self.sched = NULL

    def __init__(self, list members):
        self.members = members
        self.n = len(members)
        self.weighted = len({(<Backend>b).weight for b in members}) > 1
        self._build_schedule()

    def __dealloc__(self):
        free(self.sched)

    cdef int _build_schedule(self) except -1:
        """One period of smooth weighted round-robin over every member."""
        cdef Py_ssize_t total = 0, i, k, best
        cdef long long *cur
        cdef long long g = 0, a, c
        for b in self.members:
            a = (<Backend>b).weight
            while a:
                g, a = a, g % a
        if g == 0:
            return 0
        for b in self.members:
            total += (<Backend>b).weight // g
        if total > SCHED_MAX:
            self.sched_len = 0       # too long a period: run live
            return 0
        self.sched = <int *>malloc(sizeof(int) * (total if total else 1))
        cur = <long long *>malloc(sizeof(long long) * (self.n if self.n else 1))
        if self.sched == NULL or cur == NULL:
            free(cur)
            raise MemoryError()
        for i in range(self.n):
            cur[i] = 0
        for k in range(total):
            best = -1
            for i in range(self.n):
                cur[i] += (<Backend>self.members[i]).weight // g
                if best < 0 or cur[i] > cur[best]:
                    best = i
            cur[best] -= total
            self.sched[k] = <int>best
        free(cur)
        self.sched_len = total
        return 0

    cdef Backend pick(self, Pool pool, unsigned long long key, unsigned long long avoid):
        if self.n == 0:
            return None
        if pool.algo == BAL_RR:
            if self.sched_len and _now >= self.ramp_until:
                return self._pick_sched(pool, avoid)
            return self._pick_swrr(pool, avoid)
        if pool.algo == BAL_LEAST:
            return self._pick_least(pool, avoid)
        if pool.algo == BAL_P2C:
            return self._pick_p2c(pool, avoid)
        return self._pick_hash(pool, key, avoid)

    cdef inline bint _usable(self, Pool pool, Backend b, unsigned long long avoid) noexcept:
        if not _available(b) or (avoid >> (b.index & 63)) & 1:
            return 0
        if pool.max_conns and b.active >= pool.max_conns:
            pool.busy = 1            # up but full: worth queueing for
            return 0
        return 1

    cdef Backend _pick_sched(self, Pool pool, unsigned long long avoid):
        cdef Py_ssize_t i, n = self.sched_len
        cdef Backend b
        for i in range(n):
            b = <Backend>self.members[self.sched[self.pos]]
            self.pos += 1
            if self.pos == n:
                self.pos = 0
            if self._usable(pool, b, avoid):
                return b
        return None

    cdef Backend _pick_swrr(self, Pool pool, unsigned long long avoid):
        cdef Backend b, best = None
        cdef long long total = 0, w
        cdef Py_ssize_t i
        for i in range(self.n):
            b = <Backend>self.members[i]
            if not self._usable(pool, b, avoid):
                continue
            w = <long long>(_weight_now(b, pool.slow_start) * 100)
            if w < 1:
                w = 1
            b.cw += w
            total += w
            if best is None or b.cw > best.cw:
                best = b
        if best is not None:
            best.cw -= total
        return best

    cdef Backend _pick_least(self, Pool pool, unsigned long long avoid):
        cdef Backend b, best = None
        cdef double score, best_score = 0
        cdef Py_ssize_t i, start = self.rr
        self.rr += 1
        if self.rr >= self.n:
            self.rr = 0
        for i in range(self.n):
            b = <Backend>self.members[(start + i) % self.n]
            if not self._usable(pool, b, avoid):
                continue
            score = b.active / _weight_now(b, pool.slow_start)
            if best is None or score < best_score:
                best = b
                best_score = score
        return best

    cdef Backend _pick_p2c(self, Pool pool, unsigned long long avoid):
        cdef Backend a, b
        cdef Py_ssize_t i, j
        if self.n < 2:
            return self._pick_least(pool, avoid)
        i = <Py_ssize_t>(_random() % <unsigned long long>self.n)
        j = <Py_ssize_t>(_random() % <unsigned long long>(self.n - 1))
        if j >= i:
            j += 1
        a = <Backend>self.members[i]
        b = <Backend>self.members[j]
        if not self._usable(pool, a, avoid):
            if self._usable(pool, b, avoid):
                return b
            return self._pick_least(pool, avoid)    # both out: look at all
        if not self._usable(pool, b, avoid):
            return a
        # fewer outstanding requests per unit of weight; +1 lets weights
        # count among idle backends
        if (b.active + 1) * _weight_now(a, pool.slow_start) < \
                (a.active + 1) * _weight_now(b, pool.slow_start):
            return b
        return a

    cdef Backend _pick_hash(self, Pool pool, unsigned long long key, unsigned long long avoid):
        cdef Backend b, best = None
        cdef unsigned long long h, best_h = 0
        cdef double s, best_s = 0
        cdef Py_ssize_t i
        for i in range(self.n):
            b = <Backend>self.members[i]
            if not self._usable(pool, b, avoid):
                continue
            h = _mix64(key ^ b.seed)
            if self.weighted:
                # weighted rendezvous: w / -ln(u), u uniform in (0, 1)
                s = b.weight / -_c_log(((h >> 11) + 0.5) * (1.0 / 9007199254740992.0))
                if best is None or s > best_s:
                    best = b
                    best_s = s
            elif best is None or h > best_h:
                best = b
                best_h = h
        return best

    cdef void tick(self, Pool pool):
        """Once per worker tick: ejections that ended, health changes seen,
        and when the slow starts end."""
        cdef Backend b
        cdef bint now_up
        cdef double ramp = 0
        for x in self.members:
            b = <Backend>x
            if b.ejected and _now >= b.eject_until:
                b.ejected = 0
                b.up_since = _now
                b.cw = 0
                _log.info("pool %s: backend %s back after ejection", pool.name, b.name)
            now_up = b.health.up
            if now_up != b.seen_up:
                b.seen_up = now_up
                if now_up:
                    # the active checks vouch for it again: that ends a
                    # passive ejection too
                    if b.ejected:
                        b.ejected = 0
                        _log.info("pool %s: backend %s back (health checks pass)",
                                  pool.name, b.name)
                    b.up_since = _now
                    b.cw = 0
                    b.fails = 0
                    b.ejections = 0
            if pool.slow_start > 0 and b.up_since > 0 and b.up_since + pool.slow_start > ramp:
                ramp = b.up_since + pool.slow_start
        self.ramp_until = ramp


# ---- the pool ---------------------------------------------------------------

cdef class Pool:
    """A named group of backends; pick() chooses one per request."""
    cdef public str name
    cdef public list backends
    cdef public str balance
    cdef public str hash_key
    cdef public int retries
    cdef public int max_conns
    cdef public double queue_timeout
    cdef public double slow_start
    cdef public int fail_max
    cdef public double eject_base
    cdef public double max_ejected    # share of the backends passive checks may eject at once
    cdef Group primary
    cdef Group backup             # None when there are no backups
    cdef int algo
    cdef int hkind
    cdef bytes hname              # header name (lower case) or cookie name
    cdef bint busy                # the last pick skipped a backend that was full
    cdef object waiting           # deque of queued ClientConn (max_conns)

    def __init__(self, name, backends, *, balance="round_robin", hash_key="ip", retries=2,
                 max_conns=0, queue_timeout=5.0, slow_start=0.0, failures=5, eject=10.0,
                 max_ejected=0.5):
        cdef Backend b
        if balance not in _BALANCE_NAMES:
            raise ValueError(f"unknown balance {balance!r}")
        self.name = name
        self.backends = list(backends)
        self.balance = balance
        self.algo = _BALANCE_NAMES[balance]
        self.hash_key = hash_key
        if hash_key == "ip":
            self.hkind = HK_IP
            self.hname = b""
        elif hash_key.startswith("header:"):
            self.hkind = HK_HEADER
            self.hname = hash_key[7:].lower().encode("latin-1")
        elif hash_key.startswith("cookie:"):
            self.hkind = HK_COOKIE
            self.hname = hash_key[7:].encode("latin-1")
        else:
            raise ValueError(f"unknown hash_key {hash_key!r}")
        self.retries = retries
        self.max_conns = max_conns
        self.queue_timeout = queue_timeout
        self.slow_start = slow_start
        self.fail_max = failures
        self.eject_base = eject
        self.max_ejected = max_ejected
        self.waiting = _deque()
        self.set_backends(self.backends)

    def set_backends(self, backends):
        """Use these backends from now on (config load, or the admin API
        adding or removing one): renumbers them and rebuilds the groups."""
        cdef Backend b
        if len(backends) > 64:
            raise ValueError("a pool has at most 64 backends")
        self.backends = list(backends)
        for i, x in enumerate(self.backends):
            b = <Backend>x
            b.pool = self
            b.index = i
            ident = b.name.encode("utf-8", "surrogateescape")   # "host:port" or "unix:/path"
            b.seed = _mix64(_hash_bytes(ident, len(ident)) + <unsigned long long>i)
        primaries = [x for x in self.backends if not (<Backend>x).backup]
        backups = [x for x in self.backends if (<Backend>x).backup]
        self.primary = Group(primaries)
        self.backup = Group(backups) if backups else None

    cdef unsigned long long key_of(self, ClientConn c, HeadParser hp):
        """The hash key of the request in `hp` (its client address when the
        header or cookie is missing)."""
        cdef size_t i
        cdef const char *v
        cdef size_t vl
        cdef size_t nl = len(self.hname)
        if self.hkind == HK_HEADER:
            for i in range(hp.nfields):
                if _ieq(hp.fields[i].name, hp.fields[i].name_len, self.hname, nl):
                    return _hash_bytes(hp.fields[i].value, hp.fields[i].value_len)
        elif self.hkind == HK_COOKIE:
            for i in range(hp.nfields):
                if _ieq(hp.fields[i].name, hp.fields[i].name_len, b"cookie", 6) and \
                        _cookie_value(hp.fields[i].value, hp.fields[i].value_len,
                                      self.hname, nl, &v, &vl):
                    return _hash_bytes(v, vl)
        return _hash_bytes(c.peer, len(c.peer))

    cdef Backend backend_named(self, str name):
        """The backend called name ("host:port"), or None (a hook's ctx.backend)."""
        cdef Backend b
        for b in self.backends:
            if b.name == name:
                return b
        return None

    cdef Backend pick(self, unsigned long long key, unsigned long long avoid):
        """A backend that can take a request now, skipping those in `avoid`
        (a bit per Backend.index); None with `busy` set when every one that
        is up is at max_conns."""
        cdef Backend b = self._pick(key, avoid)
        if b is None and not self.busy and self._end_ejections():
            b = self._pick(key, avoid)
        return b

    cdef inline Backend _pick(self, unsigned long long key, unsigned long long avoid):
        cdef Backend b
        self.busy = 0
        b = self.primary.pick(self, key, avoid)
        if b is not None or self.busy or self.backup is None:
            return b
        return self.backup.pick(self, key, avoid)

    cdef str eject_refusal(self, Backend b):
        """Why b, at the end of a run of failures, must not be ejected now
        (None: it may be).  Passive checks never take the last available
        backend out, nor more than max_ejected of its group (the primaries,
        or the backups; one may always go, as in Envoy), except that
        primaries may all go while a backup is there to take over: that is
        what the operator made backups for."""
        cdef Backend x
        cdef int ejected = 0, members = 0, others = 0
        cdef bint backup_up = 0
        for o in self.backends:
            x = <Backend>o
            if x is not b and _available(x):
                others += 1
                if x.backup:
                    backup_up = 1
            if x.backup == b.backup:
                members += 1
                if x.ejected:
                    ejected += 1
        if others == 0:
            return "it is the last available backend of the pool"
        if ejected and ejected + 1 > self.max_ejected * members and not (backup_up and not b.backup):
            return "%d of %d %s are ejected already (max_ejected %g)" % (
                ejected, members, "backups" if b.backup else "backends", self.max_ejected)
        return None

    cdef int _end_ejections(self):
        """No backend is available: if that is because of ejections (other
        backends went down since, or were drained), take the ejected ones
        that are up back at once rather than answer 503.  Returns how many
        came back."""
        cdef Backend x
        cdef int n = 0
        for o in self.backends:
            x = <Backend>o
            if _available(x):
                return 0         # the pick skipped it (already tried)
        for o in self.backends:
            x = <Backend>o
            if x.ejected and x.up and x.health.up:
                x.ejected = 0
                x.up_since = _now
                x.cw = 0
                n += 1
                _log.warning("pool %s: no other backend available; backend %s back before its "
                             "ejection ends", self.name, x.name)
        return n

    # -- the max_conns queue --

    cdef void enqueue(self, ClientConn c):
        c.queued = 1
        c.qdeadline = _now + self.queue_timeout
        self.waiting.append(c)

    cdef void wake(self):
        """A backend has room again: hand it to the longest-waiting request."""
        cdef ClientConn c
        cdef Backend b
        while self.waiting:
            c = <ClientConn>self.waiting[0]
            if not c.queued or c.state >= C_LINGER:
                self.waiting.popleft()
                continue
            b = self.pick(c.hkey, c.tried)
            if b is None:
                return
            self.waiting.popleft()
            c.queued = 0
            c._dispatch(b)

    cdef void tick(self):
        cdef ClientConn c
        self.primary.tick(self)
        if self.backup is not None:
            self.backup.tick(self)
        while self.waiting:
            c = <ClientConn>self.waiting[0]
            if c.queued and c.state < C_LINGER and _now < c.qdeadline:
                break
            self.waiting.popleft()
            if c.queued and c.state < C_LINGER:
                c.queued = 0
                _log.warning("pool %s: no backend free within %.1fs (max_conns %d)",
                             self.name, self.queue_timeout, self.max_conns)
                c._reply_unavailable(1, 0)   # its body may be half read: close
        if self.waiting:
            self.wake()

    @property
    def queued(self):
        return len(self.waiting)

    def pick_backend(self, key=None, avoid=()):
        """pick() for tests and tools: key is bytes (hashed like a request
        value) or None; avoid lists backends to skip."""
        cdef unsigned long long k = 0, mask = 0
        if key is not None:
            k = _hash_bytes(key, len(key))
        for b in avoid:
            mask |= 1ULL << ((<Backend>b).index & 63)
        return self.pick(k, mask)


cdef list _pools = []

def set_pools(pools):
    """The pools this worker serves (their ticks run in pools_tick)."""
    global _pools
    _pools = list(pools)

def pools_tick():
    """Called by the worker's ticker: ends ejections, notices health changes,
    expires queued requests."""
    for p in _pools:
        (<Pool>p).tick()


def clock():
    """The loop time the worker's ticker last set (set_clock)."""
    return _now
