"""What `edgeproxy run` opens, tried without starting anything: the files
and directories it writes (access log, cache, pid and state files) and the
addresses it binds.  `edgeproxy check` reports every problem; `run` refuses
to start on the file problems, one line each, instead of a worker's
traceback.  Each problem is "<key path>: <what is wrong>"."""

from __future__ import annotations

import errno
import os
import socket
import tempfile

from edgeproxy.config.model import Config

__all__ = ["bind_problems", "file_problems", "running_pid"]


def _why(exc: OSError) -> str:
    return exc.strerror or str(exc)


def _try_create_in(directory: str) -> str | None:
    """Whether a file can be created in directory (as run would): what fails, or None."""
    try:
        fd, tmp = tempfile.mkstemp(prefix=".edgeproxy-check-", dir=directory)
    except OSError as exc:
        return _why(exc)
    os.close(fd)
    os.unlink(tmp)
    return None


def writable_file(path: str, key: str) -> str | None:
    """A file run appends to or creates (its directory must exist)."""
    if os.path.isdir(path):
        return f"{key}: {path} is a directory"
    if os.path.exists(path):
        try:
            with open(path, "ab"):
                pass
        except OSError as exc:
            return f"{key}: cannot write {path}: {_why(exc)}"
        return None
    directory = os.path.dirname(path) or "."
    if not os.path.isdir(directory):
        return f"{key}: cannot create {path}: the directory {directory} does not exist"
    why = _try_create_in(directory)
    return f"{key}: cannot create {path} in {directory}: {why}" if why else None


def creatable_dir(path: str, key: str) -> str | None:
    """A directory run creates if missing (as os.makedirs) and writes in."""
    if os.path.exists(path):
        if not os.path.isdir(path):
            return f"{key}: {path} exists and is not a directory"
        why = _try_create_in(path)
        return f"{key}: cannot write in {path}: {why}" if why else None
    parent = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        return f"{key}: cannot create {path}: {parent} is not a directory"
    why = _try_create_in(parent)
    return f"{key}: cannot create {path} (in {parent}): {why}" if why else None


def file_problems(config: Config) -> list[str]:
    """The files and directories run would open for writing and cannot."""
    from edgeproxy.health.status import state_path
    from edgeproxy.server.supervisor import pid_file_of

    problems = []
    log = config.log.access_log
    if log and log != "-":
        problems.append(writable_file(log, "log.access_log"))
    if config.cache is not None and any(r.cache for r in config.routes):
        problems.append(creatable_dir(config.cache.path, "cache.path"))
    problems.append(writable_file(pid_file_of(config), "server.pid_file"))
    problems.append(writable_file(state_path(config), "server.state_file"))
    return [p for p in problems if p]


def running_pid(config: Config) -> int | None:
    """The supervisor already running this configuration (its pid file), or None."""
    from edgeproxy.server.supervisor import pid_file_of

    try:
        with open(pid_file_of(config)) as f:
            pid = int(f.read().strip())
        os.kill(pid, 0)
    except (OSError, ValueError):
        return None
    return pid


def _bind(host: str, port: int) -> None:
    # as edgeproxy.server.worker.bind_socket and edgeproxy.admin.bind_admin do
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind((host, port))


def bind_problems(config: Config) -> list[str]:
    """The listen (and admin) addresses that cannot be bound now: in use,
    a privileged port, an address this host does not have."""
    problems = []
    wanted = [(f"listen[{i}].bind", lc.bind, lc.host or "0.0.0.0", lc.port)
              for i, lc in enumerate(config.listen) if lc.port]
    s = config.server
    if s.admin:
        wanted.append(("server.admin", s.admin, s.admin_host, s.admin_port))
    for key, text, host, port in wanted:
        try:
            _bind(host, port)
        except socket.gaierror as exc:
            problems.append(f"{key}: cannot bind {text}: {exc.strerror}")
        except OSError as exc:
            hint = ""
            if exc.errno == errno.EADDRINUSE:
                hint = " (another process listens there)"
            elif exc.errno == errno.EACCES and port < 1024:
                hint = " (ports below 1024 need root or CAP_NET_BIND_SERVICE)"
            problems.append(f"{key}: cannot bind {text}: {_why(exc)}{hint}")
    return problems
