"""A TCP proxy for tests that puts network faults between edgeproxy and an
origin: it listens on 127.0.0.1, forwards each connection it accepts to the
target port, and does to it what its current Fault says (taken when the
connection is accepted, so set it before the request that should meet it).

Faults, each on one direction ("up": edgeproxy to origin, "down": origin to
edgeproxy) once `after` bytes have gone that way:
    Fault.passing()        forward both ways
    Fault.cut(d, n)        close both sides (FIN); n = 0 up: on accept
    Fault.reset(d, n)      close both sides with a reset (SO_LINGER 0)
    Fault.stall(d, n)      stop forwarding (and reading) that way; the
                           connection stays open until a side closes it
    Fault.trickle(d, s)    forward that way one byte every s seconds
    Fault.delay_accept(s)  hold the accepted connection s seconds before
                           connecting to the origin and forwarding
    Fault.never_read()     accept, never read, never answer

Like asyncpg's test fuzzer (_testbase/fuzzer.py) in spirit; its own loop
runs on its own thread, so tests drive it from plain synchronous code."""

from __future__ import annotations

import asyncio
import socket
import struct
import threading
from dataclasses import dataclass

_LINGER_0 = struct.pack("ii", 1, 0)


@dataclass(frozen=True)
class Fault:
    kind: str = "pass"
    direction: str = "down"
    after: int = 0
    seconds: float = 0.0

    @staticmethod
    def passing() -> Fault:
        return Fault()

    @staticmethod
    def cut(direction: str, after: int = 0) -> Fault:
        return Fault("cut", direction, after)

    @staticmethod
    def reset(direction: str, after: int = 0) -> Fault:
        return Fault("reset", direction, after)

    @staticmethod
    def stall(direction: str, after: int = 0) -> Fault:
        return Fault("stall", direction, after)

    @staticmethod
    def trickle(direction: str, seconds: float = 0.001) -> Fault:
        return Fault("trickle", direction, 0, seconds)

    @staticmethod
    def delay_accept(seconds: float) -> Fault:
        return Fault("delay_accept", seconds=seconds)

    @staticmethod
    def never_read() -> Fault:
        return Fault("never_read")


class _Conn:
    """One proxied connection: the two transports' streams and its end."""

    def __init__(self, down_w: asyncio.StreamWriter):
        self.down_w = down_w          # toward edgeproxy
        self.up_w: asyncio.StreamWriter | None = None
        self.done = asyncio.Event()
        self.ended = 0                # directions that met their end of input
        self.stalled = False

    def close(self, reset: bool = False) -> None:
        for w in (self.down_w, self.up_w):
            if w is None or w.transport.is_closing():
                continue
            if reset:
                sock = w.get_extra_info("socket")
                if sock is not None:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_0)
                w.transport.abort()
            else:
                w.close()
        self.done.set()


class FaultProxy:
    """start() it, point a pool at .port, set() a Fault, stop() it."""

    def __init__(self, target_port: int):
        self.target_port = target_port
        self.port = 0
        self.fault = Fault.passing()
        self.accepted = 0                 # connections accepted, all faults
        self._conns: set[_Conn] = set()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._server: asyncio.AbstractServer | None = None

    def start(self) -> FaultProxy:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(5)
        return self

    async def _start(self) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    def set(self, fault: Fault) -> None:
        """The fault for the connections accepted from now on."""
        self.fault = fault

    def drop_all(self) -> None:
        """Close every connection still open (stalled or never read)."""
        async def _drop():
            for c in list(self._conns):
                c.close()
        asyncio.run_coroutine_threadsafe(_drop(), self._loop).result(5)

    def stop(self) -> None:
        async def _stop():
            self._server.close()
            for c in list(self._conns):
                c.close(reset=True)
            for t in asyncio.all_tasks():
                if t is not asyncio.current_task():
                    t.cancel()
        asyncio.run_coroutine_threadsafe(_stop(), self._loop).result(5)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)

    async def _accept(self, down_r: asyncio.StreamReader, down_w: asyncio.StreamWriter) -> None:
        fault = self.fault
        self.accepted += 1
        conn = _Conn(down_w)
        self._conns.add(conn)
        try:
            if fault.kind == "never_read":
                down_w.transport.pause_reading()
                await conn.done.wait()
                return
            if fault.kind in ("cut", "reset") and fault.direction == "up" and fault.after == 0:
                conn.close(reset=fault.kind == "reset")
                return
            if fault.kind == "delay_accept":
                await asyncio.sleep(fault.seconds)
            up_r, conn.up_w = await asyncio.open_connection("127.0.0.1", self.target_port)
            pumps = [asyncio.ensure_future(self._pump(conn, down_r, conn.up_w, "up", fault)),
                     asyncio.ensure_future(self._pump(conn, up_r, down_w, "down", fault))]
            await conn.done.wait()
            for p in pumps:
                p.cancel()
        except (ConnectionError, OSError, asyncio.CancelledError):
            pass
        finally:
            conn.close()
            self._conns.discard(conn)

    async def _pump(self, conn: _Conn, src: asyncio.StreamReader, dst: asyncio.StreamWriter,
                    direction: str, fault: Fault) -> None:
        mine = fault.direction == direction and fault.kind in ("cut", "reset", "stall", "trickle")
        sent = 0
        try:
            while True:
                if mine and fault.kind != "trickle" and sent >= fault.after:
                    break
                data = await src.read(65536)
                if not data:
                    # one side ended: pass the end on; once both ended, or the
                    # other way is stalled and so never ends, close
                    conn.ended += 1
                    if conn.ended == 2 or conn.stalled:
                        conn.close()
                    elif dst.can_write_eof() and not dst.transport.is_closing():
                        dst.write_eof()
                    return
                if mine and fault.kind == "trickle":
                    for i in range(len(data)):
                        dst.write(data[i:i + 1])
                        await dst.drain()
                        await asyncio.sleep(fault.seconds)
                    continue
                if mine:
                    data = data[:fault.after - sent]
                dst.write(data)
                await dst.drain()
                sent += len(data)
            # `after` bytes went this way: the fault
            if fault.kind == "stall":
                conn.stalled = True
                await conn.done.wait()        # nothing more, until the other way ends
            else:
                await asyncio.sleep(0.05)     # let the last bytes leave before the end
                conn.close(reset=fault.kind == "reset")
        except (ConnectionError, OSError):
            conn.close()
        except asyncio.CancelledError:
            pass
