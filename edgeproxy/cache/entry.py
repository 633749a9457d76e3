"""What the cache keeps for one response (its metadata record) and that record's binary form."""
from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass

__all__ = [
    "FLAG_HEURISTIC",
    "FLAG_INVALIDATED",
    "FLAG_MUST_REVALIDATE",
    "FLAG_NO_CACHE",
    "FLAG_TARGETED",
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
FLAG_TARGETED = 16        # the directives came from a targeted field (RFC 9213), not Cache-Control

_KIND_ENTRY_V1 = 1     # without checksums (still read: their body is not verified)
_KIND_VARY = 2
_KIND_ENTRY = 3        # with the body's CRC-32, and its own in the last 4 bytes

# kind, flags, status, chunk_size, body_id, body_length, then the times and
# lifetimes as doubles, then the lengths of the variable fields that follow,
# then (kind 3) the CRC-32 of the body (-1: not known). The variable fields
# follow, and (kind 3) the CRC-32 of all the record before it.
_FIXED_V1 = struct.Struct("<BBHIQQ8d8I")
_FIXED = struct.Struct("<BBHIQQ8d8Iq")
_FLAGS_OFFSET = 1
_LAST_ACCESS_OFFSET = struct.calcsize("<BBHIQQ7d")
_DOUBLE = struct.Struct("<d")
_CRC = struct.Struct("<I")
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
    body_crc: int | None = None    # CRC-32 of the body, set by the store (None: not known)

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
        len(e.last_modified), len(vary), len(tags), -1 if e.body_crc is None else e.body_crc)
    record = b"".join((fixed, e.key, e.variant, e.reason, e.head, e.etag, e.last_modified,
                       vary, tags))
    return record + _CRC.pack(zlib.crc32(record))


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
        if data[0] == _KIND_ENTRY:
            end = len(data) - _CRC.size
            if end < _FIXED.size or zlib.crc32(memoryview(data)[:end]) != _CRC.unpack_from(
                    data, end)[0]:
                raise ValueError("cache record checksum mismatch")
            (_, flags, status, chunk_size, body_id, body_length,
             request_time, response_time, date_value, age_value, lifetime, swr, sie,
             last_access, *lengths, body_crc) = _FIXED.unpack_from(data)
            body_crc = None if body_crc < 0 else body_crc
            pos = _FIXED.size
        elif data[0] == _KIND_ENTRY_V1:
            end = len(data)
            (_, flags, status, chunk_size, body_id, body_length,
             request_time, response_time, date_value, age_value, lifetime, swr, sie,
             last_access, *lengths) = _FIXED_V1.unpack_from(data)
            body_crc = None
            pos = _FIXED_V1.size
        else:
            raise ValueError(f"unknown cache record kind {data[0]}")
    except struct.error as exc:
        raise ValueError(f"truncated cache record: {exc}") from None
    fields = []
    for n in lengths:
        fields.append(data[pos:pos + n])
        pos += n
    if pos != end:
        raise ValueError("bad cache record length")
    key, variant, reason, head, etag, last_modified, vary, tags = fields
    return CacheEntry(
        key=key, status=status, reason=reason, head=head, request_time=request_time,
        response_time=response_time, date_value=date_value, age_value=age_value,
        lifetime=lifetime, variant=variant, vary=tuple(vary.split(b",")) if vary else (),
        etag=etag, last_modified=last_modified, tags=tuple(tags.split(b"\n")) if tags else (),
        flags=flags, stale_while_revalidate=swr, stale_if_error=sie, body_length=body_length,
        body_id=body_id, chunk_size=chunk_size, last_access=last_access, body_crc=body_crc)


def _resealed(buf: bytearray) -> bytes:
    if buf[0] == _KIND_ENTRY:
        end = len(buf) - _CRC.size
        _CRC.pack_into(buf, end, zlib.crc32(memoryview(buf)[:end]))
    return bytes(buf)


def patch_last_access(record: bytes, when: float) -> bytes:
    """The encoded entry `record` with its last-access time set to `when`."""
    buf = bytearray(record)
    _DOUBLE.pack_into(buf, _LAST_ACCESS_OFFSET, when)
    return _resealed(buf)


def patch_flags(record: bytes, set_flags: int) -> bytes:
    """The encoded entry `record` with `set_flags` added to its flags."""
    buf = bytearray(record)
    buf[_FLAGS_OFFSET] |= set_flags
    return _resealed(buf)
