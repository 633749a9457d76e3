"""The built-in demo: an origin server for `edgeproxy demo` and for the tests, and the demo's set-up."""
from __future__ import annotations

import importlib
from typing import Any

__all__ = ["OriginServer", "OriginThread", "big_body", "start_origin"]


def __getattr__(name: str) -> Any:
    # Imported on first use, so that `python -m edgeproxy.demo.origin` does not
    # find the module already imported by its package (runpy's RuntimeWarning).
    if name in __all__:
        return getattr(importlib.import_module("edgeproxy.demo.origin"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
