"""The memory case: hold thousands of idle keep-alive connections and weigh the proxy's RSS."""
from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

from bench.servers import Server

OPENING_AT_ONCE = 200     # connections being opened concurrently (keeps SYN queues short)
SETTLE_S = 1.0            # pause before weighing, so the proxy has finished with them


@dataclass(frozen=True)
class IdleResult:
    wanted: int
    opened: int               # connected, sent a GET and read the full answer
    still_open: int           # of those, not closed by the proxy when RSS was read
    failed: int
    first_error: str
    rss_before_kib: int
    rss_after_kib: int
    seconds: float

    @property
    def growth_kib(self) -> int:
        return self.rss_after_kib - self.rss_before_kib

    @property
    def bytes_per_connection(self) -> float | None:
        return self.growth_kib * 1024 / self.still_open if self.still_open else None


async def _read_answer(reader: asyncio.StreamReader) -> int:
    """Read one HTTP/1.1 response to its end; return its status."""
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ")[1])
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    if "content-length" in headers:
        await reader.readexactly(int(headers["content-length"]))
    elif "chunked" in headers.get("transfer-encoding", "").lower():
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            await reader.readexactly(size + 2)
            if size == 0:
                break
    return status


async def _hold(server: Server, path: str, count: int, time_limit_s: float) -> IdleResult:
    started = time.monotonic()
    deadline = started + time_limit_s
    rss_before = server.rss_kib()
    request = f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode()
    gate = asyncio.Semaphore(OPENING_AT_ONCE)
    held: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
    errors: list[str] = []

    async def open_one() -> None:
        async with gate:
            if time.monotonic() > deadline:
                errors.append("time limit reached before opening")
                return
            writer = None
            try:
                reader, writer = await asyncio.wait_for(
                    asyncio.open_connection("127.0.0.1", server.port), 10)
                writer.write(request)
                status = await asyncio.wait_for(_read_answer(reader), 10)
                if status != 200:
                    raise ValueError(f"answered {status}")
                held.append((reader, writer))
            except (TimeoutError, OSError, ValueError, asyncio.IncompleteReadError,
                    asyncio.LimitOverrunError) as exc:
                errors.append(f"{type(exc).__name__}: {exc}")
                if writer is not None:
                    writer.close()

    try:
        await asyncio.gather(*(open_one() for _ in range(count)))
        await asyncio.sleep(SETTLE_S)
        rss_after = server.rss_kib()
        still_open = sum(1 for reader, _ in held if not reader.at_eof())
    finally:
        for _, writer in held:
            writer.close()
        await asyncio.gather(*(w.wait_closed() for _, w in held), return_exceptions=True)
    return IdleResult(wanted=count, opened=len(held), still_open=still_open, failed=len(errors),
                      first_error=errors[0] if errors else "", rss_before_kib=rss_before,
                      rss_after_kib=rss_after, seconds=time.monotonic() - started)


def hold_idle_connections(server: Server, path: str, count: int,
                          time_limit_s: float = 60.0) -> IdleResult:
    """Open `count` connections (one GET each), weigh the proxy, then close them all."""
    try:
        import uvloop  # opens the connections about twice as fast
        return uvloop.run(_hold(server, path, count, time_limit_s))
    except ImportError:
        return asyncio.run(_hold(server, path, count, time_limit_s))
