"""HTTP/1.1 parsing and the routing path: the compiled implementation when
built, else the pure-Python twins (`_pure` for the parser, `_path` for the
routing path).

Both implement docs/parser-contract.md.  `EDGEPROXY_NO_EXTENSIONS=1` forces
the pure one; `IMPLEMENTATION` says which one these names come from.
"""
from __future__ import annotations

import importlib
import os
from types import ModuleType

from edgeproxy.http import _path, _pure

__all__ = [
    "BODY_CHUNKED", "BODY_CLOSE", "BODY_LENGTH", "BODY_NONE", "IMPLEMENTATION",
    "ChunkedDecoder", "HTTPError", "ParseError", "implementations",
    "normalize_path", "parse_request", "parse_response", "path_implementations",
    "path_is_normal",
]


def _compiled() -> ModuleType | None:
    """edgeproxy._ext, or None when it is not built (or fails to load)."""
    try:
        return importlib.import_module("edgeproxy._ext")
    except ImportError:
        return None


def implementations() -> dict[str, ModuleType | None]:
    """Every parser implementation by test id; None for a missing one."""
    return {"py-parser": _pure, "c-parser": _compiled()}


def path_implementations() -> dict[str, ModuleType | None]:
    """Every routing-path implementation by test id; None for a missing one."""
    return {"py-path": _path, "c-path": _compiled()}


_active = None if os.environ.get("EDGEPROXY_NO_EXTENSIONS") == "1" else _compiled()
if _active is None:
    _active = _pure
IMPLEMENTATION = "py" if _active is _pure else "c"

parse_request = _active.parse_request
parse_response = _active.parse_response
ChunkedDecoder = _active.ChunkedDecoder
HTTPError = _active.HTTPError
ParseError = _active.ParseError
BODY_NONE = _active.BODY_NONE
BODY_LENGTH = _active.BODY_LENGTH
BODY_CHUNKED = _active.BODY_CHUNKED
BODY_CLOSE = _active.BODY_CLOSE
normalize_path = (_path if _active is _pure else _active).normalize_path
path_is_normal = (_path if _active is _pure else _active).path_is_normal
