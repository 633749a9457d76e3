"""A go-ftw compatible runner of the CRS regression suite, for the firewall tests.

It reads CRS's YAML tests (go-ftw format) and the platform overrides, builds
each stage's request as go-ftw would send it (raw bytes), and judges a stage by
the rule ids the engine logged (`expect_ids`, `no_expect_ids`), the status and
the log regexes, as TESTING.md describes. Requests go either straight into the
engine's request model (`run_in_process`) or over a socket (`judge`, with a
verdict the caller got from a real proxy's audit log).
"""

from __future__ import annotations

import base64
import glob
import json
import os
import re
from dataclasses import dataclass, field

import yaml

from edgeproxy.http import _pure
from edgeproxy.waf.engine import Engine, Request

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def crs_dir() -> str | None:
    """Where CRS v4 is: $EDGEPROXY_CRS_DIR, else ../shared/crs beside the repo."""
    for d in (os.environ.get("EDGEPROXY_CRS_DIR"), os.path.join(REPO, "..", "shared", "crs"),
              "/work/shared/crs"):
        if d and os.path.isfile(os.path.join(d, "crs-setup.conf.example")):
            return os.path.abspath(d)
    return None


# The configuration TESTING.md gives: the CRS docker image's base rules,
# detection mode, paranoia level 4 and the marker rule.
BASE_CONF = r"""
SecRuleEngine DetectionOnly
SecRequestBodyAccess On
SecRequestBodyLimit 13107200
SecRequestBodyNoFilesLimit 131072
SecRequestBodyLimitAction Reject
SecRequestBodyJsonDepthLimit 512
SecArgumentsLimit 1000
SecResponseBodyAccess On
SecResponseBodyMimeType text/plain text/html text/xml application/json
SecResponseBodyLimit 1048576
SecResponseBodyLimitAction ProcessPartial
SecDefaultAction "phase:1,pass,log,tag:'modsecurity'"
SecDefaultAction "phase:2,pass,log,tag:'modsecurity'"
SecRule REQUEST_HEADERS:Content-Type "^(?:application(?:/soap\+|/)|text/)xml" \
    "id:200000,phase:1,t:none,t:lowercase,pass,nolog,ctl:requestBodyProcessor=XML"
SecRule REQUEST_HEADERS:Content-Type "^application/json" \
    "id:200001,phase:1,t:none,t:lowercase,pass,nolog,ctl:requestBodyProcessor=JSON"
SecRule REQUEST_HEADERS:Content-Type "^application/[a-z0-9.-]+[+]json" \
    "id:200006,phase:1,t:none,t:lowercase,pass,nolog,ctl:requestBodyProcessor=JSON"
SecRule &ARGS "@ge 1000" \
    "id:200007,phase:2,t:none,log,deny,status:400,msg:'Failed to fully parse request body due to large argument count',severity:2"
SecRule REQBODY_ERROR "!@eq 0" \
    "id:200002,phase:2,t:none,log,deny,status:400,msg:'Failed to parse request body.',logdata:'%{reqbody_error_msg}',severity:2"
SecRule MULTIPART_STRICT_ERROR "!@eq 0" \
    "id:200003,phase:2,t:none,log,deny,status:400,msg:'Multipart request body failed strict validation'"
SecRule MULTIPART_UNMATCHED_BOUNDARY "@eq 1" \
    "id:200004,phase:2,t:none,log,deny,msg:'Multipart parser detected a possible unmatched boundary.'"
SecRule TX:/^MSC_/ "!@streq 0" \
    "id:200005,phase:2,t:none,deny,msg:'ModSecurity internal error flagged: %{MATCHED_VAR_NAME}'"
SecAction "id:900000,phase:1,pass,t:none,nolog,setvar:tx.blocking_paranoia_level=4"
SecAction "id:900110,phase:1,pass,t:none,nolog,setvar:tx.inbound_anomaly_score_threshold=5,setvar:tx.outbound_anomaly_score_threshold=4"
SecAction "id:900320,phase:1,pass,t:none,nolog,setvar:tx.arg_length=400"
SecAction "id:900330,phase:1,pass,t:none,nolog,setvar:tx.total_arg_length=6400"
SecAction "id:900340,phase:1,pass,t:none,nolog,setvar:tx.max_file_size=64100"
SecAction "id:900350,phase:1,pass,t:none,nolog,setvar:tx.combined_file_sizes=65535"
SecRule REQUEST_HEADERS:X-CRS-Test "@rx ^.*$" \
    "id:999999,phase:1,pass,t:none,log,msg:'%{MATCHED_VAR}',ctl:ruleRemoveById=1-999999"
"""


def load_engine(crs: str, extra: str = "") -> Engine:
    return Engine.load([os.path.join(crs, "crs-setup.conf.example"), os.path.join(crs, "rules", "*.conf")],
                       extra_text=BASE_CONF + extra)


@dataclass
class Stage:
    raw: bytes
    output: dict


@dataclass
class Case:
    rule_file: str
    rule_id: int
    test_id: int
    stages: list[Stage] = field(default_factory=list)

    @property
    def name(self) -> str:
        return f"{self.rule_id}-{self.test_id}"


def raw_request(inp: dict) -> bytes:
    """The bytes go-ftw sends for one stage's `input`."""
    if inp.get("encoded_request"):
        return base64.b64decode("".join(inp["encoded_request"].split()))
    method = inp.get("method", "GET")
    uri = inp.get("uri", "/")
    version = inp.get("version", "HTTP/1.1")
    headers = inp.get("headers") or {}
    data = inp.get("data")
    if isinstance(data, list):
        data = "\r\n".join(data)
    body = data.encode("utf-8", "surrogateescape") if isinstance(data, str) else b""
    lines = [f"{method} {uri} {version}".encode("utf-8", "surrogateescape")]
    names = {str(k).lower() for k in headers}
    for k, v in headers.items():
        lines.append(f"{k}: {v}".encode("utf-8", "surrogateescape"))
    if inp.get("autocomplete_headers", True):
        if body and "content-length" not in names and "transfer-encoding" not in names:
            lines.append(b"Content-Length: %d" % len(body))
        if body and "content-type" not in names:
            lines.append(b"Content-Type: application/x-www-form-urlencoded")
        if "connection" not in names:
            lines.append(b"Connection: close")
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


def load_cases(crs: str) -> list[Case]:
    cases: list[Case] = []
    root = os.path.join(crs, "tests", "regression", "tests")
    for path in sorted(glob.glob(os.path.join(root, "*", "*.yaml"))):
        with open(path, encoding="utf-8") as f:
            doc = yaml.safe_load(f)
        if not doc or "tests" not in doc:
            continue
        rule_file = os.path.basename(os.path.dirname(path))
        rid = int(doc.get("rule_id") or os.path.basename(path).split(".")[0])
        for t in doc["tests"]:
            c = Case(rule_file, rid, int(t["test_id"]))
            for st in t["stages"]:
                st = st.get("stage", st)
                c.stages.append(Stage(raw_request(st["input"]), st.get("output") or {}))
            cases.append(c)
    return cases


def load_overrides(crs: str, platform: str = "nginx") -> dict[tuple[int, int], tuple[dict, str]]:
    """(rule id, test id) -> (the output the platform gets instead, the reason)."""
    path = os.path.join(crs, "tests", "regression", f"{platform}-overrides.yaml")
    with open(path, encoding="utf-8") as f:
        doc = yaml.safe_load(f)
    out: dict[tuple[int, int], tuple[dict, str]] = {}
    for o in doc.get("test_overrides") or []:
        for tid in o.get("test_ids") or []:
            # An override without an output ignores the test (go-ftw's behaviour).
            out[(int(o["rule_id"]), int(tid))] = (o.get("output") or {}, (o.get("reason") or "").strip())
    return out


# ------------------------------------------------------------------ in process

def to_request(raw: bytes) -> tuple[Request | None, int]:
    """The engine's request for raw bytes, and the status the proxy's parser gives.

    The status is 200 when edgeproxy's strict HTTP/1.1 parser accepts the
    head, else the parser's refusal (400, 505, ...).
    """
    status = 200
    try:
        if _pure.parse_request(raw) is None:
            status = 400
    except _pure.HTTPError as e:
        status = e.status
    head, sep, rest = raw.partition(b"\r\n\r\n")
    if not sep:
        head, sep, rest = raw.partition(b"\n\n")
    lines = head.decode("latin-1").replace("\r\n", "\n").split("\n")
    first = lines[0].split(" ")
    parts = [p for p in first if p]
    if len(parts) < 2:
        return None, status if status != 200 else 400
    method, target = parts[0], parts[1]
    version = parts[2] if len(parts) > 2 else "HTTP/1.1"
    headers = []
    for ln in lines[1:]:
        if ":" not in ln:
            continue
        k, _, v = ln.partition(":")
        headers.append((k, v.strip(" \t")))
    body = rest
    lower = {k.lower(): v for k, v in headers}
    if "chunked" in lower.get("transfer-encoding", "").lower():
        body = _dechunk(rest)
    elif lower.get("content-length", "").isdigit():
        body = rest[:int(lower["content-length"])]
    else:
        body = b""  # RFC 9112 6.3: no framing, no body
    ver = version[5:] if version.upper().startswith("HTTP/") else version
    return Request(method, target, ver, headers, body.decode("latin-1")), status


def _dechunk(data: bytes) -> bytes:
    out = []
    while data:
        line, sep, data = data.partition(b"\r\n")
        if not sep:
            break
        try:
            n = int(line.split(b";")[0].strip() or b"0", 16)
        except ValueError:
            break
        if n == 0:
            break
        out.append(data[:n])
        data = data[n + 2:]
    return b"".join(out)


def reflect(req: Request) -> tuple[int, list[tuple[str, str]], str]:
    """What the albedo-style backend answers: its /reflect endpoint, else an empty 200."""
    if req.method == "POST" and req.uri.split("?")[0] == "/reflect":
        try:
            spec = json.loads(req.body.encode("latin-1").decode("utf-8", "replace"))
        except ValueError:
            return 400, [], ""
        headers = [(str(k), str(v)) for k, v in (spec.get("headers") or {}).items()]
        body = spec.get("body") or ""
        if spec.get("encodedBody"):
            body = base64.b64decode(spec["encodedBody"]).decode("latin-1")
        else:
            body = body.encode("utf-8").decode("latin-1")
        if not any(k.lower() == "content-type" for k, _ in headers):
            headers.append(("Content-Type", "text/plain; charset=utf-8"))
        return int(spec.get("status") or 200), headers, body
    return 200, [("Content-Length", "0")], ""


_RESPONSE_TYPES = ("text/plain", "text/html", "text/xml", "application/json")


def run_in_process(engine: Engine, raw: bytes) -> tuple[int, list[int], list[tuple[int, str, str]]]:
    """(status, logged rule ids, (id, msg, logdata) per logged match) of one request."""
    req, status = to_request(raw)
    if req is None or status != 200:
        return status, [], []
    tx = engine.transaction(req)
    tx.run_request()
    if not tx.interrupted:
        st, headers, body = reflect(req)
        ctype = next((v.split(";")[0].strip().lower() for k, v in headers if k.lower() == "content-type"), "")
        tx.set_response(st, headers, body if ctype in _RESPONSE_TYPES else "")
        tx.run_response()
        status = tx.status if tx.interrupted else st
    else:
        status = tx.status
    return status, tx.rule_ids, tx.details


def _esc(s: str) -> str:
    if s.isprintable() and s.isascii():
        return s
    return "".join(c if 0x20 <= ord(c) < 0x7F else f"\\x{ord(c):02x}" for c in s)


def judge(output: dict, status: int, ids: list[int], details) -> str | None:
    """None when the stage passes, else why not."""
    log = output.get("log") or {}
    logged = set(ids)
    for i in log.get("expect_ids") or []:
        if i not in logged:
            return f"expected {i} not logged (logged {sorted(logged)})"
    for i in log.get("no_expect_ids") or []:
        if i in logged:
            return f"unexpected {i} logged"
    want = output.get("status")
    if want is not None:
        allowed = want if isinstance(want, list) else [want]
        if status not in allowed:
            return f"status {status}, expected {want}"
    # The log lines as ModSecurity writes them (control bytes as \xHH), for match_regex.
    text = "\n".join(f'[id "{i}"] [msg "{_esc(m)}"] [data "{_esc(d)}"]' for i, m, d in details)
    if log.get("match_regex") and not re.search(log["match_regex"], text):
        return f"log does not match {log['match_regex']!r}"
    if log.get("no_match_regex") and re.search(log["no_match_regex"], text):
        return f"log matches {log['no_match_regex']!r}"
    if output.get("expect_error") and status == 200:
        return "expected an error"
    return None


def run_case(engine: Engine, case: Case, override: tuple[dict, str] | None) -> tuple[str | None, bool]:
    """(why it fails or None, whether the platform override was needed to pass).

    A test passes on its own expectations; only when it does not is the
    platform's override tried, so the overrides used are the exclusions this
    engine needs, a subset of the platform's list.
    """
    results = [run_in_process(engine, st.raw) for st in case.stages]
    why = None
    for st, (status, ids, msgs) in zip(case.stages, results, strict=True):
        why = judge(st.output, status, ids, msgs)
        if why:
            break
    if why is None or override is None:
        return why, False
    for status, ids, msgs in results:
        if judge(override[0], status, ids, msgs):
            return why, False
    return None, True


def run_suite(engine: Engine, cases: list[Case], overrides: dict) -> dict:
    """Run every case in process; per rule file pass/fail, the failures, the overrides used."""
    per_file: dict[str, list[int]] = {}
    failures: list[tuple[str, str]] = []
    used: list[tuple[str, str]] = []
    passed = 0
    for c in cases:
        ov = overrides.get((c.rule_id, c.test_id))
        why, needed = run_case(engine, c, ov)
        counts = per_file.setdefault(c.rule_file, [0, 0])
        if why is None:
            passed += 1
            counts[0] += 1
            if needed:
                used.append((c.name, ov[1]))
        else:
            counts[1] += 1
            failures.append((c.name, why))
    return {"passed": passed, "total": len(cases), "per_file": per_file, "failures": failures,
            "overrides_used": used}
