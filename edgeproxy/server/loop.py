"""The event loop a worker runs: uvloop, imported so that it tracks its transports in a C map (_ext.TransportsByFd), or the standard asyncio loop when EDGEPROXY_LOOP=asyncio."""

from __future__ import annotations

import asyncio
import os
import sys
import weakref
from types import ModuleType

from edgeproxy import _ext

__all__ = ["new_event_loop", "uvloop_module"]


def uvloop_module() -> ModuleType:
    """uvloop, imported with weakref.WeakValueDictionary standing for
    _ext.TransportsByFd while its module initialises: uvloop binds that class
    then, for the one map it makes of it (transports by fd), whose Python
    __setitem__ cost ~5% of a worker's CPU with a new connection per
    request. When something imported uvloop before us, it keeps its own."""
    if "uvloop.loop" in sys.modules:
        import uvloop
        return uvloop
    standard = weakref.WeakValueDictionary
    weakref.WeakValueDictionary = _ext.TransportsByFd  # type: ignore[misc, assignment]
    try:
        import uvloop
    finally:
        weakref.WeakValueDictionary = standard  # type: ignore[misc]
    return uvloop


def new_event_loop() -> asyncio.AbstractEventLoop:
    """uvloop, unless EDGEPROXY_LOOP=asyncio asks for the standard loop (the
    tests run the data plane on both, since transports differ in detail)."""
    if os.environ.get("EDGEPROXY_LOOP", "uvloop") == "asyncio":
        return asyncio.new_event_loop()
    return uvloop_module().new_event_loop()
