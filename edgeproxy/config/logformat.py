"""What an access log line may hold: the combined and JSON formats' needs,
the named fields of a template (`log.access_format = "{client_ip} {host}
..."`) and how a client's bytes are escaped in a line.  The config loader
checks templates with it; edgeproxy.server.accesslog writes the lines."""

from __future__ import annotations

import difflib
import string
import time
from collections.abc import Callable

__all__ = ["TEMPLATE_FIELDS", "Template", "cache_text", "is_template", "parse_template"]

_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")

# bytes printed as they are; every other one as \xHH (nginx's log escaping),
# the quote and the backslash as \" and \\
_PLAIN = bytes(c for c in range(0x20, 0x7F) if c not in b'"\\')
_ESC = [chr(c) if c in _PLAIN else f"\\x{c:02x}" for c in range(256)]
_ESC[ord('"')] = '\\"'
_ESC[ord("\\")] = "\\\\"


def _clf_time(t: float) -> str:
    g = time.localtime(t)
    off = g.tm_gmtoff // 60
    sign = "+" if off >= 0 else "-"
    off = abs(off)
    return (f"{g.tm_mday:02d}/{_MONTHS[g.tm_mon - 1]}/{g.tm_year}:{g.tm_hour:02d}:"
            f"{g.tm_min:02d}:{g.tm_sec:02d} {sign}{off // 60:02d}{off % 60:02d}")


def _iso_time(t: float) -> str:
    """Local time as nginx's $time_iso8601: 2024-05-01T12:00:00+00:00."""
    g = time.localtime(t)
    off = g.tm_gmtoff // 60
    sign = "+" if off >= 0 else "-"
    off = abs(off)
    return (f"{g.tm_year:04d}-{g.tm_mon:02d}-{g.tm_mday:02d}T{g.tm_hour:02d}:{g.tm_min:02d}:"
            f"{g.tm_sec:02d}{sign}{off // 60:02d}:{off % 60:02d}")


def _q(b: bytes) -> str:
    """Bytes from a client as one safe piece of a line."""
    if not b.translate(None, _PLAIN):           # the common case: nothing to escape
        return b.decode("ascii")
    return "".join([_ESC[c] for c in b])


def _qs(s: str) -> str:
    return _q(s.encode("utf-8", "surrogateescape"))


def _extra_text(extra: dict) -> str:
    # a hook's value may hold anything: control characters are escaped
    return "".join(f' {_name(k)}="{_qs(str(v))}"' for k, v in extra.items())


def _name(key: object) -> str:
    return "".join(ch if ch.isalnum() or ch in "_-." else "_" for ch in str(key)) or "_"


def cache_text(line: bytes | None) -> bytes:
    """A Cache-Status line as one token: "hit;ttl=59", "fwd=miss;stored"; b"-" without."""
    if not line:
        return b"-"
    value = line.partition(b":")[2]
    params = [p.strip() for p in value.split(b";")]
    if params and params[0] == b"edgeproxy":
        params = params[1:]
    return b";".join(p for p in params if p) or b"-"


def _split_line(line: bytes) -> tuple[bytes, bytes, bytes]:
    """A request line's method, target and protocol."""
    method, _, rest = line.partition(b" ")
    target, _, protocol = rest.rpartition(b" ") if b" " in rest else (rest, b"", b"")
    return method, target, protocol


# --- templates ---------------------------------------------------------------

class Rec:
    """One request as the core reports it (AccessLog.record's arguments)."""
    __slots__ = ("log", "now", "peer", "line", "status", "nbytes", "head_bytes", "duration",
                 "referer", "agent", "backend", "request_id", "cache", "host", "route", "lst")


def _part(i: int) -> Callable[[Rec], str]:
    return lambda r: _q(_split_line(r.line)[i]) or "-"


# name -> (what the core must capture for it, how it prints)
TEMPLATE_FIELDS: dict[str, tuple[tuple[str, ...], Callable[[Rec], str]]] = {
    "time_iso": ((), lambda r: r.log.iso_time(r.now)),
    "time_local": ((), lambda r: r.log.clf_time(r.now)),
    "msec": ((), lambda r: f"{r.now:.3f}"),
    "client_ip": ((), lambda r: _q(r.peer)),
    "host": (("host",), lambda r: _q(r.host) if r.host else "-"),
    "method": (("line",), _part(0)),
    "target": (("line",), _part(1)),
    "protocol": (("line",), _part(2)),
    "request": (("line",), lambda r: _q(r.line)),
    "status": ((), lambda r: str(r.status)),
    "bytes_sent": ((), lambda r: str(r.nbytes + r.head_bytes)),
    "body_bytes_sent": ((), lambda r: str(r.nbytes)),
    "duration_ms": ((), lambda r: f"{r.duration * 1000:.3f}"),
    "duration": ((), lambda r: f"{r.duration:.3f}"),
    "route": ((), lambda r: _qs(r.log.route_name(r.route))),
    "backend": ((), lambda r: _qs(r.backend)),
    "cache": (("cache",), lambda r: _q(cache_text(r.cache))),
    "request_id": ((), lambda r: _q(r.request_id)),
    "scheme": ((), lambda r: r.lst.proto.decode() if r.lst is not None else "-"),
    "listener": ((), lambda r: _qs(r.lst.name) if r.lst is not None else "-"),
    "user_agent": (("agent",), lambda r: _q(r.agent)),
    "referer": (("referer",), lambda r: _q(r.referer)),
}

# what the two fixed formats print
_FIXED_NEEDS = {"combined": ("line", "referer", "agent", "cache"),
                "json": ("line", "referer", "agent", "cache", "host")}


class Template:
    """A compiled `access_format` template: literal text and fields."""

    def __init__(self, text: str):
        self.text = text
        self.pieces: list[str | Callable[[Rec], str]] = []
        self.names: list[str] = []
        for literal, name, spec, conversion in string.Formatter().parse(text):
            if literal:
                self.pieces.append(literal)
            if name is None:
                continue
            if name not in TEMPLATE_FIELDS:
                hint = difflib.get_close_matches(name, TEMPLATE_FIELDS, n=1, cutoff=0.6)
                raise ValueError(f"unknown field {{{name}}}"
                                 + (f" (did you mean {{{hint[0]}}}?)" if hint else "")
                                 + "; the fields are " + ", ".join(TEMPLATE_FIELDS))
            if spec or conversion:
                raise ValueError(f"{{{name}}}: fields take no format spec or conversion")
            self.names.append(name)
            self.pieces.append(TEMPLATE_FIELDS[name][1])
        if not self.names:
            raise ValueError("a template names at least one {field}")
        if "\n" in text or "\r" in text:
            raise ValueError("a template is one line (no CR or LF)")

    @property
    def needs(self) -> set[str]:
        return {c for n in self.names for c in TEMPLATE_FIELDS[n][0]}

    def render(self, r: Rec) -> str:
        return "".join([p if isinstance(p, str) else p(r) for p in self.pieces])


def parse_template(text: str) -> Template:
    """The template of an `access_format` value; ValueError says what is wrong."""
    try:
        return Template(text)
    except ValueError as exc:
        if "Single '}'" in str(exc) or "unmatched" in str(exc) or "expected '}'" in str(exc):
            raise ValueError(f"unbalanced braces (write {{{{ and }}}} for literal ones): {exc}") \
                from None
        raise


def is_template(fmt: str) -> bool:
    return fmt not in _FIXED_NEEDS
