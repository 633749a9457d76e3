"""The reverse proxies compared: how each is configured, started and named."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from bench.origin import nginx_binary, nginx_user_line
from bench.servers import Pinning, Server
from bench.templates import fill

REPO = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Setup:
    """What a contender's launch needs to know about this run."""
    workdir: Path
    port: int
    origin_port: int
    nofile: int          # RLIMIT_NOFILE the proxies may use
    pinning: Pinning


class Contender:
    name = ""

    def missing(self) -> str | None:
        """Why this contender cannot run here, or None."""
        return None

    def version(self) -> str:
        return ""

    def server(self, setup: Setup) -> Server:
        raise NotImplementedError


class NginxProxy(Contender):
    """worker_processes 1, upstream keepalive 1024, HTTP/1.1 upstream, default buffering."""
    name = "nginx"

    def missing(self) -> str | None:
        return None if nginx_binary() else "nginx is not installed (apt-get install nginx-light)"

    def version(self) -> str:
        return _first_line([nginx_binary() or "nginx", "-v"])

    def server(self, setup: Setup) -> Server:
        conf = setup.workdir / "nginx-proxy.conf"
        conf.write_text(fill("nginx-proxy.conf", USER=nginx_user_line(), NOFILE=setup.nofile,
                             WORKER_CONNECTIONS=setup.nofile - 64, WORKDIR=setup.workdir,
                             PORT=setup.port, ORIGIN_PORT=setup.origin_port))
        argv = [nginx_binary() or "nginx", "-p", str(setup.workdir), "-c", str(conf),
                "-e", str(setup.workdir / "nginx-proxy-error.log")]
        return Server(self.name, setup.pinning.for_proxy(argv), setup.port,
                      setup.workdir / "nginx-proxy.log")


class HAProxy(Contender):
    """nbthread 1, mode http, keep-alive both sides with http-reuse always."""
    name = "haproxy"

    def missing(self) -> str | None:
        if shutil.which("haproxy") is None:
            return "haproxy is not installed (apt-get install haproxy)"
        return None

    def version(self) -> str:
        return _first_line(["haproxy", "-v"])

    def server(self, setup: Setup) -> Server:
        conf = setup.workdir / "haproxy.cfg"
        conf.write_text(fill("haproxy.cfg", PORT=setup.port, ORIGIN_PORT=setup.origin_port))
        argv = ["haproxy", "-db", "-f", str(conf)]  # -db: foreground, one process
        return Server(self.name, setup.pinning.for_proxy(argv), setup.port,
                      setup.workdir / "haproxy.log")


class EdgeProxy(Contender):
    """This repository's proxy, started from the working tree with its defaults (one worker)."""
    name = "edgeproxy"

    def missing(self) -> str | None:
        if not (REPO / "edgeproxy" / "__main__.py").exists():
            return "edgeproxy has no __main__ yet (python -m edgeproxy does not exist)"
        return None

    def version(self) -> str:
        return "working tree (see commit)"

    def server(self, setup: Setup) -> Server:
        argv = [sys.executable, "-m", "edgeproxy", "run",
                "--listen", f"127.0.0.1:{setup.port}",
                "--upstream", f"http://127.0.0.1:{setup.origin_port}"]
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
        return Server(self.name, setup.pinning.for_proxy(argv), setup.port,
                      setup.workdir / "edgeproxy.log", env=env, cwd=str(REPO))


CONTENDERS: dict[str, Contender] = {c.name: c for c in (NginxProxy(), HAProxy(), EdgeProxy())}


def _first_line(argv: list[str]) -> str:
    try:
        done = subprocess.run(argv, check=False, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"unknown ({exc})"
    lines = (done.stdout + done.stderr).strip().splitlines()
    return lines[0].strip() if lines else "unknown"
