"""Type stubs of the compiled core (ext/, built as edgeproxy._ext)."""
from collections.abc import Iterable
from typing import Any

# -- parser (docs/parser-contract.md) --

BODY_NONE: int
BODY_LENGTH: int
BODY_CHUNKED: int
BODY_CLOSE: int

class HTTPError(Exception):
    status: int
    message: str
    def __init__(self, status: int, message: str) -> None: ...

class ParseError(HTTPError): ...

class Request:
    method: bytes
    target: bytes
    version: int
    headers: list[tuple[bytes, bytes]]
    head_length: int
    host: bytes | None
    body: int
    content_length: int
    keep_alive: bool
    expect_continue: bool
    upgrade: bool
    connection_tokens: list[bytes]

class Response:
    status: int
    reason: bytes
    version: int
    headers: list[tuple[bytes, bytes]]
    head_length: int
    body: int
    content_length: int
    keep_alive: bool
    upgrade: bool

def parse_request(data: bytes, *, max_line: int = ..., max_head: int = ...,
                  max_fields: int = ...) -> Request | None: ...
def parse_response(data: bytes, *, method: bytes = ..., max_head: int = ...,
                   max_fields: int = ...) -> Response | None: ...
def normalize_path(target: bytes) -> bytes: ...
def path_is_normal(target: bytes) -> bool: ...

class ChunkedDecoder:
    done: bool
    def __init__(self, *, max_line: int = ..., max_trailer: int = ...) -> None: ...
    def feed(self, data: bytes) -> tuple[list[bytes], int]: ...

# -- the data plane (built by edgeproxy.proxy.build) --

class ProxySettings:
    def __init__(self, *, max_line: int = ..., max_head: int = ..., max_fields: int = ...,
                 max_body: int = ..., resp_max_head: int = ..., resp_max_fields: int = ...,
                 t_connect: float = ..., t_read: float = ..., t_send: float = ...,
                 t_header: float = ..., t_keepalive: float = ..., t_body: float = ...,
                 server_header: str = ...,
                 hide: Iterable[str] = ..., access_log: Any = ...,
                 normalize_target: bool = ..., log_fields: int = ...) -> None: ...
    max_body: int
    t_connect: float
    t_read: float
    t_send: float
    t_body: float
    log_fields: int
    def derive(self, *, max_body: int | None = ..., t_connect: float | None = ...,
               t_read: float | None = ..., t_send: float | None = ...,
               t_body: float | None = ...) -> ProxySettings: ...
    addr: ClientAddr | None   # trusted proxies and per-address limits (clientaddr.pyx)

class AddrSet:
    """CIDR blocks (IPv4, IPv6) to test client addresses against."""
    blocks: tuple[str, ...]
    def __init__(self, blocks: Iterable[str] = ...) -> None: ...
    def __contains__(self, ip: str | bytes) -> bool: ...

class ClientAddr:
    trusted: AddrSet | None
    forwarded: bool
    max_per_ip: int
    max_heads_per_ip: int
    def __init__(self, trusted: Iterable[str] = ..., real_ip_header: str = ...,
                 max_connections_per_ip: int = ..., max_pending_heads_per_ip: int = ...) -> None: ...

def client_addr_stats() -> dict[str, tuple[int, int]]: ...

class ProxyProtocolError(ValueError): ...

def parse_proxy_header(data: bytes | bytearray | memoryview) -> tuple[
    int, int, str, str, str | None, int, str | None, int] | None: ...
def proxy_header(version: int, src: str | None, sport: int, dst: str | None,
                 dport: int) -> bytes: ...

class ProxyHeaderConn:
    """A listener with proxy_protocol: reads the PROXY header, then hands over."""
    def __init__(self, lst: Listener) -> None: ...

class SharedMemory:
    def __init__(self, buffer: Any) -> None: ...

class Backend:
    host: str
    port: int
    path: str | None            # unix socket backends
    scheme: str
    name: str
    weight: int
    up: bool
    requests: int
    active: int
    proxy_protocol: int          # 1, 2: a PROXY header of that version on each connection
    def __init__(self, host: str, port: int, *, scheme: str = ..., weight: int = ...,
                 idle_max: int = ..., idle_timeout: float = ..., t_connect: float = ...,
                 ssl: Any = ..., server_hostname: str | None = ..., backup: bool = ...,
                 path: str | None = ...) -> None: ...
    @property
    def idle_count(self) -> int: ...
    def attach_health(self, mem: SharedMemory, offset: int) -> None: ...
    def healthy(self) -> bool: ...
    def available(self) -> bool: ...

class Pool:
    name: str
    backends: list[Backend]
    def __init__(self, name: str, backends: Iterable[Backend], *, balance: str = ...,
                 hash_key: str = ..., retries: int = ..., max_conns: int = ...,
                 queue_timeout: float = ..., slow_start: float = ..., failures: int = ...,
                 eject: float = ..., max_ejected: float = ...) -> None: ...
    def set_backends(self, backends: Iterable[Backend]) -> None: ...
    def pick_backend(self, key: Any = ..., avoid: Iterable[Backend] = ...) -> Backend | None: ...
    @property
    def queued(self) -> int: ...

class HookCall:
    name: str
    fn: Any
    is_async: bool
    def __init__(self, name: str, fn: Any, is_async: bool) -> None: ...

class Phase:
    """A compiled phase (its request hook is C-level)."""

class PhaseSeq(Phase):
    items: tuple[Phase, ...]
    def __init__(self, items: Any) -> None: ...

class StaticPhase(Phase):
    """route.static: files served from a directory (ext/static.pyx)."""
    root: str
    served: int
    def __init__(self, root: str, route_path: str, *, index: str = ..., fallback: str | None = ...,
                 cache_control: str | None = ..., symlinks: bool = ..., precompressed: bool = ...,
                 types: dict[bytes, bytes] | None = ..., compress: tuple[str, ...] = ...,
                 compress_types: tuple[str, ...] = ..., compress_min_size: int = ...) -> None: ...

class CompressPhase(Phase):
    """route.compress: responses compressed as they stream (ext/compress.pyx)."""
    offer: tuple[str, ...]
    min_size: int
    def __init__(self, offer: tuple[str, ...], types: Any, min_size: int) -> None: ...

# the operator's toolkit (ext/toolkit.pyx; built by edgeproxy/toolkit/phases.py)
class HeadEdits:
    """Field edits of one head: names dropped, lines added (docs/architecture.md)."""
    drop: tuple[bytes, ...]
    add: bytes
    tmpl: tuple | None
    always: bool
    wants_host: bool
    host: bytes | None
    def __init__(self, drop: Any = (), add: bytes = b"", tmpl: Any = None,
                 always: bool = False) -> None: ...
    def merged(self, other: HeadEdits) -> HeadEdits: ...

class Answers:
    """Error pages: status -> (content type, body)."""
    pages: dict[int, tuple[bytes, bytes]]
    backend: bool
    def __init__(self, pages: dict, backend: bool = False) -> None: ...

class AnswersPhase(Phase):
    resp: HeadEdits | None
    answers: Answers | None
    def __init__(self, resp: HeadEdits | None = None, answers: Answers | None = None) -> None: ...

class HeaderRulesPhase(Phase):
    req: HeadEdits
    def __init__(self, req: HeadEdits) -> None: ...

class RewritePhase(Phase):
    prefix: bytes | None
    rx: Any
    to: tuple
    def __init__(self, prefix: bytes | None = None, rx: Any = None, to: Any = ()) -> None: ...

class RedirectPhase(Phase):
    status: int
    reason: bytes
    to: tuple
    def __init__(self, status: int, to: tuple) -> None: ...

class AuthBasicPhase(Phase):
    checker: Any
    challenge: bytes
    forward: bool
    max_inflight: int
    def __init__(self, checker: Any, realm: str, forward: bool = False,
                 max_inflight: int = 32) -> None: ...

class PhaseChain:
    """A route's (or the listeners' connect phase's) hooks, by phase (docs/hooks.md)."""
    wants: int
    by_phase: tuple[list[HookCall], ...]
    pools: dict[str, Pool]
    timeout: float
    body_limit: int
    loop: Any
    def __init__(self, hooks: Iterable[tuple[str, Any]], pools: dict[str, Pool],
                 timeout: float = ..., body_limit: int = ..., loop: Any = ...) -> None: ...
    def wants_phase(self, name: str) -> bool: ...

class RequestCtx:
    """What every phase of one request sees (docs/hooks.md)."""
    client_ip: str
    scheme: str
    route: int | None
    connection: RequestCtx | None
    request_id: str | None
    vars: dict[str, Any]
    log: dict[str, Any]
    cache_key: str | None
    backend: str | None
    method: str
    target: str
    path: str
    query: str
    host: str
    pool: str
    headers: Any
    upstream_headers: Any
    status: int
    response_headers: Any
    duration: float
    bytes_in: int
    bytes_out: int
    upstream: str | None

class Route:
    cache: Any
    hot: HotIndex | None
    phases: PhaseChain | None
    phase: Any                  # the compiled phase (CacheRoutePhase on cache routes) or None
    cfg: ProxySettings | None   # the route's own limits and timeouts
    def __init__(self, host: str | None, path: str, pool: Pool, index: int = ...,
                 cache: Any = ...) -> None: ...

class HotEntry:
    key: bytes
    head: bytes
    parts: tuple[memoryview | bytes, ...]   # the body: slices of the LMDB map in a worker
    body_len: int
    body: bytes                 # a copy of parts, joined
    status: int
    age_base: float
    expires: float
    has_date: bool

class TransportsByFd:
    def __setitem__(self, key: int, value: object) -> None: ...
    def __getitem__(self, key: int) -> object: ...
    def __delitem__(self, key: int) -> None: ...
    def __contains__(self, key: object) -> bool: ...
    def __len__(self) -> int: ...
    def get(self, key: int, default: object = ...) -> object: ...

class HotIndex:
    budget: int
    body_max: int
    used: int
    margin: float
    hits: int
    synced: int
    def __init__(self, budget: int = ..., body_max: int = ..., margin: float = ...) -> None: ...
    def __len__(self) -> int: ...
    def attach_generation(self, buffer: Any) -> None: ...
    def detach_generation(self) -> None: ...
    def generation_changed(self) -> bool: ...
    def offer(self, key: bytes, head: bytes, body: bytes | tuple[memoryview | bytes, ...], status: int, age_base: float,
              expires: float) -> bool: ...
    def drop(self, key: bytes) -> bool: ...
    def keys(self) -> list[bytes]: ...
    def rebind(self, key: bytes, body: bytes | tuple[memoryview | bytes, ...] | None) -> bool: ...
    def clear(self) -> None: ...
    def get(self, key: bytes) -> HotEntry | None: ...
    def take_hits(self) -> int: ...

class Router:
    def __init__(self, routes: Iterable[Route]) -> None: ...
    def route_for(self, host: str | bytes, path: str | bytes) -> str | None: ...

class Listener:
    def __init__(self, cfg: ProxySettings, router: Router, proto: str = ...,
                 resp_extra: bytes = ..., redirect_port: int = ...,
                 subject_header: str | None = ..., subject_of: Any = ...,
                 tls_context: Any = ..., name: str = ...) -> None: ...
    name: str
    tls_context: Any        # https: the ssl.SSLContext its TLSServerConn run
    phases: PhaseChain | None   # global hooks with a connect phase
    max_conns: int               # open connections at most (this worker); 0 = no limit
    nconns: int
    proxy_protocol: bool
    pp_from: AddrSet | None
    access: AccessList | None   # allow/deny, checked before routing (ext/limits.pyx)
    def __call__(self) -> ClientConn | TLSServerConn | ProxyHeaderConn: ...

class ClientConn:
    state: int
    deadline: float
    def forward(self, pool: Pool, head: bytes) -> None: ...
    def refetch(self, pool: Pool, head: bytes) -> bool: ...
    def respond(self, head: bytes, body: bytes | tuple[memoryview | bytes, ...], status: int) -> None: ...

class TLSServerConn:
    """The TCP protocol of a TLS client connection and its ClientConn's transport."""
    def __init__(self, lst: Listener) -> None: ...
    def get_extra_info(self, name: str, default: Any = ...) -> Any: ...
    def write(self, data: Any) -> None: ...
    def close(self) -> None: ...
    def abort(self) -> None: ...

class UpstreamConn:
    state: int
    deadline: float

class TLSUpstreamConn(UpstreamConn): ...

ACCESS_LOG_CAPTURE: dict[str, int]

def set_clock(now: float, date_line: bytes | None = ...) -> None: ...
def set_draining(on: bool) -> None: ...
def stats() -> dict[str, int]: ...
def expire_timeouts() -> None: ...
def close_idle_clients(min_idle: float = ...) -> None: ...
RESOURCE_ERRNOS: frozenset[int]
def resource_error(kind: str, what: str) -> None: ...
def set_request_id_prefix(prefix: bytes) -> None: ...
def metrics_layout() -> dict[str, Any]: ...
def attach_metrics(region: Any, offset: int) -> None: ...
def set_pools(pools: Iterable[Pool]) -> None: ...
def pools_tick() -> None: ...
def retry_budget() -> dict[str, Any]: ...
def hash_key(value: bytes) -> int: ...
def clock() -> float: ...

# ---- access lists and rate limits (ext/limits.pyx, docs/limits.md) ----
LIMIT_COUNTERS: tuple[str, ...]
ZONE_HEAD_BYTES: int
ZONE_BUCKET_BYTES: int
ZONE_WAYS: int

class AccessList:
    label: str
    denied_count: int
    def __init__(self, rules: list[tuple[bool, int, bytes, int]], label: str = ...,
                 counters: Any = ..., index: int = ...) -> None: ...
    def allows(self, address: str) -> bool: ...

class AccessPhase(Phase):
    acl: AccessList
    def __init__(self, acl: AccessList) -> None: ...

class LimitZone:
    nbuckets: int
    def __init__(self, buf: Any) -> None: ...
    def counters(self) -> dict[str, int]: ...
    def check(self, key: int, rate: float, burst: int, delay: int = ...) -> tuple[int, float]: ...

class LimitRequest:
    client_ip: str
    method: str
    host: str
    target: str
    headers: list[tuple[str, str]]
    def header(self, name: str, default: Any = ...) -> Any: ...

class RateLimit:
    name: str
    zone: LimitZone
    store: Any
    policy_field: str
    def __init__(self, name: str, zone: LimitZone, rate: float, burst: int = ..., delay: int = ...,
                 key: str = ..., dry_run: bool = ..., hook: Any = ..., store: Any = ...,
                 deny_on_error: bool = ...) -> None: ...

class LimitPhase(Phase):
    limits: tuple[RateLimit, ...]
    def __init__(self, limits: Iterable[RateLimit], loop: Any = ...) -> None: ...

def limit_hash(lim: RateLimit, key: bytes) -> int: ...
