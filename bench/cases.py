"""The benchmark cases: one line each in CASES, run in the order listed."""
from __future__ import annotations

from dataclasses import dataclass

from bench.origin import CACHED_PREFIX, STATIC_PREFIX, UPLOAD_PATH, MiB

# How the contenders are set up for a case; a run restarts them when it changes.
PLAIN = "plain"   # plain HTTP listener, no cache
TLS = "tls"       # HTTPS listener on the run's certificate
CACHE = "cache"   # plain HTTP listener, responses under CACHED_PREFIX cached
LIMIT = "limit"   # plain, edgeproxy's "/" route has a local rate limit that never triggers
ACCESS = "access"  # plain, edgeproxy's "/" route has an allow list the client passes

# --cases also takes these group names; a run without --cases runs "core".
GROUPS = {"core": PLAIN, "tls": TLS, "cache": CACHE, "limit": LIMIT, "access": ACCESS}


@dataclass(frozen=True)
class Case:
    name: str
    path: str = "/1k.bin"
    connections: int = 50           # concurrent client connections
    close: bool = False             # "Connection: close": a new connection per request
    body_bytes: int = 0             # > 0: every request is a POST of this many bytes
    idle: bool = False              # memory case: hold `connections` idle keep-alive connections
    quick: bool = False             # part of --quick
    setup: str = PLAIN              # PLAIN, TLS or CACHE

    @property
    def method(self) -> str:
        return "POST" if self.body_bytes else "GET"

    @property
    def tls(self) -> bool:
        return self.setup == TLS

    @property
    def cached(self) -> bool:
        return self.setup == CACHE

    @property
    def group(self) -> str:
        return next(g for g, setup in GROUPS.items() if setup == self.setup)

    @property
    def per_handshake(self) -> bool:
        """Every request is a new TLS connection: req/s are handshakes/s."""
        return self.tls and self.close

    def describe(self) -> str:
        if self.idle:
            return f"{self.connections} idle keep-alive connections after one GET {self.path} each"
        conn = "Connection: close" if self.close else "keep-alive"
        text = f"{self.method} {self.path}, {self.connections} connections, {conn}"
        if self.per_handshake:
            return f"{text}, HTTPS: one TLS handshake (resumed by wrk) per request"
        if self.tls:
            return f"{text}, HTTPS"
        if self.cached:
            return f"{text}, cache hits (warmed and checked first)"
        if self.setup == LIMIT:
            return f"{text}, edgeproxy: one local rate limit (never reached)"
        if self.setup == ACCESS:
            return f"{text}, edgeproxy: an allow list (the client matches its third rule)"
        return text


CASES: dict[str, Case] = {case.name: case for case in (
    Case("get-1k", "/1k.bin", quick=True),
    Case("get-100k", "/100k.bin", quick=True),
    Case("get-1m", "/1m.bin"),
    Case("get-1k-hook", f"{CACHED_PREFIX}1k.bin"),   # edgeproxy: one no-op Python hook (request, log)
    Case("get-1k-c1000", "/1k.bin", connections=1000),
    Case("get-1k-close", "/1k.bin", close=True),
    Case("post-1m", UPLOAD_PATH, body_bytes=MiB),
    Case("static-1k", f"{STATIC_PREFIX}1k.bin"),      # files from disk: edgeproxy route.static, nginx alias
    Case("static-100k", f"{STATIC_PREFIX}100k.bin"),
    Case("idle-10k", "/1k.bin", connections=10_000, idle=True),
    Case("https-1k", "/1k.bin", setup=TLS),
    Case("https-handshake", "/1k.bin", close=True, setup=TLS),
    Case("cache-hit-1k", f"{CACHED_PREFIX}1k.bin", setup=CACHE),
    Case("cache-hit-100k", f"{CACHED_PREFIX}100k.bin", setup=CACHE),
    # what the abuse controls cost a route that has them: each against get-1k
    Case("get-1k-limit", "/1k.bin", setup=LIMIT),
    Case("get-1k-allow", "/1k.bin", setup=ACCESS),
)}
