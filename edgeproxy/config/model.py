"""The validated configuration: plain frozen dataclasses, nothing else.

Everything the proxy reads from a TOML file (or from the quick-mode flags)
ends up as one of these objects.  `edgeproxy.config.load` builds them and is
the only place that knows about TOML; the rest of the code reads these.
"""
from __future__ import annotations

from dataclasses import dataclass, field

KiB = 1024
MiB = 1024 * KiB

# Response headers that give away backend software; always removed, whatever
# `server.hide_headers` says (lower-case).
BUILTIN_HIDDEN_HEADERS = ("server", "x-powered-by", "x-aspnet-version",
                          "x-aspnetmvc-version", "x-runtime")


# --- the operator's toolkit (checked by edgeproxy/toolkit/config.py) ---------

@dataclass(frozen=True)
class HeaderRules:
    """Field rules of one direction: `set` replaces, `add` appends, `remove`
    drops; values may hold {client_ip} {host} {scheme} {request_id} {route}."""
    set: tuple[tuple[str, str], ...] = ()
    add: tuple[tuple[str, str], ...] = ()
    remove: tuple[str, ...] = ()     # lower-case
    always: bool = False             # response rules: the proxy's own answers too


@dataclass(frozen=True)
class RewriteConfig:
    pattern: str                     # re2, on the routing path (`from` in the file)
    to: str                          # with $1..$9


@dataclass(frozen=True)
class RedirectConfig:
    to: str                          # with {path} {query} {request_uri} {host} {scheme}
    status: int = 302


@dataclass(frozen=True)
class ErrorPage:
    path: str
    content_type: str
    body: bytes                      # read at load


@dataclass(frozen=True)
class AuthBasicConfig:
    realm: str
    users: str                       # the htpasswd file (absolute)
    entries: tuple[tuple[str, str], ...]  # (user, hash), read at load
    forward: bool = False            # send the Authorization field on to the backend


@dataclass(frozen=True)
class ServerConfig:
    workers: int = 1                 # 0 = one per CPU
    server_header: str = ""          # "" sends no Server header
    hide_headers: tuple[str, ...] = ()  # extra response headers to remove (lower-case)
    grace: float = 30.0              # SIGTERM: seconds requests in flight get to finish
    drain_timeout: float = 300.0     # reload: seconds old workers keep long requests/WebSockets
    pid_file: str | None = None      # None: derived from the config path (edgeproxy.server.supervisor)
    admin: str | None = None         # admin listener as written, e.g. "127.0.0.1:9901"; None = off
    admin_host: str = ""             # parsed from `admin`
    admin_port: int = 0
    state_file: str | None = None    # where `edgeproxy status` reads pool state; None = derived
    hooks: tuple[str, ...] = ()      # "module:attr" phase hooks run on every route, first
    hooks_timeout: float = 1.0       # seconds one hook call may take; then 503
    hooks_body_limit: int = 1 * MiB  # request bodies buffered for request_body hooks; 413 beyond
    normalize_target: bool = False   # forward the normalised path instead of the path as received
    # the client's address (docs/configuration.md, "The client's address")
    trusted_proxies: tuple[str, ...] = ()   # CIDR blocks whose requests may name the client
    real_ip_header: str = "x-forwarded-for"  # x-forwarded-for | forwarded
    max_connections_per_ip: int = 0  # open connections per client address per worker; 0 = no limit
    max_pending_heads_per_ip: int = 0  # unfinished request heads per address per worker; 0 = no limit
    fd_reserve: int = 16             # descriptors kept free: accepting stops below; 0 = off
    limits: tuple[str, ...] = ()     # names of [[limit]]s applied to every route, first
    # defaults every route inherits (edgeproxy/toolkit/)
    request_headers: HeaderRules | None = None
    response_headers: HeaderRules | None = None
    error_pages: tuple[tuple[int, ErrorPage], ...] = ()
    error_pages_backend: bool = False

    @property
    def hidden_headers(self) -> frozenset[str]:
        """Every response header to remove: the built-in ones and `hide_headers`."""
        return frozenset(BUILTIN_HIDDEN_HEADERS) | frozenset(self.hide_headers)


@dataclass(frozen=True)
class CertConfig:
    cert: str                        # PEM file: the certificate, then its chain
    key: str                         # PEM file: the private key
    password: str | None = None      # for an encrypted key


@dataclass(frozen=True)
class ListenTLSConfig:
    certs: tuple[CertConfig, ...]    # the first one is the default (no or unknown SNI)
    min_version: str = "1.2"         # "1.2" or "1.3"
    hsts: str | None = None          # e.g. "max-age=31536000": sent as Strict-Transport-Security
    client_ca: str | None = None     # require and verify client certificates against this CA
    client_subject_header: str = "X-Client-Subject"  # the verified subject, sent to the backend


@dataclass(frozen=True)
class AccessRule:
    """One line of an access list: "allow 10.0.0.0/8", "deny 2001:db8::/32", "deny all"."""
    allow: bool
    network: str | None              # normal form "10.0.0.0/8"; None = all addresses
    text: str = ""                   # as written


@dataclass(frozen=True)
class ListenConfig:
    bind: str                        # as written: "127.0.0.1:8080", "[::1]:8080"
    host: str                        # parsed host (no brackets, lower-case); "" = all IPv4 interfaces
    port: int                        # 0 = any free port (tests)
    backlog: int = 2048
    tls: ListenTLSConfig | None = None  # HTTPS when set
    redirect_http: bool = False      # plain listener: answer 308 to the https:// URL
    max_connections: int = 0         # open connections per worker; beyond: 503 and close; 0 = no limit
    proxy_protocol: bool = False     # each connection starts with a PROXY header (v1 or v2)
    proxy_protocol_from: tuple[str, ...] | None = None  # who may send it; None = server.trusted_proxies
    access: tuple[AccessRule, ...] = ()  # allow/deny by client address; first match wins; 403


@dataclass(frozen=True)
class BackendConfig:
    url: str                         # as written, e.g. "http://127.0.0.1:5000"; "unix:/abs/path"
    scheme: str                      # "http" or "https"
    host: str                        # lower-case, no brackets for IPv6; "localhost" for unix
    port: int                        # 80 / 443 when the URL has none; 0 for unix
    weight: int = 1
    backup: bool = False
    path: str | None = None          # a unix socket backend's absolute path

    @property
    def name(self) -> str:
        """How logs, metrics and the admin API name it: "host:port",
        "[v6]:port" or "unix:/path" (as edgeproxy._ext.Backend.name)."""
        if self.path is not None:
            return "unix:" + self.path
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True)
class PoolTLSConfig:
    verify: bool = True              # verify the backend's chain and name
    ca: str | None = None            # CA file; None = the system trust store
    server_name: str | None = None   # SNI and the name verified; None = the backend's host
    client_cert: str | None = None   # mTLS toward the backend
    client_key: str | None = None


@dataclass(frozen=True)
class HealthConfig:
    path: str                        # GET this on every backend; 2xx/3xx (see expect) is a pass
    interval: float = 2.0            # seconds between two probes of one backend
    timeout: float = 1.0             # a probe without a complete answer by then fails
    rise: int = 2                    # consecutive passes that bring a down backend up
    fall: int = 3                    # consecutive failures that take an up backend down
    expect: tuple[int, int] = (200, 399)  # the statuses that pass, inclusive


@dataclass(frozen=True)
class PassiveConfig:
    failures: int = 5                # consecutive connect errors/resets/timeouts that eject; 0 = off
    eject: float = 10.0              # seconds out, doubled on each ejection in a row
    max_ejected: float = 0.5         # share of the primaries (or backups) ejected at once; never the last


@dataclass(frozen=True)
class PoolConfig:
    name: str
    backends: tuple[BackendConfig, ...]
    keepalive: int = 1024            # idle upstream connections kept per backend per worker
    keepalive_timeout: float = 60.0  # an idle upstream connection is closed after this
    tls: PoolTLSConfig = field(default_factory=PoolTLSConfig)  # used by https:// backends
    balance: str = "round_robin"     # round_robin | least_conn | p2c | hash
    hash_key: str = "ip"             # with hash: "ip", "header:<name>" or "cookie:<name>"
    health: HealthConfig | None = None  # active checks; None = off
    passive: PassiveConfig = field(default_factory=PassiveConfig)
    retries: int = 2                 # other backends tried for one request
    max_conns: int = 0               # outstanding requests per backend per worker; 0 = unlimited
    queue_timeout: float = 5.0       # a request queued for max_conns gets 503 after this
    slow_start: float = 0.0          # seconds over which a recovered backend's weight ramps up
    proxy_protocol: str = ""         # "v1" | "v2": a PROXY header on each backend connection; "" = off


@dataclass(frozen=True)
class StaticConfig:
    """A route's `static` table: files served from a directory, no backend
    (edgeproxy.static, ext/static.pyx)."""
    root: str                        # the directory (absolute once loaded)
    index: str = "index.html"        # served for a path ending in "/"; "" for none
    fallback: str | None = None      # "/index.html": served (200) for paths with no file
    cache_control: str | None = None # sent as Cache-Control with every file
    symlinks: bool = False           # follow symlinks that lead out of the root
    precompressed: bool = False      # serve name.zst / .br / .gz to clients accepting them


# media types compressed by default (`route.compress_types`)
DEFAULT_COMPRESS_TYPES = (
    "text/html", "text/css", "text/plain", "text/javascript", "text/xml", "text/csv",
    "text/markdown", "application/javascript", "application/json", "application/xml",
    "application/manifest+json", "application/wasm", "image/svg+xml",
    "application/x-javascript", "application/ld+json", "application/rss+xml",
    "application/atom+xml", "font/ttf", "font/otf",
)


@dataclass(frozen=True)
class RouteConfig:
    pool: str = ""                   # "" only for a static or a redirect route (no backend)
    path: str = "/"                  # prefix; the longest match wins
    host: str | None = None          # exact "a.example.com" or wildcard "*.example.com"
    cache: bool = False              # responses on this route may be cached
    hooks: tuple[str, ...] = ()      # "module:attr" phase hooks, after the global ones
    static: StaticConfig | None = None  # serve files from disk instead of a pool
    compress: tuple[str, ...] = ()   # content codings to compress with, by preference
    compress_types: tuple[str, ...] = DEFAULT_COMPRESS_TYPES  # media types compressed
    compress_min_size: int = 256     # bodies known to be smaller go as they are
    max_body: int | None = None      # this route's limits.body_size (None: the global one)
    timeout: RouteTimeoutConfig | None = None  # this route's own timeouts
    limits: tuple[str, ...] = ()     # names of [[limit]]s, after server.limits
    access: tuple[AccessRule, ...] = ()  # allow/deny by client address; first match wins; 403    # the operator's toolkit (edgeproxy/toolkit/)
    request_headers: HeaderRules | None = None
    response_headers: HeaderRules | None = None
    strip_prefix: bool = False
    rewrite: RewriteConfig | None = None
    redirect: RedirectConfig | None = None
    error_pages: tuple[tuple[int, ErrorPage], ...] = ()
    error_pages_backend: bool = False
    auth_basic: AuthBasicConfig | None = None


@dataclass(frozen=True)
class RouteTimeoutConfig:
    """A route's overrides of [timeout] (None: the global value)."""
    read: float | None = None
    send: float | None = None
    connect: float | None = None
    body: float | None = None


@dataclass(frozen=True)
class TimeoutConfig:
    connect: float = 5.0
    read: float = 60.0               # between two reads from a backend
    send: float = 60.0               # between two writes to a backend that make progress
    header: float = 10.0             # a client must send a complete request head within this
    keepalive: float = 75.0          # an idle client connection is closed after this
    body: float = 60.0               # between two reads of a request body (nginx's client_body_timeout)


@dataclass(frozen=True)
class LimitsConfig:
    request_line: int = 8 * KiB      # 414 beyond
    header_size: int = 32 * KiB      # 431 beyond (the whole request head)
    header_count: int = 100          # 431 beyond
    body_size: int = 100 * MiB       # 413 beyond; 0 = unlimited
    response_header_size: int = 64 * KiB  # a larger backend head is a 502


@dataclass(frozen=True)
class LogConfig:
    level: str = "info"              # debug | info | warning | error
    access_log: str | None = None    # a file path, "-" for stderr, None for off
    access_format: str = "combined"  # combined | json | a template of {fields}


@dataclass(frozen=True)
class CacheConfig:
    path: str                        # the LMDB environment (a directory); created if missing
    max_size: int = 1024 * MiB       # the map size; eviction keeps use under it
    max_object: int = 64 * MiB       # larger responses stream through uncached
    heuristic: bool = True           # heuristic freshness for Last-Modified responses
    stale_grace: float = 0.0         # seconds stale may be served when the backend fails
    # RFC 9213: response fields whose directives replace Cache-Control for
    # this cache (the first present and valid wins), and whether clients get them
    targeted: tuple[str, ...] = ("edgeproxy-cache-control", "cdn-cache-control")
    forward_targeted: bool = False
    # the purge bus: purges made here reach every edge on the same Redis stream
    purge_bus: str | None = None     # "redis://host:port/db", "rediss://...", "unix:///path"
    purge_bus_stream: str = "edgeproxy:purges"
    purge_bus_maxlen: int = 10000    # messages the stream keeps (approximately)


@dataclass(frozen=True)
class RateLimitConfig:
    """One [[limit]]: a GCRA rate limit (docs/limits.md)."""
    name: str
    rate: float                      # requests per second ("10r/s" = 10.0, "30r/m" = 0.5)
    rate_text: str = ""              # as written
    key: str = "ip"                  # ip | header:<name> | cookie:<name> | route | "module:attr"
    burst: int = 0                   # requests beyond the rate taken at once
    delay: int = 0                   # > 0: burst requests beyond this many wait; 0: none wait
    store: str = "local"             # local | redis://host:port/db
    mode: str = "enforce"            # enforce | dry-run
    on_store_error: str = "local"    # redis down: local (fail open to this host's limit) | deny
    size: int = 65536                # keys the local table holds (least recent evicted)


@dataclass(frozen=True)
class Config:
    listen: tuple[ListenConfig, ...]
    routes: tuple[RouteConfig, ...]
    pools: dict[str, PoolConfig]     # by name, in file order
    server: ServerConfig = field(default_factory=ServerConfig)
    timeout: TimeoutConfig = field(default_factory=TimeoutConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    log: LogConfig = field(default_factory=LogConfig)
    cache: CacheConfig | None = None  # no [cache] section: no cache
    rate_limits: tuple[RateLimitConfig, ...] = ()  # [[limit]] tables, in file order
    source: str | None = None        # the file it came from, if any
    files: tuple[str, ...] = field(default=(), compare=False)  # every file read: source first, then its includes
