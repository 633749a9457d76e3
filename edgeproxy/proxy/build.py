"""Turns a validated Config into the compiled core's objects (done once per
worker start or reload, never per request)."""

from __future__ import annotations

import os
import ssl
import sys

from edgeproxy._ext import (
    AddrSet,
    Backend,
    ClientAddr,
    Listener,
    PhaseChain,
    Pool,
    ProxySettings,
    Route,
    Router,
)
from edgeproxy.config.model import Config, ListenConfig, RouteConfig


def build_settings(config: Config, access_log=None) -> ProxySettings:
    from edgeproxy.toolkit.phases import defaults

    lim, t = config.limits, config.timeout
    settings = ProxySettings(
        max_line=lim.request_line,
        max_head=lim.header_size,
        max_fields=lim.header_count,
        max_body=lim.body_size,
        resp_max_head=lim.response_header_size,
        t_connect=t.connect,
        t_read=t.read,
        t_send=t.send,
        t_header=t.header,
        t_keepalive=t.keepalive,
        t_body=t.body,
        server_header=config.server.server_header,
        hide=config.server.hide_headers,
        access_log=access_log,
        normalize_target=config.server.normalize_target,
    )
    settings.addr = _client_addr(config)
    # the global response rules (`always`) and error pages, for answers no route shapes
    settings.resp_edits, settings.answers = defaults(config)
    return settings


def _client_addr(config: Config) -> ClientAddr | None:
    """The core's client-address settings; None when nothing uses them (so
    a connection pays one pointer test)."""
    s = config.server
    if not (s.trusted_proxies or s.max_connections_per_ip or s.max_pending_heads_per_ip):
        return None
    return ClientAddr(s.trusted_proxies, s.real_ip_header, s.max_connections_per_ip,
                      s.max_pending_heads_per_ip)


def build_pools(config: Config, client_tls=None) -> dict[str, Pool]:
    """One Pool per configured pool.  client_tls(pool_config) -> SSLContext
    gives the context for https backends."""
    pools = {}
    for name, pc in config.pools.items():
        backends = []
        for bc in pc.backends:
            ctx = None
            sni = None
            if bc.scheme == "https":
                if client_tls is None:
                    raise ValueError(f"pool.{name}: https backends need TLS support")
                ctx = client_tls(pc)
                sni = pc.tls.server_name or bc.host
            backends.append(Backend(bc.host, bc.port, scheme=bc.scheme, weight=bc.weight,
                                    idle_max=pc.keepalive, idle_timeout=pc.keepalive_timeout,
                                    t_connect=config.timeout.connect, ssl=ctx,
                                    server_hostname=sni, backup=bc.backup, path=bc.path))
            backends[-1].proxy_protocol = {"": 0, "v1": 1, "v2": 2}[pc.proxy_protocol]
        pools[name] = Pool(name, backends, balance=pc.balance, hash_key=pc.hash_key,
                           retries=pc.retries, max_conns=pc.max_conns,
                           queue_timeout=pc.queue_timeout, slow_start=pc.slow_start,
                           failures=pc.passive.failures, eject=pc.passive.eject,
                           max_ejected=pc.passive.max_ejected)
    return pools


class Hooks:
    """This worker's hook objects (each "module:attr" loaded once, so a
    global hook is one object on every route) and the chains built of them."""

    def __init__(self, config: Config, pools: dict[str, Pool], loop=None):
        from edgeproxy.phases import load_hook

        self.config = config
        self.pools = pools
        self.loop = loop
        self.objects: dict[str, object] = {}
        specs = list(config.server.hooks) + [h for r in config.routes for h in r.hooks]
        if specs and config.source:
            base = os.path.dirname(os.path.abspath(config.source))
            if base not in sys.path:
                sys.path.insert(0, base)
        for spec in specs:
            if spec not in self.objects:
                self.objects[spec] = load_hook(spec)

    def chain(self, specs) -> PhaseChain | None:
        """The chain of the global hooks then specs; None when there are none."""
        order = list(self.config.server.hooks) + list(specs)
        if not order:
            return None
        s = self.config.server
        return PhaseChain([(spec, self.objects[spec]) for spec in order], self.pools,
                          s.hooks_timeout, s.hooks_body_limit, self.loop)


def route_settings(settings: ProxySettings, rc: RouteConfig) -> ProxySettings | None:
    """The settings a route with its own max_body or timeouts runs on (a
    copy of the global ones); None for a route without (it costs nothing)."""
    t = rc.timeout
    if rc.max_body is None and t is None:
        return None
    return settings.derive(max_body=rc.max_body, t_read=t and t.read, t_send=t and t.send,
                           t_connect=t and t.connect, t_body=t and t.body)


def build_router(config: Config, pools: dict[str, Pool], cache=None, hooks: Hooks | None = None,
                 shared: dict | None = None, settings: ProxySettings | None = None) -> Router:
    """The routing table.  Route i of the config gets metrics row i + 1 (row
    0 counts requests no route took; see edgeproxy.metrics.route_labels).
    With `cache` (this worker's EdgeCache), routes with `cache = true` carry
    a cache phase and the others nothing; with `hooks`, routes with hooks
    (their own or global ones) carry their PhaseChain.  The compiled phases
    each route uses come from edgeproxy.proxy.compiled (`shared`: worker-wide
    objects they share, kept across calls by the caller).  `settings`: the
    listeners' ProxySettings, which routes with their own limits copy
    (build_settings(config) when not given)."""
    from edgeproxy.proxy.compiled import BuildEnv, route_phase

    env = BuildEnv(config, pools, cache, hooks, shared if shared is not None else {})
    routes = []
    no_pool = None
    for i, r in enumerate(config.routes):
        phase = None
        pool = pools.get(r.pool)
        if pool is None:         # a redirect route: its phase answers every request
            no_pool = no_pool or Pool("-", [])
            pool = no_pool
        if r.cache and cache is not None:
            from edgeproxy.cache.phase import CachePhase
            phase = CachePhase(cache, pool)
        route = Route(r.host, r.path, pool, i + 1, phase)
        if phase is not None:
            route.hot = cache.hot
        route.phase = route_phase(env, r, i, route.phase)
        if hooks is not None:
            route.phases = hooks.chain(r.hooks)
        if r.max_body is not None or r.timeout is not None:
            if settings is None:
                settings = build_settings(config)
            route.cfg = route_settings(settings, r)
        routes.append(route)
    return Router(routes)


def build_listener_factory(settings: ProxySettings, router: Router, listen: ListenConfig,
                           config: Config, tls_context: ssl.SSLContext | None = None,
                           hooks: Hooks | None = None) -> Listener:
    """See _listener; with `hooks`, global hooks with a connect phase run
    on each new connection."""
    lst = _listener(settings, router, listen, config, tls_context)
    lst.max_conns = listen.max_connections
    if listen.proxy_protocol:
        lst.proxy_protocol = True
        lst.pp_from = AddrSet(listen.proxy_protocol_from or config.server.trusted_proxies)
    if listen.access:
        from edgeproxy.limits import listener_access
        lst.access = listener_access(listen)
    if hooks is not None:
        chain = hooks.chain(())
        if chain is not None and chain.wants_phase("connect"):
            lst.phases = chain
    return lst


def _listener(settings: ProxySettings, router: Router, listen: ListenConfig,
              config: Config, tls_context: ssl.SSLContext | None) -> Listener:
    """The protocol factory of one listener: HTTPS ones (tls_context: the
    listener's ServerTLS.context, which its connections run OpenSSL with)
    add HSTS and the verified client subject; plain ones may redirect to
    the first HTTPS listener."""
    if listen.tls is not None:
        extra = b""
        if listen.tls.hsts:
            extra = b"Strict-Transport-Security: " + listen.tls.hsts.encode("latin-1") + b"\r\n"
        subject_of = None
        if listen.tls.client_ca:
            from edgeproxy.tls import client_subject

            def subject_of(transport):
                return client_subject(transport.get_extra_info("ssl_object"))
        return Listener(settings, router, "https", extra,
                        subject_header=listen.tls.client_subject_header, subject_of=subject_of,
                        tls_context=tls_context, name=listen.bind)
    redirect_port = 0
    if listen.redirect_http:
        redirect_port = next((lc.port for lc in config.listen if lc.tls is not None), 443)
    return Listener(settings, router, "http", b"", redirect_port=redirect_port, name=listen.bind)
