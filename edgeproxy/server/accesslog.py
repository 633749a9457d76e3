"""The access log: one line per request, combined or JSON format, written
from a buffer flushed at least once a second and at exit, so the event loop
never waits on the disk for each request."""

from __future__ import annotations

import json
import sys
import time

_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")


def _clf_time(t: float) -> str:
    g = time.localtime(t)
    off = g.tm_gmtoff // 60
    sign = "+" if off >= 0 else "-"
    off = abs(off)
    return (f"{g.tm_mday:02d}/{_MONTHS[g.tm_mon - 1]}/{g.tm_year}:{g.tm_hour:02d}:"
            f"{g.tm_min:02d}:{g.tm_sec:02d} {sign}{off // 60:02d}{off % 60:02d}")


def _q(b: bytes) -> str:
    # keep one line per request whatever the client sent
    return b.decode("latin-1").replace("\\", "\\\\").replace('"', '\\"')


class AccessLog:
    """Buffers formatted lines; flush() writes them (the worker calls it
    every second and at exit)."""

    def __init__(self, path: str, fmt: str = "combined"):
        self.path = path
        self.fmt = fmt
        self._lines: list[str] = []
        self._file = None
        self.reopen()

    def reopen(self) -> None:
        """Open (again) the file, e.g. after logrotate moved it."""
        if self._file is not None and self._file is not sys.stderr:
            self.flush()
            self._file.close()
        self._file = sys.stderr if self.path == "-" else open(self.path, "a", buffering=1 << 16)

    def log(self, peer: bytes, request_line: bytes, status: int, nbytes: int,
            duration: float, referer: bytes, agent: bytes, backend: str) -> None:
        now = time.time()
        if self.fmt == "json":
            self._lines.append(json.dumps({
                "time": now, "remote": peer.decode("latin-1"),
                "request": request_line.decode("latin-1"), "status": status,
                "bytes": nbytes, "duration": round(duration, 6),
                "referer": referer.decode("latin-1"), "agent": agent.decode("latin-1"),
                "backend": backend}) + "\n")
        else:
            self._lines.append(
                f'{peer.decode("latin-1")} - - [{_clf_time(now)}] "{_q(request_line)}" {status} '
                f'{nbytes} "{_q(referer)}" "{_q(agent)}"\n')

    def flush(self) -> None:
        if self._lines and self._file is not None:
            self._file.write("".join(self._lines))
            self._file.flush()
            self._lines.clear()

    def close(self) -> None:
        self.flush()
        if self._file is not None and self._file is not sys.stderr:
            self._file.close()
        self._file = None
