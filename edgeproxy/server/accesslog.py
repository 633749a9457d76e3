"""The access log: one line per request, in the combined or JSON format or
a template of named fields, written from a buffer flushed at least once a
second and at exit, so the event loop never waits on the disk for each
request.

Combined lines are the Apache/nginx "combined" format followed by four
fields: the duration in seconds, the backend chosen, the cache status and
the request id:

    127.0.0.1 - - [01/May/2024:12:00:00 +0000] "GET /a HTTP/1.1" 200 512 "-" "curl/8" 0.003 127.0.0.1:5000 - 5f0c9a2e11b4-1a

JSON lines carry the same as named fields, and the host, scheme, route and
listener (see docs/operations.md).  A template such as
`"{time_iso} {client_ip} {host} {method} {target} {status} {bytes_sent}"`
prints the fields of TEMPLATE_FIELDS it names; an unknown name is a
configuration error (`parse_template`).

The core captures of each request only what the format prints (`fields`,
read once into ProxySettings.log_fields).  Whatever a client sent is
escaped: no control byte, quote or non-ASCII byte of a request reaches a
combined or template line unescaped, and JSON lines stay valid JSON for any
input bytes.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Sequence

from edgeproxy.config.logformat import (
    _FIXED_NEEDS,
    Rec,
    _clf_time,
    _extra_text,
    _iso_time,
    _q,
    _qs,
    _split_line,
    cache_text,
    is_template,
    parse_template,
)

# --- the log -------------------------------------------------------------------

class AccessLog:
    """Buffers formatted lines; flush() writes them in one write(2) on an
    O_APPEND descriptor, so lines from several workers sharing a file never
    interleave (the worker calls it every second, on SIGUSR1 and at exit).
    `routes[i]`: the name of the route with metrics row i (0: none)."""

    def __init__(self, path: str, fmt: str = "combined", routes: Sequence[str] = ()):
        self.path = path
        self.fmt = fmt
        self.template = parse_template(fmt) if is_template(fmt) else None
        self.routes = list(routes)
        self.fields = self.capture_mask()
        self._lines: list[str] = []
        self._fd = -1
        self._clf_second = -1
        self._clf_text = ""
        self._iso_second = -1
        self._iso_text = ""
        self.reopen()

    def capture_mask(self) -> int:
        """What the core must capture for this format (ProxySettings.log_fields)."""
        from edgeproxy._ext import ACCESS_LOG_CAPTURE
        needs = self.template.needs if self.template is not None else _FIXED_NEEDS[self.fmt]
        mask = 0
        for name in needs:
            mask |= ACCESS_LOG_CAPTURE[name]
        return mask

    def route_name(self, index: int) -> str:
        return self.routes[index] if 0 < index < len(self.routes) else "-"

    def clf_time(self, now: float) -> str:
        second = int(now)
        if second != self._clf_second:
            self._clf_second = second
            self._clf_text = _clf_time(now)
        return self._clf_text

    def iso_time(self, now: float) -> str:
        second = int(now)
        if second != self._iso_second:
            self._iso_second = second
            self._iso_text = _iso_time(now)
        return self._iso_text

    def reopen(self) -> None:
        """Open (again) the file, e.g. after logrotate moved it."""
        self.flush()
        if self._fd > 2:
            os.close(self._fd)
        if self.path == "-":
            self._fd = sys.stderr.fileno()
        else:
            self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC,
                               0o644)

    def log(self, peer: bytes, request_line: bytes, status: int, nbytes: int,
            duration: float, referer: bytes, agent: bytes, backend: str,
            request_id: bytes = b"-", cache: str = "-", extra: dict | None = None) -> None:
        """extra: fields the phases added (RequestCtx.log): JSON keys, or
        `key="value"` pairs after a combined line."""
        self.record(peer, request_line, status, nbytes, 0, duration, referer, agent, backend,
                    request_id, None if cache == "-" else b"Cache-Status: " + cache.encode(),
                    None, 0, None, extra)

    def record(self, peer: bytes, line: bytes, status: int, nbytes: int, head_bytes: int,
               duration: float, referer: bytes, agent: bytes, backend: str, request_id: bytes,
               cache: bytes | None, host: bytes | None, route: int, lst,
               extra: dict | None) -> None:
        """One request, as the core reports it (ClientConn._log_request):
        nbytes the body bytes sent, head_bytes the head's; cache the
        Cache-Status line or None; host (when captured) or None; route the
        metrics row; lst the Listener (its proto and name)."""
        now = time.time()
        if self.template is not None:
            r = Rec()
            r.log, r.now, r.peer, r.line, r.status = self, now, peer, line, status
            r.nbytes, r.head_bytes, r.duration = nbytes, head_bytes, duration
            r.referer, r.agent, r.backend, r.request_id = referer, agent, backend, request_id
            r.cache, r.host, r.route, r.lst = cache, host, route, lst
            text = self.template.render(r)
            self._lines.append(text + _extra_text(extra) + "\n" if extra else text + "\n")
        elif self.fmt == "json":
            method, target, protocol = _split_line(line)
            record = {
                "time": round(now, 3), "remote": peer.decode("latin-1"),
                "method": method.decode("latin-1"), "target": target.decode("latin-1"),
                "protocol": protocol.decode("latin-1"), "status": status,
                "bytes": nbytes, "duration": round(duration, 6),
                "referer": referer.decode("latin-1"), "agent": agent.decode("latin-1"),
                "backend": backend, "cache": cache_text(cache).decode("latin-1"),
                "request_id": request_id.decode("latin-1"),
                "host": host.decode("latin-1") if host else "-",
                "scheme": lst.proto.decode() if lst is not None else "-",
                "route": self.route_name(route),
                "listener": lst.name if lst is not None else "-"}
            if extra:
                for k, v in extra.items():
                    record.setdefault(str(k), v if isinstance(v, (int, float, bool)) or v is None
                                      else str(v))
            self._lines.append(json.dumps(record) + "\n")
        else:
            self._lines.append(
                f'{peer.decode("latin-1")} - - [{self.clf_time(now)}] "{_q(line)}" {status} '
                f'{nbytes} "{_q(referer)}" "{_q(agent)}" {duration:.3f} {_qs(backend)} '
                f'{_q(cache_text(cache))} {_q(request_id)}'
                f'{_extra_text(extra) if extra else ""}\n')

    def flush(self) -> None:
        if not self._lines or self._fd < 0:
            return
        data = "".join(self._lines).encode("utf-8", "surrogateescape")
        self._lines.clear()
        try:
            while data:
                n = os.write(self._fd, data)
                data = data[n:]
        except OSError as exc:  # a full disk must not take the worker down
            print(f"edgeproxy: access log {self.path}: {exc.strerror}", file=sys.stderr)

    def close(self) -> None:
        self.flush()
        if self._fd > 2:
            os.close(self._fd)
        self._fd = -1
