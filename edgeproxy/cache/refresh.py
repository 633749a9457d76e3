"""The cache's own requests to a backend (background revalidation): a minimal asyncio HTTP/1.1 client, and request-head rewriting."""
from __future__ import annotations

import asyncio
import logging
from typing import Any

from edgeproxy.http import (
    BODY_CHUNKED,
    BODY_LENGTH,
    BODY_NONE,
    ChunkedDecoder,
    HTTPError,
    parse_response,
)

__all__ = ["fetch", "rewrite_head"]

log = logging.getLogger("edgeproxy.cache")

Headers = list[tuple[bytes, bytes]]

_READ = 1 << 16


def rewrite_head(head: bytes, drop: tuple[bytes, ...], add: Headers) -> bytes:
    """A request head (ending in a blank line) without the fields named in
    `drop` (lower-case) and with `add` appended."""
    lines = head[:-4].split(b"\r\n") if head.endswith(b"\r\n\r\n") else head.split(b"\r\n")
    kept = [lines[0]]
    for line in lines[1:]:
        name = line.partition(b":")[0].strip().lower()
        if name not in drop:
            kept.append(line)
    kept.extend(b"%s: %s" % (n, v) for n, v in add)
    return b"\r\n".join(kept) + b"\r\n\r\n"


async def fetch(backend: Any, head: bytes, *, timeout: float,
                max_body: int) -> tuple[int, bytes, Headers, bytes] | None:
    """Send a GET head (with `Connection: close`) to backend and read the
    whole response: (status, reason, headers, body), or None when the
    backend cannot be reached, times out, answers badly or sends more than
    max_body bytes."""
    try:
        return await asyncio.wait_for(_exchange(backend, head, max_body), timeout)
    except (TimeoutError, OSError, asyncio.IncompleteReadError, HTTPError, ValueError) as exc:
        log.info("cache: background request to %s failed: %s", backend.name, exc or type(exc))
        return None


async def _exchange(backend: Any, head: bytes, max_body: int):
    if backend.ssl is not None:
        reader, writer = await asyncio.open_connection(
            backend.host, backend.port, ssl=backend.ssl,
            server_hostname=backend.server_hostname or backend.host, limit=1 << 20)
    else:
        reader, writer = await asyncio.open_connection(backend.host, backend.port,
                                                       limit=1 << 20)
    try:
        writer.write(head)
        data = b""
        while True:
            resp = parse_response(data, method=b"GET") if data else None
            if resp is not None and resp.status >= 200:
                break
            if resp is not None:              # interim response: skip it
                data = data[resp.head_length:]
                continue
            more = await reader.read(_READ)
            if not more:
                raise ValueError("closed inside the response head")
            data += more
        rest = data[resp.head_length:]
        if resp.body == BODY_NONE:
            body = b""
        elif resp.body == BODY_LENGTH:
            if resp.content_length > max_body:
                raise ValueError("response larger than the largest object")
            body = rest + await reader.readexactly(max(0, resp.content_length - len(rest)))
            body = body[:resp.content_length]
        elif resp.body == BODY_CHUNKED:
            decoder = ChunkedDecoder()
            parts: list[bytes] = []
            size = 0
            while True:
                pieces, _ = decoder.feed(rest) if rest else ([], 0)
                parts.extend(pieces)
                size += sum(len(p) for p in pieces)
                if size > max_body:
                    raise ValueError("response larger than the largest object")
                if decoder.done:
                    break
                rest = await reader.read(_READ)
                if not rest:
                    raise ValueError("closed inside a chunked body")
            body = b"".join(parts)
        else:
            parts = [rest]
            size = len(rest)
            while chunk := await reader.read(_READ):
                parts.append(chunk)
                size += len(chunk)
                if size > max_body:
                    raise ValueError("response larger than the largest object")
            body = b"".join(parts)
        return resp.status, resp.reason, resp.headers, body
    finally:
        writer.close()
