"""Importing users' hooks ("module:attr") and what a hook may answer with."""
from __future__ import annotations

import importlib
import inspect
from collections.abc import Mapping

from edgeproxy.phases.headers import check_name, check_value

__all__ = ["PHASES", "SYNC_ONLY", "HookError", "Response", "load_hook", "hook_phases"]

# in the order the core runs them for a request (connect once per connection)
PHASES = ("connect", "request", "request_body", "upstream_request", "response",
          "response_body", "error", "log")
# called while a backend's response streams: they must answer at once
SYNC_ONLY = frozenset({"upstream_request", "response", "response_body"})


class HookError(Exception):
    """A hook that cannot be loaded, or that returned something unusable."""


class Response:
    """An answer from a hook: `return Response(401, "no token\\n",
    {"WWW-Authenticate": "Bearer"})`.  The core adds Date, Content-Length,
    Connection and the configured Server and listener fields."""

    __slots__ = ("status", "body", "headers")

    def __init__(self, status: int, body: bytes | str = b"",
                 headers: Mapping[str, str] | list[tuple[str, str]] | None = None):
        if not isinstance(status, int) or isinstance(status, bool) or not 200 <= status <= 599:
            raise ValueError(f"a hook's answer needs a status from 200 to 599, not {status!r}")
        if isinstance(body, str):
            body = body.encode("utf-8")
        if not isinstance(body, (bytes, bytearray, memoryview)):
            raise ValueError(f"a hook's answer body must be bytes or str, not {type(body).__name__}")
        items = list(headers.items()) if isinstance(headers, Mapping) else list(headers or ())
        fields = []
        for name, value in items:
            check_name(name)
            low = name.lower()
            if low in ("content-length", "transfer-encoding", "connection"):
                raise ValueError(f"field {name!r} is the proxy's own (framing)")
            fields.append((name, check_value(value)))
        self.status = status
        self.body = bytes(body)
        self.headers = fields

    def __repr__(self) -> str:
        return f"Response({self.status}, {len(self.body)} bytes)"


def hook_phases(obj: object) -> dict[str, bool]:
    """The phases obj defines: {name: is_async}."""
    out = {}
    for name in PHASES:
        fn = getattr(obj, name, None)
        if fn is not None and callable(fn):
            out[name] = inspect.iscoroutinefunction(fn)
    return out


def load_hook(spec: str) -> object:
    """Import "module:attr"; a class is instantiated with no arguments.
    Raises HookError with a message fit for `edgeproxy check`."""
    if not isinstance(spec, str) or spec.count(":") != 1:
        raise HookError(f"expected \"module:attr\", got {spec!r}")
    modname, _, attr = spec.partition(":")
    if not modname or not attr:
        raise HookError(f"expected \"module:attr\", got {spec!r}")
    try:
        mod = importlib.import_module(modname)
    except ModuleNotFoundError as exc:
        raise HookError(f"no module named {exc.name!r}") from None
    except Exception as exc:  # the module's own code failed
        raise HookError(f"importing {modname!r} failed: {type(exc).__name__}: {exc}") from None
    obj = mod
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise HookError(f"module {modname!r} has no attribute {attr!r}") from None
    if inspect.isclass(obj):
        try:
            obj = obj()
        except Exception as exc:
            raise HookError(f"{spec}() failed: {type(exc).__name__}: {exc}") from None
    phases = hook_phases(obj)
    if not phases:
        raise HookError(f"{spec} defines none of the phases ({', '.join(PHASES)})")
    bad = sorted(p for p, is_async in phases.items() if is_async and p in SYNC_ONLY)
    if bad:
        raise HookError(f"{spec}: {', '.join(bad)} must be a plain method, not async "
                        "(it runs while the backend's response streams)")
    return obj
