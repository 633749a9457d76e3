"""Streaming compressors, one per response: zlib (gzip framing) from the
standard library, Google's `brotli` and `zstandard` from PyPI.  Levels are
modest so that the CPU one chunk costs stays small (docs/configuration.md,
`compress`): a backend's read is at most 256 KiB, and each is compressed
as it arrives, with nothing held beyond the compressor's own window."""

from __future__ import annotations

import zlib

# gzip 5, brotli 4, zstd 3: each within a few percent of its best ratio for
# text, at a fraction of the CPU of its highest level
LEVELS = {"gzip": 5, "br": 4, "zstd": 3}


class _Gzip:
    __slots__ = ("z",)

    def __init__(self, level: int):
        self.z = zlib.compressobj(level, zlib.DEFLATED, 16 + zlib.MAX_WBITS, 8)

    def compress(self, data) -> bytes:
        # Z_SYNC_FLUSH: what arrived goes out now (a streamed page renders
        # as it comes), at a few bytes per flush
        return self.z.compress(data) + self.z.flush(zlib.Z_SYNC_FLUSH)

    def finish(self) -> bytes:
        return self.z.flush(zlib.Z_FINISH)


class _Brotli:
    __slots__ = ("b",)

    def __init__(self, level: int):
        import brotli
        self.b = brotli.Compressor(quality=level, lgwin=22)

    def compress(self, data) -> bytes:
        return self.b.process(bytes(data)) + self.b.flush()

    def finish(self) -> bytes:
        return self.b.finish()


class _Zstd:
    __slots__ = ("o", "flush_block")

    def __init__(self, level: int):
        import zstandard
        self.o = zstandard.ZstdCompressor(level=level).compressobj()
        self.flush_block = zstandard.COMPRESSOBJ_FLUSH_BLOCK

    def compress(self, data) -> bytes:
        return self.o.compress(data) + self.o.flush(self.flush_block)

    def finish(self) -> bytes:
        return self.o.flush()


_KINDS = {"gzip": _Gzip, "br": _Brotli, "zstd": _Zstd}


def encoder(coding: str, level: int | None = None):
    """A new streaming compressor for coding: .compress(data) -> bytes
    (what can go out now), .finish() -> the rest."""
    return _KINDS[coding](LEVELS[coding] if level is None else level)


def compress_whole(coding: str, data: bytes, level: int | None = None) -> bytes:
    """data compressed in one go (small static files)."""
    e = encoder(coding, level)
    return e.compress(data) + e.finish()
