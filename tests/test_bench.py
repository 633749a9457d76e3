"""The benchmark suite runs end to end, writes its JSON, and cleans up after itself.

Speed itself is never asserted here: only that the bench measures something
and that its origin, rotation and ratios behave as documented.
"""
from __future__ import annotations

import importlib.util
import json
import os
import selectors
import shutil
import signal
import socket
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import pytest

from bench import procfs
from bench.cases import ACCESS, CACHE, LIMIT, PLAIN, TLS
from bench.certs import make_run_cert
from bench.cli import _case_names
from bench.contenders import CONTENDERS, Setup
from bench.origin import (
    FILES,
    UPLOAD_PATH,
    MiB,
    asyncio_origin,
    file_body,
    nginx_binary,
    nginx_origin,
)
from bench.runner import paired_ratios, rotation, summarize
from bench.servers import Pinning, StartedServers, free_port, wait_until_serving

REPO = Path(__file__).resolve().parent.parent
NO_PIN = Pinning(None, None)

needs_tools = pytest.mark.skipif(
    shutil.which("wrk") is None or nginx_binary() is None,
    reason="the bench needs wrk and nginx (apt-get install nginx-light haproxy wrk)")


def _contenders() -> str:
    # edgeproxy joins once `python -m edgeproxy` exists; until then nginx alone.
    has_edgeproxy = importlib.util.find_spec("edgeproxy.__main__") is not None
    return "nginx,edgeproxy" if has_edgeproxy else "nginx"


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return env


def _stop(proc: subprocess.Popen) -> None:
    """End the bench the polite way (SIGTERM lets it stop its servers), then by force."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _gone(pid: int) -> bool:
    return not procfs.is_alive(pid)


@needs_tools
def test_quick_run_writes_json_with_positive_figures(tmp_path: Path) -> None:
    contenders = _contenders()
    argv = [sys.executable, "-m", "bench", "--quick", "--cases", "get-1k", "--duration", "1",
            "--contenders", contenders, "--results-dir", str(tmp_path)]
    proc = subprocess.Popen(argv, cwd=REPO, env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        out, err = proc.communicate(timeout=120)
    finally:
        _stop(proc)
    assert proc.returncode == 0, err
    files = list(tmp_path.glob("*.json"))
    assert len(files) == 1, err
    doc = json.loads(files[0].read_text())
    assert files[0].name.endswith(f"-{doc['commit']['short']}.json")

    assert len(doc["commit"]["sha"]) == 40 and isinstance(doc["commit"]["dirty"], bool)
    assert doc["machine"]["nproc"] >= 1 and doc["machine"]["kernel"]
    assert "nginx" in doc["machine"]["versions"]["nginx"]
    assert "wrk" in doc["machine"]["versions"]["wrk"]
    assert doc["settings"]["cases"] == ["get-1k"] and doc["settings"]["duration_s"] == 1
    assert doc["interrupted"] is False

    names = contenders.split(",")
    for name in names:
        assert doc["contenders"][name]["status"] == "ok", doc["contenders"][name]
    rows = {r["contender"]: r for r in doc["results"] if r["case"] == "get-1k"}
    assert sorted(rows) == sorted(names)
    for name, row in rows.items():
        m = row["median"]
        assert m["req_s"] > 0, name
        assert m["mib_s"] > 0
        assert m["cpu_us_per_request"] > 0
        assert 0 < m["latency_us"]["p50"] <= m["latency_us"]["p99"] <= m["latency_us"]["p99_9"]
        assert m["peak_rss_kib"] > 0
        assert m["http_errors"] == 0 and m["socket_errors"] == 0
        assert len(row["rounds"]) == 1 and row["rounds"][0]["requests"] > 0
    if "edgeproxy" in names:
        ratio = next(r for r in doc["ratios"] if r["baseline"] == "nginx")
        assert ratio["subject"] == "edgeproxy"
        assert ratio["req_s"] > 0 and ratio["cpu_per_request"] > 0

    assert "get-1k" in out and "req/s" in out  # the table
    assert "[get-1k round 1/1] nginx" in err   # the progress lines
    # Every server it started is gone.
    pids = doc["settings"]["origin_pids"]
    pids += [p for c in doc["contenders"].values() for p in c["pids"]]
    assert pids and all(_gone(p) for p in pids)


@needs_tools
def test_sigterm_stops_the_servers_and_keeps_partial_results(tmp_path: Path) -> None:
    argv = [sys.executable, "-m", "bench", "--cases", "get-1k,get-100k", "--duration", "3",
            "--rounds", "1", "--warmup", "0", "--contenders", "nginx",
            "--results-dir", str(tmp_path)]
    proc = subprocess.Popen(argv, cwd=REPO, env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        seen = ""
        with selectors.DefaultSelector() as sel:
            sel.register(proc.stderr, selectors.EVENT_READ)
            deadline = time.monotonic() + 30
            while "nginx serving on" not in seen and time.monotonic() < deadline:
                if sel.select(timeout=1):
                    line = proc.stderr.readline()
                    if not line:
                        break
                    seen += line
        assert "nginx serving on" in seen, seen
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    finally:
        _stop(proc)
    assert proc.returncode == 130, err
    doc = json.loads(next(tmp_path.glob("*.json")).read_text())
    assert doc["interrupted"] is True
    pids = doc["settings"]["origin_pids"] + doc["contenders"]["nginx"]["pids"]
    assert pids and all(_gone(p) for p in pids)


def _origin_params() -> list:
    return [pytest.param("nginx", marks=pytest.mark.skipif(nginx_binary() is None,
                                                           reason="nginx is not installed")),
            "asyncio"]


@pytest.fixture(params=_origin_params())
def origin(request, tmp_path: Path):
    tmp_path.chmod(0o755)  # nginx workers read the docroot as another user
    with StartedServers() as started:
        if request.param == "nginx":
            server = nginx_origin(tmp_path, free_port(), 1024, NO_PIN)
        else:
            server = asyncio_origin(tmp_path, free_port(), NO_PIN, sys.executable, REPO)
        started.start(server)
        wait_until_serving(server, "/1k.bin", FILES["/1k.bin"])
        yield server


def _read_response(sock: socket.socket) -> tuple[int, bytes]:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, "connection closed before the answer"
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    status = int(head.split(b" ")[1])
    headers = {line.split(b":")[0].strip().lower(): line.split(b":", 1)[1].strip()
               for line in head.split(b"\r\n")[1:]}
    if b"content-length" in headers:
        size = int(headers[b"content-length"])
        while len(rest) < size:
            rest += sock.recv(65536)
        return status, rest[:size]
    body = b""  # chunked (the nginx echo module answers so)
    while True:
        while b"\r\n" not in rest:
            rest += sock.recv(65536)
        size_line, _, rest = rest.partition(b"\r\n")
        size = int(size_line.split(b";")[0], 16)
        while len(rest) < size + 2:
            rest += sock.recv(65536)
        body, rest = body + rest[:size], rest[size + 2:]
        if size == 0:
            return status, body


def test_origin_serves_the_files_on_one_keepalive_connection(origin) -> None:
    with socket.create_connection(("127.0.0.1", origin.port), timeout=5) as sock:
        for path, size in FILES.items():
            sock.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
            status, body = _read_response(sock)
            assert status == 200 and body == file_body(size)


def test_origin_answers_an_upload_only_after_the_whole_body(origin) -> None:
    body = file_body(MiB)
    head = (f"POST {UPLOAD_PATH} HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n"
            f"Content-Type: application/octet-stream\r\n\r\n").encode()
    with socket.create_connection(("127.0.0.1", origin.port), timeout=5) as sock:
        sock.sendall(head + body[:MiB // 2])
        sock.settimeout(0.5)
        with pytest.raises(socket.timeout):
            sock.recv(1)  # half a body: no answer yet
        sock.settimeout(5)
        sock.sendall(body[MiB // 2:])
        status, answer = _read_response(sock)
        assert status == 200 and answer.strip() == b"ok"
        # The connection is still usable: the body was consumed, not left behind.
        sock.sendall(b"GET /1k.bin HTTP/1.1\r\nHost: x\r\n\r\n")
        assert _read_response(sock) == (200, file_body(1024))


def test_rounds_alternate_the_contenders() -> None:
    names = ["nginx", "haproxy", "edgeproxy"]
    assert [rotation(names, r) for r in range(4)] == [
        ["nginx", "haproxy", "edgeproxy"], ["haproxy", "edgeproxy", "nginx"],
        ["edgeproxy", "nginx", "haproxy"], ["nginx", "haproxy", "edgeproxy"]]


def _round(req_s: float, cpu_us: float, p99: float = 1000.0) -> dict:
    return {"req_s": req_s, "mib_s": req_s / 1000, "cpu_us_per_request": cpu_us, "cpu_busy": 0.5,
            "latency_us": {"p50": 100, "p90": 500, "p99": p99, "p99_9": 2000},
            "http_errors": 1, "socket_errors_total": 0, "peak_rss_kib": int(req_s),
            "origin_cpu_s": 1.0}


def test_summary_takes_medians_sums_errors_and_keeps_the_highest_peak() -> None:
    m = summarize([_round(100, 10), _round(300, 30), _round(200, 20, p99=5000)])
    assert m["req_s"] == 200 and m["cpu_us_per_request"] == 20
    assert m["req_s_spread"] == pytest.approx((300 - 100) / 200)
    assert m["latency_us"]["p99"] == 1000
    assert m["http_errors"] == 3 and m["peak_rss_kib"] == 300


def test_ratios_pair_the_contenders_round_by_round() -> None:
    by_round = {("edgeproxy", 0): _round(200, 10), ("nginx", 0): _round(100, 20),
                ("edgeproxy", 1): _round(90, 30), ("nginx", 1): _round(100, 20),
                ("edgeproxy", 2): _round(150, 25)}  # nginx missing in round 3: not paired
    r = paired_ratios("get-1k", "edgeproxy", "nginx", by_round, rounds=3)
    assert r["pairs"] == 2
    assert r["req_s"] == pytest.approx((2.0 + 0.9) / 2)
    assert r["cpu_per_request"] == pytest.approx((0.5 + 1.5) / 2)
    assert r["req_s_range"] == [0.9, 2.0]
    assert paired_ratios("get-1k", "edgeproxy", "haproxy", by_round, rounds=3) is None


def test_unknown_case_is_refused_by_name() -> None:
    done = subprocess.run([sys.executable, "-m", "bench", "--cases", "get-1k,get-2k"], check=False,
                          cwd=REPO,
                          env=_env(), capture_output=True, text=True, timeout=30)
    assert done.returncode == 2
    assert "unknown case get-2k" in done.stderr


def test_case_groups_expand_in_registry_order() -> None:
    assert _case_names("tls") == ["https-1k", "https-handshake"]
    assert _case_names("cache,get-1k") == ["cache-hit-1k", "cache-hit-100k", "get-1k"]
    assert "idle-10k" in _case_names("core") and "https-1k" not in _case_names("core")
    assert _case_names("limit,access") == ["get-1k-limit", "get-1k-allow"]


def test_configs_render_for_every_setup_with_the_run_certificate(tmp_path: Path) -> None:
    from cryptography import x509
    from cryptography.hazmat.primitives.asymmetric import ec

    cert = make_run_cert(tmp_path)
    loaded = x509.load_pem_x509_certificate(cert.cert.read_bytes())
    assert isinstance(loaded.public_key(), ec.EllipticCurvePublicKey)
    assert loaded.public_key().curve.name == "secp256r1"
    assert cert.key.stat().st_mode & 0o077 == 0 and cert.combined.stat().st_mode & 0o077 == 0
    assert b"PRIVATE KEY" in cert.combined.read_bytes()
    for setup in (PLAIN, TLS, CACHE, LIMIT, ACCESS):
        s = Setup(tmp_path, free_port(), free_port(), 1024, NO_PIN, setup, cert)
        servers = {name: c.server(s) for name, c in CONTENDERS.items()}
        assert (servers["nginx"].client_tls is not None) == (setup == TLS)
        nginx = (tmp_path / f"nginx-proxy-{setup}.conf").read_text()
        haproxy = (tmp_path / f"haproxy-{setup}.cfg").read_text()
        edge = tomllib.loads((tmp_path / f"edgeproxy-{setup}-{s.port}.toml").read_text())
        assert edge["server"]["workers"] == 1
        assert (f"{s.port} backlog=4096 ssl;" in nginx) == (setup == TLS)
        assert (f"ssl crt {cert.combined}" in haproxy) == (setup == TLS)
        assert ("tls" in edge["listen"][0]) == (setup == TLS)
        assert ("proxy_cache bench_cache;" in nginx) == (setup == CACHE)
        assert ("cache-use bench_cache" in haproxy) == (setup == CACHE)
        assert any(r.get("cache") for r in edge["route"]) == (setup == CACHE)
        # (edgeproxy-base writes the same file without them: render this tree's)
        own = CONTENDERS["edgeproxy"].config_text(s)
        mine = tomllib.loads(own)
        assert (mine["route"][0].get("limits") == ["bench"]) == (setup == LIMIT)
        assert bool(mine.get("limit")) == (setup == LIMIT)
        assert ("access" in mine["route"][0]) == (setup == ACCESS)
        if setup in (LIMIT, ACCESS):        # a config the proxy accepts
            from edgeproxy.config import parse_config
            cfg = parse_config(own)
            assert cfg.routes[0].limits or cfg.routes[0].access
        if setup == TLS:
            assert f"ssl_ciphers {cert.ciphers};" in nginx and f"ciphers {cert.ciphers}" in haproxy
            assert edge["listen"][0]["tls"]["certs"] == [{"cert": str(cert.cert),
                                                          "key": str(cert.key)}]
        if shutil.which("haproxy"):
            done = subprocess.run(["haproxy", "-c", "-f", str(tmp_path / f"haproxy-{setup}.cfg")],
                                  check=False, capture_output=True, text=True, timeout=30)
            assert done.returncode == 0, done.stdout + done.stderr
        if nginx_binary():
            done = subprocess.run([nginx_binary(), "-t", "-p", str(tmp_path), "-c",
                                   str(tmp_path / f"nginx-proxy-{setup}.conf"),
                                   "-e", str(tmp_path / "nginx-t.log")],
                                  check=False, capture_output=True, text=True, timeout=30)
            assert done.returncode == 0, done.stderr


@needs_tools
def test_https_and_cache_cases_measure_verified_hits(tmp_path: Path) -> None:
    contenders = _contenders()
    argv = [sys.executable, "-m", "bench", "--cases", "https-1k,cache-hit-1k", "--duration", "1",
            "--rounds", "1", "--warmup", "0", "--contenders", contenders,
            "--results-dir", str(tmp_path)]
    done = subprocess.run(argv, cwd=REPO, env=_env(), capture_output=True, text=True,
                          timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    doc = json.loads(next(tmp_path.glob("*.json")).read_text())
    names = contenders.split(",")
    for name in names:
        instances = {i["setup"]: i for i in doc["contenders"][name]["instances"]}
        assert sorted(instances) == [CACHE, TLS]
        assert instances[TLS]["tls"]["version"] in ("TLSv1.2", "TLSv1.3")
        assert f"[cache-hit-1k cache check] {name}" in done.stderr
    rows = {(r["case"], r["contender"]): r for r in doc["results"]}
    for case in ("https-1k", "cache-hit-1k"):
        for name in names:
            row = rows[(case, name)]
            assert row["errors"] == [] and row["median"]["req_s"] > 0, row
            assert row["median"]["http_errors"] == 0 and row["median"]["socket_errors"] == 0
    for name in names:  # the nginx origin counts what got past the caches: nothing
        assert rows[("cache-hit-1k", name)]["median"]["origin_requests"] == 0
    pids = doc["settings"]["origin_pids"]
    pids += [p for c in doc["contenders"].values() for p in c["pids"]]
    assert pids and all(_gone(p) for p in pids)
    assert not Path(doc["settings"]["workdir"]).exists()  # the certificate's key with it
