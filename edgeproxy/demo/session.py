"""What `edgeproxy demo` sets up: the origin process, a configuration file, a throwaway certificate, the guide it prints.

The demo is a real configuration in a temporary directory (printed, so it
can be read or edited and reloaded with SIGHUP), served by the usual
supervisor and worker: plain HTTP, HTTPS, a cached route, the admin
listener with its status page and /metrics.  The origin runs as a child
process (`python -m edgeproxy.demo.origin`), not a thread, because the
supervisor forks; it exits when its stdin closes, so it never outlives the
demo, however the demo ends.
"""
from __future__ import annotations

import os
import selectors
import subprocess
import sys
from dataclasses import dataclass

__all__ = ["CERT_DAYS", "DemoPorts", "OriginProcess", "guide", "write_config"]

CERT_DAYS = 7          # the demo certificate's validity (short-lived: it warns only near its end)
ORIGIN_START_TIMEOUT = 15.0

CONFIG = """\
# The configuration `edgeproxy demo` runs (docs/configuration.md).
[server]
workers = 1
grace = 1
admin = "{host}:{admin_port}"          # the status page and /metrics, on localhost only
pid_file = "edgeproxy.pid"
state_file = "state.json"

[[listen]]
bind = "{host}:{port}"

[[listen]]
bind = "{host}:{https_port}"
tls.certs = [{{ cert = "cert.pem", key = "key.pem" }}]

[[route]]                               # cached: the origin's /cached/ pages are cacheable
path = "/cached/"
pool = "origin"
cache = true

[[route]]
path = "/"
pool = "origin"

[pool.origin]
backends = ["{origin}"]

[log]
access_log = "-"

[cache]
path = "cache"
max_size = "64MiB"
max_object = "16MiB"
"""


@dataclass(frozen=True)
class DemoPorts:
    host: str
    port: int            # plain HTTP
    https_port: int
    admin_port: int


def write_config(directory: str, ports: DemoPorts, origin_url: str) -> str:
    """Write directory/edgeproxy.toml (the certificate is cert.pem/key.pem beside it)."""
    path = os.path.join(directory, "edgeproxy.toml")
    with open(path, "w") as f:
        f.write(CONFIG.format(host=ports.host, port=ports.port, https_port=ports.https_port,
                              admin_port=ports.admin_port, origin=origin_url))
    return path


class OriginProcess:
    """`python -m edgeproxy.demo.origin` on a free port, stopped by `stop()` or
    by the end of this process (its stdin is a pipe from here)."""

    def __init__(self, host: str):
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "edgeproxy.demo.origin", "--host", host, "--port", "0",
             "--until-stdin-closes"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
            start_new_session=True)    # Ctrl-C goes to the proxy; the origin stops after it
        line = self._first_line()
        if not line.startswith("demo origin on "):
            self.stop()
            raise OSError(f"the demo origin did not start ({line.strip() or 'no output'})")
        self.url = line.removeprefix("demo origin on ").strip()

    def _first_line(self) -> str:
        with selectors.DefaultSelector() as sel:
            sel.register(self.proc.stdout, selectors.EVENT_READ)
            if not sel.select(ORIGIN_START_TIMEOUT):
                return ""
        return self.proc.stdout.readline()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()          # the origin exits on its own
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        for stream in (self.proc.stdin, self.proc.stdout):
            if stream and not stream.closed:
                stream.close()


def guide(ports: DemoPorts, origin_url: str, config_path: str, cert: str) -> str:
    """What the demo prints: where it listens and a curl line for each thing to try."""
    h = ports.host
    http = f"http://{h}:{ports.port}"
    https = f"https://{h}:{ports.https_port}"
    admin = f"http://{h}:{ports.admin_port}"
    return "\n".join([
        f"edgeproxy demo, in front of the demo origin {origin_url}:",
        f"  {http:<28} plain HTTP (--port)",
        f"  {https:<28} HTTPS (--https-port), with a certificate made now, valid {CERT_DAYS} "
        "days:",
        f"  {'':<28} {cert}",
        f"  {admin:<28} admin: status page, /metrics, /status (--admin-port; localhost only)",
        f"  configuration: {config_path}",
        "Try:",
        f"  curl -i {http}/",
        f"  curl -i {http}/cached/page            # twice: Cache-Status says miss, then hit",
        f"  curl -i --cacert {cert} {https}/api/hello",
        f"  curl -s '{http}/big?size=10485760' | wc -c",
        f"  curl -i --data-binary 'hello' -H 'Transfer-Encoding: chunked' {http}/echo",
        f"  curl -i '{http}/slow?delay=2'",
        f"  curl -s {admin}/metrics | grep edgeproxy_requests_total",
        f"  curl -s {admin}/status",
        f"  and {admin}/ in a browser: backends, health, request rate",
        "The origin sends Server and X-Powered-By headers; edgeproxy removes them.",
        "Press Ctrl-C to stop.",
    ])
