"""Count a process tree's system calls over one round with `perf stat` (optional)."""
from __future__ import annotations

import shutil
import signal
import subprocess
from pathlib import Path

from bench.servers import Pinning, die_with_parent

EVENT = "raw_syscalls:sys_enter"


def perf_unusable() -> str | None:
    """Why perf cannot count syscalls here (not installed, not permitted), or None."""
    if shutil.which("perf") is None:
        return "perf is not installed (apt-get install linux-perf)"
    try:
        done = subprocess.run(["perf", "stat", "-x,", "-e", EVENT, "--", "true"],
                              check=False, capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"perf stat failed: {exc}"
    if done.returncode != 0 or _count(done.stderr) is None:
        return f"perf stat -e {EVENT} is not permitted here: {done.stderr.strip()[-300:]}"
    return None


def _count(output: str) -> int | None:
    for line in output.splitlines():
        fields = line.split(",")
        if len(fields) > 2 and fields[2] == EVENT:
            return int(fields[0]) if fields[0].isdigit() else None
    return None


class SyscallCount:
    """perf stat attached to the given PIDs (all their threads) until stop()."""

    def __init__(self, pids: list[int], out: Path, pinning: Pinning) -> None:
        self._out = out
        argv = ["perf", "stat", "-x,", "-e", EVENT, "-o", str(out),
                "-p", ",".join(str(p) for p in pids)]
        self._proc = subprocess.Popen(pinning.for_load(argv), stdin=subprocess.DEVNULL,
                                      stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                      start_new_session=True,
                                      preexec_fn=die_with_parent)  # noqa: PLW1509 (no threads)

    def stop(self) -> int | None:
        """Stop counting; the number of syscalls, or None if perf failed."""
        if self._proc.poll() is None:
            self._proc.send_signal(signal.SIGINT)  # perf prints its counts on SIGINT
        try:
            self._proc.wait(10)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()
            return None
        try:
            return _count(self._out.read_text())
        except OSError:
            return None
