"""Show a run's document: the table on stdout, the JSON file, and the optional PNG chart."""
from __future__ import annotations

import json
import time
from pathlib import Path

from bench.cases import CASES

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def result_stem(doc: dict) -> str:
    """<UTC timestamp>-<short commit>, e.g. 20250101T120000Z-1a2b3c4d."""
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.strptime(doc["started_utc"], "%Y-%m-%dT%H:%M:%SZ"))
    return f"{stamp}-{doc['commit']['short']}"


def write_json(doc: dict, results_dir: Path) -> Path:
    results_dir.mkdir(parents=True, exist_ok=True)
    path = results_dir / f"{result_stem(doc)}.json"
    path.write_text(json.dumps(doc, indent=2) + "\n")
    return path


def _num(value: float | None, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def _pct(fraction: float | None) -> str:
    return "-" if fraction is None else f"{100 * fraction:.0f}%"


def _ms(us: float | None) -> str:
    return "-" if us is None else f"{us / 1000:.2f}"


def render_table(doc: dict) -> str:
    s, commit = doc["settings"], doc["commit"]
    load = doc["load_average"]
    lines = [
        f"edgeproxy bench  commit {commit['short']}{' (dirty)' if commit['dirty'] else ''}  "
        f"{doc['machine']['nproc']} CPUs  {s['rounds']} round(s) x {s['duration_s']} s  "
        f"origin {s['origin']}  pinning proxy={s['pinning']['proxy_cpus']} "
        f"load={s['pinning']['load_cpus']}  load average {load['start'][0]:.2f}"
        + (f" -> {load['end'][0]:.2f}" if load["end"] else ""),
        "",
    ]
    header = (f"{'case':<16}{'contender':<11}{'req/s':>10}{'+-':>5}{'MiB/s':>9}{'p50 ms':>9}"
              f"{'p99 ms':>9}{'p99.9 ms':>10}{'err h/s':>9}{'CPU us/req':>12}{'+-':>5}"
              f"{'busy':>6}{'kern':>6}{'peak RSS MiB':>14}")
    if s["syscalls"]:
        header += f"{'sys/req':>9}"
    lines.append(header)
    previous = None
    for row in doc["results"]:
        m = row["median"]
        case = row["case"] if row["case"] != previous else ""
        previous = row["case"]
        if m is None:
            failure = "; ".join(row["errors"])[:100]
            lines.append(f"{case:<16}{row['contender']:<11}  failed: {failure}")
            continue
        lat = m["latency_us"]
        line = (f"{case:<16}{row['contender']:<11}{m['req_s']:>10,.0f}"
                f"{_pct(m['req_s_spread']):>5}"
                f"{m['mib_s']:>9.1f}{_ms(lat['p50']):>9}{_ms(lat['p99']):>9}{_ms(lat['p99_9']):>10}"
                f"{str(m['http_errors']) + '/' + str(m['socket_errors']):>9}"
                f"{_num(m['cpu_us_per_request'], '.1f'):>12}"
                f"{_pct(m['cpu_us_per_request_spread']):>5}"
                f"{_pct(m['cpu_busy']):>6}"
                f"{_pct(m.get('cpu_kernel_share')):>6}"
                f"{m['peak_rss_kib'] / 1024:>14.1f}")
        if s["syscalls"]:
            line += f"{_num(row['syscalls_per_request'], '.1f'):>9}"
        lines.append(line)
    lines += _case_footnotes(doc)
    if doc["ratios"]:
        lines += ["", (f"{s['subject']} / baseline, median of the per-round pairs "
                       "(req/s: above 1 is faster; CPU/request: below 1 is cheaper)"),
                  f"{'case':<16}{'baseline':<11}{'req/s':>10}{'range':>14}{'CPU/req':>10}{'range':>14}"]
        for r in doc["ratios"]:
            rr, cr = r["req_s_range"], r["cpu_per_request_range"]
            lines.append(f"{r['case']:<16}{r['baseline']:<11}{_num(r['req_s'], '.2f'):>9}x"
                         f"{(f'{rr[0]:.2f}-{rr[1]:.2f}' if rr else '-'):>14}"
                         f"{_num(r['cpu_per_request'], '.2f'):>9}x"
                         f"{(f'{cr[0]:.2f}-{cr[1]:.2f}' if cr else '-'):>14}")
    else:
        lines += ["", (f"no ratios: they need {s['subject']} and another contender measured "
                       "in the same rounds (--subject picks the first one)")]
    if doc["idle"]:
        lines += ["", (f"{'case':<16}{'contender':<11}{'open':>13}{'RSS before MiB':>16}"
                       f"{'after MiB':>11}{'growth MiB':>12}{'bytes/conn':>12}")]
        for row in doc["idle"]:
            if row["error"]:
                lines.append(f"{row['case']:<16}{row['contender']:<11}  {row['error'][:100]}")
                continue
            lines.append(f"{row['case']:<16}{row['contender']:<11}"
                         f"{str(row['still_open']) + '/' + str(row['wanted']):>13}"
                         f"{row['rss_before_kib'] / 1024:>16.1f}"
                         f"{row['rss_after_kib'] / 1024:>11.1f}{row['growth_kib'] / 1024:>12.1f}"
                         f"{_num(row['bytes_per_connection'], ',.0f'):>12}")
    troubles = [f"{name}: {c['status']}: {c['detail']}" for name, c in doc["contenders"].items()
                if c["status"] != "ok"]
    if troubles or doc["notes"] or doc["interrupted"]:
        lines.append("")
        lines += [f"!! {t}" for t in troubles]
        lines += [f"note: {n}" for n in doc["notes"]]
        if doc["interrupted"]:
            lines.append("note: the run was interrupted; the results are partial")
    return "\n".join(lines)


def _case_footnotes(doc: dict) -> list[str]:
    """What the HTTPS handshake and cache rows mean, and how many requests got past the caches."""
    lines = []
    measured = list(dict.fromkeys(r["case"] for r in doc["results"]))
    for name in measured:
        case = CASES.get(name)
        if case is None:
            continue
        if case.per_handshake:
            lines.append(f"{name}: every request is a new TCP and TLS connection: req/s = "
                         "handshakes/s, CPU us/req = CPU per handshake (wrk resumes the session: "
                         "see contenders.*.instances[].tls in the JSON)")
        if case.cached:
            past = [f"{r['contender']} {_num(r['median']['origin_requests'], 'd')}"
                    for r in doc["results"] if r["case"] == name and r["median"]]
            if past:
                lines.append(f"{name}: requests that reached the origin during the rounds "
                             f"(- : not counted): {', '.join(past)}")
    return [""] + lines if lines else []


def write_chart(doc: dict, path: Path) -> str | None:
    """Draw req/s and CPU/request per case per contender; the reason if it cannot."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed (pip install matplotlib)"
    rows = [r for r in doc["results"] if r["median"]]
    if not rows:
        return "no results to draw"
    cases = list(dict.fromkeys(r["case"] for r in rows))
    contenders = list(dict.fromkeys(r["contender"] for r in rows))
    value = {(r["case"], r["contender"]): r["median"] for r in rows}
    fig, axes = plt.subplots(1, 2, figsize=(max(8, 2.2 * len(cases) * 2), 4.5))
    width = 0.8 / len(contenders)
    for ax, key, title in ((axes[0], "req_s", "requests/s (higher is better)"),
                           (axes[1], "cpu_us_per_request",
                            "proxy CPU µs per request (lower is better)")):
        for i, name in enumerate(contenders):
            heights = [(value.get((c, name)) or {}).get(key) or 0 for c in cases]
            ax.bar([x + i * width for x in range(len(cases))], heights, width, label=name)
        drawn = [v for r in rows if (v := r["median"].get(key))]
        if drawn and max(drawn) > 20 * min(drawn):
            ax.set_yscale("log")  # 1 KiB and 1 MiB cases differ a thousandfold
        ax.set_xticks([x + width * (len(contenders) - 1) / 2 for x in range(len(cases))])
        ax.set_xticklabels(cases, rotation=20)
        ax.set_title(title)
        ax.legend()
    commit = doc["commit"]
    dirty = " (dirty)" if commit["dirty"] else ""
    fig.suptitle(f"edgeproxy bench, commit {commit['short']}{dirty}, "
                 f"{doc['started_utc']}, medians of {doc['settings']['rounds']} round(s)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return None
