"""`edgeproxy check` tries what `run` would open (listen and admin
addresses, the access log's and the cache's directories, the pid file),
and `run`'s start-up failures are one line naming the cause, never a
traceback, with an exit code other than 0.  Real sockets, real files,
real processes."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import pytest
from harness import ROOT, Client, free_port, wait_port

BACKEND = 'backends = ["http://127.0.0.1:9"]'


def write(tmp_path, text: str, name: str = "e.toml"):
    path = tmp_path / name
    path.write_text(f'[server]\npid_file = "{tmp_path}/e.pid"\nstate_file = "{tmp_path}/e.state"\n'
                    f'{text}\n[[route]]\npool = "web"\n{"cache = true" if "[cache]" in text else ""}\n'
                    f"[pool.web]\n{BACKEND}\n")
    return path


def edgeproxy(*args, timeout: float = 20.0):
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.run([sys.executable, "-m", "edgeproxy", *args], capture_output=True,
                          text=True, timeout=timeout, env=env)


@pytest.fixture
def busy_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen()
    yield s.getsockname()[1]
    s.close()


def listen(port: int) -> str:
    return f'[[listen]]\nbind = "127.0.0.1:{port}"\n'


def test_check_passes_a_config_run_could_start(tmp_path):
    cfg = write(tmp_path, listen(free_port()) + f'[log]\naccess_log = "{tmp_path}/logs.log"\n'
                f'[cache]\npath = "{tmp_path}/cache/new"\n')
    r = edgeproxy("check", "-c", str(cfg))
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("OK: 1 listener")
    assert not (tmp_path / "cache").exists() and not (tmp_path / "logs.log").exists()  # only tried
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".edgeproxy-check")]


def test_check_finds_a_port_in_use(tmp_path, busy_port):
    admin_busy = socket.socket()
    admin_busy.bind(("127.0.0.1", 0))
    admin_busy.listen()
    try:
        cfg = write(tmp_path, listen(busy_port).replace(
            "[[listen]]", f'admin = "127.0.0.1:{admin_busy.getsockname()[1]}"\n[[listen]]', 1))
        r = edgeproxy("check", "-c", str(cfg))
    finally:
        admin_busy.close()
    assert r.returncode == 1
    assert f"listen[0].bind: cannot bind 127.0.0.1:{busy_port}: Address already in use" in r.stderr
    assert "server.admin: cannot bind" in r.stderr
    assert "Traceback" not in r.stderr


def test_check_finds_unwritable_log_and_cache_places(tmp_path):
    (tmp_path / "afile").write_text("x")
    (tmp_path / "logdir").mkdir()
    cfg = write(tmp_path, listen(free_port()) + f'[log]\naccess_log = "{tmp_path}/none/a.log"\n'
                f'[cache]\npath = "{tmp_path}/afile/cache"\n')
    r = edgeproxy("check", "-c", str(cfg))
    assert r.returncode == 1
    assert f"log.access_log: cannot create {tmp_path}/none/a.log: the directory " \
           f"{tmp_path}/none does not exist" in r.stderr
    assert f"cache.path: cannot create {tmp_path}/afile/cache: {tmp_path}/afile is not a " \
           "directory" in r.stderr
    cfg = write(tmp_path, listen(free_port()) + f'[log]\naccess_log = "{tmp_path}/logdir"\n'
                f'[cache]\npath = "{tmp_path}/afile"\n')
    r = edgeproxy("check", "-c", str(cfg))
    assert r.returncode == 1
    assert f"log.access_log: {tmp_path}/logdir is a directory" in r.stderr
    assert f"cache.path: {tmp_path}/afile exists and is not a directory" in r.stderr


def test_check_finds_a_directory_it_may_not_write_in(tmp_path):
    if os.geteuid() == 0:
        target = "/sys"                 # root may write anywhere but in sysfs
    else:
        target = tmp_path / "ro"
        target.mkdir()
        target.chmod(0o500)
    cfg = write(tmp_path, listen(free_port()) + f'[log]\naccess_log = "{target}/a.log"\n')
    r = edgeproxy("check", "-c", str(cfg))
    assert r.returncode == 1
    assert f"log.access_log: cannot create {target}/a.log in {target}: Permission denied" \
        in r.stderr


def test_check_of_a_running_proxys_config_does_not_fail_on_its_ports(tmp_path, origin):
    port = free_port()
    cfg = tmp_path / "live.toml"
    cfg.write_text(f'[server]\npid_file = "{tmp_path}/live.pid"\n{listen(port)}'
                   f'[[route]]\npool = "web"\n[pool.web]\nbackends = ["{origin.url}"]\n')
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.Popen([sys.executable, "-m", "edgeproxy", "run", "-c", str(cfg)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    try:
        wait_port(port, proc)
        with Client(port) as c:
            assert c.request("GET", "/size/1").status == 200
        for _ in range(100):                      # the pid file follows the listeners
            if (tmp_path / "live.pid").exists():
                break
            time.sleep(0.05)
        r = edgeproxy("check", "-c", str(cfg))
        assert r.returncode == 0, r.stderr
        assert f"listen addresses not tried: edgeproxy {proc.pid} runs this configuration" \
            in r.stdout
    finally:
        proc.terminate()
        proc.wait(10)


def _one_line_failure(r, words: str) -> None:
    assert r.returncode not in (0, None), r
    assert "Traceback" not in r.stderr, r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and words in lines[0], r.stderr


@pytest.mark.parametrize("mode", [(), ("--no-supervisor",)])
def test_run_fails_in_one_line(tmp_path, busy_port, mode):
    cases = [
        (listen(busy_port), f"listen 127.0.0.1:{busy_port}: Address already in use"),
        (listen(free_port()) + f'[log]\naccess_log = "{tmp_path}/nodir/a.log"\n',
         f"log.access_log: cannot create {tmp_path}/nodir/a.log"),
        (listen(free_port()) + f'[cache]\npath = "{tmp_path}/e.toml/cache"\n',
         "cache.path: cannot create"),
        (listen(free_port()) + 'tls.certs = [{ cert = "missing.pem", key = "missing.key" }]\n',
         'listen[0].tls.certs[0].cert: "missing.pem" not found'),
        (listen(free_port()) + "[timeout]\nread = \"long\"\n", "timeout.read: expected a number"),
    ]
    for text, words in cases:
        cfg = write(tmp_path, text)
        r = edgeproxy("--log-level", "warning", "run", "-c", str(cfg), *mode)
        if "invalid configuration" in r.stderr:      # the loader's own report: a head line
            assert r.returncode == 2 and "Traceback" not in r.stderr and words in r.stderr
            continue
        _one_line_failure(r, words)


def test_a_reload_to_an_unwritable_log_is_refused_in_one_message(proxy_factory, tmp_path, origin):
    from ops_support import start, status
    proxy, admin_port = start(proxy_factory, tmp_path, origin.url, admin=True)
    pids = [w["pid"] for w in status(admin_port)["workers"]]
    proxy.config_path.write_text(proxy.config_path.read_text()
                                 + f'\n[log]\naccess_log = "{tmp_path}/gone/access.log"\n')
    r = edgeproxy("reload", "-c", str(proxy.config_path), timeout=60)
    assert r.returncode == 1
    assert f"log.access_log: cannot create {tmp_path}/gone/access.log" in r.stderr
    assert "Traceback" not in proxy.log() and "crashed" not in proxy.log()
    after = status(admin_port)
    assert after["generation"] == 1 and [w["pid"] for w in after["workers"]] == pids
    with Client(proxy.port) as c:
        assert c.request("GET", "/size/5").status == 200
