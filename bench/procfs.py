"""Read a process tree's CPU time, memory and limits from /proc."""
from __future__ import annotations

import os
from pathlib import Path

CLOCK_TICKS_PER_SECOND = os.sysconf("SC_CLK_TCK")


def _stat_fields(pid: int) -> list[str] | None:
    """The fields of /proc/PID/stat after the command name (field 3 onward)."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name sits in parentheses and may itself hold spaces or ')'.
    return raw[raw.rindex(")") + 2:].split()


def is_alive(pid: int) -> bool:
    fields = _stat_fields(pid)
    return fields is not None and fields[0] not in ("Z", "X")


def start_time(pid: int) -> int | None:
    """Start time in clock ticks since boot: with the PID, it names one process."""
    fields = _stat_fields(pid)
    return int(fields[19]) if fields else None


def cpu_ticks(pid: int) -> tuple[int, int]:
    """(utime, stime) of every thread of the process, in clock ticks ((0, 0) if gone)."""
    fields = _stat_fields(pid)
    return (int(fields[11]), int(fields[12])) if fields else (0, 0)


def children(pid: int) -> list[int]:
    found: list[int] = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return found
    for tid in tasks:
        try:
            listed = Path(f"/proc/{pid}/task/{tid}/children").read_text()
            found.extend(int(c) for c in listed.split())
        except OSError:
            pass
    return found


def tree(pid: int) -> list[int]:
    """The process and all its living descendants."""
    pids, todo = [], [pid]
    while todo:
        p = todo.pop()
        if is_alive(p):
            pids.append(p)
            todo.extend(children(p))
    return pids


def status_kib(pid: int, key: str) -> int:
    """A 'kB' line of /proc/PID/status such as VmRSS or VmHWM (0 if gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def reset_peak_rss(pid: int) -> bool:
    """Make VmHWM start again from the current RSS (Linux 4.0+, needs the right to)."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def open_files_limit(pid: int) -> int | None:
    """The soft RLIMIT_NOFILE of a running process."""
    try:
        for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
            if line.startswith("Max open files"):
                soft = line.split()[3]
                return None if soft == "unlimited" else int(soft)
    except OSError:
        pass
    return None

