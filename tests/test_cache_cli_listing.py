"""`edgeproxy cache load` defaults taken from the listener serving the routes (the HTTPS
one behind a redirecting HTTP one), `cache list [--prefix] [-l]`, and `cache load --delete`,
against real configuration files, a real LMDB cache and a real proxy over TLS."""
from __future__ import annotations

import os
import ssl
import subprocess
import sys
import time

import pytest
from click.testing import CliRunner, Result
from harness import ROOT, Client, start_proxy

from edgeproxy.cache import CacheStore, policy
from edgeproxy.cache.keys import cache_key
from edgeproxy.cli.cache import cache
from edgeproxy.config import load_config
from edgeproxy.tls import write_selfsigned


def run(*args: str) -> Result:
    return CliRunner().invoke(cache, list(args), catch_exceptions=False)


def open_store(config_path: str) -> CacheStore:
    return CacheStore.open(load_config(config_path).cache)


@pytest.fixture
def certs(tmp_path):
    return write_selfsigned(["localhost", "127.0.0.1"], str(tmp_path / "certs"), days=30)


def tls_config(tmp_path, certs, http_port: int, https_port: int, *, cache_route: bool = True,
               backend: str = "http://127.0.0.1:5000") -> str:
    cert, key = certs
    path = tmp_path / "edgeproxy.toml"
    path.write_text(f"""
[[listen]]
bind = "127.0.0.1:{http_port}"
redirect_http = true

[[listen]]
bind = "127.0.0.1:{https_port}"
tls.certs = [{{ cert = "{cert}", key = "{key}" }}]

[[route]]
path = "/"
pool = "app"
cache = {"true" if cache_route else "false"}

[pool.app]
backends = ["{backend}"]

[cache]
path = "{tmp_path / 'cache'}"
max_size = "8MiB"
max_object = "1MiB"
""")
    return str(path)


@pytest.fixture
def site(tmp_path):
    root = tmp_path / "public"
    (root / "js").mkdir(parents=True)
    (root / "app.css").write_text("body { color: red }")
    (root / "js" / "app.js").write_text("console.log(1)")
    (root / "logo.svg").write_text("<svg/>")
    return root


def test_load_defaults_to_the_https_listener_behind_a_redirect(tmp_path, certs, site):
    cfg = tls_config(tmp_path, certs, 8080, 8443)
    result = run("load", "-c", cfg, str(site), "--prefix", "/static/")
    assert result.exit_code == 0, result.output
    assert "3 files under https://127.0.0.1:8443/static/: 3 stored" in result.output
    assert "warning" not in result.output
    with open_store(cfg) as store:
        assert store.get(cache_key(b"https", b"127.0.0.1:8443", b"/static/app.css")) is not None
        assert store.get(cache_key(b"http", b"127.0.0.1:8080", b"/static/app.css")) is None
    # on the default port the key has none, as the Host header a client sends
    cfg = tls_config(tmp_path, certs, 80, 443)
    result = run("load", "-c", cfg, str(site))
    assert "3 files under https://127.0.0.1/: 3 stored" in result.output


def test_load_warns_when_no_caching_route_serves_the_prefix(tmp_path, certs, site):
    cfg = tls_config(tmp_path, certs, 8080, 8443, cache_route=False)
    result = CliRunner().invoke(cache, ["load", "-c", cfg, str(site)], catch_exceptions=False)
    assert result.exit_code == 0
    assert ("warning: https://127.0.0.1:8443/: route[0] takes it but has no cache = true; "
            "these entries would never be served") in result.stderr


def test_a_running_proxy_answers_what_load_stored_with_its_defaults(tmp_path, certs, site, origin):
    """The keys `cache load` picks by default are the ones the proxy looks up: a
    client on the HTTPS listener gets the file as a hit, never reaching the origin;
    `cache warm` goes through the same listener (not the redirecting one)."""
    cert, key = certs
    body = (f'[[route]]\npath = "/"\npool = "app"\ncache = true\n\n'
            f'[pool.app]\nbackends = ["{origin.url}"]\n\n'
            f'[cache]\npath = "{tmp_path / "cache"}"\nmax_size = "8MiB"\nmax_object = "1MiB"\n')
    proxy = start_proxy(tmp_path, body, listen_lines=[
        "redirect_http = true", f'tls.certs = [{{ cert = "{cert}", key = "{key}" }}]'])
    try:
        http_port, https_port = proxy.ports
        cfg = str(proxy.config_path)
        result = run("load", "-c", cfg, str(site), "--prefix", "/static/")
        assert result.exit_code == 0, result.output
        assert f"https://127.0.0.1:{https_port}/static/: 3 stored" in result.output
        context = ssl.create_default_context(cafile=cert)
        with Client(https_port, ssl_context=context, server_name="localhost") as c:
            r = c.request("GET", "/static/app.css", host=f"127.0.0.1:{https_port}")
        assert r.status == 200 and r.body == b"body { color: red }"
        assert "hit" in r.header("cache-status")
        assert not [s for s in origin.requests if s.target.startswith("/static/")]
        with Client(http_port) as c:   # the plain listener only redirects
            assert c.request("GET", "/static/app.css", host="127.0.0.1").status == 308

        urls = tmp_path / "urls.txt"
        urls.write_text("/cache/warmed?cc=max-age%3D60\n")
        warmed = run("warm", "-c", cfg, str(urls))
        assert warmed.exit_code == 0, warmed.output
        assert "1 answered (200: 1)" in warmed.output and "1 stored" in warmed.output
        listed = run("list", "-c", cfg, "--prefix", f"https://127.0.0.1:{https_port}/cache/")
        assert listed.stdout == f"https://127.0.0.1:{https_port}/cache/warmed?cc=max-age%3D60\n"
    finally:
        proxy.stop()


def test_list_shows_keys_in_order_and_filters_by_prefix(tmp_path, certs, site):
    cfg = tls_config(tmp_path, certs, 8080, 8443)
    run("load", "-c", cfg, str(site), "--prefix", "/static/", "--host", "a.example")
    run("load", "-c", cfg, str(site), "--prefix", "/", "--host", "b.example")
    result = run("list", "-c", cfg)
    assert result.exit_code == 0
    assert result.stdout.splitlines() == [
        "https://a.example/static/app.css", "https://a.example/static/js/app.js",
        "https://a.example/static/logo.svg",
        "https://b.example/app.css", "https://b.example/js/app.js", "https://b.example/logo.svg",
    ]
    assert result.stderr == "6 entries\n"
    result = run("list", "-c", cfg, "--prefix", "https://A.example/static/js")
    assert result.stdout == "https://a.example/static/js/app.js\n"
    assert run("list", "-c", cfg, "--prefix", "https://c.example/").stdout == ""
    bad = run("list", "-c", cfg, "--prefix", "a.example/")
    assert bad.exit_code == 2 and "not an http:// or https:// URL prefix" in bad.output


def test_list_long_shows_status_size_age_and_freshness(tmp_path, certs, site):
    cfg = tls_config(tmp_path, certs, 8080, 8443)
    run("load", "-c", cfg, str(site), "--host", "a.example", "--max-age", "600")
    run("purge", "-c", cfg, "https://a.example/logo.svg", "--soft")
    with open_store(cfg) as store:      # a response stored in two variants
        now = time.time()
        for lang in (b"en", b"fr"):
            entry = policy.new_entry(cache_key(b"https", b"a.example", b"/hello"),
                                     [(b"Accept-Language", lang)], 200, b"OK",
                                     [(b"Cache-Control", b"max-age=60"),
                                      (b"Vary", b"Accept-Language")], now - 5, now - 5)
            writer = store.begin(entry)
            writer.write(b"bonjour" if lang == b"fr" else b"hello")
            assert writer.commit()
    lines = run("list", "-c", cfg, "-l").stdout.splitlines()
    assert len(lines) == 5
    fields = {line.split()[-1]: line.split() for line in lines if "vary" not in line}
    status, size, age, state, _ = fields["https://a.example/app.css"]
    assert (status, size, state) == ("200", str(len("body { color: red }")), "fresh")
    assert age.endswith("s") and int(age[:-1]) < 60
    assert fields["https://a.example/logo.svg"][3] == "stale"
    variants = [line for line in lines if "vary" in line]
    assert len(variants) == 2
    assert all(line.endswith("https://a.example/hello  (vary: accept-language)") for line in variants)
    assert sorted(line.split()[1] for line in variants) == ["5", "7"]


def test_load_delete_removes_entries_for_files_gone(tmp_path, certs, site):
    cfg = tls_config(tmp_path, certs, 8080, 8443)
    args = ("load", "-c", cfg, str(site), "--prefix", "/static/", "--host", "a.example")
    assert "3 stored" in run(*args).output
    run("load", "-c", cfg, str(site), "--prefix", "/other/", "--host", "a.example")
    run("load", "-c", cfg, str(site), "--prefix", "/static/", "--host", "b.example")
    os.remove(site / "logo.svg")
    os.rename(site / "js" / "app.js", site / "js" / "main.js")

    kept = run(*args)          # without --delete nothing is removed
    assert "1 stored (14 bytes), 1 unchanged" in kept.output and "removed" not in kept.output
    result = run(*args, "--delete")
    assert result.exit_code == 0, result.output
    assert "0 stored (0 bytes), 2 unchanged, 2 removed (entries for files gone)" in result.output
    assert run("list", "-c", cfg, "--prefix", "https://a.example/static/").stdout.splitlines() == [
        "https://a.example/static/app.css", "https://a.example/static/js/main.js"]
    # other prefixes and hosts keep theirs
    assert len(run("list", "-c", cfg, "--prefix", "https://a.example/other/").stdout.splitlines()) == 3
    assert len(run("list", "-c", cfg, "--prefix", "https://b.example/").stdout.splitlines()) == 3
    with open_store(cfg) as store:
        assert store.stats()["entries"] == 8
    again = run(*args, "--delete")
    assert "2 unchanged, 0 removed" in again.output


def test_list_into_a_pipe_closed_early(tmp_path, certs):
    """`edgeproxy cache list | head -1`: no traceback when the reader goes away
    (click turns EPIPE into a quiet exit; this keeps it so)."""
    cfg = tls_config(tmp_path, certs, 8080, 8443)
    with open_store(cfg) as store:     # 300 KiB of keys: more than a pipe holds
        now = time.time()
        for i in range(150):
            key = cache_key(b"https", b"a.example", b"/%03d/" % i + b"k" * 2000)
            entry = policy.new_entry(key, [], 200, b"OK", [(b"Cache-Control", b"max-age=60")],
                                     now, now)
            assert store.begin(entry).commit()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(f"{sys.executable} -m edgeproxy cache list -c {cfg} | head -1",
                          shell=True, capture_output=True, text=True, env=env, timeout=60)
    assert proc.stdout == "https://a.example/000/" + "k" * 2000 + "\n"
    assert "Traceback" not in proc.stderr and "BrokenPipe" not in proc.stderr, proc.stderr
