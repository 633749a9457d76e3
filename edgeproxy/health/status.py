"""The state file: a small JSON snapshot of every pool's backends (up/down,
ejections, outstanding requests, failures, the last health check) that the
running proxy rewrites each second and `edgeproxy status` reads and prints.

It lives at `server.state_file`, or by default in the run-time directory
(/run/edgeproxy under systemd, else the temp directory:
`edgeproxy.config.runtime`) under a name derived from the configuration
file's absolute path, so `edgeproxy status -c FILE` finds the proxy started
with `edgeproxy run -c FILE`.

Under a supervisor it shows what the admin `/status` shows: backends added,
removed and drained through the admin API, and request counts that go on
across reloads and worker restarts (the supervisor's metrics totals).
"""
from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import time
from collections.abc import Callable, Collection, Mapping

from edgeproxy.config.model import Config
from edgeproxy.config.runtime import runtime_dir
from edgeproxy.health.board import CHECK_FAIL, CHECK_NONE, HealthBoard

log = logging.getLogger("edgeproxy.health")

STALE_AFTER = 5.0    # seconds without a rewrite: the proxy is not running


def state_path(config: Config) -> str:
    if config.server.state_file:
        return config.server.state_file
    if config.source:
        ident = os.path.abspath(config.source)
    else:
        ident = "quick:" + ",".join(lc.bind for lc in config.listen)
    digest = hashlib.sha256(ident.encode()).hexdigest()[:12]
    return os.path.join(runtime_dir(), f"edgeproxy-{digest}.state.json")


def snapshot(config: Config, board: HealthBoard, checker=None, pid: int | None = None, *,
             drained: Collection[tuple[str, str]] = (),
             requests: Mapping[tuple[str, str], int] | None = None) -> dict:
    """The state of every backend of `config`, summed over the workers.
    `drained`: (pool, backend) taken out through the admin API; `requests`:
    the requests of each (pool, backend) since the start (None: what the
    board's workers count)."""
    now = time.time()
    rows = []
    for slot in range(board.workers):
        wpid, written, stats = board.read_worker(slot)
        if wpid:
            rows.append((wpid, written, stats))
    pools = []
    for name, pc in config.pools.items():
        backends = []
        for bc in pc.backends:
            key = (name, bc.name)
            k = board.index[key]
            h = board.read_health(*key)
            per = [stats[k] for _, _, stats in rows]
            ejected = [s for s in per if s.ejected_left > 0]
            check = None
            if pc.health is not None and h.checked != CHECK_NONE:
                verdict = checker.verdicts.get(key) if checker is not None else None
                check = {
                    "ok": h.checked != CHECK_FAIL,
                    "status": h.status,
                    "detail": verdict.last.detail if verdict and verdict.last else str(h.status),
                    "age": round(max(0.0, now - h.when), 1),
                    "streak": h.streak,
                }
            if key in drained:
                state = "drained"
            elif not h.up:
                state = "down"
            elif ejected and len(ejected) == len(per):
                state = "ejected"
            elif ejected:
                state = f"ejected in {len(ejected)}/{len(per)} workers"
            else:
                state = "up"
            backends.append({
                "backend": key[1],
                "url": bc.url,
                "weight": bc.weight,
                "backup": bc.backup,
                "state": state,
                "healthy": h.up,
                "active": sum(s.active for s in per),
                "requests": (sum(s.requests for s in per) if requests is None
                             else requests.get(key, 0)),
                "drained": key in drained,
                "fails": max((s.fails for s in per), default=0),
                "failures": sum(s.failures for s in per),
                "ejected_for": round(max((s.ejected_left for s in ejected), default=0.0), 1),
                "check": check,
            })
        pools.append({"name": name, "balance": pc.balance,
                      "health": pc.health.path if pc.health else None, "backends": backends})
    return {"pid": pid or os.getpid(), "written": now, "workers": [r[0] for r in rows],
            "pools": pools}


def write_state(path: str, data: dict) -> None:
    """Replace the file atomically (readers never see half of it)."""
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        json.dump(data, f)
    os.replace(tmp, path)


def read_state(path: str) -> dict | None:
    """The snapshot, or None when there is none or it is stale (the proxy
    stopped or its writer died)."""
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, ValueError):
        return None
    if time.time() - data.get("written", 0) > STALE_AFTER:
        return None
    try:
        os.kill(int(data["pid"]), 0)
    except (ProcessLookupError, KeyError, ValueError, TypeError):
        return None
    except PermissionError:
        pass
    return data


class StateWriter:
    """Rewrites the state file each second on the running loop; removes it
    when stopped.  `view`, when given, says what the supervisor knows
    beyond the board: (the configuration with the admin's changes, the
    drained backends, the requests per backend since the start)."""

    def __init__(self, config: Config, board: HealthBoard, checker=None, pid: int | None = None,
                 view: Callable[[], tuple[Config, Collection, Mapping]] | None = None):
        self.config = config
        self.board = board
        self.checker = checker
        self.pid = pid
        self.view = view
        self.path = state_path(config)
        self._task: asyncio.Task | None = None
        self._warned = False

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    def write_once(self) -> None:
        # a few KiB to a local temp file: quick enough to do on the loop
        if self.view is not None:
            config, drained, requests = self.view()
            data = snapshot(config, self.board, self.checker, self.pid, drained=drained,
                            requests=requests)
        else:
            data = snapshot(self.config, self.board, self.checker, self.pid)
        try:
            write_state(self.path, data)
        except OSError as exc:
            if not self._warned:
                self._warned = True
                log.warning("cannot write the state file %s: %s", self.path, exc.strerror)

    async def _run(self) -> None:
        while True:
            self.write_once()
            await asyncio.sleep(1.0)

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None
        try:
            os.unlink(self.path)
        except OSError:
            pass


def format_status(data: dict) -> str:
    """The snapshot as a table per pool."""
    out = [f"edgeproxy pid {data['pid']}, workers {', '.join(map(str, data['workers'])) or '-'}"]
    for pool in data["pools"]:
        checks = f"health {pool['health']}" if pool["health"] else "no active checks"
        out.append("")
        out.append(f"pool {pool['name']} ({pool['balance']}, {checks})")
        rows = [("backend", "state", "active", "requests", "fails", "failures", "last check")]
        for b in pool["backends"]:
            name = b["url"] + (f" weight={b['weight']}" if b["weight"] != 1 else "") \
                + (" backup" if b["backup"] else "")
            state = b["state"] + (f" ({b['ejected_for']}s)" if b["ejected_for"] else "")
            c = b["check"]
            check = "-" if c is None else (
                f"{'pass' if c['ok'] else 'FAIL'}: {c['detail']} ({c['age']}s ago)")
            rows.append((name, state, str(b["active"]), str(b["requests"]), str(b["fails"]),
                         str(b["failures"]), check))
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
        for r in rows:
            out.append("  " + "  ".join(r[i].ljust(widths[i]) for i in range(len(widths)))
                       + "  " + r[-1])
    return "\n".join(out)
