"""The makers of the compiled access and limit phases of a route (listed
in edgeproxy.proxy.compiled.MAKERS), and a listener's access list."""

from __future__ import annotations

import asyncio

from edgeproxy import _ext
from edgeproxy.config.model import Config, ListenConfig
from edgeproxy.limits.rules import compile_access, load_key_function
from edgeproxy.limits.shared import registry


def _access_list(rules, label: str) -> _ext.AccessList:
    reg = registry()
    return _ext.AccessList(compile_access(rules), label, reg.access_map, reg.access_index(label))


def make_access_phase(env, route_config, index: int):
    """The route's access list, or None."""
    if not route_config.access:
        return None
    label = f"route {route_config.host or ''}{route_config.path}"
    return _ext.AccessPhase(_access_list(route_config.access, label))


def listener_access(listen: ListenConfig) -> _ext.AccessList | None:
    if not listen.access:
        return None
    return _access_list(listen.access, f"listen {listen.bind}")


def _rate_limit(env, lim) -> _ext.RateLimit:
    """One worker-wide RateLimit per [[limit]] (env.shared), so that a
    limit on several routes is one limit."""
    made = env.shared.setdefault("rate_limits", {})
    rl = made.get(lim.name)
    if rl is not None:
        return rl
    store = None
    if lim.store != "local":
        from edgeproxy.limits.redis import RedisLimiter
        store = RedisLimiter(lim, _loop())
        env.shared.setdefault("limit_stores", []).append(store)
    hook = None
    if lim.key not in ("ip", "route") and not lim.key.startswith(("header:", "cookie:")):
        hook = load_key_function(lim.key)
    rl = made[lim.name] = _ext.RateLimit(
        lim.name, registry().zone(lim), lim.rate, lim.burst, lim.delay, lim.key,
        lim.mode == "dry-run", hook, store, lim.on_store_error == "deny")
    return rl


def _loop():
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.get_event_loop()


def make_limit_phase(env, route_config, index: int):
    """The route's rate limits (server.limits first), or None."""
    config: Config = env.config
    names = list(dict.fromkeys((*config.server.limits, *route_config.limits)))
    if not names:
        return None
    by_name = {lim.name: lim for lim in config.rate_limits}
    return _ext.LimitPhase([_rate_limit(env, by_name[n]) for n in names], _loop())
