"""Drive one load round with wrk and read back its counts and latency percentiles."""
from __future__ import annotations

import json
import shutil
import signal
import subprocess
from dataclasses import dataclass
from pathlib import Path

from bench.cases import Case
from bench.servers import Pinning, die_with_parent
from bench.templates import fill

RESULT_MARK = "BENCH_RESULT "
TIMEOUT_S = 5     # a request slower than this counts as a wrk timeout error


class WrkError(RuntimeError):
    """wrk failed or printed no result; the message carries its output."""


@dataclass(frozen=True)
class WrkResult:
    duration_s: float
    requests: int
    bytes: int
    errors: dict[str, int]       # connect, read, write, status (HTTP >= 400), timeout
    latency_us: dict[str, float]  # min, mean, max, stdev, p50, p90, p99, p99_9

    @property
    def socket_errors(self) -> int:
        return sum(self.errors[k] for k in ("connect", "read", "write", "timeout"))


def wrk_binary() -> str | None:
    return shutil.which("wrk")


def write_script(case: Case, workdir: Path) -> Path:
    """The Lua script for the case: the request shape, then the JSON report."""
    parts = []
    if case.body_bytes:
        parts.append(fill("post-body.lua", BODY_BYTES=case.body_bytes))
    parts.append(fill("report.lua"))
    script = workdir / f"wrk-{case.name}.lua"
    script.write_text("\n".join(parts))
    return script


def run_round(case: Case, port: int, duration_s: int, workdir: Path, pinning: Pinning) -> WrkResult:
    argv = [wrk_binary() or "wrk", "-t1", f"-c{case.connections}", f"-d{duration_s}s",
            f"--timeout={TIMEOUT_S}s", "-s", str(write_script(case, workdir))]
    if case.close:
        argv += ["-H", "Connection: close"]
    argv.append(f"{'https' if case.tls else 'http'}://127.0.0.1:{port}{case.path}")
    proc = subprocess.Popen(pinning.for_load(argv), stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True,
                            preexec_fn=die_with_parent)  # noqa: PLW1509 (no threads)
    try:
        out, err = proc.communicate(timeout=duration_s + TIMEOUT_S + 30)
    except subprocess.TimeoutExpired as exc:
        proc.kill()
        proc.communicate()
        raise WrkError(f"wrk did not finish within {duration_s + TIMEOUT_S + 30} s") from exc
    finally:
        if proc.poll() is None:  # interrupted (Ctrl-C): end our wrk by its PID
            proc.send_signal(signal.SIGKILL)
            proc.wait()
    for line in out.splitlines():
        if line.startswith(RESULT_MARK):
            raw = json.loads(line[len(RESULT_MARK):])
            return WrkResult(duration_s=raw["duration_us"] / 1e6, requests=raw["requests"],
                             bytes=raw["bytes"], errors=raw["errors"], latency_us=raw["latency_us"])
    output = (out + err).strip()[-800:]
    raise WrkError(f"wrk exited with {proc.returncode} and no result:\n{output}")
