"""What the cache keeps for one response (its metadata record) and that record's binary form."""
from __future__ import annotations

import struct
from dataclasses import dataclass

__all__ = [
    "FLAG_HEURISTIC",
    "FLAG_INVALIDATED",
    "FLAG_MUST_REVALIDATE",
    "FLAG_NO_CACHE",
    "CacheEntry",
    "VaryRecord",
    "decode_record",
    "encode_entry",
    "encode_vary",
]

FLAG_NO_CACHE = 1         # response `no-cache`: validate before every use
FLAG_MUST_REVALIDATE = 2  # must-revalidate, proxy-revalidate or s-maxage: never serve stale
FLAG_INVALIDATED = 4      # soft-purged: treated as stale from then on
FLAG_HEURISTIC = 8        # the freshness lifetime is a heuristic one

_KIND_ENTRY = 1
_KIND_VARY = 2

# kind, flags, status, chunk_size, body_id, body_length, then the times and
# lifetimes as doubles, then the lengths of the variable fields that follow.
_FIXED = struct.Struct("<BBHIQQ8d8I")
_FLAGS_OFFSET = 1
_LAST_ACCESS_OFFSET = struct.calcsize("<BBHIQQ7d")
_DOUBLE = struct.Struct("<d")
_VARY = struct.Struct("<BII")


@dataclass(slots=True)
class CacheEntry:
    """One stored response, without its body (which the store keeps in chunks).

    `head` holds the stored header fields ready to send, each
    b"Name: value\\r\\n"; it never holds Age, Content-Length, Set-Cookie or
    hop-by-hop fields (the hit path adds Age and Content-Length).
    Times are POSIX seconds (floats).
    """
    key: bytes                     # primary key, b"https://example.com/path?q"
    status: int
    reason: bytes
    head: bytes
    request_time: float            # when the request that got this response was sent
    response_time: float           # when the response was received
    date_value: float              # its Date (response_time when absent or invalid)
    age_value: float               # its Age (0 when absent)
    lifetime: float                # freshness lifetime, seconds (RFC 9111 §4.2.1)
    variant: bytes = b""           # secondary key (16-byte digest) or b"" without Vary
    vary: tuple[bytes, ...] = ()   # the field names Vary listed, lower-case, sorted
    etag: bytes = b""              # the ETag as sent (b"" when none)
    last_modified: bytes = b""     # the Last-Modified as sent (b"" when none)
    tags: tuple[bytes, ...] = ()   # Surrogate-Key / Cache-Tag values, for purge by tag
    flags: int = 0
    stale_while_revalidate: float = 0.0
    stale_if_error: float = 0.0
    body_length: int = 0
    body_id: int = 0               # set by the store
    chunk_size: int = 0            # set by the store
    last_access: float = 0.0       # updated sparsely by the store (eviction order)

    @property
    def no_cache(self) -> bool:
        return bool(self.flags & FLAG_NO_CACHE)

    @property
    def must_revalidate(self) -> bool:
        return bool(self.flags & FLAG_MUST_REVALIDATE)

    @property
    def invalidated(self) -> bool:
        return bool(self.flags & FLAG_INVALIDATED)

    @property
    def headers(self) -> list[tuple[bytes, bytes]]:
        """The stored header fields as (name, value) pairs."""
        fields = []
        for line in self.head.split(b"\r\n"):
            if line:
                name, _, value = line.partition(b":")
                fields.append((name, value.strip()))
        return fields


@dataclass(frozen=True, slots=True)
class VaryRecord:
    """Kept at a primary key whose responses have `Vary`: the field names to
    build the secondary key from."""
    key: bytes
    vary: tuple[bytes, ...]


def encode_entry(e: CacheEntry) -> bytes:
    vary = b",".join(e.vary)
    tags = b"\n".join(e.tags)
    fixed = _FIXED.pack(
        _KIND_ENTRY, e.flags, e.status, e.chunk_size, e.body_id, e.body_length,
        e.request_time, e.response_time, e.date_value, e.age_value, e.lifetime,
        e.stale_while_revalidate, e.stale_if_error, e.last_access,
        len(e.key), len(e.variant), len(e.reason), len(e.head), len(e.etag),
        len(e.last_modified), len(vary), len(tags))
    return b"".join((fixed, e.key, e.variant, e.reason, e.head, e.etag, e.last_modified,
                     vary, tags))


def encode_vary(key: bytes, vary: tuple[bytes, ...]) -> bytes:
    names = b",".join(vary)
    return _VARY.pack(_KIND_VARY, len(key), len(names)) + key + names


def decode_record(data: bytes) -> CacheEntry | VaryRecord:
    """The record stored at a key; ValueError when it is not one of ours."""
    if not data:
        raise ValueError("empty cache record")
    try:
        if data[0] == _KIND_VARY:
            _, klen, vlen = _VARY.unpack_from(data)
            pos = _VARY.size
            if pos + klen + vlen != len(data):
                raise ValueError("bad vary record length")
            names = data[pos + klen:pos + klen + vlen]
            return VaryRecord(data[pos:pos + klen], tuple(names.split(b",")) if names else ())
        if data[0] != _KIND_ENTRY:
            raise ValueError(f"unknown cache record kind {data[0]}")
        (_, flags, status, chunk_size, body_id, body_length,
         request_time, response_time, date_value, age_value, lifetime, swr, sie, last_access,
         *lengths) = _FIXED.unpack_from(data)
    except struct.error as exc:
        raise ValueError(f"truncated cache record: {exc}") from None
    pos = _FIXED.size
    fields = []
    for n in lengths:
        fields.append(data[pos:pos + n])
        pos += n
    if pos != len(data):
        raise ValueError("bad cache record length")
    key, variant, reason, head, etag, last_modified, vary, tags = fields
    return CacheEntry(
        key=key, status=status, reason=reason, head=head, request_time=request_time,
        response_time=response_time, date_value=date_value, age_value=age_value,
        lifetime=lifetime, variant=variant, vary=tuple(vary.split(b",")) if vary else (),
        etag=etag, last_modified=last_modified, tags=tuple(tags.split(b"\n")) if tags else (),
        flags=flags, stale_while_revalidate=swr, stale_if_error=sie, body_length=body_length,
        body_id=body_id, chunk_size=chunk_size, last_access=last_access)


def patch_last_access(record: bytes, when: float) -> bytes:
    """The encoded entry `record` with its last-access time set to `when`."""
    buf = bytearray(record)
    _DOUBLE.pack_into(buf, _LAST_ACCESS_OFFSET, when)
    return bytes(buf)


def patch_flags(record: bytes, set_flags: int) -> bytes:
    """The encoded entry `record` with `set_flags` added to its flags."""
    buf = bytearray(record)
    buf[_FLAGS_OFFSET] |= set_flags
    return bytes(buf)
