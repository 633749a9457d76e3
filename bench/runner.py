"""One bench run: start the origin and the contenders, alternate them round by round, collect.

The result is one plain dict (the JSON document that bench/report.py prints,
saves and plots); its fields are described in docs/bench.md.
"""
from __future__ import annotations

import datetime
import http.client
import os
import resource
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from bench import procfs
from bench.cases import PLAIN, TLS, Case
from bench.certs import CertError, RunCert, make_run_cert
from bench.contenders import CONTENDERS, REPO, Setup
from bench.idle import OPENING_AT_ONCE, hold_idle_connections
from bench.machine import commit_stamp, load_average, machine_facts
from bench.origin import (
    FILES,
    asyncio_origin,
    cached_requests_seen,
    nginx_binary,
    nginx_origin,
    verify_origin,
)
from bench.servers import (
    Pinning,
    Server,
    StartedServers,
    StartError,
    free_port,
    http_get,
    parse_cpu_list,
    tls_session_resumed,
    wait_until_serving,
)
from bench.syscalls import SyscallCount, perf_unusable
from bench.wrk import WrkError, WrkResult, run_round

SCHEMA = 2                    # 2: setups (TLS, cache), origin_requests, contenders' instances
WANTED_OPEN_FILES = 65536
IDLE_SECONDS_EST = 5          # rough time per contender of an idle case, for the estimate
START_SECONDS_EST = 2
ROUND_OVERHEAD_EST = 0.2      # starting wrk, reading /proc
HIT_CHECK_TRIES = 10          # GETs (0.1 s apart) for a cached path to become a hit


@dataclass(frozen=True)
class Settings:
    cases: list[Case]
    contenders: list[str]
    duration_s: int
    rounds: int
    warmup_s: int                 # 0: no warm-up
    pinning: Pinning
    syscalls: bool
    subject: str                  # the contender the ratios are about
    origin: str                   # "auto", "nginx" or "asyncio"
    keep_workdir: bool = False
    idle_time_limit_s: float = 60.0

    def warm_up_before(self) -> set[str]:
        """The load cases preceded by a warm-up: the first, and any that opens more
        connections than all before it (the pools grow then); the other cases find
        the proxies warm already, and the median over rounds absorbs the rest."""
        warm, most, setup = set(), 0, None
        for case in self.cases:
            if case.setup != setup:  # the contenders are started afresh for it
                most, setup = 0, case.setup
            if not case.idle and case.connections > most and self.warmup_s:
                warm.add(case.name)
                most = case.connections
        return warm

    def setups(self) -> list[str]:
        """The contenders' setups in the order the cases need them (a restart between)."""
        found: list[str] = []
        for case in self.cases:
            if not found or found[-1] != case.setup:
                found.append(case.setup)
        return found

    def estimated_seconds(self) -> int:
        load = [c for c in self.cases if not c.idle]
        rounds = self.rounds + (1 if self.syscalls else 0)
        per_contender = (len(load) * rounds * (self.duration_s + ROUND_OVERHEAD_EST)
                         + len(self.warm_up_before()) * self.warmup_s
                         + sum(1 for c in self.cases if c.idle) * IDLE_SECONDS_EST
                         + START_SECONDS_EST * len(self.setups()))
        return round(len(self.contenders) * per_contender)


class StopRequest:
    """Set by the SIGTERM/SIGINT handler.  The handler also raises KeyboardInterrupt,
    but one raised inside a fork hook or a finalizer is swallowed by Python, so
    the run checks this flag again between rounds."""
    requested = False

    @classmethod
    def check(cls) -> None:
        if cls.requested:
            raise KeyboardInterrupt


def say(line: str) -> None:
    """A progress line on stderr (stdout carries only the final table)."""
    print(line, file=sys.stderr, flush=True)


def _utc_now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def raise_open_files_limit(wanted: int = WANTED_OPEN_FILES) -> int:
    """Lift RLIMIT_NOFILE as far as allowed (children inherit it); return the soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < wanted:
        try:  # needs CAP_SYS_RESOURCE; without it the hard limit stays
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, wanted))
            return wanted
        except (ValueError, OSError):
            pass
    target = wanted if hard == resource.RLIM_INFINITY else hard
    if soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def rotation(names: list[str], round_index: int) -> list[str]:
    """Round 1: A B C, round 2: B C A, round 3: C A B, ..."""
    k = round_index % len(names) if names else 0
    return names[k:] + names[:k]


def _median(values: list[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return statistics.median(known) if known else None


def _spread(values: list[float | None]) -> float | None:
    """(max - min) / median of the rounds: how much the machine's noise moved them."""
    known = [v for v in values if v is not None]
    if len(known) < 2 or not statistics.median(known):
        return None
    return (max(known) - min(known)) / statistics.median(known)


def round_figures(wrk: WrkResult, body_bytes: int, cpu_ticks: int, origin_ticks: int,
                  peak_rss_kib: int, syscalls: int | None,
                  origin_requests: int | None = None,
                  sys_ticks: int | None = None) -> dict[str, object]:
    """The numbers kept for one contender in one round (sys_ticks: the part
    of cpu_ticks spent in the kernel)."""
    cpu_s = cpu_ticks / procfs.CLOCK_TICKS_PER_SECOND
    moved = wrk.bytes + wrk.requests * body_bytes  # answers received + request bodies sent
    def per_request(v):
        return v / wrk.requests if wrk.requests else None
    return {
        "requests": wrk.requests,
        "duration_s": wrk.duration_s,
        "req_s": wrk.requests / wrk.duration_s if wrk.duration_s else 0.0,
        "bytes_received": wrk.bytes,
        "body_bytes_sent": wrk.requests * body_bytes,
        "mib_s": moved / wrk.duration_s / 2**20 if wrk.duration_s else 0.0,
        "latency_us": {k: wrk.latency_us[k] for k in ("p50", "p90", "p99", "p99_9", "mean", "max")},
        "http_errors": wrk.errors["status"],
        "socket_errors": {k: wrk.errors[k] for k in ("connect", "read", "write", "timeout")},
        "socket_errors_total": wrk.socket_errors,
        "cpu_s": cpu_s,
        "cpu_us_per_request": per_request(cpu_s * 1e6),
        "cpu_busy": cpu_s / wrk.duration_s if wrk.duration_s else None,
        # the kernel's share of that CPU time (loopback TCP, syscalls)
        "cpu_kernel_share": sys_ticks / cpu_ticks if sys_ticks is not None and cpu_ticks else None,
        "peak_rss_kib": peak_rss_kib,
        "origin_cpu_s": origin_ticks / procfs.CLOCK_TICKS_PER_SECOND,
        "origin_requests": origin_requests,  # cache cases: requests that got past the cache
        "syscalls": syscalls,
        "syscalls_per_request": per_request(syscalls) if syscalls is not None else None,
    }


def summarize(rounds: list[dict[str, object]]) -> dict[str, object]:
    """Medians over the rounds (errors are summed, the peak RSS is the highest)."""
    def col(key: str, sub: str | None = None) -> list[float | None]:
        return [r[key][sub] if sub else r[key] for r in rounds]  # type: ignore[index]
    return {
        "rounds": len(rounds),
        "req_s": _median(col("req_s")),
        "req_s_spread": _spread(col("req_s")),
        "mib_s": _median(col("mib_s")),
        "latency_us": {p: _median(col("latency_us", p)) for p in ("p50", "p90", "p99", "p99_9")},
        "http_errors": sum(col("http_errors")),          # type: ignore[arg-type]
        "socket_errors": sum(col("socket_errors_total")),  # type: ignore[arg-type]
        "cpu_us_per_request": _median(col("cpu_us_per_request")),
        "cpu_us_per_request_spread": _spread(col("cpu_us_per_request")),
        "cpu_busy": _median(col("cpu_busy")),
        "cpu_kernel_share": _median([r.get("cpu_kernel_share") for r in rounds]),  # type: ignore[misc]
        "peak_rss_kib": max(col("peak_rss_kib")),        # type: ignore[type-var]
        "origin_cpu_s": _median(col("origin_cpu_s")),
        "origin_requests": _sum_known([r.get("origin_requests") for r in rounds]),
    }


def _sum_known(values: list[object]) -> int | None:
    known = [v for v in values if isinstance(v, int)]
    return sum(known) if known else None


def paired_ratios(case: str, subject: str, baseline: str,
                  by_round: dict[tuple[str, int], dict[str, object]], rounds: int) -> dict | None:
    """subject/baseline for req/s and CPU per request, paired round by round, then the median.

    Pairing within a round compares runs made seconds apart, so slow drifts of a
    shared machine cancel out better than in a ratio of two medians.
    """
    rps, cpu = [], []
    for r in range(rounds):
        a, b = by_round.get((subject, r)), by_round.get((baseline, r))
        if not a or not b:
            continue
        if b["req_s"]:
            rps.append(a["req_s"] / b["req_s"])  # type: ignore[operator]
        if a["cpu_us_per_request"] and b["cpu_us_per_request"]:
            cpu.append(a["cpu_us_per_request"] / b["cpu_us_per_request"])  # type: ignore[operator]
    if not rps and not cpu:
        return None
    return {"case": case, "subject": subject, "baseline": baseline, "pairs": len(rps),
            "req_s": _median(rps), "req_s_range": [min(rps), max(rps)] if rps else None,
            "cpu_per_request": _median(cpu),
            "cpu_per_request_range": [min(cpu), max(cpu)] if cpu else None}


class Run:
    """The state of one run; run() fills self.doc."""

    def __init__(self, settings: Settings) -> None:
        self.s = settings
        self.servers: dict[str, Server] = {}     # the contenders running now
        self.setup: str | None = None            # the setup they run with
        self.not_started: dict[str, str] = {}    # contender -> why it is not running in it
        self.cert: RunCert | None = None
        self.origin: Server | None = None
        self.workdir = Path(tempfile.mkdtemp(prefix="edgeproxy-bench-"))
        self.workdir.chmod(0o755)  # nginx workers run as another user and read the docroot
        self.peak_reset_works = True
        self.nofile = 0
        self.started = StartedServers()
        self.doc: dict[str, object] = {
            "schema": SCHEMA,
            "started_utc": _utc_now(),
            "finished_utc": None,
            "interrupted": False,
            "commit": commit_stamp(),
            "machine": machine_facts(),
            "load_average": {"start": load_average(), "end": None},
            "settings": {
                "cases": [c.name for c in settings.cases],
                "contenders": settings.contenders,
                "duration_s": settings.duration_s, "rounds": settings.rounds,
                "warmup_s": settings.warmup_s, "pinning": settings.pinning.describe(),
                "syscalls": settings.syscalls, "subject": settings.subject,
                "origin": None, "origin_pids": [], "open_files_limit": None,
                "workdir": str(self.workdir),  # removed at the end unless --keep-workdir
            },
            "cases": {c.name: c.describe() for c in settings.cases},
            "tls": None,
            "contenders": {},
            "results": [],
            "idle": [],
            "ratios": [],
            "notes": [],
        }

    # -- helpers ---------------------------------------------------------------

    def note(self, text: str) -> None:
        say(f"note: {text}")
        self.doc["notes"].append(text)  # type: ignore[union-attr]

    def _fail(self, name: str, detail: str) -> None:
        say(f"!! {name}: {detail}")
        entry = self.doc["contenders"][name]  # type: ignore[index]
        entry["detail"] = "; ".join(filter(None, [entry["detail"], f"[{self.setup}] {detail}"]))
        entry["status"] = "failed"
        self.servers.pop(name, None)
        self.not_started[name] = detail

    def _running(self) -> list[str]:
        return [n for n in self.s.contenders if n in self.servers]

    # -- phases ----------------------------------------------------------------

    def run(self) -> dict[str, object]:
        self.nofile = nofile = raise_open_files_limit()
        self.doc["settings"]["open_files_limit"] = nofile  # type: ignore[index]
        if self.s.pinning.load_cpus:
            os.sched_setaffinity(0, parse_cpu_list(self.s.pinning.load_cpus))
        say(f"bench: {len(self.s.cases)} cases x {len(self.s.contenders)} contenders, "
            f"{self.s.rounds} round(s) of {self.s.duration_s} s; "
            f"about {self.s.estimated_seconds()} s")
        try:
            with self.started as started:
                self._start_origin(started, nofile)
                for case in self.s.cases:
                    StopRequest.check()
                    if case.setup != self.setup:
                        self._start_contenders(case.setup)
                        if not self.servers and self.setup == self.s.setups()[0]:
                            raise StartError("no contender could be started")
                    if not self._running():
                        self.note(f"{case.name} skipped: no contender is running")
                        continue
                    if case.idle:
                        self._idle_case(case)
                    else:
                        self._load_case(case)
                self.doc["load_average"]["end"] = load_average()  # type: ignore[index]
        except KeyboardInterrupt:
            self.doc["interrupted"] = True
            say("interrupted: stopping the servers")
        finally:
            if self.s.keep_workdir:
                say(f"logs and configs kept in {self.workdir}")
            else:
                shutil.rmtree(self.workdir, ignore_errors=True)
            self.doc["finished_utc"] = _utc_now()
        return self.doc

    def _start_origin(self, started: StartedServers, nofile: int) -> None:
        kind = self.s.origin
        if kind == "auto":
            kind = "nginx" if nginx_binary() else "asyncio"
            if kind == "asyncio":
                self.note("nginx is not installed: the origin is the asyncio fallback (slower)")
        if kind == "nginx":
            origin = nginx_origin(self.workdir, free_port(), nofile, self.s.pinning)
        else:
            origin = asyncio_origin(self.workdir, free_port(), self.s.pinning, sys.executable, REPO)
        self.doc["settings"]["origin"] = kind  # type: ignore[index]
        started.start(origin)
        verify_origin(origin)
        self.origin = origin
        self.doc["settings"]["origin_pids"] = origin.pids()  # type: ignore[index]
        say(f"origin ({kind}) serving on 127.0.0.1:{origin.port}")

    def _start_contenders(self, setup: str) -> None:
        """Stop the contenders of the previous setup (if any), start them all with this one."""
        for server in self.servers.values():
            self.started.stop(server)
        self.servers, self.not_started, self.setup = {}, {}, setup
        if setup == TLS and self.cert is None:
            try:
                self.cert = make_run_cert(self.workdir)
            except CertError as exc:
                self.note(f"no HTTPS cases: {exc}")
                self.not_started = {name: str(exc) for name in self.s.contenders}
                return
            self.doc["tls"] = {"certificate": "ECDSA P-256, self-signed, made for this run",  # type: ignore[index]
                               "tls12_ciphers": self.cert.ciphers}
        if setup != PLAIN:
            say(f"contenders restarted for the {setup} cases")
        for name in self.s.contenders:
            contender = CONTENDERS[name]
            entry: dict[str, object] = self.doc["contenders"].setdefault(  # type: ignore[union-attr]
                name, {"status": "ok", "detail": "", "command": None, "pids": [],
                       "instances": []})
            missing = contender.missing()
            if missing:
                if entry["status"] != "missing":
                    entry.update(status="missing", detail=missing)
                    say(f"!! {name}: skipped: {missing}")
                self.not_started[name] = missing
                continue
            server = self._new_server(name, setup)
            instance: dict[str, object] = {"setup": setup, "command": server.argv, "pids": [],
                                           "tls": None}
            entry["instances"].append(instance)  # type: ignore[union-attr]
            entry["command"] = entry["command"] or server.argv
            try:
                self.started.start(server)
                wait_until_serving(server, "/1k.bin", FILES["/1k.bin"])
                if setup == TLS:  # what a client negotiates, with the certificate checked
                    version, cipher = http_get(server, "/1k.bin").tls or ("", "")
                    instance["tls"] = {"version": version, "cipher": cipher,
                                       "resumes": tls_session_resumed(server, "/1k.bin")}
            except (StartError, OSError) as exc:  # OSError: ssl.SSLError too
                instance["pids"] = server.pids()
                entry["pids"] += instance["pids"]  # type: ignore[operator]
                self._fail(name, f"did not start: {exc}")
                self.started.stop(server)
                continue
            self.servers[name] = server
            entry["open_files_limit"] = server.open_files_limit()
            instance["pids"] = server.pids()
            entry["pids"] += instance["pids"]  # type: ignore[operator]
            tls = instance["tls"]
            shown = (f", {tls['version']} {tls['cipher']}, sessions "  # type: ignore[index]
                     f"{'resumed' if tls['resumes'] else 'NOT resumed'}") if tls else ""  # type: ignore[index]
            say(f"{name} serving on 127.0.0.1:{server.port} "
                f"({setup}{shown}; pids {server.pids()})")
        if setup == TLS:
            resuming = {name: i["tls"]["resumes"]  # type: ignore[index]
                        for name, c in self.doc["contenders"].items()  # type: ignore[union-attr]
                        if name in self.servers and (i := c["instances"][-1])["tls"]}
            if len(set(resuming.values())) > 1:
                self.note("TLS session resumption differs (" + ", ".join(
                    f"{n}: {'yes' if r else 'no'}" for n, r in resuming.items()) + "): wrk "
                    "resumes where it can, so https-handshake compares unlike handshakes")

    def _new_server(self, name: str, setup: str) -> Server:
        assert self.origin is not None
        return CONTENDERS[name].server(Setup(self.workdir, free_port(), self.origin.port,
                                             self.nofile, self.s.pinning, setup, self.cert))

    def _check_alive(self, name: str, when: str) -> bool:
        server = self.servers.get(name)
        if server is None:
            return False
        if not server.alive():
            self._fail(name, f"exited with status {server.exit_status()} {when}; "
                             f"its log ends with:\n{server.log_tail()}")
            return False
        return True

    def _check_fd_room(self, case: Case, name: str, server: Server) -> None:
        if case.idle:  # idle clients hold no upstream socket; those being opened may
            needed = case.connections + OPENING_AT_ONCE + 64
        else:
            needed = 2 * case.connections + 64
        limit = server.open_files_limit()
        if limit is not None and limit < needed:
            self.note(f"{name} may open only {limit} files; {case.name} may need {needed}")

    def _one_round(self, name: str, case: Case, duration_s: int,
                   count_syscalls: bool = False) -> dict[str, object]:
        server, origin = self.servers[name], self.origin
        assert origin is not None
        if not server.reset_peak_rss() and self.peak_reset_works:
            self.peak_reset_works = False
            self.note("cannot reset VmHWM (/proc/PID/clear_refs): peak RSS is since start")
        counter = None
        if count_syscalls:
            counter = SyscallCount(server.pids(), self.workdir / f"perf-{name}-{case.name}.txt",
                                   self.s.pinning)
            time.sleep(0.2)  # let perf attach before the load starts
        seen0 = cached_requests_seen(self.workdir) if case.cached else None
        (user0, sys0), origin0 = server.cpu_split(), origin.cpu_ticks()
        try:
            wrk = run_round(case, server.port, duration_s, self.workdir, self.s.pinning)
        finally:
            syscalls = counter.stop() if counter else None
        (user1, sys1), origin1 = server.cpu_split(), origin.cpu_ticks()
        seen1 = cached_requests_seen(self.workdir) if case.cached else None
        past_cache = seen1 - seen0 if seen0 is not None and seen1 is not None else None
        return round_figures(wrk, case.body_bytes, user1 + sys1 - user0 - sys0,
                             origin1 - origin0, server.peak_rss_kib(), syscalls, past_cache,
                             sys_ticks=sys1 - sys0)

    def _check_cache_hit(self, name: str, case: Case) -> str | None:
        """After the warm-up, GET the case's path until the contender says it answered
        from its cache; None if it did, else what went wrong."""
        server, contender = self.servers[name], CONTENDERS[name]
        shown = "no answer"
        for _ in range(HIT_CHECK_TRIES):
            try:
                got = http_get(server, case.path, timeout=5)
            except (OSError, http.client.HTTPException) as exc:
                shown = f"GET {case.path}: {exc}"
            else:
                hit, header = contender.cache_status(got.headers)
                if got.status == 200 and hit:
                    say(f"[{case.name} cache check] {name:<10} hit ({header})")
                    return None
                shown = f"GET {case.path} answered {got.status} with {header}"
            time.sleep(0.1)  # a store may complete just after the answer
        return f"not answered from its cache after {HIT_CHECK_TRIES} GETs: {shown}"

    def _load_case(self, case: Case) -> None:
        for name in self._running():
            self._check_fd_room(case, name, self.servers[name])
        by_round: dict[tuple[str, int], dict[str, object]] = {}
        errors: dict[str, list[str]] = {name: [f"not running ({self.setup}): {why}"]
                                         for name, why in self.not_started.items()}
        if case.name in self.s.warm_up_before():
            for name in self._running():
                StopRequest.check()
                say(f"[{case.name} warm-up] {name}")
                try:
                    run_round(case, self.servers[name].port, self.s.warmup_s, self.workdir,
                              self.s.pinning)
                except WrkError as exc:
                    errors.setdefault(name, []).append(f"warm-up: {exc}")
                self._check_alive(name, f"during the {case.name} warm-up")
        measured = self._running()
        if case.cached:  # rounds of misses would measure something else: leave such a one out
            for name in self._running():
                problem = self._check_cache_hit(name, case)
                if problem:
                    say(f"!! [{case.name}] {name}: {problem}; left out of this case")
                    errors.setdefault(name, []).append(f"cache check: {problem}")
                    measured.remove(name)
        for r in range(self.s.rounds):
            for name in rotation([n for n in measured if n in self.servers], r):
                StopRequest.check()
                tag = f"[{case.name} round {r + 1}/{self.s.rounds}] {name:<10}"
                try:
                    figures = self._one_round(name, case, self.s.duration_s)
                except WrkError as exc:
                    errors.setdefault(name, []).append(f"round {r + 1}: {exc}")
                    say(f"{tag} wrk failed: {exc}")
                else:
                    by_round[(name, r)] = figures
                    say(f"{tag} {progress_figures(figures)}")
                    self._check_past_cache(case, name, figures)
                self._check_alive(name, f"during {case.name} round {r + 1}")
        syscalls: dict[str, float | None] = {}
        if self.s.syscalls:
            for name in [n for n in measured if n in self.servers]:
                StopRequest.check()
                try:
                    figures = self._one_round(name, case, self.s.duration_s, count_syscalls=True)
                except WrkError as exc:
                    errors.setdefault(name, []).append(f"syscall round: {exc}")
                    continue
                syscalls[name] = figures["syscalls_per_request"]  # type: ignore[assignment]
                shown = "n/a" if syscalls[name] is None else f"{syscalls[name]:.1f}"
                say(f"[{case.name} syscalls] {name:<10} {shown} syscalls/request")
        for name in self.s.contenders:
            rounds = [by_round[(name, r)] for r in range(self.s.rounds) if (name, r) in by_round]
            if not rounds and name not in errors:
                continue
            self.doc["results"].append({  # type: ignore[union-attr]
                "case": case.name, "contender": name,
                "median": summarize(rounds) if rounds else None,
                "syscalls_per_request": syscalls.get(name),
                "errors": errors.get(name, []),
                "rounds": rounds,
            })
        for baseline in self.s.contenders:
            if baseline == self.s.subject:
                continue
            ratio = paired_ratios(case.name, self.s.subject, baseline, by_round, self.s.rounds)
            if ratio:
                self.doc["ratios"].append(ratio)  # type: ignore[union-attr]

    def _check_past_cache(self, case: Case, name: str, figures: dict[str, object]) -> None:
        past, done = figures["origin_requests"], figures["requests"]
        if case.cached and isinstance(past, int) and past > 0.001 * done:  # type: ignore[operator]
            self.note(f"{case.name} {name}: {past} of {done} requests reached the origin "
                      "in a round: not all were cache hits")

    def _idle_case(self, case: Case) -> None:
        """Each contender afresh (a new process), so memory kept from the load cases
        does not hide the growth; the load-case instance stays up meanwhile."""
        if raise_open_files_limit() < case.connections + 256:
            self.note(f"this process may open only {raise_open_files_limit()} files: "
                      f"{case.name} will fall short of {case.connections} connections")
        for name in self._running():
            StopRequest.check()
            say(f"[{case.name}] {name}: fresh instance, opening {case.connections} connections")
            server = self._new_server(name, case.setup)
            try:
                self.started.start(server)
                wait_until_serving(server, "/1k.bin", FILES["/1k.bin"])
                self._check_fd_room(case, name, server)
                result = hold_idle_connections(server, case.path, case.connections,
                                               self.s.idle_time_limit_s)
                exit_status = server.exit_status()
            except StartError as exc:
                say(f"[{case.name}] {name}: fresh instance did not start: {exc}")
                self.doc["idle"].append({"case": case.name, "contender": name,  # type: ignore[union-attr]
                                         "error": f"did not start: {exc}"})
                continue
            finally:
                self.started.stop(server)
            per_conn = result.bytes_per_connection
            say(f"[{case.name}] {name:<10} {result.still_open}/{result.wanted} open, "
                f"RSS +{result.growth_kib / 1024:.1f} MiB, "
                f"{'n/a' if per_conn is None else f'{per_conn:,.0f}'} bytes/connection"
                + (f" ({result.failed} failed: {result.first_error})" if result.failed else "")
                + ("" if exit_status is None else f"; the proxy exited with status {exit_status}"))
            self.doc["idle"].append({  # type: ignore[union-attr]
                "case": case.name, "contender": name, "error": None, "wanted": result.wanted,
                "opened": result.opened, "still_open": result.still_open,
                "failed": result.failed, "first_error": result.first_error,
                "rss_before_kib": result.rss_before_kib, "rss_after_kib": result.rss_after_kib,
                "growth_kib": result.growth_kib,
                "bytes_per_connection": per_conn, "seconds": result.seconds,
                "exited_with": exit_status,
            })


def progress_figures(f: dict[str, object]) -> str:
    cpu = f["cpu_us_per_request"]
    busy = f["cpu_busy"]
    errors = f["http_errors"] + f["socket_errors_total"]  # type: ignore[operator]
    return (f"{f['req_s']:>10,.0f} req/s  CPU "
            f"{'n/a' if cpu is None else f'{cpu:.1f}'} us/req "
            f"({'n/a' if busy is None else f'{busy:.0%}'} busy)  "
            f"p99 {f['latency_us']['p99'] / 1000:.2f} ms  errors {errors}")  # type: ignore[index]


def run(settings: Settings) -> dict[str, object]:
    if perf_unusable_reason := (perf_unusable() if settings.syscalls else None):
        say(f"note: --syscalls skipped: {perf_unusable_reason}")
        settings = Settings(**{**settings.__dict__, "syscalls": False})
        bench_run = Run(settings)
        bench_run.doc["notes"].append(f"--syscalls skipped: {perf_unusable_reason}")  # type: ignore[union-attr]
    else:
        bench_run = Run(settings)
    return bench_run.run()
