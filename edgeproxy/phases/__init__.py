"""The phase API: what users' Python hooks see and return.

A hook is an importable object (`"module:attr"`, a class is instantiated
once per worker) with one or more methods named after the phases below.
The compiled core (ext/phases.pyx) calls them in a fixed order, passing one
`RequestCtx` per request; see docs/hooks.md."""
from __future__ import annotations

from edgeproxy.phases.headers import Headers
from edgeproxy.phases.load import PHASES, SYNC_ONLY, HookError, Response, load_hook

__all__ = ["PHASES", "SYNC_ONLY", "Headers", "HookError", "Response", "load_hook"]
