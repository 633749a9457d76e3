"""Reads a TOML configuration (or the quick-mode flags) into the `Config` dataclasses, reporting every problem at once.

The schema is a set of tables: each `Table` lists its `Key`s, and each key
names its kind (how a TOML value is checked and converted) and an optional
extra check.  Defaults live in `edgeproxy.config.model`: a key left out is
simply not passed to the dataclass.  Adding a key is one `Key(...)` line here
and one field there.

Every error is one line, "<key path>: <what is wrong>", e.g.
`route[1].pool: no pool named "apii"`.  Array indices count from 0.
`include` and `${ENV}` are resolved first (`edgeproxy.config.compose`),
which also tells each error's file and line.
"""
from __future__ import annotations

import difflib
import ipaddress
import json
import math
import os
import re
import sys
import urllib.parse
from collections.abc import Callable, Iterable
from dataclasses import MISSING, dataclass, fields
from decimal import Decimal, InvalidOperation
from typing import Any

from edgeproxy.config.compose import Composed, compose
from edgeproxy.config.model import (
    AccessRule,
    BackendConfig,
    CacheConfig,
    CertConfig,
    Config,
    HealthConfig,
    LimitsConfig,
    ListenConfig,
    ListenTLSConfig,
    LogConfig,
    PassiveConfig,
    PoolConfig,
    PoolTLSConfig,
    RateLimitConfig,
    RouteConfig,
    RouteTimeoutConfig,
    ServerConfig,
    StaticConfig,
    TimeoutConfig,
)
from edgeproxy.http._path import normalize_path
from edgeproxy.http._pure import ParseError
from edgeproxy.toolkit import config as toolkit

__all__ = ["ConfigError", "load_config", "parse_config", "quick_config"]


class ConfigError(Exception):
    """The configuration is unusable; `.errors` lists every problem found.

    `.locations[i]` is where `.errors[i]` comes from, "file:line", or None.
    """

    def __init__(self, errors: Iterable[str], source: str | None = None,
                 locations: Iterable[str | None] | None = None):
        self.errors = list(errors)
        self.source = source
        self.locations = list(locations or ())[:len(self.errors)]
        self.locations += [None] * (len(self.errors) - len(self.locations))
        super().__init__(self.errors)

    def __str__(self) -> str:
        where = f" in {self.source}" if self.source else ""
        n = len(self.errors)
        head = f"invalid configuration{where} ({n} error{'' if n == 1 else 's'}):"
        return "\n".join([head, *(f"  {at}: {e}" if at else f"  {e}"
                                   for e, at in zip(self.errors, self.locations, strict=True))])


# --- the walk ---------------------------------------------------------------

class Invalid(Exception):
    """The value at the current key path is wrong; the message says why."""


class _Bad:
    """Stands for a value that failed (its error is already recorded)."""

    def __repr__(self) -> str:
        return "BAD"


BAD = _Bad()


class Partial:
    """A table that had errors: its good values, for the checks between sections.

    Reading a field gives its value, the model's default when it was left
    out, or BAD.
    """

    def __init__(self, model: type, values: dict):
        self._model = model
        self._values = values

    def __getattr__(self, name: str) -> Any:
        if name in self._values:
            return self._values[name]
        for f in fields(self._model):
            if f.name == name and f.default is not MISSING:
                return f.default
        return BAD


def is_bad(value: Any) -> bool:
    if value is BAD or isinstance(value, Partial):
        return True
    if isinstance(value, (list, tuple)):
        return any(is_bad(v) for v in value)
    if isinstance(value, dict):
        return any(is_bad(v) for v in value.values())
    return False


class Reader:
    """Walks one raw TOML document through the schema, collecting every error."""

    def __init__(self, base_dir: str):
        self.base_dir = base_dir      # relative file paths are relative to this
        self.errors: list[str] = []

    def error(self, path: str, message: str) -> None:
        self.errors.append(f"{path}: {message}")

    def read(self, kind: Callable, value: Any, path: str,
             check: Callable | None = None) -> Any:
        """`kind(value)`, then `check`; BAD (with the error recorded) on failure."""
        try:
            result = kind(value, path, self)
        except Invalid as exc:
            self.error(path, str(exc))
            return BAD
        if check is not None and not is_bad(result):
            problem = check(result)
            if problem:
                self.error(path, f"{show(value)} {problem}")
                return BAD
        return result


def show(value: Any) -> str:
    """A value as it would appear in TOML, for error messages."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        text = json.dumps(value, ensure_ascii=False)
        return text if len(text) <= 80 else text[:76] + '..."'
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, dict):
        return "a table"
    if isinstance(value, list):
        return "an array"
    return "a date/time"


def key_path(path: str, name: str) -> str:
    if not re.fullmatch(r"[A-Za-z0-9_-]+", name):
        name = json.dumps(name, ensure_ascii=False)
    return f"{path}.{name}" if path else name


@dataclass(frozen=True)
class Key:
    """One key of a table: its TOML name, kind, extra check and dataclass field."""

    name: str
    kind: Callable[[Any, str, Reader], Any]
    check: Callable[[Any], str | None] | None = None  # returns what is wrong, or None
    required: bool = False
    field: str | None = None          # the dataclass field, when not `name`

    @property
    def attr(self) -> str:
        return self.field or self.name


@dataclass(frozen=True)
class Table:
    """A TOML table that becomes one dataclass.

    `finish(values, path, reader)` runs after the keys, for checks that
    involve several keys; it may add or rewrite `values`.
    """

    model: type
    keys: tuple[Key, ...]
    finish: Callable[[dict, str, Reader], None] | None = None

    def default_of(self, key: Key) -> Any:
        """The value a key gets when the file leaves it out (MISSING: none)."""
        for f in fields(self.model):
            if f.name == key.attr:
                if f.default is not MISSING:
                    return f.default
                if f.default_factory is not MISSING:
                    return f.default_factory()
        return MISSING

    def __call__(self, value: Any, path: str, reader: Reader, **extra: Any) -> Any:
        if not isinstance(value, dict):
            raise Invalid(f"expected a table, got {show(value)}")
        known = {key.name: key for key in self.keys}
        for name in value:
            if name not in known:
                hint = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
                reader.error(key_path(path, name), "unknown key"
                             + (f" (did you mean {json.dumps(hint[0])}?)" if hint else ""))
        values: dict[str, Any] = {}
        for key in self.keys:
            where = key_path(path, key.name)
            if key.name in value:
                values[key.attr] = reader.read(key.kind, value[key.name], where, key.check)
            elif key.required:
                reader.error(where, "missing (required)")
                values[key.attr] = BAD
        if self.finish is not None:
            self.finish(values, path, reader)
        if is_bad(values):
            return Partial(self.model, values)
        return self.model(**values, **extra)


def array_of(table: Table, *, toml_name: str) -> Callable:
    """An array of tables (`[[name]]`), each read by `table`."""
    def read(value: Any, path: str, reader: Reader) -> Any:
        if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
            raise Invalid(f"expected an array of tables ([[{toml_name}]]), got {show(value)}")
        return tuple(reader.read(table, item, f"{path}[{i}]") for i, item in enumerate(value))
    return read


def tables_by_name(table: Table) -> Callable:
    """A table of named tables (`[name.x]`), each read by `table` with `name=x`."""
    def read(value: Any, path: str, reader: Reader) -> Any:
        if not isinstance(value, dict):
            raise Invalid(f"expected a table, got {show(value)}")
        out = {}
        for name, item in value.items():
            where = key_path(path, name)
            out[name] = reader.read(lambda v, p, r, name=name: table(v, p, r, name=name), item, where)
        return out
    return read


def list_of(kind: Callable, *, what: str, empty: str | None = None) -> Callable:
    """An array whose items are each read by `kind`; errors name the item.
    With `empty` (the message), an empty array is an error."""
    def read(value: Any, path: str, reader: Reader) -> Any:
        if not isinstance(value, list):
            raise Invalid(f"expected an array of {what}, got {show(value)}")
        if not value and empty:
            raise Invalid(empty)
        return tuple(reader.read(kind, item, f"{path}[{i}]") for i, item in enumerate(value))
    return read


# --- kinds: check one TOML value and convert it -----------------------------

def boolean(value: Any, path: str, reader: Reader) -> bool:
    if not isinstance(value, bool):
        raise Invalid(f"expected true or false, got {show(value)}")
    return value


def integer(value: Any, path: str, reader: Reader) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise Invalid(f"expected an integer, got {show(value)}")
    return value


def number(value: Any, path: str, reader: Reader) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise Invalid(f"expected a number, got {show(value)}")
    if not math.isfinite(value):
        raise Invalid(f"expected a finite number, got {show(value)}")
    return float(value)


def string(value: Any, path: str, reader: Reader) -> str:
    if not isinstance(value, str):
        raise Invalid(f"expected a string, got {show(value)}")
    return value


def text_line(value: Any, path: str, reader: Reader) -> str:
    """A string that may be sent in a header: no control characters."""
    value = string(value, path, reader)
    if re.search(r"[\x00-\x1f\x7f]", value):
        raise Invalid(f"{show(value)} contains a control character")
    return value


SIZE_UNITS = {
    "": 1, "b": 1,
    "kib": 1024, "mib": 1024 ** 2, "gib": 1024 ** 3, "tib": 1024 ** 4,
    "kb": 1000, "mb": 1000 ** 2, "gb": 1000 ** 3, "tb": 1000 ** 4,
}


def size(value: Any, path: str, reader: Reader) -> int:
    """Bytes: an integer, or a string such as "64KiB", "1.5GiB" or "10MB"."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if not isinstance(value, str):
        raise Invalid(f"expected a size (bytes, or a string like \"64KiB\"), got {show(value)}")
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", value)
    unit = m and SIZE_UNITS.get(m.group(2).lower())
    if not unit:
        raise Invalid(f"{show(value)} is not a size (use bytes as an integer, or a string "
                      "like \"512B\", \"64KiB\", \"100MiB\", \"1GiB\"; KB/MB/GB are powers of 1000)")
    try:
        amount = Decimal(m.group(1)) * unit
    except InvalidOperation:  # pragma: no cover - the regex only lets digits through
        raise Invalid(f"{show(value)} is not a size") from None
    if amount != amount.to_integral_value():
        raise Invalid(f"{show(value)} is not a whole number of bytes")
    return int(amount)


def one_of(*choices: str) -> Callable:
    """A string from a fixed set (compared in lower case)."""
    listed = ", ".join(json.dumps(c) for c in choices)

    def read(value: Any, path: str, reader: Reader) -> str:
        if not isinstance(value, str):
            raise Invalid(f"expected one of {listed}, got {show(value)}")
        if value.lower() not in choices:
            raise Invalid(f"{show(value)} is not one of {listed}")
        return value.lower()
    return read


TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")


def cidr(value: Any, path: str, reader: Reader) -> str:
    """An IPv4 or IPv6 block ("10.0.0.0/8", "::1/128"; an address alone is
    one host), without host bits set."""
    value = string(value, path, reader)
    try:
        return str(ipaddress.ip_network(value, strict=True))
    except ValueError as exc:
        raise Invalid(f"{show(value)} is not a CIDR block ({exc})") from None


def proxy_protocol_version(value: Any, path: str, reader: Reader) -> str:
    if value is False:
        return ""
    if value not in ("v1", "v2"):
        raise Invalid(f"expected \"v1\", \"v2\" or false, got {show(value)}")
    return value


def header_name(value: Any, path: str, reader: Reader) -> str:
    value = string(value, path, reader)
    if not TOKEN.fullmatch(value):
        raise Invalid(f"{show(value)} is not a valid header name")
    return value


def hook_spec(value: Any, path: str, reader: Reader) -> str:
    """A phase hook, "module:attr": imported now, so that a missing module
    or attribute, or an object with no phase method, is named by its key
    path.  The config file's directory is searched first."""
    from edgeproxy.phases.load import HookError, load_hook

    value = string(value, path, reader)
    if reader.base_dir and reader.base_dir not in sys.path:
        sys.path.insert(0, reader.base_dir)
    try:
        load_hook(value)
    except HookError as exc:
        raise Invalid(str(exc)) from None
    return value


def header_name_lower(value: Any, path: str, reader: Reader) -> str:
    return header_name(value, path, reader).lower()


def file_path(value: Any, path: str, reader: Reader) -> str:
    """A path, made absolute (relative to the config file's directory)."""
    value = string(value, path, reader)
    if not value:
        raise Invalid("expected a path, got \"\"")
    return os.path.abspath(os.path.join(reader.base_dir, os.path.expanduser(value)))


def readable_file(value: Any, path: str, reader: Reader) -> str:
    """An existing, readable file; returns its absolute path."""
    full = file_path(value, path, reader)
    if not os.path.exists(full):
        raise Invalid(f"{show(value)} not found (looked for {full})")
    if not os.path.isfile(full):
        raise Invalid(f"{show(value)} is not a file ({full})")
    try:
        with open(full, "rb"):
            pass
    except OSError as exc:
        raise Invalid(f"{show(value)} cannot be read: {exc.strerror} ({full})") from None
    return full


def log_target(value: Any, path: str, reader: Reader) -> str:
    """A log file path, or "-" for stderr."""
    if value == "-":
        return value
    return file_path(value, path, reader)


HOST_LABEL = re.compile(r"(?!-)[a-z0-9_-]{1,63}(?<!-)")


def is_host_name(host: str) -> bool:
    """A DNS name or an IPv4 literal (lower-case)."""
    if not host or len(host) > 253:
        return False
    labels = host.split(".")
    if all(label.isdigit() for label in labels):
        try:
            ipaddress.IPv4Address(host)
        except ValueError:
            return False
        return True
    return all(HOST_LABEL.fullmatch(label) for label in labels)


def host_name(value: Any, path: str, reader: Reader) -> str:
    text = string(value, path, reader).lower()
    if not is_host_name(text):
        raise Invalid(f"{show(value)} is not a host name")
    return text


def is_ipv6(host: str) -> bool:
    try:
        ipaddress.IPv6Address(host)
    except ValueError:
        return False
    return True


def parse_port(text: str, whole: str) -> int:
    if not text.isdigit() or not text.isascii():
        raise Invalid(f"{show(whole)} has no valid port")
    port = int(text)
    if port > 65535:
        raise Invalid(f"{show(whole)} port out of range")
    return port


@dataclass(frozen=True)
class Bind:
    text: str
    host: str
    port: int


def bind_address(value: Any, path: str, reader: Reader) -> Bind:
    """"127.0.0.1:8080", "[::1]:8080", ":8080" (all IPv4 interfaces), "localhost:8080"."""
    text = string(value, path, reader)
    example = '(e.g. "127.0.0.1:8080", "[::1]:8080", ":8080")'
    if text.startswith("["):
        host, sep, port = text[1:].partition("]:")
        if not sep or not is_ipv6(host):
            raise Invalid(f"{show(text)} is not \"[IPv6 address]:port\" {example}")
    else:
        host, sep, port = text.rpartition(":")
        if not sep:
            raise Invalid(f"{show(text)} is not host:port {example}")
        if ":" in host:
            raise Invalid(f"{show(text)}: an IPv6 address goes in brackets, e.g. \"[::1]:8080\"")
        host = host.lower()
        if host and not is_host_name(host):
            raise Invalid(f"{show(text)} has an invalid host {example}")
    return Bind(text, host.lower(), parse_port(port, text))


UNIX_PATH_MAX = 107         # sun_path holds 108 bytes with the final NUL


def unix_socket_path(url: str, rest: str, reader: Reader) -> str:
    """The absolute path of a "unix:PATH" backend (relative to the config's directory)."""
    if not rest:
        raise Invalid(f"{show(url)} has no socket path (e.g. \"unix:/run/gunicorn.sock\")")
    if re.search(r"[\x00-\x1f\x7f\"\\]", rest):
        raise Invalid(f"{show(url)}: the socket path has a control character, quote or backslash")
    full = os.path.abspath(os.path.join(reader.base_dir, os.path.expanduser(rest)))
    if len(full.encode("utf-8", "surrogateescape")) > UNIX_PATH_MAX:
        raise Invalid(f"{show(url)}: the socket path ({full}) is longer than {UNIX_PATH_MAX} "
                      "bytes, the most a unix socket address holds")
    return full


def backend(value: Any, path: str, reader: Reader) -> BackendConfig:
    """"http://host:port" or "unix:/path" (also written "http://unix:/path",
    as nginx does), optionally followed by " weight=N" and/or " backup"."""
    text = string(value, path, reader)
    if not text.strip():
        raise Invalid(f"expected a backend URL, got {show(text)}")
    url, *options = text.split()
    scheme, sep, rest = url.partition("://")
    scheme = scheme.lower()
    unix_path = None
    if url[:5].lower() == "unix:" or (sep and scheme == "http" and rest[:6].lower() == "unix:/"):
        unix_path = unix_socket_path(url, (rest if sep else url)[5:].rstrip(":") or "", reader)
    elif sep and scheme == "https" and rest[:6].lower() == "unix:/":
        raise Invalid(f"{show(url)}: TLS to a unix socket backend is not supported "
                      "(write \"unix:/path\": the socket is local)")
    if unix_path is not None:
        weight, backup = backend_options(options)
        return BackendConfig(url="unix:" + unix_path, scheme="http", host="localhost", port=0,
                             weight=weight, backup=backup, path=unix_path)
    if not sep or scheme not in ("http", "https"):
        raise Invalid(f"{show(url)} is not an http:// or https:// URL")
    hostport, slash, tail = rest.partition("/")
    if "?" in hostport or "#" in hostport or tail or "?" in rest or "#" in rest:
        raise Invalid(f"{show(url)} must not have a path, query or fragment "
                      "(the request's own path is forwarded)")
    if "@" in hostport:
        raise Invalid(f"{show(url)} must not contain user info")
    if hostport.startswith("["):
        host, sep, after = hostport[1:].partition("]")
        if not sep or not is_ipv6(host) or (after and not after.startswith(":")):
            raise Invalid(f"{show(url)} has an invalid IPv6 host")
        port_text = after[1:] if after else ""
    else:
        if hostport.count(":") > 1:
            raise Invalid(f"{show(url)}: an IPv6 address goes in brackets, e.g. \"http://[::1]:5000\"")
        host, _, port_text = hostport.partition(":")
        host = host.lower()
        if not host:
            raise Invalid(f"{show(url)} has no host")
        if not is_host_name(host):
            raise Invalid(f"{show(url)} has an invalid host")
    if port_text or hostport.endswith(":"):
        port = parse_port(port_text, url)
        if port == 0:
            raise Invalid(f"{show(url)} port out of range")
    else:
        port = 443 if scheme == "https" else 80
    weight, backup = backend_options(options)
    return BackendConfig(url=url, scheme=scheme, host=host.lower(), port=port,
                         weight=weight, backup=backup)


def backend_options(options: list[str]) -> tuple[int, bool]:
    """The words after a backend's URL: (weight, backup)."""
    weight, backup = 1, False
    for option in options:
        name, eq, number_text = option.partition("=")
        if option == "backup":
            backup = True
        elif name == "weight" and eq and number_text.isdigit() and number_text.isascii():
            weight = int(number_text)
            if not 1 <= weight <= 1000:
                raise Invalid(f"{show(option)}: weight must be from 1 to 1000")
        else:
            raise Invalid(f"unknown backend option {show(option)} "
                          "(use \"weight=N\" and/or \"backup\")")
    return weight, backup


def access_format(value: Any, path: str, reader: Reader) -> str:
    """"combined", "json", or a template of {fields} (edgeproxy.server.accesslog)."""
    from edgeproxy.config.logformat import is_template, parse_template

    text = string(value, path, reader)
    if text.lower() in ("combined", "json"):
        return text.lower()
    if "{" not in text:
        raise Invalid(f"{show(text)} is not \"combined\", \"json\" or a template of "
                      "{fields} such as \"{client_ip} {method} {target} {status}\"")
    if is_template(text):
        try:
            parse_template(text)
        except ValueError as exc:
            raise Invalid(f"{show(text)}: {exc}") from None
    return text


def admin_address(value: Any, path: str, reader: Reader) -> Bind:
    """An explicit address for the admin listener: an IP literal or
    "localhost", never a wildcard (it must not be reachable by accident)."""
    bind = bind_address(value, path, reader)
    if bind.host in ("", "0.0.0.0", "::") or (bind.host != "localhost"
                                              and not is_ip(bind.host)):
        raise Invalid(f"{show(bind.text)}: the admin listener needs an explicit IP address, "
                      "e.g. \"127.0.0.1:9901\" (not a wildcard or a host name)")
    if bind.port == 0:
        raise Invalid(f"{show(bind.text)}: give the admin listener a port")
    return bind


def is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def host_pattern(value: Any, path: str, reader: Reader) -> str:
    """An exact host name, or "*." followed by one (any subdomain)."""
    text = string(value, path, reader).lower()
    name = text[2:] if text.startswith("*.") else text
    if not is_host_name(name):
        raise Invalid(f"{show(value)} is not a host name or a \"*.example.com\" pattern")
    return text


def url_path(value: Any, path: str, reader: Reader) -> str:
    text = string(value, path, reader)
    if not text.startswith("/"):
        raise Invalid(f"{show(text)} must start with \"/\"")
    if re.search(r"[\x00-\x20\x7f?#]", text):
        raise Invalid(f"{show(text)} must be a path only (no spaces, query or fragment)")
    return text


def directory(value: Any, path: str, reader: Reader) -> str:
    """An existing directory the proxy can read; returns its absolute path."""
    full = file_path(value, path, reader)
    if not os.path.isdir(full):
        raise Invalid(f"{show(value)} is not a directory ({full})")
    if not os.access(full, os.R_OK | os.X_OK):
        raise Invalid(f"{show(value)} cannot be read ({full})")
    return full


def file_name(value: Any, path: str, reader: Reader) -> str:
    """A file name without a directory ("" for none)."""
    text = string(value, path, reader)
    if "/" in text or "\\" in text or "\x00" in text or text in (".", ".."):
        raise Invalid(f"{show(text)} must be a file name, without \"/\"")
    return text


def static_fallback(value: Any, path: str, reader: Reader) -> str:
    """A file beneath a static root, written as a path ("/index.html")."""
    text = url_path(value, path, reader)
    if "\\" in text or any(seg in (".", "..") for seg in text.split("/")) or text.endswith("/"):
        raise Invalid(f"{show(text)} must name a file beneath the root (no \".\", \"..\" "
                      "or trailing \"/\")")
    return text


def coding(value: Any, path: str, reader: Reader) -> str:
    """A content coding edgeproxy can compress with, whose package is installed."""
    from edgeproxy.compress import missing_package

    name = one_of("zstd", "br", "gzip")(value, path, reader)
    pkg = missing_package(name)
    if pkg is not None:
        raise Invalid(f"{show(name)} needs the {pkg!r} package (pip install {pkg})")
    return name


def media_type(value: Any, path: str, reader: Reader) -> str:
    """A media type without parameters ("text/html"), lower-case."""
    text = string(value, path, reader).strip().lower()
    if not re.fullmatch(r"[a-z0-9!#$&^_.+-]+/[a-z0-9!#$&^_.+*-]+", text):
        raise Invalid(f"{show(text)} is not a media type (type/subtype, no parameters)")
    return text


def codings_finish(value: tuple) -> str | None:
    return "lists a coding twice" if len(set(value)) != len(value) else None


def route_finish(values: dict, path: str, reader: Reader) -> None:
    """A route goes to a pool, serves files (static) or redirects."""
    static, pool = values.get("static"), values.get("pool")
    if static is None:
        if pool is None and values.get("redirect") is None:
            reader.error(key_path(path, "pool"), "missing (required): name a pool, "
                         "serve files with static, or redirect")
            values["pool"] = BAD
        return
    if pool is not None:
        reader.error(key_path(path, "pool"), "a static route serves files itself; "
                     "remove pool (or static)")
    if values.get("cache") is True:
        reader.error(key_path(path, "cache"), "a static route is served from disk; "
                     "cache is for responses of a pool")


def route_path(value: Any, path: str, reader: Reader) -> str:
    """A route's path prefix, in the normal form requests are routed on
    (edgeproxy/http/_path.py): any other spelling could never match."""
    text = url_path(value, path, reader)
    if not text.isascii():
        raise Invalid(f"{show(text)} must be ASCII: requests carry other characters "
                      "percent-encoded, so write them so")
    try:
        normal = normalize_path(text.encode("ascii")).decode("ascii")
    except ParseError as exc:
        raise Invalid(f"{show(text)} can never match: requests with it are refused "
                      f"({exc.message})") from None
    if normal != text:
        raise Invalid(f"{show(text)} is not in normal form: requests are routed on "
                      f"{show(normal)}, so write that")
    return text


def hash_key(value: Any, path: str, reader: Reader) -> str:
    """"ip", "header:<name>" or "cookie:<name>"."""
    text = string(value, path, reader)
    kind, colon, name = text.partition(":")
    kind = kind.strip().lower()
    if kind == "ip" and not colon:
        return "ip"
    if kind == "header" and colon and TOKEN.fullmatch(name.strip()):
        return "header:" + name.strip().lower()
    if kind == "cookie" and colon and TOKEN.fullmatch(name.strip()):
        return "cookie:" + name.strip()
    raise Invalid(f"{show(text)} is not \"ip\", \"header:<name>\" or \"cookie:<name>\"")


def status_range(value: Any, path: str, reader: Reader) -> tuple[int, int]:
    """"200-399" or "200": the response statuses a health probe accepts."""
    text = string(value, path, reader)
    m = re.fullmatch(r"\s*([1-5]\d\d)\s*(?:-\s*([1-5]\d\d)\s*)?", text)
    if not m:
        raise Invalid(f"{show(text)} is not a status or a range like \"200-399\"")
    low = int(m.group(1))
    high = int(m.group(2) or low)
    if high < low:
        raise Invalid(f"{show(text)}: the range ends before it starts")
    return (low, high)


def access_rule(value: Any, path: str, reader: Reader) -> AccessRule:
    """"allow 10.0.0.0/8", "deny 2001:db8::/32", "deny all" (edgeproxy.limits.rules)."""
    from edgeproxy.limits.rules import parse_access_rule
    text = string(value, path, reader)
    try:
        allow, network = parse_access_rule(text)
    except ValueError as exc:
        raise Invalid(str(exc)) from None
    return AccessRule(allow, network, text)


def _limit_text(parse: Callable) -> Callable:
    def read(value: Any, path: str, reader: Reader) -> Any:
        text = string(value, path, reader)
        try:
            return parse(text)
        except ValueError as exc:
            raise Invalid(str(exc)) from None
    return read


def limit_key(value: Any, path: str, reader: Reader) -> str:
    """A [[limit]]'s key; a hook "module:attr" is imported now (as hooks are)."""
    from edgeproxy.limits.rules import parse_limit_key
    key = _limit_text(parse_limit_key)(value, path, reader)
    if ":" in key and not key.startswith(("header:", "cookie:")):
        from edgeproxy.limits.rules import load_key_function
        if reader.base_dir and reader.base_dir not in sys.path:
            sys.path.insert(0, reader.base_dir)
        try:
            load_key_function(key)
        except ValueError as exc:
            raise Invalid(f"{show(key)} is not \"ip\", \"route\", \"header:<name>\" or "
                          f"\"cookie:<name>\"; as a hook \"module:attr\": {exc}") from None
    return key


def limit_store(value: Any, path: str, reader: Reader) -> str:
    import importlib.util

    from edgeproxy.limits.rules import parse_store
    store = _limit_text(parse_store)(value, path, reader)
    if store != "local" and importlib.util.find_spec("redis") is None:
        raise Invalid("a redis:// store needs the redis package: "
                      "pip install 'edgeproxy[redis]'")
    return store


def feature(read: Callable) -> Callable:
    """A kind from a feature's own module: `read(value, path, base_dir,
    errors)` appends (key path, message) pairs (edgeproxy/toolkit/config.py)."""
    def kind(value: Any, path: str, reader: Reader) -> Any:
        errors: list[tuple[str, str]] = []
        result = read(value, path, reader.base_dir, errors)
        for where, message in errors:
            reader.error(where, message)
        return BAD if errors or result is None else result
    return kind


# --- checks: run on a converted value ----------------------------------------

def above(limit: float) -> Callable[[Any], str | None]:
    def check(value: Any) -> str | None:
        return None if value > limit else f"must be greater than {limit}"
    return check


def at_least(limit: float) -> Callable[[Any], str | None]:
    def check(value: Any) -> str | None:
        return None if value >= limit else f"must be {limit} or more"
    return check


def share(value: Any) -> str | None:
    """A fraction of a whole: more than 0, at most 1."""
    return None if 0 < value <= 1 else "must be more than 0 and at most 1"


# --- checks across keys of one table -----------------------------------------

def listen_finish(values: dict, path: str, reader: Reader) -> None:
    bind = values.get("bind")
    if isinstance(bind, Bind):
        values.update(bind=bind.text, host=bind.host, port=bind.port)
    if values.get("redirect_http") is True and values.get("tls") not in (None, BAD):
        reader.error(key_path(path, "redirect_http"),
                     "only a plain (non-TLS) listener can redirect to HTTPS")


def server_finish(values: dict, path: str, reader: Reader) -> None:
    admin = values.get("admin")
    if isinstance(admin, Bind):
        values.update(admin=admin.text, admin_host=admin.host, admin_port=admin.port)


def pool_tls_finish(values: dict, path: str, reader: Reader) -> None:
    has_cert, has_key = "client_cert" in values, "client_key" in values
    if has_cert != has_key:
        missing = "client_key" if has_cert else "client_cert"
        reader.error(key_path(path, missing), "missing (client_cert and client_key go together)")


def pool_finish(values: dict, path: str, reader: Reader) -> None:
    backends = values.get("backends")
    if not isinstance(backends, tuple):
        return
    seen: dict[tuple, int] = {}
    for i, b in enumerate(backends):
        if b is BAD:
            continue
        where = key_path(path, "backends") + f"[{i}]"
        address = (b.scheme, b.host, b.port) if b.path is None else ("unix", b.path)
        if address in seen:
            reader.error(where, f"{show(b.url)} is already listed as backends[{seen[address]}]")
        seen.setdefault(address, i)
    if backends and not is_bad(backends) and all(b.backup for b in backends):
        reader.error(key_path(path, "backends"), "every backend is a backup; at least one must not be")


def pool_balance_finish(values: dict, path: str, reader: Reader) -> None:
    if "hash_key" in values and values.get("balance", "round_robin") not in ("hash", BAD):
        reader.error(key_path(path, "hash_key"), "only used with balance = \"hash\"")
    backends = values.get("backends")
    if isinstance(backends, tuple) and len(backends) > 64:
        reader.error(key_path(path, "backends"), f"{len(backends)} backends; at most 64 per pool")


def redis_url(value: Any, path: str, reader: Reader) -> str:
    """A Redis URL: redis://[user:password@]host[:port][/db], rediss://..., unix:///path."""
    value = text_line(value, path, reader)
    parts = urllib.parse.urlsplit(value)
    if parts.scheme not in ("redis", "rediss", "unix"):
        raise Invalid(f"{show(value)} is not a redis://, rediss:// or unix:// URL")
    if parts.scheme == "unix":
        if not parts.path:
            raise Invalid(f"{show(value)} has no socket path")
        return value
    try:
        port = parts.port
    except ValueError:
        raise Invalid(f"{show(value)} has a bad port") from None
    if not parts.hostname or (port is not None and not 0 < port < 65536):
        raise Invalid(f"{show(value)} has no host")
    db = parts.path.strip("/")
    if db and not db.isdigit():
        raise Invalid(f"{show(value)}: the path must be a database number")
    return value


def limit_finish(values: dict, path: str, reader: Reader) -> None:
    rate = values.get("rate")
    if isinstance(rate, str):
        from edgeproxy.limits.rules import parse_rate
        try:
            values.update(rate=parse_rate(rate), rate_text=rate)
        except ValueError as exc:
            reader.error(key_path(path, "rate"), str(exc))
            values["rate"] = BAD
    burst, delay = values.get("burst", 0), values.get("delay", 0)
    if isinstance(burst, int) and isinstance(delay, int) and delay > burst:
        reader.error(key_path(path, "delay"), f"{delay} is more than burst ({burst}): "
                     "delay counts requests inside the burst")
    if "on_store_error" in values and values.get("store", "local") == "local":
        reader.error(key_path(path, "on_store_error"), "only used with a redis:// store")


def _check_limit_names(values: dict, reader: Reader) -> None:
    """[[limit]] names are unique; routes and server.limits name existing ones."""
    limits = values.get("rate_limits", ())
    names: dict[str, int] = {}
    if isinstance(limits, tuple):
        for i, lim in enumerate(limits):
            name = lim.name if lim is not BAD else None
            if not isinstance(name, str):
                continue
            if name in names:
                reader.error(f"limit[{i}].name", f"{show(name)} is already limit[{names[name]}]")
            names.setdefault(name, i)

    def check(where: str, used: Any) -> None:
        if not isinstance(used, tuple):
            return
        for j, name in enumerate(used):
            if isinstance(name, str) and name not in names:
                hint = difflib.get_close_matches(name, names, n=1, cutoff=0.6)
                reader.error(f"{where}[{j}]", f"no [[limit]] named {show(name)}"
                             + (f" (did you mean {json.dumps(hint[0])}?)" if hint else ""))
            elif isinstance(name, str) and list(used).index(name) != j:
                reader.error(f"{where}[{j}]", f"{show(name)} is listed twice")

    server = values.get("server")
    if server is not None and server is not BAD:
        check("server.limits", server.limits)
    routes = values.get("routes", ())
    if isinstance(routes, tuple):
        for i, route in enumerate(routes):
            if route is not BAD:
                check(f"route[{i}].limits", route.limits)


def cache_finish(values: dict, path: str, reader: Reader) -> None:
    max_size = values.get("max_size", CacheConfig.max_size)
    max_object = values.get("max_object", CacheConfig.max_object)
    if isinstance(max_size, int) and isinstance(max_object, int) and max_object > max_size:
        reader.error(key_path(path, "max_object"),
                     f"{max_object} bytes is larger than cache.max_size ({max_size} bytes)")
    targeted = values.get("targeted")
    if isinstance(targeted, tuple):
        if "cache-control" in targeted:
            reader.error(key_path(path, "targeted"), "lists Cache-Control, the field targeted "
                         "fields override; list only targeted fields such as CDN-Cache-Control")
        elif len(set(targeted)) != len(targeted):
            reader.error(key_path(path, "targeted"), "lists a field name twice")


def config_finish(values: dict, path: str, reader: Reader) -> None:
    """Checks between sections: listeners, routes and the pools they name.

    Items that had errors of their own arrive as `Partial`; their good
    fields are still checked.
    """
    listen = values.setdefault("listen", ())
    routes = values.setdefault("routes", ())
    pools = values.setdefault("pools", {})
    if listen == ():
        reader.error("listen", "no listeners: add a [[listen]] table with a bind address")
    if routes == ():
        reader.error("route", "no routes: add a [[route]] table naming a pool")

    if isinstance(listen, tuple):
        seen: dict[tuple[str, int], int] = {}
        for i, item in enumerate(listen):
            if item.port is BAD or item.host is BAD:
                continue
            address = (normal_host(item.host), item.port)
            if item.port and address in seen:
                reader.error(f"listen[{i}].bind",
                             f"{show(item.bind)} is already used by listen[{seen[address]}]")
            seen.setdefault(address, i)
        if not any(item.tls not in (None, BAD) for item in listen):
            for i, item in enumerate(listen):
                if item.redirect_http is True:
                    reader.error(f"listen[{i}].redirect_http",
                                 "true but no listener has tls to redirect to")

    server = values.get("server")
    if isinstance(listen, tuple):
        trusted = server.trusted_proxies if isinstance(server, ServerConfig) else ()
        for i, item in enumerate(listen):
            if item.proxy_protocol is True and not item.proxy_protocol_from and not trusted:
                reader.error(f"listen[{i}].proxy_protocol",
                             "true but no source may send the header: set proxy_protocol_from "
                             "(or server.trusted_proxies) to the load balancers' addresses")
    if isinstance(listen, tuple) and isinstance(server, ServerConfig) and server.admin:
        admin_host = "127.0.0.1" if server.admin_host == "localhost" else normal_host(server.admin_host)
        for i, item in enumerate(listen):
            if item.port is BAD or item.host is BAD or item.port != server.admin_port:
                continue
            host = normal_host(item.host)
            if host in (admin_host, "0.0.0.0", "::") or item.host == server.admin_host:
                reader.error("server.admin", f"{show(server.admin)} is also listen[{i}] "
                             f"({show(item.bind)}): the admin listener must not be public")

    if isinstance(routes, tuple):
        names = set(pools) if isinstance(pools, dict) else None
        seen_routes: dict[tuple, int] = {}
        for i, route in enumerate(routes):
            if names is not None and isinstance(route.pool, str) and route.pool \
                    and route.pool not in names:
                hint = difflib.get_close_matches(route.pool, names, n=1, cutoff=0.6)
                reader.error(f"route[{i}].pool", f"no pool named {show(route.pool)}"
                             + (f" (did you mean {json.dumps(hint[0])}?)" if hint else ""))
            if route.cache is True and values.get("cache") is None:
                reader.error(f"route[{i}].cache", "true but there is no [cache] section")
            toolkit_route_checks(route, f"route[{i}]", reader)
            match = (route.host, route.path)
            if BAD in match:
                continue
            if match in seen_routes:
                reader.error(f"route[{i}]", "same host and path as "
                             f"route[{seen_routes[match]}]; it would never be used")
            seen_routes.setdefault(match, i)
    _check_limit_names(values, reader)


def normal_host(host: str) -> str:
    """The form two binds are compared in: ":80" is "0.0.0.0:80" (what the server binds)."""
    if not host:
        return "0.0.0.0"
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        return host


# --- the schema --------------------------------------------------------------

# header rules and error pages: in [server] (every route's default) and in routes
TOOLKIT_KEYS = (
    Key("request_headers", feature(toolkit.header_rules("request"))),
    Key("response_headers", feature(toolkit.header_rules("response"))),
    Key("error_pages", feature(toolkit.error_pages)),
    Key("error_pages_backend", boolean),
)


def toolkit_route_checks(route: Any, path: str, reader: Reader) -> None:
    """strip_prefix and rewrite exclude each other (route_finish checks the pool)."""
    if route.strip_prefix is True and route.rewrite not in (None, BAD):
        reader.error(key_path(path, "rewrite"), "a route has strip_prefix or rewrite, not both")


CERT = Table(CertConfig, (
    Key("cert", readable_file, required=True),
    Key("key", readable_file, required=True),
    Key("password", string),
))

LISTEN_TLS = Table(ListenTLSConfig, (
    Key("certs", list_of(CERT, what="tables with cert and key",
                                empty="empty: at least one { cert = ..., key = ... } is required"), required=True),
    Key("min_version", one_of("1.2", "1.3")),
    Key("hsts", text_line),
    Key("client_ca", readable_file),
    Key("client_subject_header", header_name),
))

LISTEN = Table(ListenConfig, (
    Key("bind", bind_address, required=True),
    Key("backlog", integer, at_least(1)),
    Key("redirect_http", boolean),
    Key("tls", LISTEN_TLS),
    Key("max_connections", integer, at_least(0)),
    Key("proxy_protocol", boolean),
    Key("proxy_protocol_from", list_of(cidr, what="CIDR blocks")),
    Key("access", list_of(access_rule, what="\"allow <CIDR>\" / \"deny <CIDR>\" strings")),
), finish=listen_finish)

STATIC = Table(StaticConfig, (
    Key("root", directory, required=True),
    Key("index", file_name),
    Key("fallback", static_fallback),
    Key("cache_control", text_line),
    Key("symlinks", boolean),
    Key("precompressed", boolean),
))

ROUTE_TIMEOUT = Table(RouteTimeoutConfig, tuple(
    Key(name, number, above(0)) for name in ("read", "send", "connect", "body")
))

ROUTE = Table(RouteConfig, (
    Key("host", host_pattern),
    Key("path", route_path),
    Key("pool", string),
    Key("cache", boolean),
    Key("hooks", list_of(hook_spec, what="\"module:attr\" strings")),
    Key("static", STATIC),
    Key("compress", list_of(coding, what="codings (\"zstd\", \"br\", \"gzip\")"), codings_finish),
    Key("compress_types", list_of(media_type, what="media types")),
    Key("compress_min_size", size, at_least(0)),
    Key("max_body", size, at_least(0)),
    Key("timeout", ROUTE_TIMEOUT),
    Key("limits", list_of(string, what="[[limit]] names")),
    Key("access", list_of(access_rule, what="\"allow <CIDR>\" / \"deny <CIDR>\" strings")),

    *TOOLKIT_KEYS,
    Key("strip_prefix", boolean),
    Key("rewrite", feature(toolkit.rewrite)),
    Key("redirect", feature(toolkit.redirect)),
    Key("auth_basic", feature(toolkit.auth_basic)),
), finish=route_finish)

POOL_TLS = Table(PoolTLSConfig, (
    Key("verify", boolean),
    Key("ca", readable_file),
    Key("server_name", host_name),
    Key("client_cert", readable_file),
    Key("client_key", readable_file),
), finish=pool_tls_finish)

HEALTH = Table(HealthConfig, (
    Key("path", url_path, required=True),
    Key("interval", number, above(0)),
    Key("timeout", number, above(0)),
    Key("rise", integer, at_least(1)),
    Key("fall", integer, at_least(1)),
    Key("expect", status_range),
))

PASSIVE = Table(PassiveConfig, (
    Key("failures", integer, at_least(0)),
    Key("eject", number, above(0)),
    Key("max_ejected", number, share),
))

POOL = Table(PoolConfig, (
    Key("backends", list_of(backend, what="backend URLs",
                                   empty="empty: at least one backend URL is required"), required=True),
    Key("keepalive", integer, at_least(0)),
    Key("keepalive_timeout", number, above(0)),
    Key("tls", POOL_TLS),
    Key("balance", one_of("round_robin", "least_conn", "p2c", "hash")),
    Key("hash_key", hash_key),
    Key("health", HEALTH),
    Key("passive", PASSIVE),
    Key("retries", integer, at_least(0)),
    Key("max_conns", integer, at_least(0)),
    Key("queue_timeout", number, above(0)),
    Key("slow_start", number, at_least(0)),
    Key("proxy_protocol", proxy_protocol_version),
), finish=lambda values, path, reader: (pool_finish(values, path, reader),
                                        pool_balance_finish(values, path, reader)))

SERVER = Table(ServerConfig, (
    Key("workers", integer, at_least(0)),
    Key("server_header", text_line),
    Key("hide_headers", list_of(header_name_lower, what="header names")),
    Key("grace", number, at_least(0)),
    Key("drain_timeout", number, at_least(0)),
    Key("pid_file", file_path),
    Key("admin", admin_address),
    Key("state_file", file_path),
    Key("hooks", list_of(hook_spec, what="\"module:attr\" strings")),
    Key("hooks_timeout", number, above(0)),
    Key("hooks_body_limit", size, above(0)),
    Key("normalize_target", boolean),
    Key("trusted_proxies", list_of(cidr, what="CIDR blocks")),
    Key("real_ip_header", one_of("x-forwarded-for", "forwarded")),
    Key("max_connections_per_ip", integer, at_least(0)),
    Key("max_pending_heads_per_ip", integer, at_least(0)),
    Key("fd_reserve", integer, at_least(0)),
    Key("limits", list_of(string, what="[[limit]] names")),
    *TOOLKIT_KEYS,
), finish=server_finish)

TIMEOUT = Table(TimeoutConfig, tuple(
    Key(name, number, above(0)) for name in ("connect", "read", "send", "header", "keepalive", "body")
))

LIMITS = Table(LimitsConfig, (
    Key("request_line", size, above(0)),
    Key("header_size", size, above(0)),
    Key("header_count", integer, above(0)),
    Key("body_size", size, at_least(0)),
    Key("response_header_size", size, above(0)),
))

LOG = Table(LogConfig, (
    Key("level", one_of("debug", "info", "warning", "error")),
    Key("access_log", log_target),
    Key("access_format", access_format),
))

CACHE = Table(CacheConfig, (
    Key("path", file_path, required=True),
    Key("max_size", size, above(0)),
    Key("max_object", size, above(0)),
    Key("heuristic", boolean),
    Key("stale_grace", number, at_least(0)),
    Key("targeted", list_of(header_name_lower, what="header names")),
    Key("forward_targeted", boolean),
    Key("purge_bus", redis_url),
    Key("purge_bus_stream", text_line),
    Key("purge_bus_maxlen", integer, at_least(100)),
), finish=cache_finish)

def _rate_text(value: Any, path: str, reader: Reader) -> str:
    return string(value, path, reader)     # parsed in limit_finish (rate_text keeps it)


RATE_LIMIT = Table(RateLimitConfig, (
    Key("name", text_line, required=True),
    Key("rate", _rate_text, required=True),
    Key("key", limit_key),
    Key("burst", integer, lambda v: None if 0 <= v <= 1 << 20 else "must be 0 to 1048576"),
    Key("delay", integer, at_least(0)),
    Key("store", limit_store),
    Key("mode", one_of("enforce", "dry-run")),
    Key("on_store_error", one_of("local", "deny")),
    Key("size", integer, lambda v: None if 64 <= v <= 1 << 24 else "must be 64 to 16777216"),
), finish=limit_finish)

CONFIG = Table(Config, (
    Key("server", SERVER),
    Key("listen", array_of(LISTEN, toml_name="listen")),
    Key("route", array_of(ROUTE, toml_name="route"), field="routes"),
    Key("pool", tables_by_name(POOL), field="pools"),
    Key("timeout", TIMEOUT),
    Key("limits", LIMITS),
    Key("log", LOG),
    Key("cache", CACHE),
    Key("limit", array_of(RATE_LIMIT, toml_name="limit"), field="rate_limits"),
), finish=config_finish)

# Sections that are single tables: overrides merge into them key by key.
MERGED_SECTIONS = {"server", "timeout", "limits", "log", "cache"}


# --- entry points -------------------------------------------------------------

def build(raw: dict, *, source: str | None, base_dir: str,
          overrides: dict[str, Any] | None = None, composed: Composed | None = None) -> Config:
    """Validate a raw document (as tomllib returns it) into a `Config`.

    With `composed` (where the document came from), errors carry their file and line.
    """
    raw = dict(raw)
    for section, value in (overrides or {}).items():
        if section in MERGED_SECTIONS and isinstance(value, dict) \
                and isinstance(raw.get(section), dict):
            raw[section] = {**raw[section], **value}
        else:
            raw[section] = value
    reader = Reader(base_dir)
    files = tuple(composed.files) if composed else ()
    config = CONFIG(raw, "", reader, source=source, files=files)
    if reader.errors or is_bad(config):
        # each error starts with its key path: where that key is written
        locations = ([composed.where(e.partition(": ")[0]) for e in reader.errors]
                     if composed and reader.errors else None)
        raise ConfigError(reader.errors or ["invalid configuration"], source, locations)
    return config


def parse_config(text: str, source: str | None = None, **overrides: Any) -> Config:
    """Parse TOML text, with its `include`s and `${ENV}` references
    (`edgeproxy.config.compose`).  Relative paths in it are relative to
    `source`'s directory (the current directory when there is no source).

    `overrides` replace whole sections (`listen=[...]`), or for the table
    sections (server, timeout, limits, log, cache) individual keys
    (`server={"workers": 2}`); they are validated like the file.
    """
    base_dir = os.path.dirname(os.path.abspath(source)) if source else os.getcwd()
    composed, problems = compose(text, source, base_dir)
    if problems:
        raise ConfigError([p.message for p in problems], source,
                          [p.where for p in problems])
    return build(composed.raw, source=source, base_dir=base_dir, overrides=overrides,
                 composed=composed)


def load_config(path: str | os.PathLike, **overrides: Any) -> Config:
    """Read and validate a TOML configuration file; see `parse_config` for `overrides`."""
    path = os.fspath(path)
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as exc:
        raise ConfigError([f"{path}: cannot read: {exc.strerror}"], path) from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError([f"{path}: not UTF-8 text (byte {exc.start})"], path) from None
    return parse_config(text, source=path, **overrides)


def quick_config(listen: Iterable[str], upstreams: Iterable[str], **overrides: Any) -> Config:
    """A configuration without a file: the listeners, one pool "default" with
    the upstreams, and one route "/" to it.  `overrides` as in `parse_config`;
    relative paths are relative to the current directory.
    """
    raw = {
        "listen": [{"bind": bind} for bind in listen],
        "route": [{"path": "/", "pool": "default"}],
        "pool": {"default": {"backends": list(upstreams)}},
    }
    return build(raw, source=None, base_dir=os.getcwd(), overrides=overrides)
