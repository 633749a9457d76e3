"""What `edgeproxy check` says about the limits beyond the config's own
errors: a Redis store that does not answer is a warning (the edges would
run on their local limits until it does), never an error."""

from __future__ import annotations

import socket

from edgeproxy.config.model import Config
from edgeproxy.limits.rules import redis_address

PROBE_TIMEOUT = 1.0


def store_warnings(config: Config, timeout: float = PROBE_TIMEOUT) -> list[str]:
    out = []
    seen: dict[str, str | None] = {}
    for i, lim in enumerate(config.rate_limits):
        if lim.store == "local":
            continue
        if lim.store not in seen:
            seen[lim.store] = _probe(lim.store, timeout)
        problem = seen[lim.store]
        if problem:
            host, port, db, _, _ = redis_address(lim.store)
            fallback = ("refuses every request it limits (on_store_error = \"deny\")"
                        if lim.on_store_error == "deny" else "uses each host's local limit")
            out.append(f"limit[{i}].store: redis://{host}:{port}/{db}: {problem}; until it "
                       f"answers, limit {lim.name!r} {fallback}")
    return out


def _probe(store: str, timeout: float) -> str | None:
    """None when Redis answers PING (or asks for the password the URL
    has), else what went wrong.  Plain RESP over a socket: `check` runs
    no event loop."""
    host, port, _, user, password = redis_address(store)
    try:
        with socket.create_connection((host, port), timeout=timeout) as s:
            if password is not None:
                args = [b"AUTH"] + ([user.encode()] if user else []) + [password.encode()]
                s.sendall(_command(args))
                reply = _reply(s)
                if not reply.startswith(b"+"):
                    return f"AUTH refused: {reply.decode('latin-1', 'replace').strip()[:100]}"
            s.sendall(_command([b"PING"]))
            reply = _reply(s)
    except OSError as exc:
        return f"unreachable ({exc.strerror or exc})"
    if reply.startswith(b"+PONG"):
        return None
    return f"did not answer PING: {reply.decode('latin-1', 'replace').strip()[:100]}"


def _command(args: list[bytes]) -> bytes:
    return b"*%d\r\n" % len(args) + b"".join(b"$%d\r\n%s\r\n" % (len(a), a) for a in args)


def _reply(s: socket.socket) -> bytes:
    data = b""
    while not data.endswith(b"\r\n") and len(data) < 4096:
        chunk = s.recv(4096)
        if not chunk:
            break
        data += chunk
    return data
