"""Conditional requests and Range for static files (RFC 9110 §13 and §14),
evaluated only for requests that carry one of those fields (the compiled
phase serves the others without coming here)."""

from __future__ import annotations

from email.utils import parsedate_to_datetime

MAX_RANGES = 32     # more ranges in one request: the whole file is sent (§14.2 allows it)


def _http_date(value: bytes) -> int | None:
    """POSIX seconds of an HTTP-date, or None when it is not one (then the
    condition is ignored: §13.1.3, §13.1.4)."""
    try:
        d = parsedate_to_datetime(value.decode("latin-1"))
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if d is None or d.tzinfo is None:
        return None
    try:
        return int(d.timestamp())
    except (OverflowError, OSError, ValueError):
        return None


def _tags(value: bytes) -> list[bytes] | None:
    """The entity-tags of an If-Match/If-None-Match value, [b"*"] for "*",
    None when malformed (the condition is then treated as false for
    If-Match, ignored for If-None-Match)."""
    v = value.strip()
    if v == b"*":
        return [b"*"]
    out = []
    i, n = 0, len(v)
    while i < n:
        while i < n and v[i] in b" \t,":
            i += 1
        if i >= n:
            break
        start = i
        if v.startswith(b"W/", i):
            i += 2
        if i >= n or v[i] != 0x22:
            return None
        end = v.find(b'"', i + 1)
        if end < 0:
            return None
        out.append(v[start:end + 1])
        i = end + 1
        while i < n and v[i] in b" \t":
            i += 1
        if i < n and v[i] != 0x2C:
            return None
    return out


def _strong_match(tags: list[bytes], etag: bytes) -> bool:
    return any(t == b"*" or (not t.startswith(b"W/") and t == etag) for t in tags)


def _weak_match(tags: list[bytes], etag: bytes) -> bool:
    bare = etag[2:] if etag.startswith(b"W/") else etag
    return any(t == b"*" or (t[2:] if t.startswith(b"W/") else t) == bare for t in tags)


def parse_range(value: bytes, size: int):
    """A Range value against a representation of `size` bytes: None when
    it is not a valid bytes range set (ignored: §14.2), [] when none of its
    ranges is satisfiable (416), else [(first, last)] inclusive."""
    unit, eq, spec = value.partition(b"=")
    if not eq or unit.strip().lower() != b"bytes":
        return None
    out = []
    items = spec.split(b",")
    if len(items) > MAX_RANGES:
        return None
    for item in items:
        item = item.strip()
        if not item:
            continue
        first, dash, last = item.partition(b"-")
        first, last = first.strip(), last.strip()
        if not dash or (first and not first.isdigit()) or (last and not last.isdigit()):
            return None
        if not first:
            if not last:
                return None
            n = int(last)
            if n == 0:
                continue          # an empty suffix is unsatisfiable
            out.append((max(0, size - n), size - 1))
            continue
        a = int(first)
        if last and int(last) < a:
            return None           # "5-1": not a valid range (the field is ignored)
        if a >= size:
            continue              # unsatisfiable
        out.append((a, min(int(last), size - 1) if last else size - 1))
    if not out and not any(i.strip() for i in items):
        return None
    return [r for r in out if r[0] <= r[1]] if size else []


def evaluate(is_get: bool, etag: bytes, mtime: int, size: int, fields: dict):
    """RFC 9110 §13.2.2's order for a GET (is_get) or HEAD of a file with
    this ETag and mtime (Range applies to GET only: §14.2).
    fields: lower-case name -> value (the conditional and Range fields the
    request has).  Returns (304,), (412,), (416,), (200, None) or
    (206, [(first, last), ...])."""
    v = fields.get(b"if-match")
    if v is not None:
        tags = _tags(v)
        if tags is None or not _strong_match(tags, etag):
            return (412,)
    else:
        v = fields.get(b"if-unmodified-since")
        if v is not None:
            t = _http_date(v)
            if t is not None and mtime > t:
                return (412,)
    v = fields.get(b"if-none-match")
    if v is not None:
        tags = _tags(v)
        if tags is not None and _weak_match(tags, etag):
            return (304,)
    else:
        v = fields.get(b"if-modified-since")
        if v is not None:
            t = _http_date(v)
            if t is not None and mtime <= t:
                return (304,)
    v = fields.get(b"range")
    if v is None or not is_get:
        return (200, None)
    ir = fields.get(b"if-range")
    if ir is not None:
        ir = ir.strip()
        if ir.startswith(b'"') or ir.startswith(b"W/"):
            if ir.startswith(b"W/") or ir != etag:      # a strong comparison (§13.1.5)
                return (200, None)
        else:
            t = _http_date(ir)
            if t is None or t != mtime:
                return (200, None)
    ranges = parse_range(v, size)
    if ranges is None:
        return (200, None)
    if not ranges:
        return (416,)
    return (206, ranges)
