"""The event loop a worker runs: uvloop, imported so that it tracks its transports in a C map (_ext.TransportsByFd), or the standard asyncio loop when EDGEPROXY_LOOP=asyncio; and how a worker notices that it has run out of descriptors."""

from __future__ import annotations

import asyncio
import errno
import os
import sys
import weakref
from types import ModuleType

from edgeproxy import _ext

__all__ = ["new_event_loop", "uvloop_module", "check_descriptors", "on_accept_exhausted"]

# called when an accept found no descriptor (the standard loop reports it;
# libuv does not): the worker's AcceptGuard stops accepting at once
on_accept_exhausted: list = []


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
        loop = asyncio.new_event_loop()
    else:
        loop = uvloop_module().new_event_loop()
    loop.set_exception_handler(_on_loop_error)
    return loop


def _on_loop_error(loop: asyncio.AbstractEventLoop, context: dict) -> None:
    # The standard loop reports an accept that found no descriptor once per
    # connection waiting (up to the backlog), with a traceback each: one
    # rate-limited line instead.
    exc = context.get("exception")
    if isinstance(exc, OSError) and exc.errno in _ext.RESOURCE_ERRNOS \
            and "accept" in context.get("message", ""):
        _ext.resource_error("accept", f"accept failed: {exc.strerror}")
        for stop_accepting in on_accept_exhausted:
            stop_accepting()
        return
    if isinstance(exc, ValueError) and str(exc) == "Invalid file descriptor: -1" \
            and on_accept_exhausted:
        # the standard loop, out of descriptors, goes on accepting up to the
        # backlog and queues a retry of accept for each try (CPython 3.11);
        # once the AcceptGuard has closed the server, they meet its closed
        # socket, which ends them
        return
    loop.default_exception_handler(context)


def check_descriptors() -> bool:
    """Whether this process can still open a descriptor (the worker's
    ticker asks once a second).  uvloop's accept, out of descriptors, closes
    the connections waiting without telling anyone (libuv's EMFILE trick):
    this is how that gets logged."""
    try:
        fd = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno not in (errno.EMFILE, errno.ENFILE):
            raise
        _ext.resource_error("accept", f"no descriptor left, new connections are closed at accept "
                                      f"({exc.strerror})")
        return False
    os.close(fd)
    return True
