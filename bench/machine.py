"""What was measured and where: the git commit and the machine's facts."""
from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path

from bench.contenders import CONTENDERS

REPO = Path(__file__).resolve().parent.parent


def _git(*args: str) -> str | None:
    try:
        # --no-optional-locks: never take .git/index.lock while others commit.
        done = subprocess.run(["git", "--no-optional-locks", *args], check=False, cwd=REPO,
                              capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def commit_stamp() -> dict[str, object]:
    sha = _git("rev-parse", "HEAD")
    status = _git("status", "--porcelain")  # untracked files count: they may be run
    return {"sha": sha, "short": sha[:8] if sha else "nogit",
            "dirty": bool(status) if status is not None else None}


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def load_average() -> list[float]:
    return list(os.getloadavg())


def machine_facts() -> dict[str, object]:
    versions = {"wrk": wrk_version()}
    versions.update({name: c.version() for name, c in CONTENDERS.items() if c.missing() is None})
    return {
        "nproc": os.cpu_count(),
        "cpu_model": _cpu_model(),
        "kernel": platform.release(),
        "python": sys.version.split()[0],
        "versions": versions,
    }


def wrk_version() -> str:
    try:
        done = subprocess.run(["wrk", "--version"], check=False, capture_output=True,
                              text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"unknown ({exc})"
    lines = (done.stdout + done.stderr).strip().splitlines()
    return lines[0].strip() if lines else "unknown"
