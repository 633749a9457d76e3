"""The cache phase of the proxy core: looks requests up, answers hits, stores misses as they stream, revalidates, collapses concurrent misses (across workers through fills.py).

The compiled core calls it only on routes with `cache = true` (`Route.cache`),
through these hooks (see ext/cachephase.pyx, _start_cached and CacheExchange):

- `CachePhase.on_request(conn, scheme, method, host, target, headers, head,
  has_body)`: answer with `conn.respond(head, body, status)` and return
  None, or return an `Exchange` whose `head` is the request head to forward
  now (None: held; the exchange later calls `conn.respond` or
  `conn.forward`), or return None to forward `head` untouched.
- `Exchange.on_response(conn, status, reason, headers, framed,
  content_length, whole)`: the backend's response head (`whole`: its body
  came with it, complete); returns (field lines to add, whether to pass the
  body to `feed`), or answers with `conn.respond`.
- `Exchange.feed(data)`: body bytes as they go to the client (chunk framing
  included when `framed`).
- `Exchange.finished()` / `Exchange.aborted()`: the response ended whole / broke off.
- `Exchange.on_backend_error(conn, status)`: no response (502, 503, 504):
  may answer with a stale entry.
"""
from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from edgeproxy.cache import policy
from edgeproxy.cache.entry import FLAG_HEURISTIC, FLAG_INVALIDATED, FLAG_NO_CACHE, CacheEntry
from edgeproxy.cache.fills import Claim
from edgeproxy.cache.keys import cache_key
from edgeproxy.cache.policy import Action, cache_status
from edgeproxy.cache.refresh import fetch, rewrite_head
from edgeproxy.cache.store import CacheCorrupt, CacheError, CacheStore
from edgeproxy.cache.targeted import Targeting
from edgeproxy.config.model import CacheConfig
from edgeproxy.http import ChunkedDecoder, ParseError

__all__ = ["CachePhase", "EdgeCache", "Exchange"]

log = logging.getLogger("edgeproxy.cache")

Headers = list[tuple[bytes, bytes]]

SYNC_READ_MAX = 1 << 20     # hit bodies up to this are sent on the loop, from the map
PIN_RENEW = 0.5             # the pinned read snapshot is renewed at least this often
COLLAPSE_WAIT = 5.0         # a collapsed request waits this long for the first one's entry
FILL_POLL = 0.025           # how often a miss waiting for another worker's fetch looks again
VERIFIED_MAX = 1 << 16      # body ids remembered as checked (then forgotten, and checked again)
_UNCACHED_METHODS = frozenset({b"OPTIONS", b"TRACE", b"CONNECT"})
_CONDITIONAL = (b"if-none-match", b"if-modified-since", b"if-match", b"if-unmodified-since",
                b"if-range", b"range")
_CRLF = b"\r\n"


def _status_line(value: bytes) -> bytes:
    return b"Cache-Status: " + value + _CRLF


class EdgeCache:
    """One worker's view of the shared cache: the store, its settings, the
    misses in flight (for collapsing), the background refreshes, and the
    hot index (`_ext.HotIndex`, or None) the core serves plain hits from."""

    def __init__(self, store: CacheStore, config: CacheConfig, *, fetch_timeout: float = 30.0,
                 hot: Any = None):
        self.store = store
        self.config = config
        self.fetch_timeout = fetch_timeout
        self.hot = hot
        # RFC 9213: the targeted fields this cache obeys, and those kept from clients
        self.targeting = Targeting.from_config(config.targeted, config.forward_targeted)
        if hot is not None:
            hot.synced = store.changes_since(-1)[0]
            if store.changes_map is not None:
                hot.attach_generation(store.changes_map)
        self.inflight: dict[bytes, Exchange] = {}   # primary key -> the GET miss filling it
        self.refreshing: set[bytes] = set()         # keys revalidated in the background
        self.invalidating: set[bytes] = set()       # keys being deleted: treated as absent
        # (key, variant) -> the entry a 304 just freshened, until its write
        # lands: lookups in this worker see the new metadata at once.
        self.updating: dict[tuple[bytes, bytes], CacheEntry] = {}
        self.tasks: set[asyncio.Task] = set()
        # Bodies whose checksum this worker checked (or computed: its own
        # commits): a body never changes under its id, so once is enough.
        self.verified: set[int] = set()
        # The read snapshot hits are sent from (slices of the map), kept
        # open on the loop thread and renewed whenever the store changed
        # (sync_hot): LMDB cannot reuse the pages freed while it lives, so
        # it must not live long under a stream of new entries. The hot
        # index's slices outlive it (CacheStore.lasting: removals reach the
        # index through the change log); its copies of bodies just committed
        # are kept here, to be moved onto the map at the next renewal.
        self._pin: Any = None
        self._pinned_at = 0.0
        self._hot_copies: dict[bytes, CacheEntry] = {}

    def spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    def lookup(self, key: bytes, headers: Headers):
        if key in self.invalidating:
            return None, False
        found = self.store.lookup(key, headers)
        entry = found.entry
        if entry is not None and self.updating:
            newer = self.updating.get((entry.key, entry.variant))
            if newer is not None and newer.body_id == entry.body_id:
                entry = newer
        return entry, found.vary_miss

    def answer(self, conn: Any, entry: CacheEntry, method: bytes, headers: Headers,
               now: float, status_value: bytes, *, fresh: bool = False) -> bool:
        """Answer conn from entry (304, 206, 416 or the stored response);
        False when the body is gone (purged or evicted since the lookup).
        `fresh`: entry is a fresh hit; when it was sent whole, offer it to
        the hot index."""
        hit = policy.respond_from_cache(entry, method, headers, now, status_value)
        # The body as slices of the map: from the pinned snapshot, or, for
        # an entry stored after it, from one opened for this answer.
        own = None
        txn = self.pinned()
        body = self.store.body_parts(txn, entry, hit.body_start, hit.body_end)
        try:
            if body is None:
                own = txn = self.store.pin()
                body = self.store.body_parts(own, entry, hit.body_start, hit.body_end)
            if body is None or not self.intact(txn, entry):
                return False
            if own is None and fresh and self.hot is not None and hit.status == entry.status \
                    and hit.body_start == 0 and hit.body_end >= entry.body_length:
                self.offer_hot(entry, body)
            head = hit.head
            if b"\r\ndate:" not in head.lower():
                head += b"Date: " + policy.format_http_date(now) + _CRLF
            conn.respond(head, body, hit.status)   # from the map; copies only what must wait
        finally:
            if own is not None:
                own.abort()
        return True

    def intact(self, txn: Any, entry: CacheEntry) -> bool:
        """Whether entry's body (in txn's snapshot) matches its checksum,
        checked the first time this worker sends that body; a corrupt entry
        is deleted (off the loop) and False returned: answer as a miss."""
        if entry.body_crc is None or entry.body_id in self.verified:
            return True
        intact = self.store.body_intact(txn, entry)
        if intact is None:           # gone meanwhile
            return False
        if not intact:
            self.corrupt(entry)
            return False
        self.checked(entry)
        return True

    def checked(self, entry: CacheEntry) -> None:
        if len(self.verified) >= VERIFIED_MAX:
            self.verified.clear()
        self.verified.add(entry.body_id)

    def corrupt(self, entry: CacheEntry) -> None:
        self.store.count("corrupt")
        self.store.log.log(logging.ERROR, "corrupt", "cache: the stored body of %s does not "
                           "match its checksum (a damaged %s/data.mdb?): deleted, fetched again",
                           entry.key[:200].decode("latin-1"), self.store.path)
        self.invalidate([entry.key])

    def pinned(self) -> Any:
        if self._pin is None:
            self._swap_pin(self.store.pin())
        return self._pin

    def _swap_pin(self, fresh: Any) -> None:
        """Make fresh (a new read snapshot) the pinned one, move the hot
        index's copied bodies onto the map in it, and end the old one, so
        that LMDB can reuse the pages it held. The change log must have been
        applied in a snapshot at least as new as fresh (sync_hot), so that
        no hot entry points at pages that only the old snapshot kept."""
        old, self._pin = self._pin, fresh
        self._pinned_at = time.monotonic()
        if self._hot_copies:
            copies, self._hot_copies = self._hot_copies, {}
            for key, entry in copies.items():
                parts = self.store.body_parts(fresh, entry)
                self.hot.rebind(key, None if parts is None else self.store.lasting(parts))
        if old is not None:
            old.abort()

    def offer_hot(self, entry: CacheEntry, body: tuple | bytes) -> None:
        """Give the hot index entry, its body as whole chunks from the pinned
        snapshot (or a copy right after a commit, moved onto the map at the
        next renewal), when the core may answer from it without asking the
        phase: its answer must not depend on the request (no Vary) nor need
        a revalidation (no-cache, a soft purge), and its freshness must be
        explicit. The core serves it only while fresh."""
        hot = self.hot
        if hot is None:
            return
        if entry.vary or entry.variant or entry.flags & (FLAG_NO_CACHE | FLAG_INVALIDATED
                                                         | FLAG_HEURISTIC) \
                or entry.lifetime <= 0 or entry.key in self.invalidating:
            hot.drop(entry.key)
            return
        copy = isinstance(body, bytes)
        if not copy:
            body = self.store.lasting(body)
        initial_age = policy.corrected_initial_age(entry)
        if hot.offer(entry.key, policy.hit_head(entry), body, entry.status,
                     initial_age - entry.response_time,
                     entry.response_time + entry.lifetime - initial_age) and copy:
            self._hot_copies[entry.key] = entry
        else:
            self._hot_copies.pop(entry.key, None)

    def update_entry(self, entry: CacheEntry) -> None:
        """Rewrite entry's metadata (after a 304) off the loop; until the
        write lands, `lookup` in this worker returns entry in place of the
        stored one, so the next request already sees it freshened."""
        self.updating[(entry.key, entry.variant)] = entry
        self.spawn(self._write_update(entry))

    async def _write_update(self, entry: CacheEntry) -> None:
        slot = (entry.key, entry.variant)
        try:
            await self.store.update_entry_async(entry)
        finally:
            if self.updating.get(slot) is entry:
                del self.updating[slot]
        self.drop_hot(entry.key)
        self.sync_hot()

    def drop_hot(self, key: bytes) -> None:
        if self.hot is not None:
            self.hot.drop(key)

    def sync_hot(self) -> None:
        """Called by the worker's ticker, and by the phase when the store
        changed: count the hot index's hits in the store, drop what other
        processes (another worker, `edgeproxy cache purge`, eviction)
        changed, and renew the pinned snapshot when the store changed or
        PIN_RENEW passed."""
        hot = self.hot
        store = self.store
        if hot is not None:
            n = hot.take_hits()
            if n:
                store.count("hits", n)
                store.count("hot_hits", n)
        fresh = None
        try:
            if self._pin is not None and (
                    (hot is not None and store.generation() != hot.synced)
                    or time.monotonic() - self._pinned_at >= PIN_RENEW):
                fresh = store.pin()      # first: the change log is read as of now or later
            if hot is not None:
                hot.synced, keys = store.changes_since(hot.synced)
        except CacheError as exc:
            store.log.log(logging.WARNING, "read", "%s", exc)
            if hot is not None:
                hot.clear()
            if fresh is not None:
                fresh.abort()
            return
        if hot is not None:
            if keys is None:
                hot.clear()
            else:
                for key in keys:
                    hot.drop(key)
        if fresh is not None:
            self._swap_pin(fresh)

    def invalidate(self, keys: list[bytes]) -> None:
        """Delete keys (every variant) off the loop; until that is done this
        worker treats them as absent."""
        async def delete(key: bytes) -> None:
            try:
                await self.store.delete_async(key)
                self.sync_hot()
            except CacheError as exc:
                self.store.log.log(logging.WARNING, "delete", "%s", exc)
            finally:
                self.invalidating.discard(key)
        for key in keys:
            self.invalidating.add(key)
            self.drop_hot(key)
            self.spawn(delete(key))

    def refresh_in_background(self, pool: Any, key: bytes, entry: CacheEntry,
                              headers: Headers, head: bytes) -> None:
        """stale-while-revalidate: revalidate entry with a request of our own."""
        if key in self.refreshing:
            return
        self.refreshing.add(key)
        self.spawn(self._refresh(pool, key, entry, headers, head))

    async def _refresh(self, pool: Any, key: bytes, entry: CacheEntry, headers: Headers,
                       head: bytes) -> None:
        try:
            backend = pool.pick_backend()
            if backend is None:
                return
            head = rewrite_head(head, _CONDITIONAL + (b"connection",),
                                policy.revalidation_headers(entry) + [(b"Connection", b"close")])
            request_time = time.time()
            got = await fetch(backend, head, timeout=self.fetch_timeout,
                              max_body=self.store.max_object)
            now = time.time()
            if got is None:
                return
            status, reason, rheaders, body = got
            if status == 304:
                updated = policy.apply_304(entry, rheaders, request_time, now,
                                           heuristic=self.config.heuristic,
                                           targeting=self.targeting)
                if updated is not None:
                    self.updating[(updated.key, updated.variant)] = updated
                    await self._write_update(updated)
                    self.store.count("revalidated")
                return
            if status >= 500:
                return           # keep serving stale as long as allowed
            why = policy.why_not_storable(b"GET", status, headers, rheaders, now=now,
                                          content_length=len(body),
                                          max_object=self.store.max_object,
                                          heuristic=self.config.heuristic,
                                          targeting=self.targeting)
            if why is not None:
                await self.store.delete_async(key)
                self.drop_hot(key)
                return
            fresh = policy.new_entry(key, headers, status, reason, rheaders, request_time, now,
                                     heuristic=self.config.heuristic, targeting=self.targeting)
            writer = self.store.begin(fresh)
            if await writer.write_async(body):
                await writer.commit_async()
            else:
                await writer.abort_async()
            self.drop_hot(key)
            self.sync_hot()
        except Exception:
            log.exception("cache: background revalidation of %s failed",
                          key[:200].decode("latin-1"))
        finally:
            self.refreshing.discard(key)

    def close(self) -> None:
        for task in list(self.tasks):
            task.cancel()
        if self.hot is not None:
            self.hot.detach_generation()
            self.hot.clear()
        self._hot_copies.clear()
        if self._pin is not None:
            self._pin.abort()
            self._pin = None
        self.store.close()


class CachePhase:
    """The cache hook of one route (`Route.cache`): its pool and the worker's EdgeCache."""

    def __init__(self, cache: EdgeCache, pool: Any):
        self.cache = cache
        self.pool = pool

    def on_request(self, conn: Any, scheme: bytes, method: bytes, host: bytes, target: bytes,
                   headers: Headers, head: bytes, has_body: bool,
                   key: bytes | None = None) -> Exchange | None:
        """key: the primary key a hook chose (RequestCtx.cache_key), instead
        of the URI's."""
        cache = self.cache
        if cache.hot is not None and cache.hot.generation_changed():
            cache.sync_hot()
        if method != b"GET" and method != b"HEAD":
            if method in _UNCACHED_METHODS:
                return None
            ex = Exchange(self, key or cache_key(scheme, host, target), method, headers, head)
            ex.invalidates = (scheme, host, target)
            return ex
        if has_body:
            return None
        if key is None:
            key = cache_key(scheme, host, target)
        now = time.time()
        try:
            entry, vary_miss = cache.lookup(key, headers)
        except CacheError as exc:
            cache.store.log.log(logging.WARNING, "read", "%s", exc)
            return None
        d = policy.lookup_decision(entry, headers, now, vary_miss=vary_miss)
        store = cache.store
        if entry is not None and d.action in (Action.FRESH, Action.STALE,
                                              Action.STALE_REVALIDATE_IN_BACKGROUND):
            if entry.body_length > SYNC_READ_MAX and method == b"GET":
                ex = Exchange(self, key, method, headers, head)
                ex.head = None
                cache.spawn(ex.answer_async(conn, entry, cache_status(hit=True, ttl=d.ttl)))
                return ex
            if cache.answer(conn, entry, method, headers, now, cache_status(hit=True, ttl=d.ttl),
                            fresh=d.action == Action.FRESH):
                store.count("hits")
                if d.action != Action.FRESH:
                    store.count("stale")
                if d.action == Action.STALE_REVALIDATE_IN_BACKGROUND:
                    cache.refresh_in_background(self.pool, key, entry, headers, head)
                return None
            entry, d = None, policy.Decision(Action.MISS, "uri-miss", None)
        if d.action == Action.GATEWAY_TIMEOUT:
            conn.respond(b"HTTP/1.1 504 Gateway Timeout\r\nContent-Length: 0\r\n"
                         + _status_line(cache_status(detail="only-if-cached"))
                         + b"Date: " + policy.format_http_date(now) + _CRLF, b"", 504)
            return None
        store.count("misses")
        ex = Exchange(self, key, method, headers, head)
        ex.fwd = d.fwd or "uri-miss"
        ex.stale = entry
        if entry is not None and (entry.etag or entry.last_modified):
            ex.head = rewrite_head(head, _CONDITIONAL, policy.revalidation_headers(entry))
            ex.revalidating = True
        elif entry is None and method == b"GET":
            leader = cache.inflight.get(key)
            if policy.field_values(headers, b"range"):
                # A range miss goes on at once with its Range (the client
                # waits for its bytes, not for the whole object); a 206 then
                # starts one background fetch of the whole (fill_whole). It
                # waits only for a full GET already fetching the object.
                ex.range_miss = True
                if leader is None or leader.settled or leader.range_fill:
                    return ex
            if leader is not None and not leader.settled:
                ex.head = None           # collapse: wait for the leader's entry
                leader.waiters.append(ex)
                ex.wait_conn = conn
                ex.timer = asyncio.get_running_loop().call_later(COLLAPSE_WAIT, ex.release)
                return ex
            cache.inflight[key] = ex
            ex.leader = True
            fills = store.fills
            if fills is not None:
                claim = fills.claim(key, COLLAPSE_WAIT)
                if claim is Claim.WAIT:
                    ex.wait_for_other_process(conn)
                    return ex
                if claim is Claim.OWN:
                    ex.filling = True
                    # another worker may have stored it between our lookup and the claim
                    if ex.answer_stored(conn):
                        ex._settle(True)
                        return None
        return ex

    def fill_whole(self, key: bytes, headers: Headers, head: bytes) -> None:
        """Fetch the whole object a range miss asked part of and store it,
        in the background, once per key: a fill in flight is the key's
        leader in this worker (full GET misses wait for it, later range
        misses just go on) and holds the store's claim across workers
        (another worker's fetch of the key, or its fill, means no second
        one). The fetch is bounded by max_object."""
        cache = self.cache
        leader = cache.inflight.get(key)
        if leader is not None and not leader.settled:
            return
        headers = policy.strip_conditionals(headers)
        ex = Exchange(self, key, b"GET", headers,
                      rewrite_head(head, _CONDITIONAL + (b"connection",),
                                   [(b"Connection", b"close")]))
        ex.head = None
        ex.leader = True
        ex.range_fill = True
        fills = cache.store.fills
        if fills is not None:
            claim = fills.claim(key, COLLAPSE_WAIT)
            if claim is Claim.WAIT:
                return
            ex.filling = claim is Claim.OWN
        cache.inflight[key] = ex
        cache.spawn(ex.fill())


class Exchange:
    """One request on a cached route, from lookup to the end of its response."""

    def __init__(self, phase: CachePhase, key: bytes, method: bytes, headers: Headers,
                 head: bytes):
        self.phase = phase
        self.key = key
        self.method = method
        # the targeted fields (RFC 9213) the core keeps out of the client's head
        self.hidden = phase.cache.targeting.hidden
        self.headers = headers
        self.request_head = head           # as the core built it
        self.head: bytes | None = head     # what the core forwards now; None: held
        self.fwd = "uri-miss"
        self.stale: CacheEntry | None = None
        self.revalidating = False
        self.refetched = False             # sent again after a 304 that selected nothing
        self.invalidates: tuple[bytes, bytes, bytes] | None = None
        self.request_time = time.time()
        # collapsing
        self.leader = False
        self.settled = False
        self.waiters: list[Exchange] = []
        self.wait_conn: Any = None
        self.timer: asyncio.TimerHandle | None = None
        self.filling = False               # holds the store's claim on fetching key
        self.remote_until = 0.0            # waiting for another process's fetch until then
        self.remote_generation = -1
        # storing
        self.writer = None
        self.decoder: ChunkedDecoder | None = None
        self.parts: list[bytes] = []
        self.size = 0                      # body bytes fed
        self.ended: str | None = None      # "done", "cut" or "too-large"
        self.wakeup: asyncio.Event | None = None
        # ranges
        self.range_miss = False            # a GET with Range, forwarded as it is
        self.range_fill = False            # the background fetch of the whole object

    # --- the backend's answer ---------------------------------------------------

    def on_response(self, conn: Any, status: int, reason: bytes, headers: Headers,
                    framed: bool, content_length: int,
                    whole: bool) -> tuple[bytes, bool] | None:
        cache = self.phase.cache
        now = time.time()
        if self.invalidates is not None:
            scheme, host, target = self.invalidates
            keys = policy.invalidation_keys(self.method, status, scheme, host, target, headers)
            if keys:
                cache.invalidate(keys)
            return None
        stale = self.stale
        if stale is not None and self.revalidating and status == 304:
            updated = policy.apply_304(stale, headers, self.request_time, now,
                                       heuristic=cache.config.heuristic,
                                       targeting=cache.targeting)
            if updated is not None:
                cache.update_entry(updated)
                cache.drop_hot(self.key)
                cache.store.count("revalidated")
                ttl = updated.lifetime - policy.current_age(updated, now)
                if cache.answer(conn, updated, self.method, self.headers, now,
                                cache_status(fwd=self.fwd, fwd_status=304, ttl=ttl)):
                    return None
            # the 304 does not select what we hold: it must not be used, and
            # the request goes again without conditions (§4.3.4), once; its
            # answer replaces the entry, or removes it when not storable
            if not self.refetched:
                self.refetched = True
                self.stale = None
                self.revalidating = False
                self.request_time = time.time()
                if conn.refetch(self.phase.pool, rewrite_head(self.request_head, _CONDITIONAL, [])):
                    return None
            cache.invalidate([self.key])
        if stale is not None and status in policy.STALE_IF_ERROR_STATUSES and \
                self._serve_stale(conn, now, status):
            return None
        if self.range_miss and status == 206:
            return self._partial(status, headers, now)
        why = policy.why_not_storable(self.method, status, self.headers, headers, now=now,
                                      content_length=content_length,
                                      max_object=cache.store.max_object,
                                      heuristic=cache.config.heuristic,
                                      targeting=cache.targeting)
        if why is not None:
            self._settle(False)
            if self.refetched:
                cache.invalidate([self.key])
            return _status_line(cache_status(fwd=self.fwd, fwd_status=status, detail=why)), False
        entry = policy.new_entry(self.key, self.headers, status, reason, headers,
                                 self.request_time, now, heuristic=cache.config.heuristic,
                                 targeting=cache.targeting)
        self.writer = cache.store.begin(entry)
        if framed:
            self.decoder = ChunkedDecoder()
        self.wakeup = asyncio.Event()
        cache.spawn(self._write_out())
        # `stored` only for a body the core already holds whole: the head
        # goes out now, and a body still to come may be cut off or badly
        # framed, and then not stored (it may well be stored; the head
        # cannot know)
        return _status_line(cache_status(fwd=self.fwd, fwd_status=status, stored=whole)), True

    def _partial(self, status: int, headers: Headers, now: float) -> tuple[bytes, bool]:
        """A 206 to a range miss: passed on as it is, and, when the whole
        response would be storable and within max_object (the total length
        of a Content-Range tells), fetched whole in the background."""
        cache = self.phase.cache
        self._settle(False)
        total = -1
        ranges = policy.field_values(headers, b"content-range")
        if len(ranges) == 1:
            _, _, size = ranges[0].rpartition(b"/")
            total = int(size) if size.strip().isdigit() and len(size) <= 18 else -1
        why = policy.why_not_storable(self.method, 200, self.headers, headers, now=now,
                                      content_length=total,
                                      max_object=cache.store.max_object,
                                      heuristic=cache.config.heuristic,
                                      targeting=cache.targeting)
        if why is None:
            self.phase.fill_whole(self.key, self.headers, self.request_head)
            why = "range-fill"
        return _status_line(cache_status(fwd=self.fwd, fwd_status=status, detail=why)), False

    async def fill(self) -> None:
        """The background fetch of the whole object (CachePhase.fill_whole)."""
        cache = self.phase.cache
        store = cache.store
        stored = False
        try:
            backend = self.phase.pool.pick_backend()
            if backend is None:
                return
            self.request_time = time.time()
            got = await fetch(backend, self.request_head, timeout=cache.fetch_timeout,
                              max_body=store.max_object)
            now = time.time()
            if got is None:
                return
            status, reason, rheaders, body = got
            if policy.why_not_storable(b"GET", status, self.headers, rheaders, now=now,
                                       content_length=len(body), max_object=store.max_object,
                                       heuristic=cache.config.heuristic,
                                       targeting=cache.targeting) is not None:
                return
            entry = policy.new_entry(self.key, self.headers, status, reason, rheaders,
                                     self.request_time, now, heuristic=cache.config.heuristic,
                                     targeting=cache.targeting)
            writer = store.begin(entry)
            if not await writer.write_async(body):
                await writer.abort_async()
            elif await writer.commit_async():
                stored = True
                store.count("range_fills")
                cache.checked(writer.entry)
                cache.drop_hot(self.key)
                cache.sync_hot()
        except Exception:
            log.exception("cache: fetching the whole of %s for a range miss failed",
                          self.key[:200].decode("latin-1"))
        finally:
            self._settle(stored)

    def on_backend_error(self, conn: Any, status: int) -> None:
        if self.stale is not None:
            self._serve_stale(conn, time.time(), None)

    def _serve_stale(self, conn: Any, now: float, status: int | None) -> bool:
        cache = self.phase.cache
        if not policy.serve_stale_on_error(self.stale, self.headers, now,
                                           stale_grace=cache.config.stale_grace):
            return False
        value = cache_status(fwd="stale", fwd_status=status, ttl=self.stale.lifetime
                             - policy.current_age(self.stale, now), detail="stale-if-error")
        if not cache.answer(conn, self.stale, self.method, self.headers, now, value):
            return False
        cache.store.count("stale")
        return True

    # --- the body, stored as it streams -------------------------------------------

    def feed(self, data: bytes) -> None:
        if self.writer is None or self.ended:
            return
        if self.writer.failed is not None:     # the store gave up: keep nothing more
            self.parts.clear()
            self._end("cut")
            return
        if self.decoder is not None:
            try:
                pieces, _ = self.decoder.feed(data)
            except ParseError:
                self._end("cut")
                return
        else:
            pieces = (data,)
        for piece in pieces:
            self.size += len(piece)
        if self.size > self.phase.cache.store.max_object:
            # Refused here, not when the writer thread gets to it: what a
            # body without Content-Length sends beyond max_object must not
            # pile up in `parts` while it streams on to the client.
            self.parts.clear()
            self._end("too-large")
            return
        self.parts.extend(pieces)
        self.wakeup.set()

    def finished(self) -> None:
        if self.writer is not None:
            complete = self.decoder is None or self.decoder.done
            self._end("done" if complete else "cut")
        elif not self.settled:
            self._settle(False)

    def aborted(self) -> None:
        if self.remote_until and not self.settled:
            # its client left while waiting for another process's fetch: keep
            # looking on behalf of this worker's waiters, if any (_poll_fill)
            self.wait_conn = None
            if any(w.wait_conn is not None for w in self.waiters):
                return
        if self.timer is not None:       # a collapsed request whose client left
            self.timer.cancel()
            self.timer = None
            self.wait_conn = None
        if self.writer is not None:
            self._end("cut")
        elif not self.settled:
            self._settle(False)

    def _end(self, how: str) -> None:
        if self.ended is None:
            self.ended = how
            self.wakeup.set()

    async def _write_out(self) -> None:
        """Write the body into the store off the event loop, then commit (or abort)."""
        writer = self.writer
        cache = self.phase.cache
        stored = False
        # a copy of a small body, for the hot index
        kept: list[bytes] | None = [] if cache.hot is not None else None
        kept_size = 0
        try:
            while True:
                await self.wakeup.wait()
                self.wakeup.clear()
                while self.parts and writer.failed is None:
                    data = b"".join(self.parts)
                    self.parts.clear()
                    if kept is not None:
                        kept_size += len(data)
                        if kept_size <= cache.hot.body_max:
                            kept.append(data)
                        else:
                            kept = None
                    await writer.write_async(data)
                if self.ended is not None:
                    break
            if self.ended == "too-large":
                await writer.fail_async("too-large")
            elif self.ended == "done" and writer.failed is None:
                stored = await writer.commit_async()
                if stored:
                    cache.checked(writer.entry)     # its checksum was computed from these bytes
                    cache.drop_hot(self.key)
                    cache.sync_hot()        # our own commit moved the store's generation
                    if kept is not None and self.method == b"GET":
                        entry = writer.entry
                        now = time.time()
                        if entry.lifetime - policy.current_age(entry, now) > 0:
                            cache.offer_hot(entry, b"".join(kept))
            else:
                await writer.abort_async()
        except asyncio.CancelledError:
            await asyncio.shield(writer.abort_async())
            raise
        finally:
            self.writer = None
            self._settle(stored)

    # --- collapsing ------------------------------------------------------------

    def _settle(self, stored: bool) -> None:
        """The leader's outcome: waiters answer from the new entry or go to the backend."""
        if self.settled:
            return
        self.settled = True
        if not self.leader:
            return
        cache = self.phase.cache
        if self.filling:
            self.filling = False
            if cache.store.fills is not None:
                cache.store.fills.release(self.key)
        if cache.inflight.get(self.key) is self:
            del cache.inflight[self.key]
        waiters, self.waiters = self.waiters, []
        for w in waiters:
            if stored:
                w.answer_collapsed()
            else:
                w.release()

    def answer_collapsed(self) -> None:
        conn = self._take_conn()
        if conn is None or self.answer_stored(conn):
            return
        self.request_time = time.time()
        conn.forward(self.phase.pool, self.request_head)

    def answer_stored(self, conn: Any) -> bool:
        """Answer conn from a fresh entry for the key, if the store has one now."""
        cache = self.phase.cache
        now = time.time()
        try:
            entry, _ = cache.lookup(self.key, self.headers)
        except CacheError:
            return False
        if entry is None:
            return False
        d = policy.lookup_decision(entry, self.headers, now)
        if d.action == Action.FRESH and cache.answer(
                conn, entry, self.method, self.headers, now,
                cache_status(hit=True, ttl=d.ttl, collapsed=True), fresh=True):
            cache.store.count("hits")
            return True
        return False

    # --- collapsing across processes -----------------------------------------------

    def wait_for_other_process(self, conn: Any) -> None:
        """Another worker is fetching this key (it holds the store's claim):
        hold the request and look every FILL_POLL for its entry. This
        worker's later misses for the key wait on this exchange as on a leader."""
        self.head = None
        self.wait_conn = conn
        loop = asyncio.get_running_loop()
        self.remote_until = loop.time() + COLLAPSE_WAIT
        self.remote_generation = -1      # look it up at the first poll
        self.timer = loop.call_later(FILL_POLL, self._poll_fill)
        log.debug("cache: another process fetches %s; waiting for its entry",
                  self.key[:200].decode("latin-1"))

    def _poll_fill(self) -> None:
        """Look again: the entry is stored (the store's generation moved and
        a lookup finds it), or the other process's claim ended (stored or
        not: its entry is committed before the claim ends; a process that
        died loses its claim), or COLLAPSE_WAIT passed. Then answer or
        forward this request and settle this worker's waiters the same way."""
        self.timer = None
        if self.settled:
            return
        if self.wait_conn is None and not any(w.wait_conn is not None for w in self.waiters):
            self._settle(False)              # every client waiting here has left
            return
        cache = self.phase.cache
        store = cache.store
        generation = store.generation()
        if generation != self.remote_generation:
            self.remote_generation = generation
            if self._end_remote_wait_if_stored():
                return
        fills = store.fills
        loop = asyncio.get_running_loop()
        if fills is not None and fills.busy(self.key) and loop.time() < self.remote_until:
            self.timer = loop.call_later(FILL_POLL, self._poll_fill)
            return
        if self._end_remote_wait_if_stored():
            return
        if loop.time() >= self.remote_until:
            log.debug("cache: waited %gs for another process to fetch %s; forwarding",
                      COLLAPSE_WAIT, self.key[:200].decode("latin-1"))
        else:
            log.debug("cache: another process's fetch of %s ended without a fresh entry; "
                      "forwarding", self.key[:200].decode("latin-1"))
        self._settle(False)          # this worker's waiters go to the backend too
        self.release()

    def _end_remote_wait_if_stored(self) -> bool:
        """When the store holds a fresh entry: settle (this worker's waiters
        answer from it), then answer this request the same way."""
        cache = self.phase.cache
        try:
            entry, _ = cache.lookup(self.key, self.headers)
        except CacheError:
            return False
        if entry is None or policy.lookup_decision(entry, self.headers, time.time()).action \
                != Action.FRESH:
            return False
        self._settle(True)
        self.answer_collapsed()
        return True

    def release(self) -> None:
        """Stop waiting: forward the request to the backend."""
        conn = self._take_conn()
        if conn is not None:
            self.request_time = time.time()
            conn.forward(self.phase.pool, self.request_head)

    def _take_conn(self) -> Any:
        conn, self.wait_conn = self.wait_conn, None
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        return conn

    async def answer_async(self, conn: Any, entry: CacheEntry, status_value: bytes) -> None:
        """A hit with a large body: read it in the store's threads, then answer."""
        cache = self.phase.cache
        hit = policy.respond_from_cache(entry, self.method, self.headers, time.time(),
                                        status_value)
        verify = entry.body_crc is not None and entry.body_id not in cache.verified
        try:
            body = await cache.store.read_body_async(entry, hit.body_start, hit.body_end,
                                                     verify=verify)
        except CacheCorrupt:
            cache.corrupt(entry)
            body = None
        if body is None:
            conn.forward(self.phase.pool, self.request_head)
            return
        if verify:
            cache.checked(entry)
        head = hit.head
        if b"\r\ndate:" not in head.lower():
            head += b"Date: " + policy.format_http_date(time.time()) + _CRLF
        cache.store.count("hits")
        conn.respond(head, body, hit.status)
