"""Accepting connections without running out of descriptors: a worker's
listening servers, stopped while fewer than a reserve of descriptors is
left and started again once connections have closed and freed some.

Out of descriptors, libuv (uvloop) accepts each waiting connection with a
spare descriptor and closes it at once, and the standard loop retries
accept a second later; either way every client that arrives then is
dropped.  A worker that stops accepting before that point leaves new
connections in the kernel's listen queue (bounded by `backlog`), where
another worker with descriptors to spare, or this one a tick later, takes
them."""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import socket

__all__ = ["AcceptGuard", "RESERVE"]

log = logging.getLogger("edgeproxy.server")

# descriptors kept free: a new connection needs one, its backend connection
# another, and the worker itself some (log files, the cache, health probes)
RESERVE = 16


def descriptors_left(need: int) -> bool:
    """Whether `need` more descriptors can be opened now (opened and closed
    again: a few microseconds each, once per tick)."""
    fds: list[int] = []
    try:
        for _ in range(need):
            fds.append(os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC))
        return True
    except OSError as exc:
        if exc.errno not in (errno.EMFILE, errno.ENFILE):
            raise
        return False
    finally:
        for fd in fds:
            os.close(fd)


class AcceptGuard:
    """The servers of one worker's listeners (each on its own duplicate of
    the shared listening socket, so that closing it leaves the socket and
    its queue in place), paused and resumed by tick()."""

    def __init__(self, loop: asyncio.AbstractEventLoop, reserve: int = RESERVE):
        self.loop = loop
        self.reserve = reserve
        self.listeners: list[tuple[socket.socket, object, int]] = []
        self.servers: list[asyncio.AbstractServer] = []
        self.paused = False
        self.closed = False
        self.pauses = 0
        self._resuming: asyncio.Task | None = None

    async def add(self, sock: socket.socket, factory, backlog: int) -> None:
        self.listeners.append((sock, factory, backlog))
        self.servers.append(await self._serve(sock, factory, backlog))

    async def _serve(self, sock, factory, backlog):
        return await self.loop.create_server(factory, sock=sock.dup(), backlog=backlog)

    def out_of_descriptors(self) -> None:
        """An accept met EMFILE (the standard loop says so): stop now."""
        if not self.paused and not self.closed and self._resuming is None and self.reserve:
            self._pause()

    def tick(self) -> None:
        """Called by the worker's ticker."""
        if self.closed or self._resuming is not None or not self.reserve:
            return
        room = descriptors_left(self.reserve)
        if not self.paused and not room:
            self._pause()
        elif self.paused and room:
            self._resuming = self.loop.create_task(self._resume())

    def _pause(self) -> None:
        from edgeproxy import _ext
        self.paused = True
        self.pauses += 1
        for srv in self.servers:
            srv.close()
        self.servers = []
        _ext.resource_error("pause", f"fewer than {self.reserve} descriptors left: not "
                                      "accepting new connections until some close")

    async def _resume(self) -> None:
        servers: list[asyncio.AbstractServer] = []
        try:
            for sock, factory, backlog in self.listeners:
                servers.append(await self._serve(sock, factory, backlog))
        except OSError as exc:
            log.warning("accepting again failed (%s); retrying on the next tick", exc)
            self.closed_now(servers)
            return
        finally:
            self._resuming = None
        if self.closed:
            self.closed_now(servers)
            return
        self.servers = servers
        self.paused = False
        log.info("descriptors free again: accepting new connections")

    @staticmethod
    def closed_now(servers: list) -> None:
        for srv in servers:
            srv.close()

    def close(self) -> None:
        """Stop accepting for good (drain)."""
        self.closed = True
        for srv in self.servers:
            srv.close()
        self.servers = []
