"""The purge bus: a purge made on one edge (CLI or admin API) reaches every edge through a bounded Redis stream, applied there as a local purge is.

With `cache.purge_bus = "redis://..."`, each edge runs one bus process
(started and watched by its supervisor: `python -m edgeproxy.cache.bus
CONFIG`), never a worker, so no Redis round trip ever runs on a worker's
loop. The edge is its cache directory: its id is made once and kept in
the store (`bus:edge`).

Publishing. A local purge is applied to the store at once (the workers see
it through the change generation, as ever) and then written to the
store's outbox (`bus:out:<seq>`, one small write transaction, with this
edge's next sequence number). The bus process polls the outbox, XADDs each
message to the stream (MAXLEN ~ `purge_bus_maxlen`) and deletes it once
Redis took it: a purge made while Redis is down is kept, and published
when it is back.

Receiving. The bus process XREADs the stream (BLOCK 1 s) from the last id it
handled, which it keeps in the store (`bus:last`) with the last sequence
number it saw from each edge (`bus:seen:<edge>`), so an edge that was
stopped or cut off catches up from the stream when it comes back. Its own
messages are skipped (applied already). Others are applied with the
store's own purge methods (in the store's writer thread).

Gaps. Messages can still be lost: trimmed by MAXLEN before a long-absent
edge read them, or lost by a Redis restart without persistence. The first
shows at reconnect (the stream's `max-deleted-entry-id` is past our last
id), both show as a jump in an edge's sequence numbers. Either is logged
(a warning naming the count when known) and counted (`bus_gaps`, and
`bus_missed` for the messages known lost; `edgeproxy cache stats`, and the
supervisor's /metrics).
"""
from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import struct
import sys
import time
import uuid
from dataclasses import dataclass
from typing import Any

from edgeproxy.cache.store import CacheError, CacheStore

__all__ = ["Purge", "announce", "apply", "edge_id", "main"]

log = logging.getLogger("edgeproxy.cache.bus")

OPS = ("url", "prefix", "tag")
_EDGE = b"bus:edge"
_SEQ = b"bus:seq"
_OUT = b"bus:out:"
_LAST = b"bus:last"
_POS = b"bus:pos"
_SEEN = b"bus:seen:"
_U64 = struct.Struct(">Q")
POLL = 0.05          # how often the outbox is looked at
BLOCK_MS = 1000      # XREAD BLOCK
BACKOFF_MAX = 2.0    # seconds between reconnection attempts, at most


@dataclass(frozen=True)
class Purge:
    """One purge: a primary key (op "url"), a key prefix, or a tag."""
    op: str
    arg: bytes
    soft: bool = False

    def __post_init__(self) -> None:
        if self.op not in OPS:
            raise ValueError(f"unknown purge {self.op!r}")


def apply(store: CacheStore, purge: Purge) -> int:
    """Apply purge to store the way `edgeproxy cache purge` does; the count."""
    if purge.op == "url":
        return store.delete(purge.arg, soft=purge.soft)
    if purge.op == "prefix":
        return store.purge_prefix(purge.arg, soft=purge.soft)
    return store.purge_tag(purge.arg, soft=purge.soft)


def edge_id(store: CacheStore) -> str:
    """This edge's id on the bus, made once and kept in its store."""
    def make(txn: Any, db: Any) -> bytes:
        have = txn.get(_EDGE, db=db)
        if have:
            return bytes(have)
        new = uuid.uuid4().hex.encode()
        txn.put(_EDGE, new, db=db)
        return new
    return store.info_write(make).decode()


def _encode(purge: Purge) -> bytes:
    return json.dumps({"op": purge.op, "arg": purge.arg.decode("latin-1"),
                       "soft": purge.soft}).encode()


def _decode(data: bytes) -> Purge:
    d = json.loads(data)
    return Purge(d["op"], d["arg"].encode("latin-1"), bool(d["soft"]))


def announce(store: CacheStore, purges: list[Purge]) -> None:
    """Put purges (already applied here) in the store's outbox, for the bus
    process to publish. One write transaction; raises CacheError."""
    edge_id(store)

    def put(txn: Any, db: Any) -> None:
        raw = txn.get(_SEQ, db=db)
        seq = _U64.unpack(raw)[0] if raw else 0
        for purge in purges:
            seq += 1
            txn.put(_OUT + _U64.pack(seq), _encode(purge), db=db)
        txn.put(_SEQ, _U64.pack(seq), db=db)
    store.info_write(put)


def _stream_id(value: bytes | str) -> tuple[int, int]:
    text = value.decode() if isinstance(value, bytes) else value
    ms, _, seq = text.partition("-")
    return int(ms), int(seq or 0)


class PurgeBus:
    """The bus process's work: publish the outbox, apply what others publish."""

    def __init__(self, store: CacheStore, url: str, stream: str, maxlen: int,
                 status: Any = None):
        self.store = store
        self.url = url
        self.stream = stream
        self.maxlen = maxlen
        self.status_out = status        # a binary file: one JSON line per change of state
        self.edge = edge_id(store)
        self.connected = False
        self.counts = {"published": 0, "applied": 0, "gaps": 0, "missed": 0}
        self.last_id: str | None = None
        # how many messages were ever added to the stream up to and with
        # last_id (Redis 7's entries-added counts them): what was trimmed
        # beyond it was never read here
        self.position = 0
        self.explained = 0              # missed messages a trim explains already
        self.seen: dict[str, int] = {}
        self._down_since: float | None = None

    def _report(self) -> None:
        if self.status_out is None:
            return
        line = json.dumps({"edge": self.edge, "connected": self.connected, **self.counts})
        try:
            self.status_out.write(line.encode() + b"\n")
            self.status_out.flush()
        except OSError:
            self.status_out = None

    def _count(self, name: str, n: int = 1) -> None:
        self.counts[name] += n
        self.store.count("bus_" + name, n)

    async def _thread(self, fn: Any, *args: Any) -> Any:
        return await self.store.in_writer(fn, *args)

    def _load_state(self) -> None:
        for key, value in self.store.info_items(b"bus:"):
            if key == _LAST:
                self.last_id = value.decode()
            elif key == _POS:
                self.position = _U64.unpack(value)[0]
            elif key.startswith(_SEEN):
                self.seen[key[len(_SEEN):].decode()] = _U64.unpack(value)[0]

    def _save_state(self) -> None:
        last, seen, position = self.last_id, dict(self.seen), self.position

        def put(txn: Any, db: Any) -> None:
            if last is not None:
                txn.put(_LAST, last.encode(), db=db)
                txn.put(_POS, _U64.pack(position), db=db)
            for edge, seq in seen.items():
                txn.put(_SEEN + edge.encode(), _U64.pack(seq), db=db)
        self.store.info_write(put)

    async def run(self) -> None:
        import redis.asyncio as aioredis
        from redis.exceptions import RedisError

        await self._thread(self._load_state)
        backoff = 0.1
        while True:
            client = aioredis.Redis.from_url(self.url, socket_connect_timeout=2.0,
                                             socket_timeout=BLOCK_MS / 1000 + 5.0)
            try:
                await client.ping()
                if self._down_since is not None:
                    log.warning("purge bus: connected to %s again after %.1fs",
                                self.url, time.monotonic() - self._down_since)
                else:
                    log.info("purge bus: connected to %s, stream %s, edge %s",
                             self.url, self.stream, self.edge)
                self._down_since = None
                self.connected = True
                backoff = 0.1
                self._report()
                await self._check_trimmed(client)
                async with asyncio.TaskGroup() as tg:
                    tg.create_task(self._publish(client))
                    tg.create_task(self._receive(client))
            except* (RedisError, OSError) as group:
                exc = group.exceptions[0]
                if self._down_since is None:
                    self._down_since = time.monotonic()
                    log.error("purge bus: %s: %s; purges made here are kept and sent "
                              "when it is back", self.url, exc)
                self.connected = False
                self._report()
            finally:
                await client.aclose()
            await asyncio.sleep(backoff)
            backoff = min(BACKOFF_MAX, backoff * 2)

    async def _check_trimmed(self, client: Any) -> None:
        """At (re)connection: were messages trimmed from the stream before
        this edge read them (the stream added more before its first entry
        than this edge has read), or is the stream not the one it read?"""
        from redis.exceptions import ResponseError
        try:
            info = await client.xinfo_stream(self.stream)
        except ResponseError:           # no stream: new, or Redis lost it
            if self.last_id not in (None, "0-0"):
                log.warning("purge bus: the stream %s is gone (Redis restarted without "
                            "persistence?): purges published meanwhile may be lost; "
                            "reading it anew", self.stream)
            self.last_id, self.position = "0-0", 0
            await self._thread(self._save_state)
            return
        info = {(k.decode() if isinstance(k, bytes) else k): v for k, v in info.items()}
        added = info.get("entries-added")
        if self.last_id is None:        # a new edge: from now on
            last = info.get("last-generated-id") or b"0-0"
            self.last_id = last.decode() if isinstance(last, bytes) else str(last)
            self.position = int(added or 0)
            await self._thread(self._save_state)
            return
        if added is None:               # Redis before 7: sequence numbers only
            return
        added, length = int(added), int(info.get("length") or 0)
        if added < self.position:
            log.warning("purge bus: the stream %s was made anew (Redis restarted without "
                        "persistence?): purges published before may be lost; reading it "
                        "from its start", self.stream)
            self.last_id, self.position = "0-0", 0
            await self._thread(self._save_state)
            return
        trimmed = added - length
        if trimmed > self.position:
            missed = trimmed - self.position
            self.position = trimmed
            self.explained += missed
            self._count("gaps")
            self._count("missed", missed)
            log.warning("purge bus: missed %d purge%s: trimmed from %s before this edge read "
                        "them (away longer than purge_bus_maxlen = %d messages last)",
                        missed, "" if missed == 1 else "s", self.stream, self.maxlen)
            self._report()

    async def _publish(self, client: Any) -> None:
        while True:
            items = await self._thread(self.store.info_items, _OUT)
            for key, payload in items:
                seq = _U64.unpack(key[len(_OUT):])[0]
                try:
                    purge = _decode(payload)
                except (ValueError, KeyError, TypeError):
                    log.error("purge bus: dropping a bad outbox record %r", payload[:100])
                else:
                    await client.xadd(self.stream, {
                        "edge": self.edge, "seq": str(seq), "op": purge.op,
                        "arg": purge.arg, "soft": "1" if purge.soft else "0"},
                        maxlen=self.maxlen, approximate=True)
                    self._count("published")
                    log.info("purge bus: published %s %s%s", purge.op,
                             purge.arg[:200].decode("latin-1"), " (soft)" if purge.soft else "")
                await self._thread(self.store.info_write,
                                   lambda txn, db, k=key: txn.delete(k, db=db))
                self._report()
            if items:
                await self._thread(self.store.flush)
            await asyncio.sleep(POLL)

    async def _receive(self, client: Any) -> None:
        while True:
            got = await client.xread({self.stream: self.last_id or "0-0"}, count=100,
                                     block=BLOCK_MS)
            if not got:
                continue
            for _stream, messages in got:
                for mid, fields in messages:
                    await self._handle(mid.decode() if isinstance(mid, bytes) else mid, fields)
            await self._thread(self._save_state)
            await self._thread(self.store.flush)
            self._report()

    async def _handle(self, mid: str, fields: dict) -> None:
        self.last_id = mid
        self.position += 1
        f = {(k.decode() if isinstance(k, bytes) else k): v for k, v in fields.items()}
        try:
            edge = f["edge"].decode()
            seq = int(f["seq"])
            purge = Purge(f["op"].decode(), bytes(f["arg"]), f.get("soft", b"0") == b"1")
        except (KeyError, ValueError, AttributeError, UnicodeError):
            log.error("purge bus: ignoring a malformed message %s on %s", mid, self.stream)
            return
        last = self.seen.get(edge)
        self.seen[edge] = max(seq, last or 0)
        if edge == self.edge:
            return                      # ours: applied when it was made
        if last is not None and seq > last + 1:
            missed = seq - last - 1
            known = min(missed, self.explained)     # counted already as trimmed
            self.explained -= known
            if missed > known:
                self._count("gaps")
                self._count("missed", missed - known)
            log.warning("purge bus: missed %d purge%s from edge %s (%s)", missed,
                        "" if missed == 1 else "s", edge,
                        "trimmed" if missed == known else "lost: Redis restarted?")
        elif last is not None and seq <= last:
            return                      # seen already
        try:
            n = await self._thread(apply, self.store, purge)
        except CacheError as exc:
            log.error("purge bus: applying %s %s failed: %s", purge.op,
                      purge.arg[:200].decode("latin-1"), exc)
            return
        self._count("applied")
        log.info("purge bus: applied %s %s%s from edge %s: %d entr%s", purge.op,
                 purge.arg[:200].decode("latin-1"), " (soft)" if purge.soft else "", edge,
                 n, "y" if n == 1 else "ies")


def main(argv: list[str] | None = None) -> int:
    """`python -m edgeproxy.cache.bus CONFIG`: the bus process of one edge.
    Status lines (JSON) go to stdout, the log to stderr; it ends on SIGTERM
    or when its parent (the supervisor) is gone."""
    from edgeproxy.config import ConfigError, load_config

    args = sys.argv[1:] if argv is None else argv
    level = os.environ.get("EDGEPROXY_LOG_LEVEL", "info").upper()
    logging.basicConfig(level=getattr(logging, level, logging.INFO), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s [%(process)d] %(name)s: %(message)s")
    if len(args) != 1:
        print("usage: python -m edgeproxy.cache.bus CONFIG", file=sys.stderr)
        return 2
    try:
        config = load_config(args[0])
    except ConfigError as exc:
        log.error("%s", exc)
        return 2
    cache = config.cache
    if cache is None or not cache.purge_bus:
        log.error("purge bus: %s has no cache.purge_bus", args[0])
        return 2
    try:
        store = CacheStore.open(cache)
    except CacheError as exc:
        log.error("purge bus: %s", exc)
        return 1
    parent = os.getppid()

    async def run() -> None:
        loop = asyncio.get_running_loop()
        task = asyncio.current_task()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, task.cancel)
        bus = PurgeBus(store, cache.purge_bus, cache.purge_bus_stream, cache.purge_bus_maxlen,
                       sys.stdout.buffer)
        work = asyncio.ensure_future(bus.run())
        try:
            while not work.done():
                if os.getppid() != parent:
                    log.warning("purge bus: the supervisor is gone; stopping")
                    break
                await asyncio.wait({work}, timeout=1.0)
            if work.done():
                work.result()
        finally:
            work.cancel()

    try:
        asyncio.run(run())
    except asyncio.CancelledError:
        pass
    finally:
        store.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
