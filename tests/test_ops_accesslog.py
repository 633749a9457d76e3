"""The access log and request ids through a real proxy: one line per
request in JSON or combined format, X-Request-Id kept or generated and sent
to the backend, flushed at exit, reopened on SIGUSR1 (logrotate)."""

from __future__ import annotations

import re
import signal

from harness import Client
from ops_support import json_lines, start, wait_until

GENERATED = re.compile(r"[0-9a-f]{12}-[0-9a-f]+")


def start_logged(proxy_factory, tmp_path, origin, fmt: str, workers: int = 1):
    log_path = tmp_path / "access.log"
    proxy, _ = start(proxy_factory, tmp_path, origin.url, workers=workers,
                     extra=f'[log]\naccess_log = "{log_path}"\naccess_format = "{fmt}"\n')
    return proxy, log_path


def test_json_lines_and_request_ids(proxy_factory, tmp_path, origin):
    proxy, log_path = start_logged(proxy_factory, tmp_path, origin, "json")
    with Client(proxy.port) as c:
        assert c.request("GET", "/size/7?q=1", headers={"X-Request-Id": "abc-123.X_y"}).status == 200
        assert c.request("POST", "/echo", body=b"hello",
                         headers={"X-Request-Id": "bad id!"}).status == 200
        assert c.request("GET", "/size/1", headers={"X-Request-Id": "x" * 201}).status == 200
        assert c.request("GET", "/size/2").status == 200
    with Client(proxy.port) as c:
        assert c.request("GET", "/size/3", host="nowhere.test").status == 200  # a new connection
    lines = wait_until(lambda: len(json_lines(log_path)) == 5 and json_lines(log_path),
                       what="five log lines")
    first, bad, long_, plain, _ = lines
    assert first["method"] == "GET" and first["target"] == "/size/7?q=1"
    assert first["protocol"] == "HTTP/1.1" and first["status"] == 200 and first["bytes"] == 7
    assert first["backend"] == f"127.0.0.1:{origin.port}" and first["cache"] == "-"
    assert first["request_id"] == "abc-123.X_y" and first["duration"] >= 0
    assert first["remote"] == "127.0.0.1" and isinstance(first["time"], float)
    assert bad["method"] == "POST"
    seen = [s.header("x-request-id") for s in origin.requests]
    assert seen[0] == "abc-123.X_y"
    for i, line in ((1, bad), (2, long_), (3, plain)):
        assert GENERATED.fullmatch(seen[i]), seen[i]       # replaced, not forwarded
        assert line["request_id"] == seen[i]
    assert len(set(seen)) == 5
    assert all(len([k for k, _ in s.headers if k.lower() == "x-request-id"]) == 1
               for s in origin.requests)


def test_errors_are_logged_too(proxy_factory, tmp_path, origin):
    log_path = tmp_path / "access.log"
    proxy, _ = start(proxy_factory, tmp_path, origin.url, extra=(
        f'[[route]]\nhost = "only.test"\npath = "/"\npool = "web"\n'
        f'[log]\naccess_log = "{log_path}"\naccess_format = "json"\n'))
    # replace the catch-all route: only only.test is routed
    text = proxy.config_path.read_text().replace('[[route]]\npath = "/"\npool = "web"\n', "", 1)
    proxy.config_path.write_text(text)
    proxy.proc.send_signal(signal.SIGHUP)
    wait_until(lambda: "reload: generation 2" in proxy.log(), what="the reload")
    with Client(proxy.port) as c:
        assert c.request("GET", "/x", host="other.test").status == 404
        assert c.request("GET", "/reset", host="only.test").status == 502
    lines = wait_until(lambda: len(json_lines(log_path)) == 2 and json_lines(log_path),
                       what="two log lines")
    assert [(ln["status"], ln["target"]) for ln in lines] == [(404, "/x"), (502, "/reset")]
    assert lines[0]["backend"] == "-" and lines[1]["backend"] == f"127.0.0.1:{origin.port}"
    assert GENERATED.fullmatch(lines[1]["request_id"])


def test_combined_format_flushed_at_exit(proxy_factory, tmp_path, origin):
    proxy, log_path = start_logged(proxy_factory, tmp_path, origin, "combined")
    with Client(proxy.port) as c:
        assert c.request("GET", "/size/12", headers={"User-Agent": "t/1", "Referer": "http://r/",
                                                     "X-Request-Id": "rid-1"}).status == 200
    assert proxy.stop() == 0           # well within the 1 s flush: the exit flushes it
    line = log_path.read_text()
    assert re.fullmatch(
        r'127\.0\.0\.1 - - \[\d\d/\w{3}/\d{4}:\d\d:\d\d:\d\d [+-]\d{4}\] "GET /size/12 HTTP/1\.1" '
        rf'200 12 "http://r/" "t/1" \d+\.\d{{3}} 127\.0\.0\.1:{origin.port} - rid-1\n', line), line


def test_sigusr1_reopens_the_log(proxy_factory, tmp_path, origin):
    proxy, log_path = start_logged(proxy_factory, tmp_path, origin, "json", workers=2)
    with Client(proxy.port) as c:
        assert c.request("GET", "/size/1", headers={"X-Request-Id": "before"}).status == 200
    wait_until(lambda: json_lines(log_path), what="the first line")
    rotated = tmp_path / "access.log.1"
    log_path.rename(rotated)                     # what logrotate does
    proxy.proc.send_signal(signal.SIGUSR1)       # the supervisor passes it to the workers
    wait_until(lambda: log_path.exists(), what="the log to be reopened")
    wait_until(lambda: all(p.exists() for p in [log_path]), what="reopen")
    for i in range(4):                           # reach both workers
        with Client(proxy.port) as c:
            assert c.request("GET", "/size/1", headers={"X-Request-Id": f"after-{i}"}).status == 200
    wait_until(lambda: len(json_lines(log_path)) == 4, what="the new lines")
    assert [ln["request_id"] for ln in json_lines(rotated)] == ["before"]
    assert sorted(ln["request_id"] for ln in json_lines(log_path)) == [f"after-{i}" for i in range(4)]
