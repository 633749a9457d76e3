"""``python -m bench``: parse the options, run, then print and save the results."""
from __future__ import annotations

import argparse
import os
import shutil
import signal
import sys
from pathlib import Path

from bench.cases import CASES, GROUPS, PLAIN
from bench.contenders import CONTENDERS
from bench.report import RESULTS_DIR, render_table, write_chart, write_json
from bench.runner import Settings, StopRequest, run, say
from bench.servers import Pinning, StartError
from bench.wrk import wrk_binary

DEFAULT_DURATION_S = 10
DEFAULT_ROUNDS = 3
DEFAULT_WARMUP_S = 1
QUICK_DURATION_S = 2


def _names(text: str, known: dict, what: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in known]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"unknown {what} {', '.join(unknown) or '(none given)'}; "
            f"choose from {', '.join(known)}")
    return list(dict.fromkeys(names))


def _case_names(text: str) -> list[str]:
    """Case names and group names (core, tls, cache, all), groups expanded."""
    groups = {g: [c.name for c in CASES.values() if c.setup == setup]
              for g, setup in GROUPS.items()}
    groups["all"] = list(CASES)
    names = _names(text, {**CASES, **groups}, "case")
    return list(dict.fromkeys(n for name in names for n in groups.get(name, [name])))


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m bench",
        description="edgeproxy side by side with nginx and HAProxy on this machine "
                    "(docs/bench.md explains the columns).")
    p.add_argument("--quick", action="store_true",
                   help=f"get-1k and get-100k, 1 round of {QUICK_DURATION_S} s (under a minute)")
    p.add_argument("--cases", type=_case_names,
                   help=f"comma-separated, from: {', '.join(CASES)}; or the groups "
                        f"{', '.join(GROUPS)}, all (default: core)")
    p.add_argument("--contenders", type=lambda t: _names(t, CONTENDERS, "contender"),
                   default=["nginx", "haproxy", "edgeproxy"],
                   help="comma-separated (default: nginx,haproxy,edgeproxy; edgeproxy-base "
                        "runs the checkout EDGEPROXY_BENCH_BASE names, to compare commits)")
    p.add_argument("--duration", type=int, help=f"seconds per round (default {DEFAULT_DURATION_S}, "
                                                f"--quick {QUICK_DURATION_S})")
    p.add_argument("--rounds", type=int,
                   help=f"rounds per case (default {DEFAULT_ROUNDS}, --quick 1)")
    p.add_argument("--warmup", type=int, default=DEFAULT_WARMUP_S,
                   help="seconds of unrecorded load per case and contender before round 1 "
                        "(0: none)")
    p.add_argument("--proxy-cpus", default="0", help="CPUs for the proxies (taskset -c list)")
    p.add_argument("--load-cpus", default="1", help="CPUs for the origin, wrk and this process")
    p.add_argument("--no-pin", action="store_true", help="do not pin anything to CPUs")
    p.add_argument("--syscalls", action="store_true",
                   help="one extra round per case under perf stat: syscalls per request")
    p.add_argument("--subject", default="edgeproxy", choices=list(CONTENDERS),
                   help="the contender whose ratios to the others are shown (default edgeproxy)")
    p.add_argument("--origin", default="auto", choices=["auto", "nginx", "asyncio"],
                   help="the origin server (auto: nginx when installed)")
    p.add_argument("--results-dir", type=Path, default=RESULTS_DIR,
                   help="where the JSON and PNG go (default bench/results/)")
    p.add_argument("--keep-workdir", action="store_true",
                   help="keep the temporary configs and server logs, and print where")
    return p


def settings_from(args: argparse.Namespace) -> Settings:
    if args.cases:
        cases = [c for c in CASES.values() if c.name in args.cases]  # registry order
    elif args.quick:
        cases = [c for c in CASES.values() if c.quick]
    else:
        cases = [c for c in CASES.values() if c.setup == PLAIN]  # the core group
    duration = args.duration or (QUICK_DURATION_S if args.quick else DEFAULT_DURATION_S)
    rounds = args.rounds or (1 if args.quick else DEFAULT_ROUNDS)
    if duration < 1 or rounds < 1 or args.warmup < 0:
        raise SystemExit("python -m bench: --duration and --rounds must be at least 1, "
                         "--warmup at least 0")
    pinning = Pinning(None, None)
    if not args.no_pin:
        cpus = os.sched_getaffinity(0)
        if shutil.which("taskset") is None:
            say("note: taskset is not installed: nothing is pinned")
        elif len(cpus) < 2:
            say("note: fewer than 2 CPUs available: nothing is pinned")
        else:
            pinning = Pinning(args.proxy_cpus, args.load_cpus)
    return Settings(cases=cases, contenders=args.contenders, duration_s=duration, rounds=rounds,
                    warmup_s=args.warmup, pinning=pinning, syscalls=args.syscalls,
                    subject=args.subject, origin=args.origin, keep_workdir=args.keep_workdir)


def _stop_running(signum: int, frame: object) -> None:
    StopRequest.requested = True
    raise KeyboardInterrupt  # so the run's finally blocks stop the servers


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if wrk_binary() is None:
        print("python -m bench: wrk is not installed (apt-get install wrk)", file=sys.stderr)
        return 2
    settings = settings_from(args)
    signal.signal(signal.SIGTERM, _stop_running)
    if signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:
        signal.signal(signal.SIGINT, _stop_running)
    try:
        doc = run(settings)
    except StartError as exc:
        print(f"python -m bench: {exc}", file=sys.stderr)
        return 1
    print(render_table(doc))
    path = write_json(doc, args.results_dir)
    problem = write_chart(doc, path.with_suffix(".png"))
    doc["chart"] = None if problem else str(path.with_suffix(".png"))
    path = write_json(doc, args.results_dir)  # again, now naming the chart
    say(f"results: {path}")
    say(f"chart: {doc['chart']}" if doc["chart"] else f"chart skipped: {problem}")
    if doc["interrupted"]:
        return 130
    measured = any(r["median"] for r in doc["results"]) or bool(doc["idle"])
    return 0 if measured else 1
