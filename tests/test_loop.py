"""The worker's event loop (edgeproxy.server.loop): uvloop imported with the
C map of transports by fd, which must keep uvloop's own checks working."""
from __future__ import annotations

import gc
import subprocess
import sys
import weakref

from harness import ROOT

from edgeproxy import _ext


class _Transport:
    """Anything weak-referenceable stands for a transport here."""


def test_transports_by_fd_holds_them_weakly():
    m = _ext.TransportsByFd()
    t = _Transport()
    m[7] = t
    assert m[7] is t and 7 in m and len(m) == 1 and m.get(7) is t
    del t
    gc.collect()
    assert 7 not in m and m.get(7) is None and len(m) == 0
    try:
        m[7]
    except KeyError:
        pass
    else:
        raise AssertionError("a dead transport must be a KeyError")
    m[8] = other = _Transport()
    del m[8]
    assert 8 not in m and other is not None


def test_uvloop_refuses_a_reader_on_a_live_transports_fd():
    """uvloop looks transports up by fd to refuse add_reader on a socket a
    live transport owns; with our map in place it still does, and the
    stdlib's WeakValueDictionary is back once uvloop is imported."""
    code = r'''
import asyncio, socket, sys, weakref
import edgeproxy.cli, edgeproxy.server.worker, edgeproxy.server.supervisor
# uvloop must not be imported before the worker makes its loop, or it keeps
# the stdlib's map (slower, still correct)
assert "uvloop" not in sys.modules, "uvloop imported too early"
from edgeproxy.server.loop import new_event_loop
standard = weakref.WeakValueDictionary
loop = new_event_loop()
assert weakref.WeakValueDictionary is standard
import uvloop
assert isinstance(loop, uvloop.Loop)

async def main():
    srv = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = srv.sockets[0].getsockname()[1]
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    fd = writer.transport.get_extra_info("socket").fileno()
    try:
        loop.add_reader(fd, lambda: None)
    except RuntimeError as exc:
        assert "used by transport" in str(exc), exc
    else:
        raise AssertionError("add_reader on a transport's fd was allowed")
    writer.close()
    await writer.wait_closed()
    srv.close()
    print("ok")

loop.run_until_complete(main())
'''
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=str(ROOT), timeout=30, check=False)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def test_weakref_module_is_untouched_in_this_process():
    assert weakref.WeakValueDictionary.__module__ == "weakref"
