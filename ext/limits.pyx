# Abuse controls as compiled phases: access lists (allow/deny by CIDR) and
# rate limits (GCRA), docs/limits.md.
#
# Access lists: a listener's is checked for every request before routing
# (ClientConn._start_request), a route's is the AccessPhase at the front of
# its compiled phases.  The client address is parsed into binary once per
# connection (ClientConn.peer_bin; again only when `peer` changes) and
# matched against prefix masks: no Python object per request.
#
# Rate limits: the LimitPhase of a route runs its limits in order.  A
# limit's state is one "theoretical arrival time" (TAT) per key in a
# LimitZone: a fixed-size table in a shared anonymous mapping the
# supervisor made before forking, so every worker of the host counts into
# the same table.  Each bucket of the table holds EP_WAYS keys under a
# spin lock taken with C atomics (a holder that died is detected by its
# pid); the least recent key of a full bucket is evicted.  A redis:// limit
# holds the request while its GCRA script runs in Redis (the Python side,
# edgeproxy/limits/redis.py), and falls back to the local zone when Redis
# cannot answer.  Requests beyond `delay` inside the burst are held on a
# timer for at most burst/rate seconds.

from posix.time cimport clock_gettime, timespec, CLOCK_MONOTONIC
from libc.math cimport ceil
from libc.string cimport memset

cdef extern from *:
    """
    #include <stdint.h>
    #include <signal.h>
    #include <errno.h>
    #include <sched.h>
    #include <unistd.h>
    #include <string.h>
    #include <arpa/inet.h>
    #include <sys/socket.h>

    #define EP_WAYS 5
    #define EP_MAGIC 0x31746d6c70656465ULL  /* "edeplmt1" */
    typedef struct { uint64_t key; int64_t tat; uint32_t logged; uint32_t pad; } ep_slot;
    typedef struct { uint32_t lock; uint32_t pad; ep_slot s[EP_WAYS]; } ep_bucket;   /* 128 bytes */
    typedef struct { uint64_t magic; uint64_t nbuckets; int64_t counters[14]; } ep_zone_head;

    static void ep_lock(uint32_t *l) {
        uint32_t me = (uint32_t)getpid(), expected;
        unsigned spins = 0;
        for (;;) {
            expected = 0;
            if (__atomic_compare_exchange_n(l, &expected, me, 0, __ATOMIC_ACQUIRE, __ATOMIC_RELAXED))
                return;
            if (++spins >= 128) {
                spins = 0;
                /* a holder holds it for a few instructions: one that is gone
                   (or a dead process whose pid we now have) died holding it */
                if (expected == me || (kill((pid_t)expected, 0) == -1 && errno == ESRCH)) {
                    if (__atomic_compare_exchange_n(l, &expected, me, 0, __ATOMIC_ACQUIRE,
                                                    __ATOMIC_RELAXED))
                        return;
                }
                sched_yield();
            }
        }
    }

    static inline void ep_unlock(uint32_t *l) { __atomic_store_n(l, 0, __ATOMIC_RELEASE); }

    static inline void ep_count(ep_zone_head *z, int i, int64_t n) {
        __atomic_fetch_add(&z->counters[i], n, __ATOMIC_RELAXED);
    }

    static inline int64_t ep_counter(ep_zone_head *z, int i) {
        return __atomic_load_n(&z->counters[i], __ATOMIC_RELAXED);
    }

    /* The slot of key in its bucket (locked by the caller), taking the least
       recent one when key is not there. */
    static ep_slot *ep_find(ep_zone_head *z, ep_bucket *b, uint64_t key, int64_t now) {
        int i, victim = 0;
        int64_t oldest = INT64_MAX;
        for (i = 0; i < EP_WAYS; i++) {
            if (b->s[i].key == key) return &b->s[i];
            if (b->s[i].tat < oldest) { oldest = b->s[i].tat; victim = i; }
        }
        if (oldest > now) ep_count(z, 4, 1);      /* a live key lost its state */
        b->s[victim].key = key;
        b->s[victim].tat = 0;
        b->s[victim].logged = 0;
        return &b->s[victim];
    }

    /* GCRA.  T: the emission interval, tau: burst * T, delay_ns: delay * T
       (0: nothing waits).  0: pass now; 1: pass after *wait_ns; 2: refused,
       it would pass in *wait_ns.  *used: tat - now after it (for the
       RateLimit field).  In dry-run (commit 0 for refusals) a refused
       request changes nothing, as the enforcing limit would not. */
    static int ep_gcra(ep_zone_head *z, ep_bucket *buckets, uint64_t key, int64_t now,
                       int64_t T, int64_t tau, int64_t delay_ns,
                       long long *wait_ns, long long *used, int *log_it) {
        ep_bucket *b = &buckets[(key >> 7) % z->nbuckets];
        ep_slot *s;
        int64_t tat, new_tat;
        int rc = 0;
        uint32_t sec;
        ep_lock(&b->lock);
        s = ep_find(z, b, key, now);
        tat = s->tat > now ? s->tat : now;
        new_tat = tat + T;
        *wait_ns = 0;
        *log_it = 0;
        if (new_tat - now > tau + T) {
            *wait_ns = new_tat - (tau + T) - now;
            *used = tat - now;
            sec = (uint32_t)(now / 1000000000LL) | 1u;
            if (s->logged != sec) { s->logged = sec; *log_it = 1; }
            rc = 2;
        } else {
            s->tat = new_tat;
            *used = new_tat - now;
            if (delay_ns > 0 && tat - now > delay_ns) {
                *wait_ns = tat - now - delay_ns;
                rc = 1;
            }
        }
        ep_unlock(&b->lock);
        return rc;
    }

    /* At most one log line per key per second (requests refused through Redis). */
    static int ep_log_due(ep_zone_head *z, ep_bucket *buckets, uint64_t key, int64_t now) {
        ep_bucket *b = &buckets[(key >> 7) % z->nbuckets];
        ep_slot *s;
        int due = 0;
        uint32_t sec = (uint32_t)(now / 1000000000LL) | 1u;
        ep_lock(&b->lock);
        s = ep_find(z, b, key, now);
        if (s->logged != sec) { s->logged = sec; due = 1; }
        ep_unlock(&b->lock);
        return due;
    }

    typedef struct { unsigned char allow, fam, pad[2]; unsigned char net[16]; unsigned char mask[16]; } ep_rule;

    /* The text address p (NUL-terminated) as 4 or 16 bytes; IPv4-mapped IPv6
       is IPv4, a zone (%eth0) is dropped.  0 when it is no IP address. */
    static int ep_parse_ip(const char *p, size_t n, unsigned char *out) {
        char buf[64];
        size_t i;
        if (n == 0 || n >= sizeof buf) return 0;
        for (i = 0; i < n && p[i] != '%'; i++) buf[i] = p[i];
        buf[i] = 0;
        if (memchr(buf, ':', i) == NULL)
            return inet_pton(AF_INET, buf, out) == 1 ? 4 : 0;
        if (inet_pton(AF_INET6, buf, out) != 1) return 0;
        static const unsigned char mapped[12] = {0,0,0,0,0,0,0,0,0,0,0xff,0xff};
        if (memcmp(out, mapped, 12) == 0) { memmove(out, out + 12, 4); return 4; }
        return 6;
    }

    /* The first rule that matches: 1 allow, 0 deny; -1 when none does. */
    static int ep_match(const ep_rule *r, int n, int fam, const unsigned char *a) {
        int i, k, len, ok;
        for (i = 0; i < n; i++) {
            if (r[i].fam == 0) return r[i].allow;
            if (r[i].fam != fam) continue;
            len = fam == 4 ? 4 : 16;
            ok = 1;
            for (k = 0; k < len; k++)
                if ((a[k] & r[i].mask[k]) != r[i].net[k]) { ok = 0; break; }
            if (ok) return r[i].allow;
        }
        return -1;
    }
    """
    int EP_WAYS
    unsigned long long EP_MAGIC
    ctypedef struct ep_zone_head:
        unsigned long long magic
        unsigned long long nbuckets
    ctypedef struct ep_bucket:
        pass
    ctypedef struct ep_rule:
        unsigned char allow
        unsigned char fam
        unsigned char net[16]
        unsigned char mask[16]
    int ep_gcra(ep_zone_head *z, ep_bucket *buckets, unsigned long long key, long long now,
                long long T, long long tau, long long delay_ns,
                long long *wait_ns, long long *used, int *log_it) noexcept nogil
    int ep_log_due(ep_zone_head *z, ep_bucket *buckets, unsigned long long key,
                   long long now) noexcept nogil
    void ep_count(ep_zone_head *z, int i, long long n) noexcept nogil
    long long ep_counter(ep_zone_head *z, int i) noexcept nogil
    int ep_parse_ip(const char *p, size_t n, unsigned char *out) noexcept nogil
    int ep_match(const ep_rule *r, int n, int fam, const unsigned char *a) noexcept nogil


cdef extern from *:
    """
    static inline void ep_add_counter(int64_t *p) { __atomic_fetch_add(p, 1, __ATOMIC_RELAXED); }
    """
    void ep_add_counter(long long *p) noexcept nogil

cdef object _limit_log = logging.getLogger("edgeproxy.limits")

# what the zone's counters count (index into ep_zone_head.counters)
cdef enum:
    LC_PASSED = 0          # went on at once
    LC_DELAYED = 1         # went on after a wait (delay)
    LC_LIMITED = 2         # answered 429
    LC_DRY_RUN = 3         # would have been answered 429 (mode = "dry-run")
    LC_EVICTED = 4         # keys whose state was dropped for a new key (table full)
    LC_STORE_ERRORS = 5    # Redis did not answer: the local limit decided
    LC_REMOTE = 6          # checks Redis answered

LIMIT_COUNTERS = ("passed", "delayed", "limited", "dry_run", "evicted", "store_errors", "remote")
ZONE_HEAD_BYTES = 128       # ep_zone_head
ZONE_BUCKET_BYTES = 128     # ep_bucket: a lock and EP_WAYS slots
ZONE_WAYS = 5

# 403 and 429 answered by the proxy itself
_REASONS.setdefault(403, b"Forbidden")
_REASONS.setdefault(429, b"Too Many Requests")

cdef inline long long _mono_ns() noexcept nogil:
    cdef timespec ts
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return <long long>ts.tv_sec * 1000000000LL + ts.tv_nsec


# ---- access lists -------------------------------------------------------------

cdef inline int _peer_family(ClientConn c) noexcept:
    """c.peer as binary (c.peer_bin), parsed once per address: 4, 6, or 0
    when it is no IP address (a Unix socket)."""
    cdef bytes p = c.peer
    if c.peer_parsed is not p:
        c.peer_fam = ep_parse_ip(PyBytes_AS_STRING(p), len(p), c.peer_bin)
        c.peer_parsed = p
    return c.peer_fam


@cython.final
cdef class AccessList:
    """allow/deny rules, first match wins; no rule matching allows (as
    nginx).  Refusals count in a shared counter (edgeproxy.limits.shared)."""
    cdef ep_rule *rules
    cdef int n
    cdef long long *denied        # the shared counter, or _m_local's spare when none
    cdef object _hold             # keeps the counter's buffer exported
    cdef readonly str label
    cdef long long _own_count

    def __init__(self, rules, str label="", counters=None, Py_ssize_t index=0):
        """rules: [(allow, family 0/4/6, network 16 bytes, prefix)] as
        edgeproxy.limits.rules.compile_access makes them; counters: a
        writable buffer of int64 counters, this list counting at index."""
        cdef int i, k, bits
        cdef unsigned char[::1] mv
        self.label = label
        self.n = len(rules)
        self.rules = <ep_rule *>malloc(sizeof(ep_rule) * (self.n if self.n else 1))
        if self.rules == NULL:
            raise MemoryError()
        memset(self.rules, 0, sizeof(ep_rule) * (self.n if self.n else 1))
        for i, (allow, fam, net, prefix) in enumerate(rules):
            if fam not in (0, 4, 6) or len(net) != 16 or not 0 <= prefix <= (32 if fam == 4 else 128):
                raise ValueError(f"bad access rule {(allow, fam, net, prefix)!r}")
            self.rules[i].allow = 1 if allow else 0
            self.rules[i].fam = fam
            bits = prefix
            for k in range(16):
                if bits >= 8:
                    self.rules[i].mask[k] = 0xff
                    bits -= 8
                elif bits > 0:
                    self.rules[i].mask[k] = <unsigned char>((0xff << (8 - bits)) & 0xff)
                    bits = 0
                self.rules[i].net[k] = (<bytes>net)[k] & self.rules[i].mask[k]
        if counters is not None:
            mv = counters
            if index < 0 or (index + 1) * 8 > mv.shape[0]:
                raise ValueError("access counter out of its region")
            self._hold = mv
            self.denied = <long long *>&mv[index * 8]
        else:
            self.denied = &self._own_count

    def __dealloc__(self):
        free(self.rules)

    cdef inline bint refuses(self, ClientConn c) noexcept:
        cdef int fam = _peer_family(c)
        if ep_match(self.rules, self.n, fam, c.peer_bin) == 0:
            ep_add_counter(self.denied)
            return 1
        return 0

    def allows(self, str address):
        """For the tests and `edgeproxy check`: would address pass?"""
        cdef unsigned char a[16]
        cdef bytes b = address.encode("latin-1")
        cdef int fam = ep_parse_ip(b, len(b), a)
        return ep_match(self.rules, self.n, fam, a) != 0

    @property
    def denied_count(self):
        return self.denied[0]


cdef bint _access_refused(ClientConn c, AccessList acl) except -1:
    """A listener's list, before routing: 403 (the connection stays when the
    request has no body)."""
    cdef HeadParser hp = _parser
    if not acl.refuses(c):
        return 0
    c._reply_error(403, hp.body == B_NONE)
    return 1


@cython.final
cdef class AccessPhase(Phase):
    """A route's access list, the first of its compiled phases."""
    cdef readonly AccessList acl

    def __init__(self, AccessList acl):
        self.acl = acl

    cdef int request(self, ClientConn c, Route route, HeadParser hp) except -2:
        if not self.acl.refuses(c):
            return R_GO
        c._reply_error(403, hp.body == B_NONE)
        return R_ANSWERED


# ---- the shared table of one limit --------------------------------------------

@cython.final
cdef class LimitZone:
    """One limit's key table and counters in a shared mapping (made by
    edgeproxy.limits.shared before the workers fork)."""
    cdef object _buf
    cdef ep_zone_head *head
    cdef ep_bucket *buckets
    cdef readonly Py_ssize_t nbuckets

    def __init__(self, buf):
        """buf: a writable buffer of 128 + 128 * nbuckets bytes, zeroed or
        already a zone (its state is kept)."""
        cdef unsigned char[::1] mv = buf
        cdef Py_ssize_t n = mv.shape[0]
        if n < 256 or n % 128:
            raise ValueError("a limit zone is 128 bytes plus 128 per bucket")
        self._buf = mv
        self.head = <ep_zone_head *>&mv[0]
        self.buckets = <ep_bucket *>&mv[128]
        self.nbuckets = n // 128 - 1
        if self.head.magic != EP_MAGIC:
            self.head.nbuckets = <unsigned long long>self.nbuckets
            self.head.magic = EP_MAGIC
        elif self.head.nbuckets != <unsigned long long>self.nbuckets:
            raise ValueError("a limit zone of another size")

    def counters(self):
        return {name: ep_counter(self.head, i) for i, name in enumerate(LIMIT_COUNTERS)}

    def check(self, unsigned long long key, double rate, int burst, int delay=0):
        """GCRA for one key now (tests): (verdict 0/1/2, wait seconds)."""
        cdef long long wait = 0, used = 0, T = <long long>(1e9 / rate)
        cdef int log_it = 0
        cdef int rc = ep_gcra(self.head, self.buckets, key | 1, _mono_ns(), T, T * burst,
                              T * delay, &wait, &used, &log_it)
        return rc, wait / 1e9


# ---- rate limits ----------------------------------------------------------------

cdef enum LimitKey:
    LK_IP = 0
    LK_HEADER
    LK_COOKIE
    LK_ROUTE
    LK_HOOK


@cython.final
cdef class LimitRequest:
    """What a key hook ("module:attr") gets: fn(request) -> str | bytes | None
    (None: the limit does not count this request)."""
    cdef readonly str client_ip
    cdef readonly str method
    cdef readonly str host
    cdef readonly str target
    cdef readonly list headers          # [(name, value)] as str, in order

    def header(self, str name, default=None):
        low = name.lower()
        for k, v in self.headers:
            if k.lower() == low:
                return v
        return default


@cython.final
cdef class RateLimit:
    """One [[limit]] as the core runs it."""
    cdef readonly str name
    cdef readonly LimitZone zone
    cdef long long T                 # ns between two requests at the rate
    cdef long long tau               # burst * T
    cdef long long delay_ns          # delay * T; 0: nothing waits
    cdef bint dry
    cdef int kind
    cdef bytes hname                 # header name (lower) or cookie name
    cdef object hook                 # the key function (LK_HOOK)
    cdef unsigned long long seed     # keys of different limits never share a slot
    cdef bytes policy                # 'RateLimit-Policy: "name";q=..;w=..\r\n'
    cdef bytes quoted                # '"name"'
    cdef readonly object store       # edgeproxy.limits.redis.RedisLimiter, or None (local)
    cdef bint deny_on_error

    def __init__(self, str name, LimitZone zone, double rate, int burst=0, int delay=0,
                 str key="ip", bint dry_run=False, object hook=None, object store=None,
                 bint deny_on_error=False):
        cdef long long q
        if rate <= 0 or burst < 0 or delay < 0 or delay > burst:
            raise ValueError("rate > 0 and 0 <= delay <= burst")
        self.name = name
        self.zone = zone
        self.T = <long long>(1e9 / rate)
        if self.T < 1:
            self.T = 1
        self.tau = self.T * burst
        self.delay_ns = self.T * delay
        self.dry = dry_run
        self.store = store
        self.deny_on_error = deny_on_error
        if key == "ip":
            self.kind = LK_IP
        elif key == "route":
            self.kind = LK_ROUTE
        elif key.startswith("header:"):
            self.kind = LK_HEADER
            self.hname = key[7:].lower().encode("latin-1")
        elif key.startswith("cookie:"):
            self.kind = LK_COOKIE
            self.hname = key[7:].encode("latin-1")
        else:
            if hook is None or not callable(hook):
                raise ValueError(f"limit {name}: key {key!r} needs its function")
            self.kind = LK_HOOK
            self.hook = hook
        nb = name.encode("utf-8")
        self.seed = _hash_bytes(nb, len(nb))
        # draft-ietf-httpapi-ratelimit-headers-10: quota q requests per window w seconds
        q = burst + 1
        self.quoted = b'"' + nb.replace(b"\\", b"\\\\").replace(b'"', b'\\"') + b'"'
        self.policy = b"RateLimit-Policy: %s;q=%d;w=%d\r\n" % (
            self.quoted, q, max(1, <long long>ceil(q / rate)))

    @property
    def policy_field(self):
        return self.policy[18:len(self.policy) - 2].decode()

    cdef bytes key_of(self, ClientConn c, Route route, HeadParser hp):
        """The request's key for this limit, or None when it has none (a
        missing header or cookie, a hook's None: not counted)."""
        cdef size_t i
        cdef const char *v
        cdef size_t vl
        cdef size_t nl
        if self.kind == LK_IP:
            return c.peer
        if self.kind == LK_ROUTE:
            return b"route:%d" % route.index
        if self.kind == LK_HEADER:
            nl = len(self.hname)
            for i in range(hp.nfields):
                if _ieq(hp.fields[i].name, hp.fields[i].name_len, self.hname, nl):
                    return hp.fields[i].value[:hp.fields[i].value_len]
            return None
        if self.kind == LK_COOKIE:
            nl = len(self.hname)
            for i in range(hp.nfields):
                if _ieq(hp.fields[i].name, hp.fields[i].name_len, b"cookie", 6) and \
                        _cookie_value(hp.fields[i].value, hp.fields[i].value_len,
                                      self.hname, nl, &v, &vl):
                    return v[:vl]
            return None
        return self._hook_key(c, hp)

    cdef bytes _hook_key(self, ClientConn c, HeadParser hp):
        cdef LimitRequest r = LimitRequest.__new__(LimitRequest)
        cdef size_t i
        if c.peer_str is None:
            c.peer_str = c.peer.decode("latin-1")
        r.client_ip = c.peer_str
        r.method = hp.method[:hp.method_len].decode("latin-1")
        r.host = hp.host[:hp.host_len].decode("latin-1") if hp.has_host else ""
        r.target = hp.target[:hp.target_len].decode("latin-1")
        r.headers = [(hp.fields[i].name[:hp.fields[i].name_len].decode("latin-1"),
                      hp.fields[i].value[:hp.fields[i].value_len].decode("latin-1"))
                     for i in range(hp.nfields)]
        try:
            k = self.hook(r)
        except Exception as exc:
            _m[M_HOOK_ERRORS] += 1
            _limit_log.error("limit %s: key function failed (request not counted): %s: %s",
                             self.name, type(exc).__name__, exc)
            return None
        if k is None:
            return None
        if isinstance(k, str):
            return (<str>k).encode("utf-8")
        if isinstance(k, bytes):
            return <bytes>k
        _m[M_HOOK_ERRORS] += 1
        _limit_log.error("limit %s: key function returned %r (str, bytes or None)", self.name, k)
        return None

    cdef inline unsigned long long hash_of(self, bytes key):
        cdef unsigned long long h = _hash_bytes(key, len(key)) ^ self.seed
        return h if h else 1

    cdef int local(self, unsigned long long h, long long now, long long *wait,
                   long long *used, int *log_it) noexcept:
        return ep_gcra(self.zone.head, self.zone.buckets, h, now, self.T, self.tau,
                       self.delay_ns, wait, used, log_it)

    cdef inline void count(self, int i) noexcept:
        ep_count(self.zone.head, i, 1)

    cdef void note_refused(self, ClientConn c, bytes key, long long wait, bint log_it,
                           HeadParser hp, bytes head):
        """Count a refusal (or a dry-run's would-be refusal) and log it at
        most once per key per second (the request line from hp, or from
        the held head)."""
        cdef bytes line
        self.count(LC_DRY_RUN if self.dry else LC_LIMITED)
        if log_it and _limit_log.isEnabledFor(30):
            if hp is not None:
                line = hp.method[:hp.method_len] + b" " + hp.target[:hp.target_len]
            else:
                line = head.partition(b" HTTP/")[0]
            _limit_log.warning("limit %s: %s %s (client %s, key %s): over the rate, "
                               "retry in %.3fs", self.name,
                               "would refuse (dry-run)" if self.dry else "429 for",
                               line[:200].decode("latin-1"), c.peer.decode("latin-1"),
                               _key_label(self, key), wait / 1e9)

    cdef bytes fields(self, long long wait, long long used):
        """Retry-After, RateLimit-Policy and RateLimit for a 429."""
        cdef long long secs = (wait + 999999999) // 1000000000
        if secs < 1:
            secs = 1
        return b"Retry-After: %d\r\n%sRateLimit: %s;r=0;t=%d\r\n" % (
            secs, self.policy, self.quoted, secs)


cdef str _key_label(RateLimit lim, bytes key):
    """How a key appears in the log: addresses as they are, other keys
    (API keys, session cookies) only as a hash."""
    if lim.kind == LK_IP or lim.kind == LK_ROUTE:
        return key.decode("latin-1")
    return "#%08x" % (_hash_bytes(key, len(key)) & 0xffffffff)


cdef object _limit_resuming = None   # the connection whose held request goes on now


@cython.final
cdef class LimitPhase(Phase):
    """The rate limits of a route (global ones first), in order: the first
    that refuses answers 429; the longest delay among them is waited."""
    cdef readonly tuple limits
    cdef object loop

    def __init__(self, limits, loop=None):
        self.limits = tuple(limits)
        for lim in self.limits:
            if not isinstance(lim, RateLimit):
                raise TypeError(f"not a RateLimit: {lim!r}")
        self.loop = loop

    cdef int request(self, ClientConn c, Route route, HeadParser hp) except -2:
        global _limit_resuming
        cdef RateLimit lim
        cdef long long now, wait = 0, w = 0, used = 0
        cdef int rc, log_it = 0
        cdef bytes key
        cdef list remote = None
        cdef _Held h
        if _limit_resuming is c:
            _limit_resuming = None      # this request was held here and goes on
            return R_GO
        now = _mono_ns()
        for lim in self.limits:
            key = lim.key_of(c, route, hp)
            if key is None:
                continue
            if lim.store is not None:
                task = lim.store.check(key)
                if task is not None:
                    if remote is None:
                        remote = []
                    remote.append((lim, key, task))
                    continue
                lim.count(LC_STORE_ERRORS)
                if lim.deny_on_error:
                    lim.note_refused(c, key, 1000000000, 1, hp, None)
                    return _refuse(c, hp, lim, 1000000000, 0)
            rc = lim.local(lim.hash_of(key), now, &w, &used, &log_it)
            if rc == 2:
                lim.note_refused(c, key, w, log_it, hp, None)
                if not lim.dry:
                    return _refuse(c, hp, lim, w, used)
                lim.count(LC_PASSED)
            elif rc == 1:
                lim.count(LC_DELAYED)
                if w > wait:
                    wait = w
            else:
                lim.count(LC_PASSED)
        if remote is None and wait == 0:
            return R_GO
        h = _hold(self, c, route, hp)
        h.wait = wait
        if remote is not None:
            h.remote = len(remote)
            for lim, key, task in remote:
                task.add_done_callback(functools.partial(_remote_done, h, lim, key))
            return R_TAKEN
        h.timer = self.loop.call_later(wait / 1e9, _held_go, h)
        return R_TAKEN


cdef int _refuse(ClientConn c, HeadParser hp, RateLimit lim, long long wait,
                 long long used) except -2:
    c._reply_error(429, hp.body == B_NONE, lim.fields(wait, used))
    return R_ANSWERED


# ---- requests held by a limit (a delay, a Redis round trip) ----------------------

@cython.final
cdef class _Held:
    cdef ClientConn c
    cdef Route route
    cdef LimitPhase phase
    cdef bytes head                  # the request head as the client sent it
    cdef int nreq                    # which request of the connection
    cdef bint no_body
    cdef long long wait              # the longest delay so far (ns)
    cdef int remote                  # Redis answers still to come
    cdef bint refused
    cdef object timer


cdef _Held _hold(LimitPhase ph, ClientConn c, Route route, HeadParser hp):
    """Keep the request aside: its head is copied (the parser moves on),
    the connection stops reading (what was already read waits in pending:
    C_WAIT), and no timeout runs (the hold is bounded by itself)."""
    cdef _Held h = _Held.__new__(_Held)
    h.c = c
    h.route = route
    h.phase = ph
    h.head = PyBytes_FromStringAndSize(hp.method, hp.head_len)
    h.nreq = c.nreq
    h.no_body = hp.body == B_NONE or (hp.body == B_LENGTH and hp.content_length == 0)
    if c.ctx is None:
        c.state = C_WAIT         # (_start_request sets the real state when it goes on)
    elif c.upq is None:
        c.upq = []               # a hooked request's body bytes wait here
    c.deadline = 0
    c._pause(P_CONNECT)
    return h


cdef inline bint _held_live(_Held h):
    cdef ClientConn c = h.c
    return c.transport is not None and c.state < C_LINGER and c.nreq == h.nreq and c.in_req


def _remote_done(_Held h, RateLimit lim, bytes key, object task):
    """One Redis check of a held request ended."""
    cdef long long wait = 0, used = 0, now
    cdef int rc = -1, log_it = 0
    cdef ClientConn c = h.c
    h.remote -= 1
    try:
        if not task.cancelled() and task.exception() is None:
            r = task.result()
            if r is not None:
                rc, wait, used = r[0], r[1], r[2]
    except Exception:
        rc = -1
    if h.refused or not _held_live(h):
        return
    if rc < 0:                       # no answer from Redis: the local limit decides
        lim.count(LC_STORE_ERRORS)
        if lim.deny_on_error:
            rc, wait = 2, 1000000000
            log_it = 1
        else:
            now = _mono_ns()
            rc = lim.local(lim.hash_of(key), now, &wait, &used, &log_it)
    else:
        lim.count(LC_REMOTE)
        if rc == 2:
            log_it = ep_log_due(lim.zone.head, lim.zone.buckets, lim.hash_of(key), _mono_ns())
    try:
        if rc == 2:
            lim.note_refused(c, key, wait, log_it, None, h.head)
            if not lim.dry:
                h.refused = 1
                c._resume(P_CONNECT)
                c._reply_error(429, h.no_body, lim.fields(wait, used))
                return
            lim.count(LC_PASSED)
        elif rc == 1:
            lim.count(LC_DELAYED)
            if wait > h.wait:
                h.wait = wait
        else:
            lim.count(LC_PASSED)
        if h.remote == 0:
            if h.wait > 0:
                h.timer = h.phase.loop.call_later(h.wait / 1e9, _held_go, h)
            else:
                _held_go(h)
    except Exception:
        _limit_log.exception("limit %s: a held request failed", lim.name)
        c.close()


cdef HeadParser _held_parser = HeadParser()


def _held_go(_Held h):
    """The request's wait is over: it goes on through the rest of the
    route's compiled phases, then to the backend, as if never held."""
    global _limit_resuming
    cdef ClientConn c = h.c
    cdef HeadParser hp = _held_parser
    cdef Route route = h.route
    cdef bytearray rest
    cdef int r
    if not _held_live(h):
        return
    try:
        if hp.parse_request(h.head, len(h.head), 0, 1 << 20, 1 << 22, MAX_FIELDS_CAP) <= 0 \
                or _set_route_path(hp) < 0:
            c._reply_error(400, 0)       # (it parsed before: never expected)
            return
        rest = c.pending
        c.pending = None
        c._resume(P_CONNECT)
        _limit_resuming = c
        try:
            if c.ctx is not None:
                _forward_phased(c, c.ctx, hp)
            else:
                c.state = C_HEAD
                r = route.phase.request(c, route, hp)
                if r == R_GO:
                    _held_forward(c, route, hp)
        finally:
            _limit_resuming = None
        if rest is not None:
            if c.state == C_BODY or c.state == C_HEAD:
                c._resume(P_PIPELINE)
                c._feed(rest, PyByteArray_AS_STRING(rest), len(rest))
            elif c.state == C_WAIT:
                c.pending = rest             # the next request: after this one's response
                c._pause(P_PIPELINE)
    except Exception:
        _limit_log.exception("a request held by a rate limit failed")
        c.close()


cdef void _held_forward(ClientConn c, Route route, HeadParser hp):
    """What _start_request does after the route's phase let a request go."""
    cdef Pool pool = route.pool
    cdef Backend b
    cdef bytes head
    c.pool = pool
    _budget_note_request()
    b = pool.pick(c.hkey, 0)
    if b is None and not pool.busy:
        c._reply_unavailable(1, hp.body == B_NONE)
        return
    head = _request_head(c, hp, b if b is not None else <Backend>pool.backends[0])
    if hp.body == B_NONE or (hp.body == B_LENGTH and hp.content_length == 0):
        c.req_done = 1
        c.state = C_WAIT
    else:
        c.req_done = 0
        c.state = C_BODY
        c._body_wait(hp.expect_continue)
    c._send_picked(pool, b, head)


def limit_hash(RateLimit lim, bytes key):
    """The slot key a limit gives a request key (tests)."""
    return lim.hash_of(key)
