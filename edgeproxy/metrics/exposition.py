"""Sums the workers' metrics slots (live ones, plus the counters of workers
that have exited, so totals never go down) and renders them as Prometheus
text or as the plain dict the admin /status returns."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from edgeproxy.metrics.region import BACKEND_WIDTH, GAUGES, LAYOUT

BOUNDS_US: list[int] = LAYOUT["duration_bounds_us"]
NBUCKETS = len(BOUNDS_US) + 1
CLASSES = ("other", "1xx", "2xx", "3xx", "4xx", "5xx")

# More metrics (cache, TLS, ...): append a function returning exposition
# lines ("# HELP"/"# TYPE" included); it is called on every scrape.
COLLECTORS: list[Callable[[], Iterable[str]]] = []


@dataclass
class SlotLabels:
    """What the rows of a worker's slot stand for (fixed per generation;
    backends added at run time are appended)."""
    routes: list[tuple[str, str]]                 # row -> (route, pool)
    backends: list[tuple[str, str]]               # table index -> (pool, backend)
    removed: set[int] = field(default_factory=set)  # backends removed at run time


# the reasons of edgeproxy_client_connections_refused_total, in slot order
REFUSED_REASONS = ("max_connections", "max_connections_per_ip", "max_pending_heads_per_ip",
                   "proxy_protocol")


@dataclass
class Counts:
    """Monotonic counters, by label."""
    requests: Counter = field(default_factory=Counter)          # (route, pool, class)
    backend_requests: Counter = field(default_factory=Counter)  # (pool, backend)
    duration: list[int] = field(default_factory=lambda: [0] * NBUCKETS)
    duration_sum_us: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    connections: int = 0
    tls_handshake_failures: int = 0
    hook_errors: int = 0
    hook_timeouts: int = 0
    refused: Counter = field(default_factory=Counter)   # client connections refused, by reason
    slow: Counter = field(default_factory=Counter)      # slow clients answered 408, by part

    def add_slot(self, v: memoryview, labels: SlotLabels) -> None:
        base = LAYOUT["routes"]
        rows = v[base:base + 6 * len(labels.routes)].tolist()
        for r, (route, pool) in enumerate(labels.routes):
            for c in range(6):
                n = rows[r * 6 + c]
                if n:
                    self.requests[(route, pool, CLASSES[c])] += n
        b = LAYOUT["duration_buckets"]
        for i, n in enumerate(v[b:b + NBUCKETS].tolist()):
            self.duration[i] += n
        self.duration_sum_us += v[LAYOUT["duration_sum_us"]]
        self.bytes_in += v[LAYOUT["bytes_in"]]
        self.bytes_out += v[LAYOUT["bytes_out"]]
        self.connections += v[LAYOUT["connections"]]
        self.tls_handshake_failures += v[LAYOUT["tls_handshake_failures"]]
        self.hook_errors += v[LAYOUT["hook_errors"]]
        self.hook_timeouts += v[LAYOUT["hook_timeouts"]]
        for i, reason in enumerate(REFUSED_REASONS):
            self.refused[reason] += v[LAYOUT["client_refused"] + i]
        for i, part in enumerate(("header", "body")):
            self.slow[part] += v[LAYOUT["client_slow"] + i]
        base = LAYOUT["backends"]
        for j, key in enumerate(labels.backends):
            n = v[base + j * BACKEND_WIDTH]
            if n:
                self.backend_requests[key] += n

    def plus(self, other: Counts) -> Counts:
        out = Counts(self.requests + other.requests,
                     self.backend_requests + other.backend_requests,
                     [a + b for a, b in zip(self.duration, other.duration, strict=True)],
                     self.duration_sum_us + other.duration_sum_us,
                     self.bytes_in + other.bytes_in, self.bytes_out + other.bytes_out,
                     self.connections + other.connections,
                     self.tls_handshake_failures + other.tls_handshake_failures,
                     self.hook_errors + other.hook_errors,
                     self.hook_timeouts + other.hook_timeouts,
                     self.refused + other.refused, self.slow + other.slow)
        return out


@dataclass
class Snapshot:
    counts: Counts
    gauges: dict[str, int]
    backends: dict[tuple[str, str], dict]     # (pool, backend) -> up, active, requests
    workers: int


class Totals:
    """The counters of workers that exited, and the sum with the live ones."""

    def __init__(self) -> None:
        self.retired = Counts()

    def retire(self, values: memoryview, labels: SlotLabels) -> None:
        """A worker exited: keep its counters (its gauges go with it)."""
        self.retired.add_slot(values, labels)

    def snapshot(self, live: list[tuple[memoryview, SlotLabels, bool]]) -> Snapshot:
        """live: (slot values, labels, in the current generation) per worker."""
        counts = Counts()
        gauges = dict.fromkeys(GAUGES, 0)
        backends: dict[tuple[str, str], dict] = {}
        for v, labels, current in live:
            counts.add_slot(v, labels)
            g = LAYOUT["gauges"]
            for k, name in enumerate(GAUGES):
                gauges[name] += v[g + k]
            base = LAYOUT["backends"]
            for j, key in enumerate(labels.backends):
                o = base + j * BACKEND_WIDTH
                active, up = v[o + 1], v[o + 2]
                if j in labels.removed:
                    continue
                entry = backends.get(key)
                if entry is None:
                    entry = backends[key] = {"pool": key[0], "backend": key[1], "up": None,
                                             "active": 0, "requests": 0}
                entry["active"] += active
                if current:   # health as the workers of the current config see it
                    entry["up"] = bool(up) if entry["up"] is None else entry["up"] and bool(up)
        counts = counts.plus(self.retired)
        for key, entry in backends.items():
            entry["requests"] = counts.backend_requests.get(key, 0)
            if entry["up"] is None:
                entry["up"] = False
        return Snapshot(counts, gauges, backends, len(live))


def _esc(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(**kv: str) -> str:
    return "{" + ",".join(f'{k}="{_esc(str(v))}"' for k, v in kv.items()) + "}"


def render_prometheus(snap: Snapshot, info: dict) -> str:
    """The text exposition format (version 0.0.4).  `info` is the
    supervisor's own state: reloads_ok, reloads_failed, restarts,
    config_checksum, config_loaded_at."""
    out: list[str] = []

    def metric(name: str, kind: str, help_: str, samples: Iterable[tuple[str, float]]) -> None:
        out.append(f"# HELP {name} {help_}")
        out.append(f"# TYPE {name} {kind}")
        for suffix_labels, value in samples:
            out.append(f"{name}{suffix_labels} {value}")

    c = snap.counts
    metric("edgeproxy_requests_total", "counter",
           "Requests answered, by route (host and path prefix), pool and status class.",
           [(_labels(route=r, pool=p, code=k), n) for (r, p, k), n in sorted(c.requests.items())])
    cumulative, buckets = 0, []
    for i, n in enumerate(c.duration):
        cumulative += n
        le = f"{BOUNDS_US[i] / 1e6:g}" if i < len(BOUNDS_US) else "+Inf"
        buckets.append((_labels(le=le), cumulative))
    out.append("# HELP edgeproxy_request_duration_seconds From the request head to the end "
               "of the response.")
    out.append("# TYPE edgeproxy_request_duration_seconds histogram")
    out.extend(f"edgeproxy_request_duration_seconds_bucket{lab} {n}" for lab, n in buckets)
    out.append(f"edgeproxy_request_duration_seconds_sum {c.duration_sum_us / 1e6}")
    out.append(f"edgeproxy_request_duration_seconds_count {cumulative}")
    metric("edgeproxy_client_received_bytes_total", "counter",
           "Bytes read from clients (heads, bodies, upgraded connections).", [("", c.bytes_in)])
    metric("edgeproxy_client_sent_bytes_total", "counter",
           "Bytes sent to clients (heads, bodies, upgraded connections).", [("", c.bytes_out)])
    metric("edgeproxy_client_connections_accepted_total", "counter",
           "Client connections accepted.", [("", c.connections)])
    metric("edgeproxy_tls_handshake_failures_total", "counter",
           "TLS handshakes from clients that failed (not TLS, no shared version or cipher, "
           "a refused client certificate, ...) or did not end within timeout.header.",
           [("", c.tls_handshake_failures)])
    metric("edgeproxy_hook_errors_total", "counter",
           "Phase hook calls that raised or returned something unusable (answered 500).",
           [("", c.hook_errors)])
    metric("edgeproxy_hook_timeouts_total", "counter",
           "Async phase hook calls that did not end within server.hooks_timeout (answered 503).",
           [("", c.hook_timeouts)])
    metric("edgeproxy_client_connections_refused_total", "counter",
           "Client connections refused: over a listener's max_connections or "
           "server.max_connections_per_ip (answered 503), over server.max_pending_heads_per_ip "
           "(closed), or without a valid PROXY header from an allowed source (closed).",
           [(_labels(reason=r), c.refused[r]) for r in REFUSED_REASONS])
    metric("edgeproxy_client_slow_total", "counter",
           "Requests answered 408: a head not whole within timeout.header, or a body that "
           "stalled for timeout.body.",
           [(_labels(part=p), c.slow[p]) for p in ("header", "body")])
    metric("edgeproxy_client_connections", "gauge", "Open client connections.",
           [("", snap.gauges["client_connections"])])
    metric("edgeproxy_upstream_connections", "gauge", "Open backend connections.",
           [("", snap.gauges["upstream_connections"])])
    metric("edgeproxy_upstream_idle_connections", "gauge",
           "Backend connections idle in keep-alive pools.", [("", snap.gauges["upstream_idle"])])
    backends = sorted(snap.backends.values(), key=lambda e: (e["pool"], e["backend"]))
    metric("edgeproxy_backend_up", "gauge", "1 when the backend takes requests.",
           [(_labels(pool=e["pool"], backend=e["backend"]), int(e["up"])) for e in backends])
    metric("edgeproxy_backend_active_requests", "gauge", "Requests outstanding at the backend.",
           [(_labels(pool=e["pool"], backend=e["backend"]), e["active"]) for e in backends])
    metric("edgeproxy_backend_requests_total", "counter", "Requests sent to the backend.",
           [(_labels(pool=p, backend=b), n) for (p, b), n in sorted(c.backend_requests.items())])
    metric("edgeproxy_workers", "gauge", "Worker processes running (all generations).",
           [("", snap.workers)])
    metric("edgeproxy_worker_restarts_total", "counter",
           "Workers that died unexpectedly and were replaced.", [("", info["restarts"])])
    metric("edgeproxy_config_reloads_total", "counter", "Configuration reloads, by result.",
           [(_labels(result="ok"), info["reloads_ok"]),
            (_labels(result="failed"), info["reloads_failed"])])
    metric("edgeproxy_config_loaded_timestamp_seconds", "gauge",
           "When the configuration in use was loaded.", [("", info["config_loaded_at"])])
    metric("edgeproxy_config_info", "gauge", "The checksum of the configuration in use.",
           [(_labels(checksum=info["config_checksum"]), 1)])
    for collect in COLLECTORS:
        out.extend(collect())
    return "\n".join(out) + "\n"
