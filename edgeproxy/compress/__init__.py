"""Compression of responses as they stream (`route.compress`): the content
codings edgeproxy can produce, their streaming compressors, and the
compiled phase's Python side (edgeproxy.compress.stage)."""

from __future__ import annotations

import importlib.util

__all__ = ["CODINGS", "available", "make_compress_phase", "missing_package"]

# coding -> the PyPI package that provides it (None: the standard library)
CODINGS = {"zstd": "zstandard", "br": "brotli", "gzip": None}


def missing_package(coding: str) -> str | None:
    """The package to install for a coding, or None when it can be used."""
    pkg = CODINGS[coding]
    if pkg is None or importlib.util.find_spec(pkg) is not None:
        return None
    return pkg


def available() -> tuple[str, ...]:
    """The codings usable here, in edgeproxy's order of preference."""
    return tuple(c for c in CODINGS if missing_package(c) is None)


def make_compress_phase(env, route_config, index: int):
    """The MAKERS entry (edgeproxy.proxy.compiled): a CompressPhase for a
    route with `compress` and a pool (static routes compress their files
    themselves), else None."""
    codings = tuple(getattr(route_config, "compress", ()) or ())
    if not codings or getattr(route_config, "static", None) is not None:
        return None
    from edgeproxy._ext import CompressPhase

    return CompressPhase(codings, tuple(route_config.compress_types),
                         route_config.compress_min_size)
