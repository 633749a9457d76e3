"""Static files from disk: a route that serves a directory itself, with no
backend (ext/static.pyx is the compiled phase; this package holds what is
decided once per route or only for the less common requests: the content
type table, conditional requests, Range, and content-coding negotiation)."""

from __future__ import annotations

from edgeproxy.static.conditional import evaluate
from edgeproxy.static.mime import content_type_table
from edgeproxy.static.negotiate import choose_encoding

__all__ = ["choose_encoding", "content_type_table", "evaluate", "make_static_phase"]


def make_static_phase(env, route_config, index: int):
    """The MAKERS entry (edgeproxy.proxy.compiled): a StaticPhase for a route
    with `static`, else None (a route without it pays nothing)."""
    sc = getattr(route_config, "static", None)
    if sc is None:
        return None
    from edgeproxy._ext import StaticPhase

    compress = tuple(getattr(route_config, "compress", ()) or ())
    return StaticPhase(sc.root, route_config.path, index=sc.index, fallback=sc.fallback,
                       cache_control=sc.cache_control, symlinks=sc.symlinks,
                       precompressed=sc.precompressed,
                       types=content_type_table(), compress=compress,
                       compress_types=tuple(getattr(route_config, "compress_types", ()) or ()),
                       compress_min_size=getattr(route_config, "compress_min_size", 0))
