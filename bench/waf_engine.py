"""CPU cost of the firewall engine per request: CRS at paranoia level 1, block mode.

A micro-benchmark of the engine alone (no sockets, no proxy): it builds each
case's request once and times `transaction(...).run_request()` with
time.process_time over N requests after a warm-up, several rounds, and prints
the median microseconds per request for each case. Run it on an idle machine:

    python -m bench.waf_engine [--crs DIR] [-n 500] [--rounds 5] [--json out.json]

The issue's targets (issue 13): clean GET at most 100 us added CPU, 2 KiB
form or JSON POST at most 300 us.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from urllib.parse import urlencode

from edgeproxy.waf.engine import Engine, Request

BROWSER = [
    ("Host", "www.example.com"),
    ("User-Agent", "Mozilla/5.0 (X11; Linux x86_64; rv:120.0) Gecko/20100101 Firefox/120.0"),
    ("Accept", "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8"),
    ("Accept-Language", "en-US,en;q=0.5"),
    ("Accept-Encoding", "gzip, deflate, br"),
    ("Cookie", "session=4f2a9c1e8b7d6a5f; theme=dark"),
    ("Connection", "keep-alive"),
]


def _form_2k() -> str:
    fields = {f"field{i}": f"value number {i} with some ordinary words" for i in range(60)}
    body = urlencode(fields)
    return body[:2048]


def _json_2k() -> str:
    items = [{"id": i, "name": f"item {i}", "tags": ["a", "b"], "price": i * 1.5} for i in range(40)]
    body = json.dumps({"order": {"customer": "Jane Doe", "items": items}})
    while len(body) > 2048:
        items.pop()
        body = json.dumps({"order": {"customer": "Jane Doe", "items": items}})
    return body


def cases() -> dict[str, Request]:
    form = _form_2k()
    js = _json_2k()
    return {
        "clean GET": Request("GET", "/search?q=hello&page=2", "1.1", list(BROWSER)),
        "2 KiB form POST": Request("POST", "/submit", "1.1", BROWSER + [
            ("Content-Type", "application/x-www-form-urlencoded"), ("Content-Length", str(len(form)))], form),
        "2 KiB JSON POST": Request("POST", "/api/order", "1.1", BROWSER + [
            ("Content-Type", "application/json"), ("Content-Length", str(len(js)))], js),
    }


# The CRS image's JSON switch (rule 200001 in TESTING.md), so JSON bodies are parsed.
JSON_SWITCH = ('SecRule REQUEST_HEADERS:Content-Type "^application/json" '
               '"id:200001,phase:1,t:none,t:lowercase,pass,nolog,ctl:requestBodyProcessor=JSON"\n')


def measure(engine: Engine, req: Request, n: int, rounds: int) -> list[float]:
    for _ in range(min(n, 50)):
        engine.transaction(req).run_request()
    out = []
    for _ in range(rounds):
        t0 = time.process_time()
        for _ in range(n):
            engine.transaction(req).run_request()
        out.append((time.process_time() - t0) / n * 1e6)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--crs", default=os.environ.get("EDGEPROXY_CRS_DIR")
                    or os.path.join(os.path.dirname(__file__), "..", "..", "shared", "crs"))
    ap.add_argument("-n", type=int, default=500)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--json")
    a = ap.parse_args(argv)
    t0 = time.perf_counter()
    engine = Engine.load([os.path.join(a.crs, "crs-setup.conf.example"), os.path.join(a.crs, "rules", "*.conf")],
                         extra_text="SecRuleEngine On\n" + JSON_SWITCH)
    load_s = time.perf_counter() - t0
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip()
    print(f"CRS loaded: {engine.rule_count} rules in {load_s:.2f} s; commit {commit}; "
          f"load average {os.getloadavg()[0]:.1f}")
    results = {}
    print(f"{'case':<18} {'median us':>10} {'min us':>9}  verdict")
    for name, req in cases().items():
        us = measure(engine, req, a.n, a.rounds)
        tx = engine.transaction(req)
        tx.run_request()
        v = tx.verdict()
        results[name] = {"median_us": statistics.median(us), "min_us": min(us), "rounds": us,
                         "action": v.action, "rule_ids": v.rule_ids}
        print(f"{name:<18} {statistics.median(us):>10.0f} {min(us):>9.0f}  {v.action} {v.rule_ids}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"commit": commit, "load_seconds": load_s, "cases": results}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
