"""The shared memory of the limits: one zone per [[limit]] (its key table
and counters) and one array of access-list refusal counters, mapped
MAP_SHARED by the supervisor before it forks the workers, so that every
worker of the host counts into the same tables (as nginx's zones).  A
reload keeps the zones of limits that keep their name and size, so a
reload does not hand every client a fresh burst."""

from __future__ import annotations

import mmap

from edgeproxy import _ext
from edgeproxy.config.model import Config, RateLimitConfig

ACCESS_MAX = 4096                     # access lists counted (route and listener ones, ever)
_HEAD = _ext.ZONE_HEAD_BYTES
_BUCKET = _ext.ZONE_BUCKET_BYTES
_WAYS = _ext.ZONE_WAYS


def _shared_map(size: int) -> mmap.mmap:
    return mmap.mmap(-1, size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE)


def zone_bytes(size: int) -> int:
    """The mapping a limit with `size` keys takes."""
    return _HEAD + _BUCKET * max(2, -(-size // _WAYS))


class Registry:
    """The zones by limit name, and the access counters with their labels."""

    def __init__(self) -> None:
        self.zones: dict[str, tuple[int, mmap.mmap, object]] = {}   # name -> (size, map, zone)
        self.order: list[str] = []          # the current config's limits
        self.access_map = _shared_map(ACCESS_MAX * 8)
        self.access_labels: dict[str, int] = {}
        self.current_access: list[str] = []

    def prepare(self, config: Config) -> None:
        """Zones for config's limits (kept from before when name and size
        match) and counter indices for its access lists."""
        keep = {}
        for lim in config.rate_limits:
            old = self.zones.get(lim.name)
            if old is not None and old[0] == lim.size:
                keep[lim.name] = old
            else:
                m = _shared_map(zone_bytes(lim.size))
                keep[lim.name] = (lim.size, m, _ext.LimitZone(m))
        self.zones = keep
        self.order = [lim.name for lim in config.rate_limits]
        self.current_access = []
        for label in access_labels(config):
            self.access_index(label)
            self.current_access.append(label)

    def zone(self, lim: RateLimitConfig):
        entry = self.zones.get(lim.name)
        if entry is None or entry[0] != lim.size:     # a lone worker, or a new limit
            m = _shared_map(zone_bytes(lim.size))
            entry = self.zones[lim.name] = (lim.size, m, _ext.LimitZone(m))
        return entry[2]

    def access_index(self, label: str) -> int:
        i = self.access_labels.get(label)
        if i is None:
            i = len(self.access_labels)
            if i >= ACCESS_MAX:
                i = ACCESS_MAX - 1          # (the last counter then sums the rest)
            self.access_labels[label] = i
        return i

    def collect(self):
        """Prometheus exposition lines (a metrics COLLECTOR)."""
        out = ["# HELP edgeproxy_limit_requests_total Requests a rate limit counted, by result "
               "(passed, delayed, limited: answered 429, dry_run: would have been).",
               "# TYPE edgeproxy_limit_requests_total counter"]
        extra = []
        for name in self.order:
            entry = self.zones.get(name)
            if entry is None:
                continue
            c = entry[2].counters()
            lab = _esc(name)
            for result in ("passed", "delayed", "limited", "dry_run"):
                out.append(f'edgeproxy_limit_requests_total{{limit="{lab}",result="{result}"}} '
                           f'{c[result]}')
            extra.append((lab, c))
        out.append("# HELP edgeproxy_limit_evictions_total Keys whose state a full table "
                   "dropped for a new key.")
        out.append("# TYPE edgeproxy_limit_evictions_total counter")
        out += [f'edgeproxy_limit_evictions_total{{limit="{lab}"}} {c["evicted"]}'
                for lab, c in extra]
        out.append("# HELP edgeproxy_limit_store_errors_total Checks the Redis store did not "
                   "answer (the local limit, or on_store_error, decided).")
        out.append("# TYPE edgeproxy_limit_store_errors_total counter")
        out += [f'edgeproxy_limit_store_errors_total{{limit="{lab}"}} {c["store_errors"]}'
                for lab, c in extra]
        out.append("# HELP edgeproxy_access_denied_total Requests an access list refused (403).")
        out.append("# TYPE edgeproxy_access_denied_total counter")
        values = memoryview(self.access_map).cast("q")
        for label in self.current_access:
            out.append(f'edgeproxy_access_denied_total{{list="{_esc(label)}"}} '
                       f'{values[self.access_labels[label]]}')
        values.release()
        return out

    def access_denied(self) -> dict[str, int]:
        values = memoryview(self.access_map).cast("q")
        try:
            return {label: values[self.access_labels[label]] for label in self.current_access}
        finally:
            values.release()


def _esc(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def access_labels(config: Config) -> list[str]:
    """The label of each access list in config: "listen <bind>", "route <host><path>"."""
    out = [f"listen {lc.bind}" for lc in config.listen if lc.access]
    out += [f"route {r.host or ''}{r.path}" for r in config.routes if r.access]
    return out


_registry: Registry | None = None


def registry() -> Registry:
    """This process's registry (a worker inherits the supervisor's)."""
    global _registry
    if _registry is None:
        _registry = Registry()
    return _registry


def prepare_shared(config: Config) -> None:
    """The supervisor, before forking a generation's workers: make the
    shared memory they will find (and count the limits on /metrics)."""
    reg = registry()
    reg.prepare(config)
    from edgeproxy.metrics.exposition import COLLECTORS
    if reg.collect not in COLLECTORS:
        COLLECTORS.append(reg.collect)
