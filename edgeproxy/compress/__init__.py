"""Compression of responses as they stream (`route.compress`): the content
codings edgeproxy can produce, their streaming compressors, and the
compiled phase's Python side (edgeproxy.compress.stage)."""

from __future__ import annotations

import importlib.util

__all__ = ["CODINGS", "available", "missing_package"]

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
