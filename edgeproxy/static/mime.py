"""Content types of static files by extension: a fixed table (the `mimetypes`
module with no system files read), so that a file gets the same type on
every machine, whatever its /etc/mime.types says."""

from __future__ import annotations

import mimetypes

# what a front end's build output holds, and what mimetypes' built-in table
# spells differently from browsers' expectations (RFC 9239: text/javascript)
_OVERRIDES = {
    ".js": "text/javascript",
    ".mjs": "text/javascript",
    ".cjs": "text/javascript",
    ".css": "text/css",
    ".html": "text/html",
    ".htm": "text/html",
    ".json": "application/json",
    ".map": "application/json",
    ".webmanifest": "application/manifest+json",
    ".txt": "text/plain",
    ".md": "text/markdown",
    ".xml": "application/xml",
    ".svg": "image/svg+xml",
    ".png": "image/png",
    ".jpg": "image/jpeg",
    ".jpeg": "image/jpeg",
    ".gif": "image/gif",
    ".webp": "image/webp",
    ".avif": "image/avif",
    ".ico": "image/vnd.microsoft.icon",
    ".woff": "font/woff",
    ".woff2": "font/woff2",
    ".ttf": "font/ttf",
    ".otf": "font/otf",
    ".wasm": "application/wasm",
    ".pdf": "application/pdf",
    ".zip": "application/zip",
    ".gz": "application/gzip",
    ".br": "application/octet-stream",
    ".zst": "application/zstd",
    ".mp4": "video/mp4",
    ".webm": "video/webm",
    ".mp3": "audio/mpeg",
    ".ogg": "audio/ogg",
    ".csv": "text/csv",
}

# types that are text: sent with "; charset=utf-8"
_TEXT = ("text/", "application/javascript", "application/json", "application/xml",
         "application/manifest+json", "image/svg+xml")

DEFAULT_TYPE = b"application/octet-stream"

_table: dict[bytes, bytes] | None = None


def _with_charset(t: str) -> str:
    return t + "; charset=utf-8" if t.startswith(_TEXT) else t


def content_type_table() -> dict[bytes, bytes]:
    """Lower-case extension without the dot (b"js") -> Content-Type value."""
    global _table
    if _table is None:
        db = mimetypes.MimeTypes(filenames=(), strict=True)   # built-in table only
        types = dict(db.types_map[True])
        types.update(_OVERRIDES)
        _table = {ext[1:].lower().encode("ascii"): _with_charset(t).encode("ascii")
                  for ext, t in types.items() if ext.startswith(".") and ext[1:].isascii()}
    return _table


def content_type(name: str) -> bytes:
    """The Content-Type value for a file name (for tests and tools)."""
    ext = name.rpartition("/")[2].rpartition(".")
    if not ext[1]:
        return DEFAULT_TYPE
    return content_type_table().get(ext[2].lower().encode("ascii", "replace"), DEFAULT_TYPE)
