"""Origins for the pool and health tests: one that can stop and come back
on the same port, with a health endpoint whose answer the test sets, and a
server that resets every connection it accepts (and counts them)."""

from __future__ import annotations

import asyncio
import socket
import threading

from harness import Origin


class PortOrigin(Origin):
    """An Origin on a chosen port (0: any), answering GET /healthz with
    `health_status`."""

    def __init__(self, port: int = 0, health_status: int = 200):
        super().__init__()
        self.want_port = port
        self.health_status = health_status

    async def _start(self):
        self._server = await asyncio.start_server(self._conn, "127.0.0.1", self.want_port,
                                                  limit=1 << 20, reuse_address=True)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _answer(self, s, r, w) -> bool:
        if s.target == "/healthz":
            w.write(b"HTTP/1.1 %d Health\r\nContent-Length: 0\r\n\r\n" % self.health_status)
            await w.drain()
            return True
        return await super()._answer(s, r, w)

    def probes(self) -> int:
        return sum(1 for s in list(self.requests) if s.target == "/healthz")

    def traffic(self) -> int:
        return sum(1 for s in list(self.requests) if s.target != "/healthz")


class ResetServer:
    """Accepts connections and resets each (at once, or after reading what
    the client sent first: `read_first`); counts the accepts."""

    def __init__(self, read_first: bool = False):
        self.read_first = read_first
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(128)
        self.port = self.sock.getsockname()[1]
        self.accepted = 0
        self._stop = False
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _run(self):
        self.sock.settimeout(0.1)
        while not self._stop:
            try:
                c, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self.accepted += 1
            if self.read_first:
                c.settimeout(2.0)
                try:
                    c.recv(65536)
                except OSError:
                    pass
            c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
            c.close()

    def stop(self):
        self._stop = True
        self._thread.join(2)
        self.sock.close()
