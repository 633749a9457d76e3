"""The text forms of rate limits and access lists, parsed and checked (the
config loader reports what they raise, ValueError, under the key's path)."""

from __future__ import annotations

import ipaddress
import re
from urllib.parse import urlsplit

_RATE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*r/([sm])\s*")
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_HOOK = re.compile(r"[A-Za-z_][\w.]*:[A-Za-z_][\w.]*")
RATE_MAX = 1e6          # requests per second; beyond that a limit is meaningless
BURST_MAX = 1 << 20
REDIS_DEFAULT_PORT = 6379


def parse_rate(text: str) -> float:
    """"10r/s" -> 10.0, "30r/m" -> 0.5 (requests per second)."""
    m = _RATE.fullmatch(text)
    if m is None:
        raise ValueError(f"{text!r} is not a rate like \"10r/s\" or \"30r/m\"")
    n = float(m.group(1))
    rate = n if m.group(2) == "s" else n / 60.0
    if not 0 < rate <= RATE_MAX:
        raise ValueError(f"{text!r}: the rate must be more than 0 and at most "
                         f"{RATE_MAX:g} requests per second")
    return rate


def parse_limit_key(text: str) -> str:
    """ip | route | header:<name> (lower-cased) | cookie:<name> | "module:attr"."""
    t = text.strip()
    if t in ("ip", "route"):
        return t
    kind, colon, name = t.partition(":")
    if colon and kind.lower() == "header" and _TOKEN.fullmatch(name.strip()):
        return "header:" + name.strip().lower()
    if colon and kind.lower() == "cookie" and _TOKEN.fullmatch(name.strip()):
        return "cookie:" + name.strip()
    if _HOOK.fullmatch(t):
        return t
    raise ValueError(f"{text!r} is not \"ip\", \"route\", \"header:<name>\", \"cookie:<name>\" "
                     "or a hook \"module:attr\"")


def parse_store(text: str) -> str:
    """"local" or "redis://host[:port][/db]" (the normal form is returned)."""
    if text == "local":
        return text
    u = urlsplit(text)
    if u.scheme != "redis":
        raise ValueError(f"{text!r} is not \"local\" or a \"redis://host:port/db\" URL")
    try:
        port = u.port or REDIS_DEFAULT_PORT
    except ValueError:
        raise ValueError(f"{text!r}: bad port") from None
    if not u.hostname:
        raise ValueError(f"{text!r}: no host")
    db = u.path.lstrip("/") or "0"
    if not db.isdigit() or u.query or u.fragment:
        raise ValueError(f"{text!r}: the path must be a database number (\"/0\")")
    host = f"[{u.hostname}]" if ":" in u.hostname else u.hostname
    auth = ""
    if u.password is not None or u.username:
        auth = f"{u.username or ''}:{u.password or ''}@" if u.password is not None \
            else f"{u.username}@"
    return f"redis://{auth}{host}:{port}/{int(db)}"


def redis_address(store: str) -> tuple[str, int, int, str | None, str | None]:
    """(host, port, db, username, password) of a normal-form redis store."""
    u = urlsplit(store)
    return (u.hostname or "127.0.0.1", u.port or REDIS_DEFAULT_PORT,
            int(u.path.lstrip("/") or 0), u.username or None, u.password)


def parse_access_rule(text: str) -> tuple[bool, str | None]:
    """"allow 10.0.0.0/8" -> (True, "10.0.0.0/8"); "deny all" -> (False, None).
    A bare address is a /32 (or /128); host bits set are an error (they
    usually mean a typo in the prefix length)."""
    parts = text.split()
    if len(parts) != 2 or parts[0] not in ("allow", "deny"):
        raise ValueError(f"{text!r} is not \"allow <CIDR>\", \"deny <CIDR>\" or "
                         "\"allow all\" / \"deny all\"")
    allow = parts[0] == "allow"
    if parts[1] == "all":
        return allow, None
    address, slash, prefix = parts[1].partition("/")
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        raise ValueError(f"{text!r}: {address!r} is not an IPv4 or IPv6 address") from None
    if slash:
        width = 32 if ip.version == 4 else 128
        if not prefix.isdigit() or int(prefix) > width:
            raise ValueError(f"{text!r}: the prefix length must be 0 to {width} for "
                             f"IPv{ip.version}, not {prefix!r}")
    try:
        net = ipaddress.ip_network(parts[1], strict=True)
    except ValueError as exc:
        raise ValueError(f"{text!r}: {exc}") from None
    return allow, str(net)


def compile_access(rules) -> list[tuple[bool, int, bytes, int]]:
    """An access list (AccessRule items) as the core matches it: (allow,
    family 0 = all / 4 / 6, network as 16 bytes, prefix length)."""
    out = []
    for r in rules:
        if r.network is None:
            out.append((r.allow, 0, bytes(16), 0))
            continue
        net = ipaddress.ip_network(r.network)
        raw = net.network_address.packed
        out.append((r.allow, net.version, raw + bytes(16 - len(raw)), net.prefixlen))
    return out


def load_key_function(spec: str):
    """The callable a hook key names ("module:attr"); ValueError naming what
    is missing.  It is called as fn(request) with a LimitRequest and returns
    the key (str or bytes), or None for a request the limit does not count."""
    import importlib

    modname, _, attr = spec.partition(":")
    try:
        obj = importlib.import_module(modname)
    except ModuleNotFoundError as exc:
        raise ValueError(f"no module named {exc.name!r}") from None
    except Exception as exc:  # the module's own code failed
        raise ValueError(f"importing {modname!r} failed: {type(exc).__name__}: {exc}") from None
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise ValueError(f"module {modname!r} has no attribute {attr!r}") from None
    if not callable(obj):
        raise ValueError(f"{spec} is not callable")
    return obj
