"""Abuse controls: rate limits ([[limit]], GCRA, shared by a host's workers
in shared memory or by a fleet through Redis) and allow/deny lists by
client address.  The per-request work is compiled (ext/limits.pyx); this
package builds it from the config, owns the shared memory, talks to Redis
and exposes the counters.  docs/limits.md says how it works."""

from edgeproxy.limits.phase import listener_access, make_access_phase, make_limit_phase
from edgeproxy.limits.shared import prepare_shared, registry

__all__ = ["make_access_phase", "make_limit_phase", "listener_access", "prepare_shared",
           "registry"]
