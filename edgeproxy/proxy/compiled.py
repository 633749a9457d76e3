"""The compiled phases of a route (ext/phases.pyx's Phase), in the order they
run: after the route's Python hooks, before the backend.  Each feature that
is a compiled phase (access lists, rate limits, auth, the firewall, rewrites
and redirects, header rules, static files, compression) adds one maker to
MAKERS; the cache's phase, which always takes the request, comes last.

A maker is `make(env, route_config, index) -> Phase | None`: None when the
route does not use the feature, so a route pays only for what it uses.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from edgeproxy._ext import PhaseSeq
from edgeproxy.limits import make_access_phase, make_limit_phase
from edgeproxy.toolkit import phases as toolkit


@dataclass
class BuildEnv:
    """What makers may use: the config, this worker's pools, its cache (or
    None), its Hooks (or None), and `shared`, worker-wide objects a feature
    builds once and its routes share (a limit table, a rule set)."""

    config: object
    pools: dict
    cache: object = None
    hooks: object = None
    shared: dict = field(default_factory=dict)


from edgeproxy.compress import make_compress_phase  # noqa: E402
from edgeproxy.static import make_static_phase  # noqa: E402

# (name, maker): run in this order; add a feature's maker at its place
MAKERS: list = [
    # first: what shapes every answer of the request (response rules, error
    # pages), so that an answer of any later phase has them
    ("answers", toolkit.make_answers),
    ("access", make_access_phase),      # allow/deny by client address: 403 (edgeproxy.limits)
    ("limits", make_limit_phase),       # rate limits: 429, or a bounded wait
    # the firewall goes here, before the toolkit's
    ("auth_basic", toolkit.make_auth_basic),
    ("redirect", toolkit.make_redirect),
    ("rewrite", toolkit.make_rewrite),               # strip_prefix, rewrite
    ("request_headers", toolkit.make_request_headers),
    # compression leaves a stage that runs before the cache's, so the cache
    # stores the compressed variant (a route with a pool only)
    ("compress", make_compress_phase),
    # static files answer every request of their route, so they come last,
    # just before the cache's place (a static route has no cache)
    ("static", make_static_phase),
]


def route_phase(env: BuildEnv, route_config, index: int, cache_phase):
    """The Route.phase for a route: None, one Phase, or a PhaseSeq."""
    items = []
    for _name, make in MAKERS:
        p = make(env, route_config, index)
        if p is not None:
            items.append(p)
    if cache_phase is not None:
        items.append(cache_phase)
    if not items:
        return None
    if len(items) == 1:
        return items[0]
    return PhaseSeq(items)
