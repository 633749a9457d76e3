"""Tests of the command line (check, run's configuration errors, help) and of the demo origin."""
from __future__ import annotations

import asyncio
import hashlib
import importlib.util
import json
import os
import re
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import h11
import pytest
from click.testing import CliRunner

from edgeproxy.cli import main
from edgeproxy.demo import OriginServer, big_body, start_origin

ROOT = Path(__file__).resolve().parent.parent

GOOD = """
[[listen]]
bind = "127.0.0.1:8080"
[[listen]]
bind = "[::1]:8080"
[[route]]
pool = "web"
[[route]]
path = "/api/"
pool = "api"
[pool.web]
backends = ["http://127.0.0.1:5000"]
[pool.api]
backends = ["http://127.0.0.1:5001", "http://127.0.0.1:5002 backup"]
"""

BAD = """
[server]
wokers = 2
[[listen]]
bind = "127.0.0.1:99999"
[[route]]
pool = "apii"
[pool.api]
backends = ["htp://x"]
[timeout]
read = "sixty"
"""

BAD_ERRORS = [
    'server.wokers: unknown key (did you mean "workers"?)',
    'listen[0].bind: "127.0.0.1:99999" port out of range',
    'pool.api.backends[0]: "htp://x" is not an http:// or https:// URL',
    'timeout.read: expected a number, got "sixty"',
    'route[0].pool: no pool named "apii" (did you mean "api"?)',
]
BAD_LINES = [3, 5, 9, 11, 7]   # where each of BAD_ERRORS is in BAD


def located(path, i: int) -> str:
    """BAD_ERRORS[i] as check prints it for the file `path`: "  FILE:LINE: error"."""
    return f"  {path}:{BAD_LINES[i]}: {BAD_ERRORS[i]}"


@pytest.fixture
def files(tmp_path):
    good = tmp_path / "good.toml"
    good.write_text(textwrap.dedent(GOOD))
    bad = tmp_path / "bad.toml"
    bad.write_text(textwrap.dedent(BAD))
    return good, bad


def invoke(*args, env=None):
    return CliRunner().invoke(main, list(args), env=env, catch_exceptions=False)


def python_m(*args):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "edgeproxy", *args], capture_output=True,
                          text=True, env=env, timeout=60)


# --- check -----------------------------------------------------------------------

def test_check_good_file(files):
    result = invoke("check", "-c", str(files[0]))
    assert result.exit_code == 0, result.output
    assert result.stdout == "OK: 2 listeners, 2 routes, 2 pools, 3 backends\n"


def test_check_bad_file_lists_every_error(files):
    result = invoke("check", "--config", str(files[1]))
    assert result.exit_code == 1
    lines = result.stderr.splitlines()
    assert lines[0] == f"edgeproxy: invalid configuration in {files[1]} (5 errors):"
    assert lines[1:] == [located(files[1], i) for i in range(len(BAD_ERRORS))]
    assert "Traceback" not in result.output


def test_check_missing_file(tmp_path):
    result = invoke("check", "-c", str(tmp_path / "nope.toml"))
    assert result.exit_code == 1
    assert f"{tmp_path}/nope.toml: cannot read: No such file or directory" in result.stderr


def test_check_needs_a_file():
    result = invoke("check")
    assert result.exit_code == 2
    assert "Missing option '-c' / '--config'" in result.stderr


def test_python_m_edgeproxy_check(files):
    good = python_m("check", "-c", str(files[0]))
    assert good.returncode == 0, good.stderr
    assert good.stdout == "OK: 2 listeners, 2 routes, 2 pools, 3 backends\n"
    bad = python_m("check", "-c", str(files[1]))
    assert bad.returncode == 1
    assert bad.stdout == ""
    for i in range(len(BAD_ERRORS)):
        assert located(files[1], i) + "\n" in bad.stderr
    assert "Traceback" not in bad.stderr


# --- run: configuration errors (serving is tested with the server) -------------------

def test_run_with_a_bad_file_exits_2(files):
    result = invoke("run", "-c", str(files[1]))
    assert result.exit_code == 2
    assert result.stderr.startswith(f"edgeproxy: invalid configuration in {files[1]} (5 errors):")
    assert located(files[1], 1) + "\n" in result.stderr
    assert "Traceback" not in result.output


def test_run_with_a_bad_file_in_a_subprocess(files):
    proc = python_m("run", "-c", str(files[1]))
    assert proc.returncode == 2
    assert BAD_ERRORS[0] in proc.stderr
    assert "Traceback" not in proc.stderr


def test_run_quick_mode_errors_exit_2():
    result = invoke("run", "--listen", "127.0.0.1:99999", "--upstream", "ftp://h",
                    "--upstream", "http://127.0.0.1:5000")
    assert result.exit_code == 2
    assert result.stderr.splitlines()[1:] == [
        '  listen[0].bind: "127.0.0.1:99999" port out of range',
        '  pool.default.backends[0]: "ftp://h" is not an http:// or https:// URL',
    ]


def test_run_overrides_are_validated_with_the_file(files):
    result = invoke("--log-level", "DEBUG", "run", "-c", str(files[1]), "--workers", "3",
                    "--access-log", "-")
    assert result.exit_code == 2
    assert BAD_ERRORS[0] in result.stderr


@pytest.mark.parametrize("args, message", [
    (["-c", "x.toml", "--listen", ":8080"], "-c/--config cannot be combined with --listen/--upstream"),
    ([], "give -c FILE, or at least one --listen and one --upstream"),
    (["--listen", ":8080"], "give -c FILE, or at least one --listen and one --upstream"),
    (["--upstream", "http://h"], "give -c FILE, or at least one --listen and one --upstream"),
    (["--listen", ":8080", "--upstream", "http://h", "--workers", "-1"], "--workers"),
])
def test_run_usage_errors(args, message):
    result = invoke("run", *args)
    assert result.exit_code == 2
    assert message in result.stderr


def test_log_level_is_checked_and_read_from_the_environment(files):
    result = invoke("--log-level", "loud", "check", "-c", str(files[0]))
    assert result.exit_code == 2 and "Invalid value for '--log-level'" in result.stderr
    result = invoke("check", "-c", str(files[0]), env={"EDGEPROXY_LOG_LEVEL": "loud"})
    assert result.exit_code == 2 and "Invalid value for '--log-level'" in result.stderr
    result = invoke("check", "-c", str(files[0]), env={"EDGEPROXY_LOG_LEVEL": "Warning"})
    assert result.exit_code == 0


def test_demo_refuses_a_port_in_use():
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = invoke("demo", "--port", str(port))
        assert result.exit_code == 2
        assert f"port {port} on 127.0.0.1 is in use; pick another with --port" in result.stderr
        result = invoke("demo", "--port", "0", "--https-port", str(port))
        assert result.exit_code == 2
        assert f"port {port} on 127.0.0.1 is in use; pick another with --https-port" in result.stderr
    # one port for two listeners
    result = invoke("demo", "--port", str(port), "--https-port", "0", "--admin-port", str(port))
    assert result.exit_code == 2 and "pick another with --admin-port" in result.stderr


# --- help ----------------------------------------------------------------------------

@pytest.mark.parametrize("command, expected", [
    ([], ["run", "check", "demo", "--log-level", "EDGEPROXY_LOG_LEVEL", "docs/configuration.md"]),
    (["run"], ["-c, --config FILE", "--listen ADDRESS", "--upstream URL", "--workers N",
               "0 = one per CPU", "--access-log PATH", "stderr", "exit", "status is 2"]),
    (["check"], ["-c, --config FILE", "[required]", "exits 1"]),
    (["demo"], ["--port PORT", "default: 8080", "--https-port PORT", "default: 8443",
                "--admin-port PORT", "default: 9901", "demo origin", "child process"]),
])
def test_help(command, expected):
    result = invoke(*command, "--help")
    assert result.exit_code == 0
    text = " ".join(result.stdout.split())  # help text is wrapped
    for piece in expected:
        assert piece in text, piece


def test_optional_groups_are_registered_when_present():
    for name in ("cert", "cache"):
        present = importlib.util.find_spec(f"edgeproxy.cli.{name}") is not None
        assert (name in main.commands) == present
        if present:
            assert invoke(name, "--help").exit_code == 0


def test_setup_logging_format():
    code = ("import logging; from edgeproxy.cli import setup_logging; setup_logging('info'); "
            "setup_logging('warning'); log = logging.getLogger('edgeproxy.t'); "
            "log.info('hidden'); log.warning('shown %d', 1)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=60)
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr  # one handler, even after two calls
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3} WARNING \[\d+\] edgeproxy\.t: shown 1",
                        lines[0])


# --- the demo origin, over real sockets ------------------------------------------------

@pytest.fixture(scope="module")
def origin():
    running = start_origin()
    yield running
    running.stop()


class Client:
    """An HTTP/1.1 client on one socket, with h11 as an independent parser."""

    def __init__(self, port: int):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.conn = h11.Connection(h11.CLIENT)

    def request(self, method: str, target: str, headers=(), body: list[bytes] | None = None):
        if self.conn.our_state is h11.DONE:
            self.conn.start_next_cycle()
        headers = [("Host", "demo"), *headers]
        out = self.conn.send(h11.Request(method=method, target=target, headers=headers))
        for piece in body or ():
            out += self.conn.send(h11.Data(data=piece))
        out += self.conn.send(h11.EndOfMessage())
        self.sock.sendall(out)
        response, data = None, b""
        while True:
            event = self.conn.next_event()
            if event is h11.NEED_DATA:
                self.conn.receive_data(self.sock.recv(65536))
            elif isinstance(event, h11.Response):
                response = event
            elif isinstance(event, h11.Data):
                data += event.data
            elif isinstance(event, h11.EndOfMessage):
                return response, data

    def close(self):
        self.sock.close()


def header(response, name: bytes) -> bytes | None:
    return dict(response.headers).get(name)


def test_origin_get_index(origin):
    client = Client(origin.port)
    response, body = client.request("GET", "/")
    assert response.status_code == 200
    assert header(response, b"content-type") == b"text/html; charset=utf-8"
    assert int(header(response, b"content-length")) == len(body)
    assert b"served by the edgeproxy demo origin, behind edgeproxy" in body
    assert header(response, b"server") == b"edgeproxy-demo-origin"
    assert header(response, b"x-powered-by") == b"edgeproxy-demo"
    client.close()


def test_origin_keep_alive_serves_several_requests_on_one_connection(origin):
    client = Client(origin.port)
    response, body = client.request("GET", "/api/hello")
    assert response.status_code == 200
    assert header(response, b"content-type") == b"application/json"
    assert json.loads(body)["message"] == "hello from the edgeproxy demo origin"
    assert header(response, b"connection") is None
    response, body = client.request("GET", "/api/hello")  # same socket
    assert response.status_code == 200 and json.loads(body)["message"]
    response, body = client.request("HEAD", "/")
    assert response.status_code == 200 and body == b""
    assert int(header(response, b"content-length")) > 0
    response, body = client.request("GET", "/nope")
    assert response.status_code == 404
    response, body = client.request("POST", "/api/hello", [("Content-Length", "2")], [b"hi"])
    assert response.status_code == 405 and header(response, b"allow") == b"GET, HEAD"
    response, body = client.request("GET", "/slow?delay=0")
    assert json.loads(body) == {"delayed": 0.0}
    client.close()


def test_origin_echo_with_a_chunked_body(origin):
    pieces = [b"hello ", b"chunked", b"x" * 70000, b""]
    client = Client(origin.port)
    response, body = client.request("POST", "/echo?a=1",
                                    [("Transfer-Encoding", "chunked"), ("X-Test", "yes")],
                                    pieces)
    assert response.status_code == 200
    echo = json.loads(body)
    assert echo["method"] == "POST"
    assert echo["target"] == "/echo?a=1" and echo["path"] == "/echo" and echo["query"] == "a=1"
    assert echo["headers"] == ["Host: demo", "Transfer-Encoding: chunked", "X-Test: yes"]
    assert echo["body_length"] == sum(map(len, pieces))
    assert echo["body_sha256"] == hashlib.sha256(b"".join(pieces)).hexdigest()
    # and a Content-Length body on the same connection
    response, body = client.request("PUT", "/echo", [("Content-Length", "5")], [b"abcde"])
    assert json.loads(body)["body_length"] == 5
    assert json.loads(body)["body_sha256"] == hashlib.sha256(b"abcde").hexdigest()
    client.close()


def test_origin_chunked_body_with_extensions_and_trailers(origin):
    with socket.create_connection(("127.0.0.1", origin.port), timeout=10) as sock:
        sock.sendall(b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
                     b"5;name=value\r\nhello\r\nA\r\n0123456789\r\n0\r\nX-Trailer: 1\r\n\r\n"
                     b"GET /big?size=10 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        data = recv_all(sock)
    first, second = data.split(b"HTTP/1.1 200 OK", 2)[1:]
    assert b'"body_length": 15' in first
    assert second.endswith(b"\r\n\r\n" + big_body(10))
    assert b"Connection: close" in second


def recv_all(sock: socket.socket) -> bytes:
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data


def test_origin_big(origin):
    client = Client(origin.port)
    size = 3 * 256 * 1024 + 17  # several write pieces
    response, body = client.request("GET", f"/big?size={size}")
    assert response.status_code == 200
    assert int(header(response, b"content-length")) == size
    assert body == big_body(size)
    assert big_body(size)[100:200] == big_body(100, offset=100)
    response, body = client.request("GET", "/big?size=-1")
    assert response.status_code == 400
    client.close()


def test_origin_expect_continue(origin):
    with socket.create_connection(("127.0.0.1", origin.port), timeout=10) as sock:
        sock.sendall(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n"
                     b"Expect: 100-continue\r\n\r\n")
        assert sock.recv(100) == b"HTTP/1.1 100 Continue\r\n\r\n"
        sock.sendall(b"abc")
        data = b""
        while b'"body_sha256"' not in data:
            data += sock.recv(65536)
    assert data.startswith(b"HTTP/1.1 200 OK\r\n")
    assert b'"body_length": 3' in data


def test_origin_http10_closes_and_bad_requests_get_400(origin):
    with socket.create_connection(("127.0.0.1", origin.port), timeout=10) as sock:
        sock.sendall(b"GET /api/hello HTTP/1.0\r\n\r\n")
        data = recv_all(sock)  # the origin closes after the response
    assert data.startswith(b"HTTP/1.1 200 OK\r\n") and b"Connection: close" in data
    for request in (b"GARBAGE\r\n\r\n",
                    b"POST /echo HTTP/1.1\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n",
                    b"POST /echo HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n"):
        with socket.create_connection(("127.0.0.1", origin.port), timeout=10) as sock:
            sock.sendall(request)
            data = recv_all(sock)
        assert data.startswith(b"HTTP/1.1 400 Bad Request\r\n"), request


def test_origin_thread_stops_and_releases_its_port():
    running = start_origin()
    port = running.port
    assert running.url == f"http://127.0.0.1:{port}"
    idle = socket.create_connection(("127.0.0.1", port), timeout=10)  # an open keep-alive
    running.stop()
    try:
        assert idle.recv(1) == b""  # closed by stop()
    except ConnectionResetError:
        pass  # or reset, when stop() came before the origin accepted it
    idle.close()
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=10).close()


def test_origin_thread_reports_a_port_in_use():
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        with pytest.raises(OSError):
            start_origin(port=busy.getsockname()[1])


def test_origin_server_on_the_callers_loop():
    async def scenario():
        server = await OriginServer.start("127.0.0.1", 0)
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
            writer.write(b"GET /api/hello HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            data = await reader.read()
            writer.close()
        finally:
            await server.close()
        return data

    data = asyncio.run(scenario())
    assert data.startswith(b"HTTP/1.1 200 OK\r\n")
    assert b"hello from the edgeproxy demo origin" in data
