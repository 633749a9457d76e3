"""`edgeproxy demo` as a user runs it (README's quick start): a real process tree on
loopback, every printed curl line run with curl, the cached route's Cache-Status, HTTPS
verified against the demo's own certificate, the admin page and /metrics, a log without
warnings or repeated lines, and nothing left behind after Ctrl-C or a kill."""
from __future__ import annotations

import json
import os
import re
import selectors
import shlex
import signal
import socket
import ssl
import subprocess
import sys
import time
from pathlib import Path

import pytest
from harness import ROOT, Client, free_port, wait_port
from ops_support import admin, wait_until

from edgeproxy.demo.session import CERT_DAYS


class Demo:
    def __init__(self, tmp_path: Path):
        self.port, self.https_port, self.admin_port = free_port(), free_port(), free_port()
        self.err_path = tmp_path / "demo.err"
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        env.pop("EDGEPROXY_LOG_LEVEL", None)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "edgeproxy", "demo", "--port", str(self.port),
             "--https-port", str(self.https_port), "--admin-port", str(self.admin_port)],
            stdout=subprocess.PIPE, stderr=open(self.err_path, "wb"), env=env,
            start_new_session=True)    # its own process group, as a terminal's job is
        self.out = self._read_guide()
        self.cert = re.search(r"(/\S+/cert\.pem)", self.out).group(1)
        self.workdir = Path(self.cert).parent
        self.origin_port = int(re.search(r"demo origin http://127\.0\.0\.1:(\d+)", self.out).group(1))
        for port in (self.port, self.https_port, self.admin_port):   # printed before it listens
            wait_port(port, self.proc)

    def _read_guide(self, timeout: float = 30.0) -> str:
        data = b""
        fd = self.proc.stdout.fileno()
        deadline = time.monotonic() + timeout
        with selectors.DefaultSelector() as sel:
            sel.register(fd, selectors.EVENT_READ)
            while time.monotonic() < deadline and b"Press Ctrl-C" not in data:
                if not sel.select(deadline - time.monotonic()):
                    break
                piece = os.read(fd, 65536)
                if not piece:
                    break
                data += piece
        if b"Press Ctrl-C" in data:
            return data.decode()
        self.kill()
        raise AssertionError("no guide from the demo:\n" + data.decode() + self.log())

    def log(self) -> str:
        return self.err_path.read_text(errors="replace")

    def curl_lines(self) -> list[str]:
        return [line.strip().split("  #")[0].strip() for line in self.out.splitlines()
                if line.strip().startswith("curl ")]

    def interrupt(self) -> int:
        """Ctrl-C: SIGINT to the whole process group, as a terminal sends it."""
        os.killpg(self.proc.pid, signal.SIGINT)
        return self.proc.wait(20)

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)


@pytest.fixture
def demo(tmp_path):
    d = Demo(tmp_path)
    yield d
    d.kill()
    d.proc.stdout.close()


def refused(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except OSError:
        return True
    return False


def test_the_guide_names_every_port_and_what_to_try(demo):
    out = demo.out
    assert f"http://127.0.0.1:{demo.port}" in out and "(--port)" in out
    assert f"https://127.0.0.1:{demo.https_port}" in out and "(--https-port)" in out
    assert f"http://127.0.0.1:{demo.admin_port}" in out and "(--admin-port; localhost only)" in out
    assert f"valid {CERT_DAYS} days" in out
    assert "configuration: " in out
    assert any("/cached/page" in line for line in demo.curl_lines())
    assert any(f":{demo.admin_port}/metrics" in line for line in demo.curl_lines())
    assert not any(" -k" in line or "--insecure" in line for line in demo.curl_lines())


def test_cached_route_https_and_admin(demo):
    with Client(demo.port) as c:
        first = c.request("GET", "/cached/page", host=f"127.0.0.1:{demo.port}")
        second = c.request("GET", "/cached/page", host=f"127.0.0.1:{demo.port}")
        page = c.request("GET", "/", host=f"127.0.0.1:{demo.port}")
    assert first.status == second.status == 200 and first.body == second.body
    # (the miss says "stored" only when the origin's head and body came in one
    # read; the hit that follows is what shows the page was stored)
    assert "fwd=uri-miss" in first.header("cache-status")
    assert "hit" in second.header("cache-status")
    assert page.header("server") is None and page.header("x-powered-by") is None
    assert b"/cached/page" in page.body             # the origin's index links to it

    context = ssl.create_default_context(cafile=demo.cert)   # verified, no -k
    with Client(demo.https_port, ssl_context=context, server_name="127.0.0.1") as c:
        hello = c.request("GET", "/api/hello", host=f"127.0.0.1:{demo.https_port}")
    assert hello.status == 200 and hello.json()["message"] == "hello from the edgeproxy demo origin"

    status_page = admin(demo.admin_port, path="/")     # one connection per request
    metrics = admin(demo.admin_port, path="/metrics")
    status = admin(demo.admin_port, path="/status")
    assert status_page.status == 200 and status_page.header("content-type").startswith("text/html")
    assert metrics.status == 200
    assert re.search(rb'edgeproxy_requests_total\{route="/cached/",pool="origin",code="2xx"\} 2',
                     metrics.body), metrics.body[:2000]
    assert status.json()["workers"]


def test_every_printed_curl_line_works(demo):
    if subprocess.run(["sh", "-c", "command -v curl"], capture_output=True).returncode:
        pytest.skip("curl is not installed")
    results = {}
    for line in demo.curl_lines():
        proc = subprocess.run(["sh", "-c", line.replace("curl ", "curl --max-time 30 ", 1)],
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, (line, proc.stderr)
        results[line] = proc.stdout
    by_path = {re.search(r"https?://\S+?(/\S*)", line).group(1).strip("'"): out
               for line, out in results.items()}
    assert "hello from the edgeproxy demo origin" in by_path["/api/hello"]
    assert by_path["/big?size=10485760"].strip() == "10485760"
    assert '"body_length": 5' in by_path["/echo"]
    assert "edgeproxy_requests_total" in by_path["/metrics"]
    assert json.loads(by_path["/status"])["workers"]
    assert "Cache-Status: edgeproxy" in by_path["/cached/page"]
    cached = [line for line in demo.curl_lines() if "/cached/" in line][0]
    again = subprocess.run(shlex.split(cached), capture_output=True, text=True, timeout=60)
    assert re.search(r"Cache-Status: edgeproxy; hit", again.stdout), again.stdout


def test_ctrl_c_stops_everything_and_the_log_has_no_warning_nor_repeat(demo):
    with Client(demo.https_port, ssl_context=ssl.create_default_context(cafile=demo.cert),
                server_name="localhost") as c:
        assert c.request("GET", "/", host="localhost").status == 200
    time.sleep(1.5)    # the access log is written once a second
    assert demo.interrupt() == 0
    assert refused(demo.origin_port) and refused(demo.port) and refused(demo.admin_port)
    assert not demo.workdir.exists()
    log = demo.log()
    assert "Traceback" not in log and "RuntimeWarning" not in log
    events = [re.sub(r"^\S+ (\w+) \[\d+\] ", r"\1 ", line) for line in log.splitlines()
              if re.match(r"^\d{4}-\d\d-\d\dT", line)]
    assert events and not [e for e in events if not e.startswith(("INFO ", "DEBUG "))], events
    repeated = {e for e in events if events.count(e) > 1}
    assert not repeated, repeated
    assert '"GET / HTTP/1.1" 200' in log          # the access log on stderr


def test_the_origin_never_outlives_a_killed_demo(demo):
    os.kill(demo.proc.pid, signal.SIGKILL)      # the demo's own process only
    demo.proc.wait(10)
    wait_until(lambda: refused(demo.origin_port), timeout=15, what="the origin to stop")
    wait_until(lambda: refused(demo.port), timeout=15, what="the worker to stop")
