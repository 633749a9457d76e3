"""`edgeproxy cache` commands (purge, stats, load, warm) run through click's CliRunner
against a real configuration file, a real LMDB cache and, for warm, a real HTTP listener."""
from __future__ import annotations

import json
import os
import socket
import socketserver
import threading
import time

import pytest
from click.testing import CliRunner, Result

from edgeproxy.cache import CacheStore, policy
from edgeproxy.cache.keys import cache_key
from edgeproxy.cli.cache import cache
from edgeproxy.config import load_config


def write_config(tmp_path, port: int = 8080, with_cache: bool = True) -> str:
    path = tmp_path / "edgeproxy.toml"
    text = f"""
[[listen]]
bind = "127.0.0.1:{port}"

[[route]]
pool = "app"

[pool.app]
backends = ["http://127.0.0.1:5000"]
"""
    if with_cache:
        text += f"""
[cache]
path = "{tmp_path / 'cache'}"
max_size = "8MiB"
max_object = "1MiB"
"""
    path.write_text(text)
    return str(path)


def run(*args: str) -> Result:
    return CliRunner().invoke(cache, list(args), catch_exceptions=False)


def open_store(config_path: str) -> CacheStore:
    return CacheStore.open(load_config(config_path).cache)


@pytest.fixture
def site(tmp_path):
    root = tmp_path / "public"
    (root / "js").mkdir(parents=True)
    (root / ".git").mkdir()
    (root / "app.css").write_text("body { color: red }")
    (root / "js" / "app.js").write_text("console.log(1)")
    (root / "my file.txt").write_text("spaces")
    (root / ".hidden").write_text("secret")
    (root / ".git" / "config").write_text("secret")
    (root / "big.bin").write_bytes(b"\0" * (1024 * 1024 + 1))  # over max_object
    return root


def test_load_stores_files_once(tmp_path, site):
    cfg = write_config(tmp_path)
    result = run("load", "-c", cfg, str(site), "--prefix", "static", "--host", "Example.com",
                 "--max-age", "600")
    assert result.exit_code == 0, result.output
    assert "4 files under http://Example.com/static/: 3 stored" in result.output
    assert "1 too-large" in result.output

    with open_store(cfg) as store:
        entry = store.get(cache_key(b"http", b"example.com", b"/static/app.css"))
        fields = {n.lower(): v for n, v in entry.headers}
        assert fields[b"content-type"] == b"text/css"
        assert fields[b"cache-control"] == b"max-age=600"
        assert fields[b"etag"].startswith(b'"') and len(fields[b"etag"]) == 34
        mtime = os.stat(site / "app.css").st_mtime
        assert policy.parse_http_date(fields[b"last-modified"]) == int(mtime)
        assert store.read_body(entry) == b"body { color: red }"
        assert policy.lookup_decision(entry, [], time.time()).action == policy.Action.FRESH
        js = store.get(cache_key(b"http", b"example.com", b"/static/js/app.js"))
        assert {n.lower(): v for n, v in js.headers}[b"content-type"] in (
            b"text/javascript", b"application/javascript")
        assert store.get(cache_key(b"http", b"example.com", b"/static/my%20file.txt"))
        assert store.get(cache_key(b"http", b"example.com", b"/static/.hidden")) is None
        assert store.get(cache_key(b"http", b"example.com", b"/static/big.bin")) is None
        assert store.stats()["entries"] == 3

    again = run("load", "-c", cfg, str(site), "--prefix", "/static/", "--host", "example.com",
                "--max-age", "600")
    assert "0 stored (0 bytes), 3 unchanged" in again.output

    (site / "app.css").write_text("body { color: blue }")
    changed = run("load", "-c", cfg, str(site), "--prefix", "/static/", "--host",
                  "example.com", "--max-age", "600")
    assert "1 stored" in changed.output and "2 unchanged" in changed.output
    with open_store(cfg) as store:
        entry = store.get(cache_key(b"http", b"example.com", b"/static/app.css"))
        assert store.read_body(entry) == b"body { color: blue }"
        assert store.stats()["entries"] == 3


def test_load_defaults_to_first_listener(tmp_path, site):
    cfg = write_config(tmp_path, port=8123)
    assert run("load", "-c", cfg, str(site)).exit_code == 0
    with open_store(cfg) as store:
        assert store.get(cache_key(b"http", b"127.0.0.1:8123", b"/app.css")) is not None


def test_purge_url_prefix_tag_and_soft(tmp_path, site):
    cfg = write_config(tmp_path)
    run("load", "-c", cfg, str(site), "--prefix", "/static/", "--host", "example.com")
    with open_store(cfg) as store:
        now = time.time()
        tagged = policy.new_entry(cache_key(b"http", b"example.com", b"/p"), [], 200, b"OK",
                                  [(b"Cache-Control", b"max-age=60"),
                                   (b"Surrogate-Key", b"product-1 home")], now, now)
        assert store.begin(tagged).commit()

    result = run("purge", "-c", cfg, "http://EXAMPLE.com:80/static/app.css")
    assert result.exit_code == 0 and "purged 1 entry" in result.output
    result = run("purge", "-c", cfg, "--prefix", "http://example.com/static/", "--soft")
    assert "marked stale 2 entries" in result.output
    result = run("purge", "-c", cfg, "--tag", "home")
    assert "purged 1 entry" in result.output

    with open_store(cfg) as store:
        assert store.get(cache_key(b"http", b"example.com", b"/static/app.css")) is None
        js = store.get(cache_key(b"http", b"example.com", b"/static/js/app.js"))
        assert js.invalidated
        assert store.get(cache_key(b"http", b"example.com", b"/p")) is None
        assert store.stats()["entries"] == 2


@pytest.mark.parametrize("args,message", [
    ((), "exactly one of"),
    (("http://a/x", "--tag", "t"), "exactly one of"),
    (("/relative",), "not an absolute http"),
    (("--prefix", "example.com/x"), "not an http:// or https:// URL prefix"),
])
def test_purge_usage_errors(tmp_path, args, message):
    result = run("purge", "-c", write_config(tmp_path), *args)
    assert result.exit_code == 2 and message in result.output


def test_stats(tmp_path, site):
    cfg = write_config(tmp_path)
    run("load", "-c", cfg, str(site), "--host", "example.com")
    with open_store(cfg) as store:
        store.count("hits", 3)
        store.count("misses", 1)
    result = run("stats", "-c", cfg)
    assert result.exit_code == 0
    assert "entries:" in result.output and " 3\n" in result.output
    assert "hit ratio:" in result.output and "75.0%" in result.output
    counters = json.loads(run("stats", "-c", cfg, "--json").output)
    assert counters["entries"] == 3 and counters["hits"] == 3 and counters["misses"] == 1
    assert counters["max_size"] == 8 * 1024 * 1024
    assert counters["map_size"] == 10 * 1024 * 1024      # max_size + MAP_MARGIN


def test_errors_are_messages(tmp_path):
    no_cache = write_config(tmp_path, with_cache=False)
    result = run("stats", "-c", no_cache)
    assert result.exit_code == 1 and "has no [cache] section" in result.output
    result = run("stats", "-c", str(tmp_path / "missing.toml"))
    assert result.exit_code == 1 and "cannot read" in result.output
    cfg = write_config(tmp_path)
    os.makedirs(tmp_path / "cache")
    (tmp_path / "cache" / "data.mdb").write_bytes(b"garbage" * 1000)
    result = run("stats", "-c", cfg)
    assert result.exit_code == 1 and "not a usable LMDB environment" in result.output


# --- warm --------------------------------------------------------------------------------------

class _Origin(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _OriginHandler)
        self.requests: list[tuple[str, str]] = []


class _OriginHandler(socketserver.StreamRequestHandler):
    def handle(self) -> None:
        line = self.rfile.readline().decode("latin-1").strip()
        host = ""
        while (field := self.rfile.readline()) not in (b"\r\n", b""):
            name, _, value = field.decode("latin-1").partition(":")
            if name.lower() == "host":
                host = value.strip()
        self.server.requests.append((line, host))
        target = line.split(" ")[1]
        if target == "/drop":
            return  # close without answering
        if target == "/hit":
            self.wfile.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n"
                             b"Cache-Status: edgeproxy; hit; ttl=10\r\n\r\nok")
        elif target == "/chunked":
            self.wfile.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                             b"2\r\nok\r\n0\r\n\r\n")
        elif target.startswith("/missing"):
            self.wfile.write(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n")
        else:
            self.wfile.write(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n"
                             b"Cache-Status: edgeproxy; fwd=uri-miss; fwd-status=200; stored"
                             b"\r\n\r\nhello")


@pytest.fixture
def origin():
    server = _Origin()
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    yield server
    server.shutdown()
    server.server_close()
    thread.join()


def test_warm(tmp_path, origin):
    port = origin.server_address[1]
    cfg = write_config(tmp_path, port=port)
    urls = tmp_path / "urls.txt"
    urls.write_text("# warm these\nhttp://Example.com/a?x=1\n\n/b\nhttp://example.com/hit\n"
                    "/missing\nhttp://example.com/chunked\n")
    result = run("warm", "-c", cfg, str(urls), "--concurrency", "2")
    assert result.exit_code == 0, result.output
    assert sorted(origin.requests) == sorted([
        ("GET /a?x=1 HTTP/1.1", "Example.com"),
        ("GET /b HTTP/1.1", f"127.0.0.1:{port}"),
        ("GET /hit HTTP/1.1", "example.com"),
        ("GET /missing HTTP/1.1", f"127.0.0.1:{port}"),
        ("GET /chunked HTTP/1.1", "example.com"),
    ])
    assert ("5 URLs: 5 answered (200: 4, 404: 1), 0 failed; 1 already cached, 2 stored"
            in result.output)


def test_warm_reports_failures(tmp_path, origin):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        closed_port = s.getsockname()[1]
    urls = tmp_path / "urls.txt"
    urls.write_text("/drop\n/a\n")
    cfg = write_config(tmp_path, origin.server_address[1])
    result = CliRunner().invoke(cache, ["warm", "-c", cfg, str(urls)])
    assert result.exit_code == 1
    assert "2 URLs: 1 answered (200: 1), 1 failed" in result.output
    assert "/drop: IncompleteReadError" in result.output
    result = CliRunner().invoke(cache, ["warm", "-c", write_config(tmp_path, closed_port),
                                        str(urls), "--timeout", "5"])
    assert result.exit_code == 1 and "0 answered (none), 2 failed" in result.output
