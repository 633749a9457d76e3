"""The reverse proxies compared: how each is configured, started and named."""
from __future__ import annotations

import http.client
import os
import shutil
import ssl
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from bench.cases import ACCESS, CACHE, LIMIT, PLAIN, TLS
from bench.certs import RunCert
from bench.origin import CACHED_PREFIX, STATIC_PREFIX, nginx_binary, nginx_user_line, static_root
from bench.servers import Pinning, Server
from bench.templates import fill

REPO = Path(__file__).resolve().parent.parent
CACHE_MIB = 64                  # every contender's cache size (HAProxy's is shared memory)
CACHE_MAX_OBJECT = 1024 * 1024  # bytes: the 100 KiB case fits, in all three


@dataclass(frozen=True)
class Setup:
    """What a contender's launch needs to know about this run."""
    workdir: Path
    port: int
    origin_port: int
    nofile: int          # RLIMIT_NOFILE the proxies may use
    pinning: Pinning
    setup: str = PLAIN   # PLAIN, TLS or CACHE (bench.cases)
    cert: RunCert | None = None  # needed for TLS

    def tls_cert(self) -> RunCert:
        if self.cert is None:
            raise ValueError("an HTTPS contender needs the run's certificate")
        return self.cert

    def client_tls(self) -> ssl.SSLContext | None:
        return self.tls_cert().client_context() if self.setup == TLS else None


class Contender:
    name = ""

    def missing(self) -> str | None:
        """Why this contender cannot run here, or None."""
        return None

    def version(self) -> str:
        return ""

    def server(self, setup: Setup) -> Server:
        raise NotImplementedError

    def cache_status(self, headers: http.client.HTTPMessage) -> tuple[bool, str]:
        """(answered from the cache?, the header that says so, as received)."""
        value = headers.get("X-Cache-Status") or ""
        return value.upper() == "HIT", f"X-Cache-Status: {value or '(none)'}"


class NginxProxy(Contender):
    """worker_processes 1, upstream keepalive 1024, HTTP/1.1 upstream, default buffering."""
    name = "nginx"

    def missing(self) -> str | None:
        return None if nginx_binary() else "nginx is not installed (apt-get install nginx-light)"

    def version(self) -> str:
        return _first_line([nginx_binary() or "nginx", "-v"])

    def server(self, setup: Setup) -> Server:
        conf = setup.workdir / f"nginx-proxy-{setup.setup}.conf"
        tls = cache_zone = cache_location = ""
        if setup.setup == TLS:
            cert = setup.tls_cert()
            tls = fill("nginx-proxy-tls.conf", CERT=cert.cert, KEY=cert.key, CIPHERS=cert.ciphers)
        if setup.setup == CACHE:
            cache_zone = (f"    proxy_cache_path {setup.workdir}/nginx-proxy-cache levels=1:2 "
                          f"keys_zone=bench_cache:10m max_size={CACHE_MIB}m inactive=60m "
                          f"use_temp_path=off;")
            cache_location = fill("nginx-proxy-cache.conf", CACHED_PREFIX=CACHED_PREFIX)
        static_location = ""
        if setup.setup == PLAIN:
            static_location = fill("nginx-proxy-static.conf", STATIC_PREFIX=STATIC_PREFIX,
                                   STATIC_ROOT=static_root(setup.workdir))
        conf.write_text(fill("nginx-proxy.conf", USER=nginx_user_line(), NOFILE=setup.nofile,
                             WORKER_CONNECTIONS=setup.nofile - 64, WORKDIR=setup.workdir,
                             PORT=setup.port, ORIGIN_PORT=setup.origin_port,
                             LISTEN_SSL=" ssl" if tls else "", TLS=tls,
                             CACHE_ZONE=cache_zone, CACHE_LOCATION=cache_location,
                             STATIC_LOCATION=static_location))
        argv = [nginx_binary() or "nginx", "-p", str(setup.workdir), "-c", str(conf),
                "-e", str(setup.workdir / "nginx-proxy-error.log")]
        return Server(self.name, setup.pinning.for_proxy(argv), setup.port,
                      setup.workdir / "nginx-proxy.log", client_tls=setup.client_tls())


class HAProxy(Contender):
    """nbthread 1, mode http, keep-alive both sides with http-reuse always."""
    name = "haproxy"

    def missing(self) -> str | None:
        if shutil.which("haproxy") is None:
            return "haproxy is not installed (apt-get install haproxy)"
        return None

    def version(self) -> str:
        return _first_line(["haproxy", "-v"])

    def server(self, setup: Setup) -> Server:
        conf = setup.workdir / f"haproxy-{setup.setup}.cfg"
        bind_tls = cache_rules = cache_section = ""
        if setup.setup == TLS:
            cert = setup.tls_cert()
            # A session cache (tune.ssl.cachesize) and tickets are on by default.
            bind_tls = (f" ssl crt {cert.combined} ssl-min-ver TLSv1.2 "
                        f"ciphers {cert.ciphers} alpn http/1.1")
        if setup.setup == CACHE:
            cache_rules = fill("haproxy-cache.cfg", CACHED_PREFIX=CACHED_PREFIX)
            cache_section = (f"cache bench_cache\n    total-max-size {CACHE_MIB}\n"
                             f"    max-object-size {CACHE_MAX_OBJECT}\n"
                             f"    # the default, 60 s, would cut the origin's max-age=600\n"
                             f"    max-age 600\n")
        conf.write_text(fill("haproxy.cfg", PORT=setup.port, ORIGIN_PORT=setup.origin_port,
                             BIND_TLS=bind_tls, CACHE_RULES=cache_rules,
                             CACHE_SECTION=cache_section))
        argv = ["haproxy", "-db", "-f", str(conf)]  # -db: foreground, one process
        return Server(self.name, setup.pinning.for_proxy(argv), setup.port,
                      setup.workdir / "haproxy.log", client_tls=setup.client_tls())


class EdgeProxy(Contender):
    """This repository's proxy, started from the working tree with a generated
    configuration file: one worker, its defaults otherwise."""
    name = "edgeproxy"
    hooks = True          # the tree knows route.hooks (get-1k-hook)
    static = True         # the tree knows route.static (static-1k, static-100k)
    limits = True         # the tree knows [[limit]] and route.access (get-1k-limit, -allow)

    @property
    def repo(self) -> Path:
        return REPO

    def missing(self) -> str | None:
        if not (self.repo / "edgeproxy" / "__main__.py").exists():
            return "edgeproxy has no __main__ yet (python -m edgeproxy does not exist)"
        return None

    def version(self) -> str:
        return "working tree (see commit)"

    def config_text(self, setup: Setup) -> str:
        listen_tls = cached_route = cache = route_extra = limits = ""
        if setup.setup == TLS:
            cert = setup.tls_cert()
            listen_tls = f"tls.certs = [{{ cert = {_toml(cert.cert)}, key = {_toml(cert.key)} }}]"
        if setup.setup == PLAIN:
            # get-1k-hook: what one Python hook (bench/hooks.py) costs beside get-1k
            cached_route = f'\n[[route]]\npath = "{CACHED_PREFIX}"\npool = "origin"\n'
            if self.hooks:
                cached_route += 'hooks = ["bench.hooks:Noop"]'
            if self.static:
                # static-1k, static-100k: files from disk (route.static)
                root = static_root(setup.workdir)
                cached_route += (f'\n\n[[route]]\npath = "{STATIC_PREFIX}"\n'
                                 f'static = {{ root = {_toml(root)} }}\n')

        if setup.setup == LIMIT and self.limits:
            # a limit wrk never reaches: what checking it costs each request
            route_extra = 'limits = ["bench"]'
            limits = '[[limit]]\nname = "bench"\nrate = "1000000r/s"\nburst = 100000\n'
        if setup.setup == ACCESS and self.limits:
            route_extra = ('access = ["allow 10.0.0.0/8", "allow 192.168.0.0/16", '
                           '"allow 127.0.0.0/8", "deny all"]')
        if setup.setup == CACHE:
            cached_route = f'\n[[route]]\npath = "{CACHED_PREFIX}"\npool = "origin"\ncache = true'
            cache_dir = setup.workdir / f"edgeproxy-cache-{setup.port}"
            cache = (f"\n[cache]\npath = {_toml(cache_dir)}\nmax_size = \"{CACHE_MIB}MiB\"\n"
                     f"max_object = {CACHE_MAX_OBJECT}")
        return fill("edgeproxy.toml", WORKDIR=setup.workdir, PORT=setup.port,
                    ORIGIN_PORT=setup.origin_port, LISTEN_TLS=listen_tls,
                    CACHED_ROUTE=cached_route, CACHE=cache, ROUTE_EXTRA=route_extra,
                    LIMITS=limits)

    def server(self, setup: Setup) -> Server:
        conf = setup.workdir / f"edgeproxy-{setup.setup}-{setup.port}.toml"
        conf.write_text(self.config_text(setup))
        argv = [sys.executable, "-m", "edgeproxy", "run", "-c", str(conf)]
        env = dict(os.environ)
        # bench.hooks comes from this repository whatever tree the proxy runs from
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(self.repo), str(REPO),
                                                          env.get("PYTHONPATH")]))
        return Server(self.name, setup.pinning.for_proxy(argv), setup.port,
                      setup.workdir / f"{self.name}.log", env=env, cwd=str(self.repo),
                      client_tls=setup.client_tls())

    def cache_status(self, headers: http.client.HTTPMessage) -> tuple[bool, str]:
        value = headers.get("Cache-Status") or ""
        params = [p.strip() for p in value.split(";")]
        return "hit" in params[1:], f"Cache-Status: {value or '(none)'}"


class EdgeProxyBase(EdgeProxy):
    """edgeproxy from another checkout (EDGEPROXY_BENCH_BASE: a clone at an
    earlier commit, its extension built in place), so that a change is
    measured before and after in one run, alternated with the others.  Its
    get-1k-hook route has no hook and its get-1k-limit/-allow routes have no
    limit or list (an earlier tree may not know the keys)."""
    name = "edgeproxy-base"
    hooks = False
    static = False
    limits = False

    @property
    def repo(self) -> Path:
        return Path(os.environ.get("EDGEPROXY_BENCH_BASE", "")).resolve()

    def missing(self) -> str | None:
        if not os.environ.get("EDGEPROXY_BENCH_BASE"):
            return "EDGEPROXY_BENCH_BASE names no checkout to compare with"
        return super().missing()

    def version(self) -> str:
        return _first_line(["git", "-C", str(self.repo), "log", "-1", "--format=%h %s"])


CONTENDERS: dict[str, Contender] = {c.name: c for c in (NginxProxy(), HAProxy(), EdgeProxy(),
                                                        EdgeProxyBase())}


def _toml(path: Path) -> str:
    """A path as a TOML basic string."""
    return '"' + str(path).replace("\\", "\\\\").replace('"', '\\"') + '"'


def _first_line(argv: list[str]) -> str:
    try:
        done = subprocess.run(argv, check=False, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"unknown ({exc})"
    lines = (done.stdout + done.stderr).strip().splitlines()
    return lines[0].strip() if lines else "unknown"
