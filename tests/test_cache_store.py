"""The LMDB cache store on real files: entries, chunked bodies, variants, purges, reopen,
two processes sharing one environment, eviction, a full map, and bad files at the path."""
from __future__ import annotations

import asyncio
import logging
import multiprocessing
import os
import time

import lmdb
import pytest

from edgeproxy.cache import CacheError, CacheStore, policy
from edgeproxy.cache.keys import cache_key
from edgeproxy.config.model import CacheConfig

MiB = 1024 * 1024


def config(tmp_path, **kwargs) -> CacheConfig:
    return CacheConfig(path=str(tmp_path / "cache"), **{"max_size": 16 * MiB, **kwargs})


def key(path: str, host: bytes = b"example.com") -> bytes:
    return cache_key(b"https", host, path.encode())


def make_entry(path: str, *extra: tuple[bytes, bytes], request_headers=(),
               cache_control: bytes = b"max-age=600"):
    now = time.time()
    headers = [(b"Cache-Control", cache_control), (b"Content-Type", b"text/plain"),
               (b"Date", policy.format_http_date(now)), *extra]
    return policy.new_entry(key(path), list(request_headers), 200, b"OK", headers, now, now)


def put(store: CacheStore, path: str, body: bytes, *extra, request_headers=(), piece=1000,
        cache_control: bytes = b"max-age=600") -> bool:
    writer = store.begin(make_entry(path, *extra, request_headers=request_headers,
                                    cache_control=cache_control))
    for i in range(0, len(body), piece):
        writer.write(body[i:i + piece])
    return writer.commit()


@pytest.fixture
def store(tmp_path):
    s = CacheStore.open(config(tmp_path), chunk_size=4096)
    yield s
    s.close()


def test_store_lookup_and_chunked_body(store):
    body = os.urandom(4096 * 3 + 123)
    assert put(store, "/a", body, piece=1500)
    found = store.lookup(key("/a"), [])
    assert found.entry is not None and not found.vary_miss
    entry = found.entry
    assert entry.body_length == len(body) and entry.chunk_size == 4096
    assert store.read_body(entry) == body
    for start, end in [(0, 1), (4000, 4200), (4096, 8192), (100, len(body)), (12000, 99999)]:
        assert store.read_body(entry, start, end) == body[start:end]
    assert store.read_body(entry, 50, 50) == b""
    assert store.get(key("/a")) == entry
    assert store.lookup(key("/b"), []) == (None, False)
    assert store.lookup(cache_key(b"http", b"example.com", b"/a"), []).entry is None


def test_exact_chunk_multiple_and_empty_body(store):
    body = os.urandom(4096 * 2)
    assert put(store, "/even", body, piece=4096)
    assert store.read_body(store.get(key("/even"))) == body
    assert put(store, "/empty", b"")
    empty = store.get(key("/empty"))
    assert empty.body_length == 0 and store.read_body(empty) == b""


def test_replacing_an_entry_frees_the_old_body(store):
    assert put(store, "/a", b"x" * 10000)
    old = store.get(key("/a"))
    used = store.stats()["bytes"]
    assert put(store, "/a", b"y" * 10000)
    new = store.get(key("/a"))
    assert store.read_body(new) == b"y" * 10000
    assert store.read_body(old) is None  # the old body is gone, never mixed with the new one
    stats = store.stats()
    assert stats["entries"] == 1 and stats["bytes"] == used


def test_variants_by_vary(store):
    gzip = [(b"Accept-Encoding", b"gzip")]
    br = [(b"Accept-Encoding", b"br")]
    vary = (b"Vary", b"Accept-Encoding")
    assert put(store, "/v", b"gzip body", vary, request_headers=gzip)
    assert store.lookup(key("/v"), br) == (None, True)  # a vary miss, not a URI miss
    assert put(store, "/v", b"br body", vary, request_headers=br)
    assert store.read_body(store.lookup(key("/v"), gzip).entry) == b"gzip body"
    assert store.read_body(store.lookup(key("/v"), [(b"accept-encoding", b"BR")]).entry) == \
        b"br body"
    assert store.stats()["entries"] == 2
    # A response without Vary replaces every variant.
    assert put(store, "/v", b"plain")
    assert store.read_body(store.lookup(key("/v"), gzip).entry) == b"plain"
    assert store.read_body(store.lookup(key("/v"), br).entry) == b"plain"
    assert store.stats()["entries"] == 1
    # And a Vary response replaces the plain one.
    assert put(store, "/v", b"gzip again", vary, request_headers=gzip)
    assert store.lookup(key("/v"), br) == (None, True)
    assert store.stats()["entries"] == 1
    assert store.delete(key("/v")) == 1
    assert store.lookup(key("/v"), gzip) == (None, False)
    assert store.stats()["bytes"] == 0


def test_long_keys(store):
    long_a = "/" + "a" * 3000 + "?1"
    long_b = "/" + "a" * 3000 + "?2"
    assert put(store, long_a, b"A") and put(store, long_b, b"B")
    assert store.read_body(store.lookup(key(long_a), []).entry) == b"A"
    assert store.read_body(store.lookup(key(long_b), []).entry) == b"B"
    assert store.purge_prefix(key("/" + "a" * 3000 + "?1")) == 1
    assert store.lookup(key(long_a), []).entry is None
    assert store.lookup(key(long_b), []).entry is not None


def test_delete_prefix_tag_and_soft_purge(store):
    assert put(store, "/static/a.css", b"a", (b"Surrogate-Key", b"static css"))
    assert put(store, "/static/b.js", b"b", (b"Cache-Tag", b"static,js"))
    assert put(store, "/static2/c", b"c")
    assert put(store, "/page", b"p", (b"Surrogate-Key", b"page"))
    other_host = policy.new_entry(key("/static/a.css", b"other.example"), [], 200, b"OK",
                                  [(b"Cache-Control", b"max-age=60")], time.time(), time.time())
    w = store.begin(other_host)
    assert w.commit()

    assert store.mark_stale(key("/page")) == 1
    page = store.lookup(key("/page"), []).entry
    assert page.invalidated
    assert policy.lookup_decision(page, [], time.time()).action == policy.Action.MUST_REVALIDATE
    assert store.read_body(page) == b"p"  # a soft purge keeps the body for revalidation

    assert store.purge_tag(b"js") == 1
    assert store.lookup(key("/static/b.js"), []).entry is None
    assert store.purge_tag(b"static", soft=True) == 1
    assert store.lookup(key("/static/a.css"), []).entry.invalidated

    assert store.purge_prefix(key("/static/")) == 1
    assert store.lookup(key("/static/a.css"), []).entry is None
    assert store.lookup(key("/static2/c"), []).entry is not None
    assert store.lookup(key("/static/a.css", b"other.example"), []).entry is not None
    assert store.purge_tag(b"static") == 0 and store.delete(key("/nothing")) == 0
    assert store.stats()["entries"] == 3


def test_purge_prefix_in_batches(store):
    for i in range(300):  # more than one purge transaction
        assert put(store, f"/many/{i}", b"x")
    assert store.purge_prefix(key("/many/"), soft=True) == 300
    assert store.purge_prefix(key("/many/")) == 300
    assert store.stats()["entries"] == 0 and store.stats()["bytes"] == 0


def test_update_entry_after_304(store):
    assert put(store, "/r", b"body", (b"ETag", b'"v1"'), cache_control=b"max-age=1")
    entry = store.lookup(key("/r"), []).entry
    later = time.time() + 100
    updated = policy.apply_304(entry, [(b"Cache-Control", b"max-age=900"),
                                       (b"ETag", b'"v1"'), (b"X-New", b"1")], later, later)
    assert store.update_entry(updated)
    again = store.lookup(key("/r"), []).entry
    assert again.lifetime == 900 and (b"X-New", b"1") in again.headers
    assert store.read_body(again) == b"body"
    # An update for an entry that was replaced meanwhile is dropped.
    assert put(store, "/r", b"new body")
    assert not store.update_entry(updated)
    assert store.read_body(store.lookup(key("/r"), []).entry) == b"new body"


def test_abort_and_too_large_store_nothing(tmp_path, caplog):
    with CacheStore.open(config(tmp_path, max_object=10_000), chunk_size=4096) as store:
        writer = store.begin(make_entry("/a"))
        writer.write(b"x" * 9000)  # two chunks written already
        writer.abort()
        assert writer.failed == "aborted" and not writer.commit()
        assert store.lookup(key("/a"), []).entry is None

        with caplog.at_level(logging.INFO, logger="edgeproxy.cache"):
            writer = store.begin(make_entry("/big"))
            assert writer.write(b"x" * 9000)
            assert not writer.write(b"x" * 2000)
            assert not writer.write(b"more")
            assert not writer.commit()
        assert writer.failed == "too-large"
        assert "not storing https://example.com/big" in caplog.text
        assert store.lookup(key("/big"), []).entry is None
        stats = store.stats()
        assert stats["bytes"] == 0 and stats["entries"] == 0 and stats["store_failures"] == 1


def test_async_writer_and_reader(store):
    body = os.urandom(50_000)

    async def main():
        writer = store.begin(make_entry("/async"))
        for i in range(0, len(body), 3000):
            assert await writer.write_async(body[i:i + 3000])
        assert await writer.commit_async()
        entry = store.lookup(key("/async"), []).entry
        assert await store.read_body_async(entry, 10, 40_000) == body[10:40_000]
        assert await store.delete_async(key("/async")) == 1
        maintain = asyncio.ensure_future(store.maintain_forever(interval=0.01))
        store.count("hits", 5)
        for _ in range(200):
            await asyncio.sleep(0.01)
            if not store._counts:
                break
        maintain.cancel()

    asyncio.run(main())
    assert store.lookup(key("/async"), []).entry is None
    assert store.stats()["hits"] == 5


def test_reopen_after_close(tmp_path):
    body = os.urandom(20_000)
    with CacheStore.open(config(tmp_path), chunk_size=4096) as store:
        assert put(store, "/keep", body, (b"Surrogate-Key", b"k"))
        store.count("hits", 2)
    with pytest.raises(CacheError, match="closed"):
        store.lookup(key("/keep"), [])
    with CacheStore.open(config(tmp_path)) as store:  # another chunk size: entries keep theirs
        entry = store.lookup(key("/keep"), []).entry
        assert store.read_body(entry) == body
        stats = store.stats()
        assert stats["entries"] == 1 and stats["hits"] == 2 and stats["stores"] == 1
        assert store.purge_tag(b"k") == 1


def test_open_twice_in_one_process_is_refused(tmp_path):
    with CacheStore.open(config(tmp_path)), \
            pytest.raises(CacheError, match="already open in this process"):
        CacheStore.open(config(tmp_path))


def test_store_inherited_through_fork_is_refused(tmp_path):
    cfg = config(tmp_path)
    with CacheStore.open(cfg) as store:
        assert put(store, "/f", b"forked")
        assert store.lookup(key("/f"), []).entry is not None  # a spare read transaction
        pid = os.fork()
        if pid == 0:  # the child: neither the parent's environment nor a new one
            code = 0
            for attempt in (lambda: store.lookup(key("/f"), []), lambda: CacheStore.open(cfg)):
                try:
                    attempt()
                    code = 1
                except CacheError as exc:
                    if "fork" not in str(exc):
                        code = 2
                except BaseException:  # noqa: BLE001 - nothing may escape a forked child
                    code = 3
            os._exit(code)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        # The parent's reader slots are intact.
        assert store.read_body(store.lookup(key("/f"), []).entry) == b"forked"


def test_writer_outliving_its_store_does_not_raise(tmp_path):
    store = CacheStore.open(config(tmp_path), chunk_size=4096)
    writer = store.begin(make_entry("/late"))
    assert writer.write(b"x" * 5000)
    store.close()
    assert not writer.write(b"x" * 5000)
    assert not writer.commit() and writer.failed == "storage"
    with CacheStore.open(config(tmp_path)) as store:
        assert store.lookup(key("/late"), []).entry is None
        store.maintain()  # this process is alive, but the writer is not among its own
        assert store.stats()["bytes"] == 0


def test_bad_files_at_the_path(tmp_path):
    path = tmp_path / "afile"
    path.write_text("not a directory")
    with pytest.raises(CacheError, match="is not a directory"):
        CacheStore.open(CacheConfig(path=str(path)))

    garbage = tmp_path / "garbage"
    garbage.mkdir()
    (garbage / "data.mdb").write_bytes(os.urandom(64 * 1024))
    with pytest.raises(CacheError, match="not a usable LMDB environment"):
        CacheStore.open(CacheConfig(path=str(garbage)))

    foreign = tmp_path / "foreign"
    env = lmdb.open(str(foreign), max_dbs=2)
    env.open_db(b"users")
    env.close()
    with pytest.raises(CacheError, match="not an edgeproxy cache"):
        CacheStore.open(CacheConfig(path=str(foreign)))

    other_version = tmp_path / "other"
    env = lmdb.open(str(other_version), max_dbs=8)
    with env.begin(write=True) as txn:
        txn.put(b"format", b"edgeproxy-cache 99", db=env.open_db(b"info", txn=txn))
    env.close()
    with pytest.raises(CacheError, match="format"):
        CacheStore.open(CacheConfig(path=str(other_version)))


def test_eviction_keeps_recently_used(tmp_path):
    body = b"z" * 100_000
    cfg = config(tmp_path, max_size=4 * MiB)
    with CacheStore.open(cfg, touch_interval=0) as store:
        for i in range(20):
            assert put(store, f"/e{i}", body, piece=50_000)
        assert store.lookup(key("/e0"), []).entry is not None  # /e0 becomes recently used
        for i in range(20, 40):  # ~26 entries fit: the oldest ~14 go, /e0 ranks 20th
            assert put(store, f"/e{i}", body, piece=50_000)
        stats = store.stats()
        assert stats["evictions"] > 0
        assert stats["bytes"] <= 0.8 * cfg.max_size
        assert store.lookup(key("/e0"), []).entry is not None
        assert store.lookup(key("/e1"), []).entry is None
        assert store.read_body(store.lookup(key("/e39"), []).entry) == body
        kept = sum(store.get(key(f"/e{i}")) is not None for i in range(40))
        assert kept == stats["entries"]


def test_full_map_degrades_to_not_stored(tmp_path, caplog):
    body = b"q" * 100_000
    with CacheStore.open(config(tmp_path, max_size=1 * MiB)) as store:
        # A long reader (another worker streaming a body, say) pins the pages
        # freed since it began: eviction cannot make room until it ends.
        pin = store._env.begin()
        results = []
        with caplog.at_level(logging.WARNING, logger="edgeproxy.cache"):
            for i in range(30):
                results.append(put(store, f"/f{i}", body, piece=50_000))
        assert False in results
        assert "not storing" in caplog.text
        pin.abort()
        assert put(store, "/after", body)
        assert store.read_body(store.lookup(key("/after"), []).entry) == body
        assert store.stats()["store_failures"] >= 1


# --- two processes --------------------------------------------------------------------------

def _child(path: str, to_child, to_parent) -> None:
    store = CacheStore.open(CacheConfig(path=path, max_size=16 * MiB), chunk_size=4096)
    assert put(store, "/shared", b"from the child" * 1000)
    store.count("hits", 3)
    store.flush()
    to_parent.put("written")
    assert to_child.get(timeout=30) == "purged"
    to_parent.put(store.lookup(key("/shared"), []).entry is None)
    writer = store.begin(make_entry("/unfinished"))
    writer.write(b"u" * 20_000)  # chunks written, never committed
    to_parent.put("pending")
    to_parent.close()
    to_parent.join_thread()  # the queue's feeder thread must send before we die
    os._exit(0)  # die in the middle of a response


def test_two_processes_share_the_cache(tmp_path):
    path = str(tmp_path / "cache")
    ctx = multiprocessing.get_context("spawn")
    to_child, to_parent = ctx.Queue(), ctx.Queue()
    child = ctx.Process(target=_child, args=(path, to_child, to_parent))
    child.start()
    try:
        assert to_parent.get(timeout=30) == "written"
        with CacheStore.open(CacheConfig(path=path, max_size=16 * MiB)) as store:
            entry = store.lookup(key("/shared"), []).entry
            assert store.read_body(entry) == b"from the child" * 1000
            assert store.stats()["hits"] == 3
            assert store.delete(key("/shared")) == 1
            to_child.put("purged")
            assert to_parent.get(timeout=30) is True  # the child sees the purge
            assert to_parent.get(timeout=30) == "pending"
            child.join(timeout=30)
            assert store.stats()["bytes"] > 0  # the dead writer's chunks
            store.maintain()  # finds the writer's process gone
            assert store.stats()["bytes"] == 0
            assert store.lookup(key("/unfinished"), []).entry is None
    finally:
        child.join(timeout=5)
        if child.is_alive():
            child.kill()
    assert child.exitcode == 0
