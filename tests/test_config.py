"""Tests of the configuration loader: valid files, every kind of error, quick mode."""
from __future__ import annotations

import os
import re
import textwrap
from pathlib import Path

import pytest

from edgeproxy.config import (
    BackendConfig,
    CacheConfig,
    CertConfig,
    Config,
    ConfigError,
    LimitsConfig,
    ListenConfig,
    ListenTLSConfig,
    LogConfig,
    PoolConfig,
    PoolTLSConfig,
    RouteConfig,
    ServerConfig,
    TimeoutConfig,
    load_config,
    parse_config,
    quick_config,
)
from edgeproxy.config import load as schema

DOCS = Path(__file__).resolve().parent.parent / "docs" / "configuration.md"

MINIMAL = """
[[listen]]
bind = "127.0.0.1:8080"
[[route]]
pool = "web"
[pool.web]
backends = ["http://127.0.0.1:5000"]
"""


def errors_of(text: str, source: str | None = None, **overrides) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_config(textwrap.dedent(text), source=source, **overrides)
    return info.value.errors


def write(path: Path, text: str = "x") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


# --- valid files -------------------------------------------------------------

def test_minimal_file_gets_every_default():
    config = parse_config(MINIMAL)
    assert config == Config(
        listen=(ListenConfig(bind="127.0.0.1:8080", host="127.0.0.1", port=8080),),
        routes=(RouteConfig(pool="web"),),
        pools={"web": PoolConfig(name="web", backends=(BackendConfig(
            url="http://127.0.0.1:5000", scheme="http", host="127.0.0.1", port=5000),))},
    )
    assert config.server == ServerConfig() and config.timeout == TimeoutConfig()
    assert config.limits == LimitsConfig() and config.log == LogConfig()
    assert config.cache is None and config.source is None


def test_full_file_parses_to_the_expected_dataclasses(tmp_path):
    for name in ("a.pem", "a.key", "certs/b.pem", "certs/b.key", "ca.pem", "client.pem",
                 "client.key", "up-ca.pem"):
        write(tmp_path / name)
    path = write(tmp_path / "edgeproxy.toml", textwrap.dedent("""
        [server]
        workers = 0
        server_header = "edgeproxy"
        hide_headers = ["X-Debug", "x-Backend"]
        normalize_target = true

        [[listen]]
        bind = ":80"
        backlog = 16
        redirect_http = true

        [[listen]]
        bind = "[::1]:8443"
        tls.certs = [ { cert = "a.pem", key = "a.key" },
                      { cert = "certs/b.pem", key = "certs/b.key", password = "pw" } ]
        tls.min_version = "1.3"
        tls.hsts = "max-age=31536000"
        tls.client_ca = "ca.pem"
        tls.client_subject_header = "X-Subject"

        [[route]]
        host = "App.Example.com"
        path = "/api/"
        pool = "api"
        cache = true

        [[route]]
        host = "*.example.com"
        pool = "api"

        [pool.api]
        backends = ["http://10.0.0.1:5001", "HTTP://Backend.Internal weight=3",
                    "https://[::1]:8443/ backup weight=2"]
        keepalive = 0
        keepalive_timeout = 2
        tls.verify = false
        tls.ca = "up-ca.pem"
        tls.server_name = "API.internal"
        tls.client_cert = "client.pem"
        tls.client_key = "client.key"

        [timeout]
        connect = 1
        read = 2.5
        send = 3
        header = 4
        keepalive = 5
        body = 6

        [limits]
        request_line = 4096
        header_size = "16KiB"
        header_count = 50
        body_size = 0
        response_header_size = "1MB"

        [log]
        level = "DEBUG"
        access_log = "logs/access.log"
        access_format = "json"

        [cache]
        path = "cache"
        max_size = "2GiB"
        max_object = "1.5MiB"
        heuristic = false
        stale_grace = 30
        """))
    config = load_config(path)
    d = str(tmp_path)
    assert config == Config(
        source=str(path),
        server=ServerConfig(workers=0, server_header="edgeproxy",
                            hide_headers=("x-debug", "x-backend"), normalize_target=True),
        listen=(
            ListenConfig(bind=":80", host="", port=80, backlog=16, redirect_http=True),
            ListenConfig(bind="[::1]:8443", host="::1", port=8443, tls=ListenTLSConfig(
                certs=(CertConfig(cert=f"{d}/a.pem", key=f"{d}/a.key"),
                       CertConfig(cert=f"{d}/certs/b.pem", key=f"{d}/certs/b.key",
                                  password="pw")),
                min_version="1.3", hsts="max-age=31536000", client_ca=f"{d}/ca.pem",
                client_subject_header="X-Subject")),
        ),
        routes=(RouteConfig(pool="api", path="/api/", host="app.example.com", cache=True),
                RouteConfig(pool="api", host="*.example.com")),
        pools={"api": PoolConfig(
            name="api",
            backends=(
                BackendConfig(url="http://10.0.0.1:5001", scheme="http", host="10.0.0.1",
                              port=5001),
                BackendConfig(url="HTTP://Backend.Internal", scheme="http",
                              host="backend.internal", port=80, weight=3),
                BackendConfig(url="https://[::1]:8443/", scheme="https", host="::1",
                              port=8443, weight=2, backup=True),
            ),
            keepalive=0, keepalive_timeout=2.0,
            tls=PoolTLSConfig(verify=False, ca=f"{d}/up-ca.pem", server_name="api.internal",
                              client_cert=f"{d}/client.pem", client_key=f"{d}/client.key"))},
        timeout=TimeoutConfig(connect=1.0, read=2.5, send=3.0, header=4.0, keepalive=5.0, body=6.0),
        limits=LimitsConfig(request_line=4096, header_size=16384, header_count=50, body_size=0,
                            response_header_size=1_000_000),
        log=LogConfig(level="debug", access_log=f"{d}/logs/access.log", access_format="json"),
        cache=CacheConfig(path=f"{d}/cache", max_size=2 * 1024 ** 3,
                          max_object=3 * 512 * 1024, heuristic=False, stale_grace=30.0),
    )
    assert isinstance(config.timeout.connect, float)
    assert "x-powered-by" in config.server.hidden_headers
    assert "x-debug" in config.server.hidden_headers


def test_example_in_the_docs_is_valid(tmp_path):
    text = DOCS.read_text()
    example = re.search(r"## A complete example\s+```toml\n(.*?)```", text, re.S).group(1)
    for name in re.findall(r'"(certs/[^"]+)"', example):
        write(tmp_path / name)
    path = write(tmp_path / "edgeproxy.toml", example)
    config = load_config(path)
    assert [lc.port for lc in config.listen] == [80, 443]
    assert set(config.pools) == {"api", "web"}
    assert config.limits.body_size == 20 * 1024 * 1024
    assert config.cache.max_size == 4 * 1024 ** 3


def test_every_key_of_the_schema_is_documented():
    documented = DOCS.read_text()

    def keys(table, prefix=""):
        for key in table.keys:
            name = prefix + key.name
            yield name
            if isinstance(key.kind, schema.Table):
                yield from keys(key.kind, name + ".")

    tables = {"server": schema.SERVER, "listen": schema.LISTEN, "route": schema.ROUTE,
              "pool": schema.POOL, "timeout": schema.TIMEOUT, "limits": schema.LIMITS,
              "log": schema.LOG, "cache": schema.CACHE, "cert": schema.CERT}
    missing = []
    for section, table in tables.items():
        assert f"## `[{section}" in documented or f"## `[[{section}" in documented \
            or section == "cert"
        for name in keys(table):
            if f"`{name}`" not in documented:
                missing.append(f"{section}: {name}")
    for name in ("cert", "key", "password"):
        assert f"`{name}`" in documented
    assert missing == []


def test_schema_and_model_agree():
    """Every key names a dataclass field, and a key may be left out exactly when it has a default."""
    tables = (schema.CONFIG, schema.SERVER, schema.LISTEN, schema.LISTEN_TLS, schema.CERT,
              schema.ROUTE, schema.POOL, schema.POOL_TLS, schema.TIMEOUT, schema.LIMITS,
              schema.LOG, schema.CACHE)
    for table in tables:
        names = {f.name for f in schema.fields(table.model)}
        for key in table.keys:
            where = (table.model.__name__, key.attr)
            assert key.attr in names, where
            has_default = table.default_of(key) is not schema.MISSING
            # (the top-level listen, route and pool are checked by config_finish instead)
            assert has_default != key.required or table is schema.CONFIG, where
    assert schema.LIMITS.default_of(schema.LIMITS.keys[0]) == 8 * 1024


@pytest.mark.parametrize("text, expected", [
    ("512", 512), ("512B", 512), ("8KiB", 8192), ("8 kib", 8192), ("1MiB", 1048576),
    ("1GiB", 1024 ** 3), ("1TiB", 1024 ** 4), ("1KB", 1000), ("10MB", 10_000_000),
    ("2GB", 2 * 10 ** 9), ("1.5KiB", 1536),
])
def test_sizes(text, expected):
    config = parse_config(MINIMAL + f'[limits]\nbody_size = "{text}"\n')
    assert config.limits.body_size == expected


def test_bind_forms():
    config = parse_config(MINIMAL.replace('bind = "127.0.0.1:8080"', 'bind = "[::1]:8080"')
                          + '[[listen]]\nbind = ":8081"\n[[listen]]\nbind = "LocalHost:0"\n'
                          + '[[listen]]\nbind = "0.0.0.0:80"\n')
    assert [(lc.host, lc.port) for lc in config.listen] == [
        ("::1", 8080), ("", 8081), ("localhost", 0), ("0.0.0.0", 80)]
    assert config.listen[0].bind == "[::1]:8080"


def test_relative_paths_are_relative_to_the_config_file(tmp_path, monkeypatch):
    write(tmp_path / "conf" / "a.pem")
    write(tmp_path / "conf" / "a.key")
    path = write(tmp_path / "conf" / "edgeproxy.toml", MINIMAL + textwrap.dedent("""
        [[listen]]
        bind = "127.0.0.1:8443"
        tls.certs = [ { cert = "a.pem", key = "a.key" } ]
        [log]
        access_log = "-"
        """))
    monkeypatch.chdir(tmp_path)  # not the file's directory
    config = load_config(os.path.relpath(path))
    cert = config.listen[1].tls.certs[0]
    assert cert.cert == str(tmp_path / "conf" / "a.pem")
    assert os.path.isabs(cert.key)
    assert config.log.access_log == "-"


def test_absent_sections_and_server_header():
    config = parse_config(MINIMAL + '[server]\nserver_header = "edge"\n')
    assert config.server.server_header == "edge"
    assert config.server.hidden_headers >= {"server", "x-powered-by", "x-aspnet-version",
                                            "x-aspnetmvc-version", "x-runtime"}


# --- errors --------------------------------------------------------------------

def with_section(extra: str) -> str:
    return MINIMAL + textwrap.dedent(extra)


ERROR_CASES = [
    # unknown keys, in every table
    ("[server]\nwokers = 2", 'server.wokers: unknown key (did you mean "workers"?)'),
    ("[servers]\nworkers = 2", 'servers: unknown key (did you mean "server"?)'),
    ('[[listen]]\nbind = ":81"\nbacklg = 1', "listen[1].backlg: unknown key"),
    ('[[route]]\npath = "/x"\npool = "web"\nhots = "a"', "route[1].hots: unknown key"),
    ('[pool.x]\nbackends = ["http://h"]\ntls.verfy = true', "pool.x.tls.verfy: unknown key"),
    ('[timeout]\nidle = 3', "timeout.idle: unknown key"),
    ('[cache]\npath = "c"\nsize = 1', "cache.size: unknown key"),
    # types
    ('[timeout]\nread = "sixty"', 'timeout.read: expected a number, got "sixty"'),
    ('[timeout]\nread = true', "timeout.read: expected a number, got true"),
    ('[timeout]\nread = inf', "timeout.read: expected a finite number, got inf"),
    ('[server]\nworkers = true', "server.workers: expected an integer, got true"),
    ('[server]\nworkers = 1.5', "server.workers: expected an integer, got 1.5"),
    ('[limits]\nheader_count = "100"', 'limits.header_count: expected an integer, got "100"'),
    ('[cache]\npath = "c"\nheuristic = 1', "cache.heuristic: expected true or false, got 1"),
    ('[server]\nhide_headers = "X-A"',
     'server.hide_headers: expected an array of header names, got "X-A"'),
    ('[server]\nhide_headers = ["X A"]',
     'server.hide_headers[0]: "X A" is not a valid header name'),
    ('[server]\nserver_header = "a\\r\\nb"',
     'server.server_header: "a\\r\\nb" contains a control character'),
    # sizes
    ('[limits]\nbody_size = "100 MegaBytes"', 'limits.body_size: "100 MegaBytes" is not a size'),
    ('[limits]\nbody_size = "8K"', 'limits.body_size: "8K" is not a size'),
    ('[limits]\nbody_size = "1.5B"', 'limits.body_size: "1.5B" is not a whole number of bytes'),
    ('[limits]\nbody_size = 1.5', "limits.body_size: expected a size"),
    # ranges
    ("[server]\nworkers = -1", "server.workers: -1 must be 0 or more"),
    ("[timeout]\nconnect = 0", "timeout.connect: 0 must be greater than 0"),
    ("[timeout]\nkeepalive = -1.5", "timeout.keepalive: -1.5 must be greater than 0"),
    ("[timeout]\nbody = 0", "timeout.body: 0 must be greater than 0"),
    ('[limits]\nheader_size = "0KiB"', 'limits.header_size: "0KiB" must be greater than 0'),
    ("[limits]\nheader_count = 0", "limits.header_count: 0 must be greater than 0"),
    ("[limits]\nbody_size = -1", "limits.body_size: -1 must be 0 or more"),
    ('[[listen]]\nbind = ":81"\nbacklog = 0', "listen[1].backlog: 0 must be 1 or more"),
    ('[pool.x]\nbackends = ["http://h"]\nkeepalive = -1', "pool.x.keepalive: -1 must be 0 or more"),
    ('[pool.x]\nbackends = ["http://h"]\nkeepalive_timeout = 0',
     "pool.x.keepalive_timeout: 0 must be greater than 0"),
    ('[pool.x]\nbackends = ["http://h"]\npassive.max_ejected = 0',
     "pool.x.passive.max_ejected: 0 must be more than 0 and at most 1"),
    ('[pool.x]\nbackends = ["http://h"]\npassive.max_ejected = 1.5',
     "pool.x.passive.max_ejected: 1.5 must be more than 0 and at most 1"),
    ('[cache]\npath = "c"\nstale_grace = -1', "cache.stale_grace: -1 must be 0 or more"),
    ('[cache]\npath = "c"\nmax_size = "1MiB"\nmax_object = "2MiB"',
     "cache.max_object: 2097152 bytes is larger than cache.max_size (1048576 bytes)"),
    # enumerations
    ('[log]\nlevel = "verbose"',
     'log.level: "verbose" is not one of "debug", "info", "warning", "error"'),
    ('[log]\naccess_format = "common"',
     'log.access_format: "common" is not "combined", "json" or a template of {fields} such as '
     '"{client_ip} {method} {target} {status}"'),
    # required keys
    ("[cache]\nmax_size = 1", "cache.path: missing (required)"),
    ('[[route]]\npath = "/x"', "route[1].pool: missing (required)"),
    ("[[listen]]\nbacklog = 5", "listen[1].bind: missing (required)"),
    ("[pool.x]\nkeepalive = 1", "pool.x.backends: missing (required)"),
    # binds
    ('[[listen]]\nbind = "127.0.0.1:99999"', 'listen[1].bind: "127.0.0.1:99999" port out of range'),
    ('[[listen]]\nbind = "127.0.0.1:http"', 'listen[1].bind: "127.0.0.1:http" has no valid port'),
    ('[[listen]]\nbind = "8080"', 'listen[1].bind: "8080" is not host:port'),
    ('[[listen]]\nbind = "::1:8080"',
     'listen[1].bind: "::1:8080": an IPv6 address goes in brackets, e.g. "[::1]:8080"'),
    ('[[listen]]\nbind = "[::g]:8080"', 'listen[1].bind: "[::g]:8080" is not "[IPv6 address]:port"'),
    ('[[listen]]\nbind = "bad host:80"', 'listen[1].bind: "bad host:80" has an invalid host'),
    ('[[listen]]\nbind = "127.0.0.1:8080"',
     'listen[1].bind: "127.0.0.1:8080" is already used by listen[0]'),
    ('[[listen]]\nbind = ":81"\n[[listen]]\nbind = "0.0.0.0:81"',
     'listen[2].bind: "0.0.0.0:81" is already used by listen[1]'),
    ('[[listen]]\nbind = ":81"\nredirect_http = true',
     "listen[1].redirect_http: true but no listener has tls to redirect to"),
    # backends
    ('[pool.x]\nbackends = ["htp://x"]',
     'pool.x.backends[0]: "htp://x" is not an http:// or https:// URL'),
    ('[pool.x]\nbackends = ["127.0.0.1:5000"]',
     'pool.x.backends[0]: "127.0.0.1:5000" is not an http:// or https:// URL'),
    ('[pool.x]\nbackends = ["http://"]', 'pool.x.backends[0]: "http://" has no host'),
    ('[pool.x]\nbackends = ["http://:80"]', 'pool.x.backends[0]: "http://:80" has no host'),
    ('[pool.x]\nbackends = ["http://u:p@h"]', 'pool.x.backends[0]: "http://u:p@h" must not contain user info'),
    ('[pool.x]\nbackends = ["http://h/api"]', 'pool.x.backends[0]: "http://h/api" must not have a path'),
    ('[pool.x]\nbackends = ["http://h?a=1"]', 'pool.x.backends[0]: "http://h?a=1" must not have a path'),
    ('[pool.x]\nbackends = ["http://h:70000"]', 'pool.x.backends[0]: "http://h:70000" port out of range'),
    ('[pool.x]\nbackends = ["http://h:0"]', 'pool.x.backends[0]: "http://h:0" port out of range'),
    ('[pool.x]\nbackends = ["http://h:x"]', 'pool.x.backends[0]: "http://h:x" has no valid port'),
    ('[pool.x]\nbackends = ["http://999.1.1.1"]', 'pool.x.backends[0]: "http://999.1.1.1" has an invalid host'),
    ('[pool.x]\nbackends = ["http://::1"]', 'pool.x.backends[0]: "http://::1": an IPv6 address goes in brackets'),
    ('[pool.x]\nbackends = ["http://h weight=0"]', 'pool.x.backends[0]: "weight=0": weight must be from 1 to 1000'),
    ('[pool.x]\nbackends = ["http://h wieght=3"]',
     'pool.x.backends[0]: unknown backend option "wieght=3" (use "weight=N" and/or "backup")'),
    ('[pool.x]\nbackends = [""]', 'pool.x.backends[0]: expected a backend URL, got ""'),
    ('[pool.x]\nbackends = [5000]', "pool.x.backends[0]: expected a string, got 5000"),
    ('[pool.x]\nbackends = []', "pool.x.backends: empty: at least one backend URL is required"),
    ('[pool.x]\nbackends = ["http://h", "http://H:80/"]',
     'pool.x.backends[1]: "http://H:80/" is already listed as backends[0]'),
    ('[pool.x]\nbackends = ["http://h backup"]',
     "pool.x.backends: every backend is a backup; at least one must not be"),
    ('[pool."my pool"]\nbackends = ["x"]',
     'pool."my pool".backends[0]: "x" is not an http:// or https:// URL'),
    # routes
    ('[[route]]\npath = "/x"\npool = "wbe"', 'route[1].pool: no pool named "wbe" (did you mean "web"?)'),
    ('[[route]]\npath = "api/"\npool = "web"', 'route[1].path: "api/" must start with "/"'),
    ('[[route]]\npath = "/a?b"\npool = "web"', 'route[1].path: "/a?b" must be a path only'),
    # a route path no request's routing path could ever start with
    ('[[route]]\npath = "/a//b/./"\npool = "web"',
     'route[1].path: "/a//b/./" is not in normal form: requests are routed on "/a/b/", so write that'),
    ('[[route]]\npath = "/%61dmin/%3a"\npool = "web"',
     'route[1].path: "/%61dmin/%3a" is not in normal form: requests are routed on "/admin/%3A"'),
    ('[[route]]\npath = "/a%2Fb/"\npool = "web"',
     'route[1].path: "/a%2Fb/" can never match: requests with it are refused '
     '(encoded slash (%2F) in the path)'),
    ('[[route]]\npath = "/../x"\npool = "web"', 'route[1].path: "/../x" can never match'),
    ('[[route]]\npath = "/caf\u00e9/"\npool = "web"', 'route[1].path: "/café/" must be ASCII'),
    ('[server]\nnormalize_target = "yes"',
     'server.normalize_target: expected true or false, got "yes"'),
    ('[[route]]\nhost = "a.*.com"\npool = "web"',
     'route[1].host: "a.*.com" is not a host name or a "*.example.com" pattern'),
    ('[[route]]\nhost = "**.example.com"\npool = "web"', 'route[1].host: "**.example.com" is not a host name'),
    ('[[route]]\nhost = "a.com:8080"\npool = "web"', 'route[1].host: "a.com:8080" is not a host name'),
    ('[[route]]\npool = "web"', "route[1]: same host and path as route[0]; it would never be used"),
    ('[[route]]\npath = "/c"\npool = "web"\ncache = true',
     "route[1].cache: true but there is no [cache] section"),
    # listener TLS
    ('[[listen]]\nbind = ":443"\ntls.certs = []',
     "listen[1].tls.certs: empty: at least one { cert = ..., key = ... } is required"),
    ('[[listen]]\nbind = ":443"\ntls.min_version = "1.2"', "listen[1].tls.certs: missing (required)"),
    ('[[listen]]\nbind = ":443"\ntls.certs = [ { cert = "nope.pem" } ]',
     'listen[1].tls.certs[0].cert: "nope.pem" not found (looked for '),
    ('[[listen]]\nbind = ":443"\ntls.certs = [ { cert = "nope.pem" } ]',
     "listen[1].tls.certs[0].key: missing (required)"),
    ('[[listen]]\nbind = ":443"\ntls.certs = [ { cert = 1, key = "k" } ]',
     "listen[1].tls.certs[0].cert: expected a string, got 1"),
    ('[[listen]]\nbind = ":443"\ntls.certs = [ "a.pem" ]',
     'listen[1].tls.certs[0]: expected a table, got "a.pem"'),
    ('[[listen]]\nbind = ":443"\ntls.certs = []\ntls.min_version = 1.2',
     'listen[1].tls.min_version: expected one of "1.2", "1.3", got 1.2'),
    ('[[listen]]\nbind = ":443"\ntls.certs = []\ntls.min_version = "1.1"',
     'listen[1].tls.min_version: "1.1" is not one of "1.2", "1.3"'),
    ('[[listen]]\nbind = ":443"\ntls.certs = []\ntls.client_ca = "ca.pem"',
     'listen[1].tls.client_ca: "ca.pem" not found'),
    ('[pool.x]\nbackends = ["https://h"]\ntls.ca = "nope.pem"', 'pool.x.tls.ca: "nope.pem" not found'),
    ('[pool.x]\nbackends = ["https://h"]\ntls.server_name = "*.h"',
     'pool.x.tls.server_name: "*.h" is not a host name'),
]


@pytest.mark.parametrize("extra, expected", ERROR_CASES,
                         ids=[case[1][:60] for case in ERROR_CASES])
def test_error_names_the_key_and_the_problem(tmp_path, extra, expected):
    source = str(tmp_path / "edgeproxy.toml")  # files are looked for in an empty directory
    errors = errors_of(with_section(extra), source=source)
    assert any(e.startswith(expected) for e in errors), errors


def test_unreadable_and_directory_files(tmp_path):
    (tmp_path / "dir.pem").mkdir()
    write(tmp_path / "a.key")
    errors = errors_of(with_section("""
        [[listen]]
        bind = ":443"
        tls.certs = [ { cert = "dir.pem", key = "a.key" } ]
        """), source=str(tmp_path / "x.toml"))
    assert errors == [f'listen[1].tls.certs[0].cert: "dir.pem" is not a file ({tmp_path}/dir.pem)']


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their mode")
def test_unreadable_file(tmp_path):
    write(tmp_path / "a.pem").chmod(0)
    write(tmp_path / "a.key")
    errors = errors_of(with_section("""
        [[listen]]
        bind = ":443"
        tls.certs = [ { cert = "a.pem", key = "a.key" } ]
        """), source=str(tmp_path / "x.toml"))
    assert errors[0].startswith('listen[1].tls.certs[0].cert: "a.pem" cannot be read: Permission')


def test_sections_of_the_wrong_shape():
    assert errors_of('server = 3\nlisten = [":80"]\n[route]\npool = "web"') == [
        "server: expected a table, got 3",
        "listen: expected an array of tables ([[listen]]), got an array",
        "route: expected an array of tables ([[route]]), got a table",
    ]


def test_a_file_needs_a_listener_and_a_route():
    assert errors_of('[pool.x]\nbackends = ["http://h"]') == [
        "listen: no listeners: add a [[listen]] table with a bind address",
        "route: no routes: add a [[route]] table naming a pool",
    ]


def test_route_without_any_pool_section():
    assert errors_of('[[listen]]\nbind = ":80"\n[[route]]\npool = "web"') == [
        'route[0].pool: no pool named "web"']


def test_client_cert_and_key_go_together(tmp_path):
    write(tmp_path / "c.pem")
    errors = errors_of(with_section("""
        [pool.x]
        backends = ["https://h"]
        tls.client_cert = "c.pem"
        """), source=str(tmp_path / "x.toml"))
    assert errors == ["pool.x.tls.client_key: missing (client_cert and client_key go together)"]


def test_redirect_on_a_tls_listener(tmp_path):
    write(tmp_path / "a.pem")
    write(tmp_path / "a.key")
    errors = errors_of(with_section("""
        [[listen]]
        bind = ":443"
        redirect_http = true
        tls.certs = [ { cert = "a.pem", key = "a.key" } ]
        """), source=str(tmp_path / "x.toml"))
    assert errors == ["listen[1].redirect_http: only a plain (non-TLS) listener can redirect to HTTPS"]


def test_every_error_is_collected():
    errors = errors_of("""
        [server]
        wokers = 2
        [[listen]]
        bind = "127.0.0.1:99999"
        [[listen]]
        bind = ":80"
        [[listen]]
        bind = "0.0.0.0:81"
        backlog = true
        [[route]]
        path = "/"
        pool = "api"
        [[route]]
        path = "/x/"
        host = "a b"
        pool = "apii"
        [pool.api]
        backends = ["htp://x", "http://ok:1"]
        [timeout]
        read = "sixty"
        [log]
        level = "loud"
        """)
    assert errors == [
        'server.wokers: unknown key (did you mean "workers"?)',
        'listen[0].bind: "127.0.0.1:99999" port out of range',
        "listen[2].backlog: expected an integer, got true",
        'route[1].host: "a b" is not a host name or a "*.example.com" pattern',
        'pool.api.backends[0]: "htp://x" is not an http:// or https:// URL',
        'timeout.read: expected a number, got "sixty"',
        'log.level: "loud" is not one of "debug", "info", "warning", "error"',
        # checks between sections still run on the items that had errors
        'route[1].pool: no pool named "apii" (did you mean "api"?)',
    ]


def test_config_error_str_lists_every_error():
    with pytest.raises(ConfigError) as info:
        parse_config(with_section("[server]\nwokers = 1\n[timeout]\nread = 0"), source="e.toml")
    assert str(info.value) == (
        "invalid configuration in e.toml (2 errors):\n"
        '  e.toml:9: server.wokers: unknown key (did you mean "workers"?)\n'
        "  e.toml:11: timeout.read: 0 must be greater than 0")
    assert info.value.source == "e.toml"
    assert info.value.locations == ["e.toml:9", "e.toml:11"]


def test_toml_syntax_error_names_the_line():
    errors = errors_of("[server\nworkers = 1", source="bad.toml")
    assert len(errors) == 1
    assert errors[0].startswith("bad.toml: invalid TOML: ")
    assert "line 1" in errors[0]


def test_load_missing_and_binary_files(tmp_path):
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path / "nope.toml")
    assert info.value.errors == [f"{tmp_path}/nope.toml: cannot read: No such file or directory"]
    binary = tmp_path / "bin.toml"
    binary.write_bytes(b"\xff\xfe[server]")
    with pytest.raises(ConfigError) as info:
        load_config(binary)
    assert info.value.errors == [f"{binary}: not UTF-8 text (byte 0)"]


# --- quick mode and overrides ----------------------------------------------------

def test_quick_config():
    config = quick_config(["127.0.0.1:8080", "[::1]:8080"],
                          ["http://127.0.0.1:5000", "http://127.0.0.1:5001 weight=2 backup"])
    assert [(lc.host, lc.port) for lc in config.listen] == [("127.0.0.1", 8080), ("::1", 8080)]
    assert config.routes == (RouteConfig(pool="default", path="/"),)
    pool = config.pools["default"]
    assert pool.name == "default"
    assert [(b.port, b.weight, b.backup) for b in pool.backends] == [(5000, 1, False), (5001, 2, True)]
    assert config.server == ServerConfig() and config.source is None


def test_quick_config_overrides_are_validated(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = quick_config([":0"], ["http://h"], server={"workers": 3},
                          log={"access_log": "a.log", "level": "debug"}, timeout={"read": 5})
    assert config.server.workers == 3
    assert config.log == LogConfig(level="debug", access_log=str(tmp_path / "a.log"))
    assert config.timeout.read == 5.0 and config.timeout.connect == 5.0
    with pytest.raises(ConfigError) as info:
        quick_config(["x"], [], server={"workers": -2})
    assert info.value.errors == [
        "server.workers: -2 must be 0 or more",  # in schema order: server first
        'listen[0].bind: "x" is not host:port (e.g. "127.0.0.1:8080", "[::1]:8080", ":8080")',
        "pool.default.backends: empty: at least one backend URL is required",
    ]
    with pytest.raises(ConfigError) as info:
        quick_config([], ["http://h"])
    assert info.value.errors == ["listen: no listeners: add a [[listen]] table with a bind address"]


def test_load_config_overrides_merge_into_sections(tmp_path):
    path = write(tmp_path / "e.toml", MINIMAL + "[server]\nworkers = 4\nserver_header = \"x\"\n")
    config = load_config(path, server={"workers": 2})
    assert config.server == ServerConfig(workers=2, server_header="x")
    config = load_config(path, listen=[{"bind": ":9999"}])
    assert [lc.port for lc in config.listen] == [9999]
