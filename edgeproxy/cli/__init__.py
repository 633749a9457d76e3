"""The `edgeproxy` command line: run and reload the proxy, check a configuration, show its backends, run the demo."""
from __future__ import annotations

import errno
import importlib
import json
import logging
import os
import signal
import socket
import sys
import tempfile
import time
from typing import Any

import click

from edgeproxy.config import Config, ConfigError, load_config, quick_config

__all__ = ["main", "setup_logging"]

LOG_LEVELS = ("debug", "info", "warning", "error")
LOG_FORMAT = "%(asctime)s.%(msecs)03d %(levelname)s [%(process)d] %(name)s: %(message)s"
LOG_DATE_FORMAT = "%Y-%m-%dT%H:%M:%S"


def setup_logging(level: str = "info") -> None:
    """Send log records of `level` and above to stderr, with time, level and process id.

    Calling it again (for instance in a worker, or once the configuration
    is read) replaces the handler it installed before.
    """
    root = logging.getLogger()
    for handler in list(root.handlers):
        if getattr(handler, "_edgeproxy", False):
            root.removeHandler(handler)
    handler = logging.StreamHandler(sys.stderr)
    handler._edgeproxy = True  # type: ignore[attr-defined]
    handler.setFormatter(logging.Formatter(LOG_FORMAT, LOG_DATE_FORMAT))
    root.addHandler(handler)
    root.setLevel(level.upper())


def count_summary(config: Config) -> str:
    """"1 listener, 2 routes, 1 pool, 3 backends"."""
    def plural(n: int, word: str) -> str:
        return f"{n} {word}{'' if n == 1 else 's'}"
    backends = sum(len(pool.backends) for pool in config.pools.values())
    return ", ".join([plural(len(config.listen), "listener"), plural(len(config.routes), "route"),
                      plural(len(config.pools), "pool"), plural(backends, "backend")])


def fail(error: ConfigError, code: int) -> None:
    click.echo(f"edgeproxy: {error}", err=True)
    sys.exit(code)


CONTEXT_SETTINGS = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


@click.group(context_settings=CONTEXT_SETTINGS)
@click.option("--log-level", type=click.Choice(LOG_LEVELS, case_sensitive=False),
              envvar="EDGEPROXY_LOG_LEVEL", show_envvar=True, default=None,
              help="Lowest level of log messages written to stderr. "
                   "Overrides log.level of the configuration (default: its value, \"info\").")
@click.pass_context
def main(ctx: click.Context, log_level: str | None) -> None:
    """edgeproxy: an HTTP/1.1 edge reverse proxy.

    \b
    Examples:
      edgeproxy run -c /etc/edgeproxy/edgeproxy.toml
      edgeproxy run --listen 127.0.0.1:8080 --upstream http://127.0.0.1:5000
      edgeproxy check -c edgeproxy.toml
      edgeproxy status -c edgeproxy.toml
      edgeproxy demo

    The configuration file format is described in docs/configuration.md.
    """
    ctx.obj = {"log_level": log_level.lower() if log_level else None}


def log_overrides(ctx: click.Context, **log: Any) -> dict[str, Any]:
    """The [log] keys set on the command line (--log-level and the command's own)."""
    if ctx.obj.get("log_level"):
        log["level"] = ctx.obj["log_level"]
    return {k: v for k, v in log.items() if v is not None}


@main.command(context_settings=CONTEXT_SETTINGS)
@click.option("-c", "--config", "config_path", metavar="FILE", type=click.Path(dir_okay=False),
              help="Read the configuration from this TOML file. "
                   "Cannot be combined with --listen/--upstream.")
@click.option("--listen", "listen", metavar="ADDRESS", multiple=True,
              help="Quick mode: accept clients on this address, e.g. 127.0.0.1:8080, "
                   "[::1]:8080 or :8080 (all IPv4 interfaces). Repeatable.")
@click.option("--upstream", "upstreams", metavar="URL", multiple=True,
              help="Quick mode: send every request to this backend, e.g. "
                   "http://127.0.0.1:5000 (may end with \" weight=N\" or \" backup\"). "
                   "Repeatable; requests are balanced between them.")
@click.option("--workers", type=click.IntRange(min=0), default=None, metavar="N",
              help="Number of worker processes; 0 = one per CPU. "
                   "Overrides server.workers (default: its value, 1).")
@click.option("--access-log", metavar="PATH", default=None,
              help="Write one line per request to this file, or \"-\" for stderr. "
                   "Overrides log.access_log (default: its value, off).")
@click.option("--no-supervisor", is_flag=True,
              help="Run one worker in this process, without the supervisor: "
                   "no reload, no admin listener, server.workers is ignored.")
@click.pass_context
def run(ctx: click.Context, config_path: str | None, listen: tuple[str, ...],
        upstreams: tuple[str, ...], workers: int | None, access_log: str | None,
        no_supervisor: bool) -> None:
    """Run the proxy until it is stopped (SIGTERM or SIGINT: graceful;
    SIGQUIT: at once).

    Give either a configuration file (-c FILE) or, in quick mode, at least
    one --listen and one --upstream: that proxies every request to the
    upstreams with the default settings. A configuration error is printed
    and the exit status is 2.

    A supervisor process runs server.workers workers; SIGHUP (or
    `edgeproxy reload -c FILE`) reloads the file without dropping requests.
    """
    if config_path and (listen or upstreams):
        raise click.UsageError("-c/--config cannot be combined with --listen/--upstream")
    if not config_path and not (listen and upstreams):
        raise click.UsageError("give -c FILE, or at least one --listen and one --upstream")
    if access_log is not None and access_log != "-":
        access_log = os.path.abspath(access_log)  # relative to where the command runs
    overrides: dict[str, Any] = {}
    if workers is not None:
        overrides["server"] = {"workers": workers}
    log = log_overrides(ctx, access_log=access_log)
    if log:
        overrides["log"] = log
    def load() -> Config:
        if config_path:
            return load_config(config_path, **overrides)
        return quick_config(listen, upstreams, **overrides)

    try:
        config = load()
    except ConfigError as error:
        fail(error, 2)
    setup_logging(config.log.level)
    from edgeproxy.server import serve  # the server pulls in the event loop and workers
    from edgeproxy.server.preflight import file_problems
    from edgeproxy.tls import TLSConfigError
    problems = file_problems(config)     # one line each, not a worker's traceback
    if problems:
        for problem in problems:
            click.echo(f"edgeproxy: {problem}", err=True)
        sys.exit(2)
    try:
        code = serve(config, supervise=not no_supervisor, load=load)
    except TLSConfigError as error:
        click.echo(f"edgeproxy: {error}", err=True)
        sys.exit(2)
    except OSError as error:
        where = f" {error.filename}" if error.filename else ""
        click.echo(f"edgeproxy: {error.strerror or error}{where}", err=True)
        sys.exit(2)
    sys.exit(code)


@main.command(context_settings=CONTEXT_SETTINGS)
@click.option("-c", "--config", "config_path", metavar="FILE", required=True,
              type=click.Path(dir_okay=False),
              help="The configuration file the running edgeproxy was started with.")
@click.option("--timeout", type=click.FloatRange(min=1), default=60.0, show_default=True,
              metavar="SECONDS", help="How long to wait for the new workers.")
def reload(config_path: str, timeout: float) -> None:
    """Reload a running edgeproxy with its configuration file, without
    dropping requests.

    Checks the file first: if it is invalid, prints every problem, exits 1
    and the running proxy is not touched. Otherwise sends SIGHUP to the
    supervisor found through server.pid_file (default: derived from the
    file's path), waits for the result and prints it; exit 0 when the new
    configuration serves, 1 when the proxy kept the old one (the reason is
    printed), 3 when no running edgeproxy was found.
    """
    try:
        config = load_config(config_path)
    except ConfigError as error:
        fail(error, 1)
    from edgeproxy.server.supervisor import pid_file_of
    pid_file = pid_file_of(config)
    try:
        with open(pid_file) as f:
            pid = int(f.read().strip())
        os.kill(pid, 0)
    except (OSError, ValueError) as exc:
        click.echo(f"edgeproxy: no running edgeproxy found through {pid_file}: "
                   f"{getattr(exc, 'strerror', None) or exc}", err=True)
        sys.exit(3)
    result_file = pid_file + ".reload"

    def last_seq() -> int:
        try:
            with open(result_file) as f:
                return json.load(f)["seq"]
        except (OSError, ValueError, KeyError):
            return 0

    before = last_seq()
    os.kill(pid, signal.SIGHUP)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        time.sleep(0.1)
        if last_seq() > before:
            with open(result_file) as f:
                result = json.load(f)
            if result["ok"]:
                click.echo(f"reloaded: {result['message']}")
                return
            click.echo(f"edgeproxy: reload failed, still running the previous configuration:\n"
                       f"{result['message']}", err=True)
            sys.exit(1)
    click.echo(f"edgeproxy: no reload result from process {pid} within {timeout:g}s", err=True)
    sys.exit(1)


@main.command(context_settings=CONTEXT_SETTINGS)
@click.option("-c", "--config", "config_path", metavar="FILE", required=True,
              type=click.Path(dir_okay=False),
              help="The TOML configuration file to check.")
def check(config_path: str) -> None:
    """Check a configuration file without starting anything.

    Prints "OK: ..." with what it defines and exits 0, or prints every
    problem found (one per line, "<key path>: <what is wrong>") and exits 1.
    Beyond the file itself it tries what `run` would open: the
    certificates and keys, the access log and cache directories, the pid
    and state files, and the listen and admin addresses (one in use is a
    problem; not tried while an edgeproxy runs this configuration).
    """
    try:
        config = load_config(config_path)
    except ConfigError as error:
        fail(error, 1)
    from edgeproxy.server.preflight import bind_problems, file_problems, running_pid
    problems = tls_problems(config) + file_problems(config)
    pid = running_pid(config)
    if pid is None:
        problems += bind_problems(config)
    if problems:
        from edgeproxy.config.compose import locate
        where = locate(config_path)
        click.echo(f"edgeproxy: {config_path}: {len(problems)} problem(s):", err=True)
        for problem in problems:
            at = where(problem)
            click.echo(f"  {at}: {problem}" if at else f"  {problem}", err=True)
        sys.exit(1)
    if pid is not None:
        click.echo(f"listen addresses not tried: edgeproxy {pid} runs this configuration")
    from edgeproxy.limits.check import store_warnings
    for warning in store_warnings(config):
        click.echo(f"edgeproxy: warning: {warning}", err=True)
    click.echo(f"OK: {count_summary(config)}")


def tls_problems(config: Config) -> list[str]:
    """What loading the certificates and keys would refuse, key path first."""
    from edgeproxy.tls import check_listen_tls, check_pool_tls
    problems = []
    for i, lc in enumerate(config.listen):
        if lc.tls is not None:
            problems += [f"listen[{i}].tls: {p}" for p in check_listen_tls(lc.tls)]
    for name, pool in config.pools.items():
        if any(b.scheme == "https" for b in pool.backends):
            problems += [f"pool.{name}.tls: {p}" for p in check_pool_tls(pool.tls)]
    return problems


@main.command(context_settings=CONTEXT_SETTINGS)
@click.option("-c", "--config", "config_path", metavar="FILE", required=True,
              type=click.Path(dir_okay=False),
              help="The configuration file the running proxy was started with.")
@click.option("--json", "as_json", is_flag=True, help="Print the raw state as JSON.")
def status(config_path: str, as_json: bool) -> None:
    """Show every backend of a running proxy: up/down, outstanding requests,
    failures and the last health check.

    Reads the state file the proxy rewrites each second (server.state_file,
    or one in the temp directory named after FILE). Exits 1 when no proxy
    started with FILE is running.
    """
    try:
        config = load_config(config_path)
    except ConfigError as error:
        fail(error, 2)
    from edgeproxy.health.status import format_status, read_state, state_path
    path = state_path(config)
    data = read_state(path)
    if data is None:
        click.echo(f"edgeproxy: no running proxy for {config_path} (no fresh state in {path})",
                   err=True)
        sys.exit(1)
    if as_json:
        import json
        click.echo(json.dumps(data, indent=2))
    else:
        click.echo(format_status(data))


def free_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def port_is_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as exc:
            if exc.errno in (errno.EADDRINUSE, errno.EACCES):
                return False
            raise
    return True


@main.command(context_settings=CONTEXT_SETTINGS)
@click.option("--port", type=click.IntRange(0, 65535), default=8080, show_default=True,
              metavar="PORT",
              help="Port edgeproxy listens on for plain HTTP, on 127.0.0.1 (0 = any free port).")
@click.option("--https-port", type=click.IntRange(0, 65535), default=8443, show_default=True,
              metavar="PORT", help="Port of its HTTPS listener, on 127.0.0.1 (0 = any free port).")
@click.option("--admin-port", type=click.IntRange(0, 65535), default=9901, show_default=True,
              metavar="PORT", help="Port of the admin listener (status page, /metrics), on "
                                   "127.0.0.1 (0 = any free port).")
@click.pass_context
def demo(ctx: click.Context, port: int, https_port: int, admin_port: int) -> None:
    """Run edgeproxy in front of the built-in demo origin, to try with curl.

    The demo origin (edgeproxy/demo/origin.py) runs as a child process on
    127.0.0.1 and a free port. edgeproxy serves it on 127.0.0.1: plain HTTP
    on PORT, HTTPS on HTTPS-PORT (with a self-signed certificate made for the
    demo), a cached route (/cached/), and the admin listener on ADMIN-PORT.
    The configuration is a file in a temporary directory (its path is
    printed), and the access log goes to stderr. Stop with Ctrl-C; the origin
    and the directory go with it.
    """
    from edgeproxy.demo.session import CERT_DAYS, DemoPorts, OriginProcess, guide, write_config
    from edgeproxy.tls import write_selfsigned
    host = "127.0.0.1"
    chosen: dict[str, int] = {}
    for option, value in (("--port", port), ("--https-port", https_port),
                          ("--admin-port", admin_port)):
        if value == 0:
            value = free_port(host)
        elif value in chosen.values() or not port_is_free(host, value):
            raise click.UsageError(f"port {value} on {host} is in use; pick another with {option}")
        chosen[option] = value
    ports = DemoPorts(host, chosen["--port"], chosen["--https-port"], chosen["--admin-port"])
    workdir = tempfile.TemporaryDirectory(prefix="edgeproxy-demo-")
    origin = None
    code = 1
    try:
        try:
            origin = OriginProcess(host)
        except OSError as error:
            click.echo(f"edgeproxy: {error}", err=True)
            sys.exit(1)
        cert, _ = write_selfsigned(["localhost", host], workdir.name, days=CERT_DAYS)
        config_path = write_config(workdir.name, ports, origin.url)
        overrides = {"log": log_overrides(ctx)}

        def load() -> Config:
            return load_config(config_path, **overrides)

        try:
            config = load()
        except ConfigError as error:  # pragma: no cover - the file is ours
            fail(error, 2)
        setup_logging(config.log.level)
        click.echo(guide(ports, origin.url, config_path, str(cert)))
        from edgeproxy.server import serve
        try:
            code = serve(config, supervise=True, load=load)
        except OSError as error:
            click.echo(f"edgeproxy: cannot listen: {error}", err=True)
            code = 2
    finally:
        if origin is not None:
            origin.stop()
        workdir.cleanup()
    sys.exit(code)


def add_optional_groups() -> None:
    """Register `edgeproxy cert` and `edgeproxy cache` when their modules exist."""
    for module_name, group_name in (("edgeproxy.cli.cert", "cert"),
                                    ("edgeproxy.cli.cache", "cache")):
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name == module_name:
                continue  # not written yet
            raise
        main.add_command(getattr(module, group_name), group_name)


add_optional_groups()
