"""docs/edgeproxy.service: `systemd-analyze verify` accepts it, its paths agree with the
documentation and with the defaults the code uses, and a real supervisor started the way
the unit starts it is found by `edgeproxy reload` and `edgeproxy status` through those
defaults alone."""
from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from harness import ROOT, Client, free_port, wait_port
from ops_support import wait_until

from edgeproxy.config import parse_config
from edgeproxy.config import runtime as runtime_module
from edgeproxy.health.status import state_path
from edgeproxy.server.supervisor import pid_file_of

UNIT = ROOT / "docs" / "edgeproxy.service"
OPERATIONS = ROOT / "docs" / "operations.md"
COMMAND = "/opt/edgeproxy/venv/bin/edgeproxy"
CONFIG = "/etc/edgeproxy/edgeproxy.toml"


def unit_settings(text: str) -> dict[str, list[str]]:
    """{"Section.Key": [values in order]} of a unit file."""
    out: dict[str, list[str]] = {}
    section = ""
    for line in text.splitlines():
        line = line.strip()
        if not line or line[0] in "#;":
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        out.setdefault(f"{section}.{key.strip()}", []).append(value.strip())
    return out


def one(settings: dict[str, list[str]], key: str) -> str:
    values = settings.get(key, [])
    assert len(values) == 1, f"{key}: {values}"
    return values[0]


@pytest.fixture(scope="module")
def unit() -> dict[str, list[str]]:
    return unit_settings(UNIT.read_text())


def verify(path: Path) -> subprocess.CompletedProcess:
    return subprocess.run(["systemd-analyze", "verify", "--man=no", str(path)],
                          capture_output=True, text=True, timeout=60)


def test_systemd_analyze_verify_accepts_the_unit(tmp_path):
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed (Debian: systemd)")
    installed = Path(sys.executable).parent / "edgeproxy"
    if not installed.exists():
        pytest.skip(f"no edgeproxy command beside {sys.executable} to stand for {COMMAND}")
    # verify insists that the commands exist: point them at this environment's edgeproxy
    copy = tmp_path / "edgeproxy.service"
    copy.write_text(UNIT.read_text().replace(COMMAND, str(installed)))
    result = verify(copy)
    assert result.returncode == 0, result.stderr
    assert result.stderr.strip() == "", result.stderr     # a warning is a failure too
    # and the check can fail: a mistyped setting is reported
    broken = tmp_path / "broken" / "edgeproxy.service"
    broken.parent.mkdir()
    broken.write_text(copy.read_text().replace("ProtectSystem=strict", "ProtectSystem=strikt"))
    assert "strikt" in verify(broken).stderr


def test_the_unit_runs_the_documented_command_and_file(unit):
    docs = OPERATIONS.read_text()
    assert f"python3 -m venv {COMMAND.removesuffix('/bin/edgeproxy')}" in docs
    assert one(unit, "Service.ExecStart") == f"{COMMAND} run -c {CONFIG}"
    assert one(unit, "Service.ExecStartPre") == f"{COMMAND} check -c {CONFIG}"
    # reload: check, then SIGHUP to the supervisor, found through its default pid file
    assert one(unit, "Service.ExecReload") == f"{COMMAND} reload -c {CONFIG}"
    user = one(unit, "Service.User")
    assert user == one(unit, "Service.Group") == "edgeproxy"
    assert re.search(rf"useradd --system --user-group .* {user}\n", docs)
    assert f"-g {user} " in docs        # the keys' group
    assert "CAP_NET_BIND_SERVICE" in one(unit, "Service.AmbientCapabilities").split()
    assert one(unit, "Service.CapabilityBoundingSet") == "CAP_NET_BIND_SERVICE"
    assert one(unit, "Service.KillMode") == "mixed"


def test_the_runtime_directory_is_where_the_code_puts_pid_and_state_files(unit, tmp_path,
                                                                          monkeypatch):
    runtime = "/run/" + one(unit, "Service.RuntimeDirectory")
    assert runtime == runtime_module.SYSTEM_RUNTIME_DIR
    config = parse_config('[[listen]]\nbind = ":80"\n[[route]]\npool = "w"\n'
                          '[pool.w]\nbackends = ["http://127.0.0.1:5000"]\n',
                          source="/etc/edgeproxy/edgeproxy.toml")
    monkeypatch.delenv(runtime_module.RUNTIME_DIR_ENV, raising=False)
    # systemd created the directory: the defaults go there
    made = tmp_path / "run-edgeproxy"
    made.mkdir()
    monkeypatch.setattr(runtime_module, "SYSTEM_RUNTIME_DIR", str(made))
    assert os.path.dirname(pid_file_of(config)) == str(made)
    assert os.path.dirname(state_path(config)) == str(made)
    # no such directory (development): the temp directory, as before
    monkeypatch.setattr(runtime_module, "SYSTEM_RUNTIME_DIR", str(tmp_path / "absent"))
    assert os.path.dirname(pid_file_of(config)) == "/tmp"
    assert os.path.dirname(state_path(config)) == "/tmp"
    monkeypatch.setenv(runtime_module.RUNTIME_DIR_ENV, str(tmp_path / "mine"))
    assert os.path.dirname(pid_file_of(config)) == str(tmp_path / "mine")


def test_what_the_documented_configuration_writes_is_writable_under_protect_system(unit):
    assert one(unit, "Service.ProtectSystem") == "strict"
    writable = ["/run/" + one(unit, "Service.RuntimeDirectory"),
                "/var/cache/" + one(unit, "Service.CacheDirectory"),
                "/var/log/" + one(unit, "Service.LogsDirectory"),
                *" ".join(unit.get("Service.ReadWritePaths", [])).split()]
    docs = OPERATIONS.read_text()
    section = docs[docs.index("## systemd"):]
    example = re.search(r"```toml\n(.*?)```", section, re.S).group(1)
    raw = tomllib.loads(example)
    written = [raw["cache"]["path"], raw["log"]["access_log"]]
    for path in written:
        assert any(path == w or path.startswith(w + "/") for w in writable), (path, writable)
    assert "pid_file" not in raw["server"] and "state_file" not in raw["server"]


def test_reload_and_status_find_a_supervisor_through_the_runtime_directory(tmp_path, origin):
    """The supervisor started as the unit starts it (no pid_file, no state_file in the
    configuration, /run/edgeproxy present) is found by `reload` and `status` run as
    separate processes, with nothing but the configuration file."""
    run_dir = tmp_path / "run"          # stands for /run/edgeproxy, made by RuntimeDirectory=
    run_dir.mkdir()
    port = free_port()
    config = tmp_path / "edgeproxy.toml"
    config.write_text(f'[server]\ngrace = 2\n[[listen]]\nbind = "127.0.0.1:{port}"\n'
                      f'[[route]]\npool = "web"\n[pool.web]\nbackends = ["{origin.url}"]\n')
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop(runtime_module.RUNTIME_DIR_ENV, None)
    cli = ("import sys, edgeproxy.config.runtime as r; "
           f"r.SYSTEM_RUNTIME_DIR = {str(run_dir)!r}; "
           "from edgeproxy.cli import main; sys.argv[0] = 'edgeproxy'; main()")

    def edgeproxy(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-c", cli, *args], capture_output=True,
                              text=True, env=env, timeout=60)

    log = open(tmp_path / "proxy.log", "wb")
    proc = subprocess.Popen([sys.executable, "-c", cli, "run", "-c", str(config)], env=env,
                            stdout=subprocess.DEVNULL, stderr=log)
    try:
        wait_port(port, proc)
        pid_files = wait_until(lambda: list(run_dir.glob("edgeproxy-*.pid")), what="pid file")
        assert int(pid_files[0].read_text()) == proc.pid
        wait_until(lambda: list(run_dir.glob("edgeproxy-*.state.json")), what="state file")
        shown = edgeproxy("status", "-c", str(config))
        assert shown.returncode == 0, shown.stderr
        assert "web" in shown.stdout
        done = edgeproxy("reload", "-c", str(config))
        assert done.returncode == 0, done.stderr
        assert done.stdout.startswith("reloaded: generation 2")
        with Client(port) as c:
            assert c.request("GET", "/size/4").body == b"xxxx"
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
        log.close()
    assert not list(run_dir.glob("edgeproxy-*.pid"))     # removed at exit
