"""The PROXY protocol, versions 1 and 2 (haproxy's proxy-protocol.txt), in
plain Python: the readable twin of ext/proxyproto.pyx, with the same API
and errors (`parse` is `_ext.parse_proxy_header`, `header` is
`_ext.proxy_header`); the tests run both on the same bytes."""

from __future__ import annotations

import socket

__all__ = ["ProxyProtocolError", "parse", "header", "V2_SIGNATURE", "MAX_HEADER"]

V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
V1_MAX = 107                     # the longest v1 line, CRLF included
MAX_HEADER = 16 + 4096           # the largest v2 header taken

FAMILIES = {0: "UNSPEC", 1: "INET", 2: "INET6", 3: "UNIX"}
ADDRESS_LENGTH = {0: 0, 1: 12, 2: 36, 3: 216}


class ProxyProtocolError(ValueError):
    """A malformed, unsupported or oversize PROXY protocol header."""


Parsed = tuple  # (length, version, command, family, src, sport, dst, dport)


def parse(data: bytes) -> Parsed | None:
    """The header at the start of data: None when more bytes are needed,
    else (length, version, command, family, source, source port,
    destination, destination port); ProxyProtocolError when it is bad."""
    data = bytes(data)
    if not data:
        return None
    if data[:1] == b"P":
        if not b"PROXY ".startswith(data[:6]):
            raise ProxyProtocolError("not a PROXY protocol header")
        return _v1(data)
    if data[:1] == b"\r":
        if not V2_SIGNATURE.startswith(data[:12]):
            raise ProxyProtocolError("not a PROXY protocol header")
        if len(data) < 16:
            return None
        return _v2(data)
    raise ProxyProtocolError("not a PROXY protocol header")


def _port(text: bytes) -> int:
    if not 0 < len(text) <= 5 or not all(48 <= c <= 57 for c in text) \
            or (len(text) > 1 and text[:1] == b"0") or int(text) > 65535:
        raise ProxyProtocolError("v1 header: bad port")
    return int(text)


def _address(text: bytes, version: int) -> str:
    # inet_pton's grammar (as the compiled parser): no zone, no leading zeros
    af = socket.AF_INET if version == 4 else socket.AF_INET6
    try:
        return socket.inet_ntop(af, socket.inet_pton(af, text.decode("ascii")))
    except (UnicodeDecodeError, OSError, ValueError):
        raise ProxyProtocolError("v1 header: bad address") from None


def _v1(data: bytes) -> Parsed | None:
    end = data.find(b"\n", 0, V1_MAX)
    if end < 0:
        if len(data) >= V1_MAX:
            raise ProxyProtocolError("v1 header longer than 107 bytes")
        return None
    if end == 0 or data[end - 1:end] != b"\r":
        raise ProxyProtocolError("v1 header not ended by CRLF")
    line = data[6:end - 1]
    if line == b"UNKNOWN" or line.startswith(b"UNKNOWN "):
        if any(c < 32 or c > 126 for c in line):
            raise ProxyProtocolError("v1 header: control byte")
        return (end + 1, 1, "PROXY", "UNSPEC", None, 0, None, 0)
    if len(line) < 5 or line[:3] != b"TCP" or line[4:5] != b" " or line[3:4] not in (b"4", b"6"):
        raise ProxyProtocolError("v1 header: protocol is not TCP4, TCP6 or UNKNOWN")
    version = 4 if line[3:4] == b"4" else 6
    rest, pos, values = line[5:], 0, []
    for f in range(4):          # each field ended by one space, the last by the CRLF
        j = rest.find(b" ", pos)
        j = len(rest) if j < 0 else j
        if j == pos or (f < 3 and j >= len(rest)) or (f == 3 and j != len(rest)):
            raise ProxyProtocolError("v1 header: expected source, destination and two ports")
        values.append(_address(rest[pos:j], version) if f < 2 else _port(rest[pos:j]))
        pos = j + 1
    src, dst, sport, dport = values
    return (end + 1, 1, "PROXY", "INET" if version == 4 else "INET6", src, sport, dst, dport)


def _v2(data: bytes) -> Parsed | None:
    version, command = data[12] >> 4, data[12] & 15
    family, transport = data[13] >> 4, data[13] & 15
    length = int.from_bytes(data[14:16], "big")
    total = 16 + length
    if version != 2:
        raise ProxyProtocolError("v2 header: version is not 2")
    if command > 1:
        raise ProxyProtocolError("v2 header: unknown command")
    if total > MAX_HEADER:
        raise ProxyProtocolError("v2 header larger than 4112 bytes")
    if family > 3 or transport > 2:
        raise ProxyProtocolError("v2 header: unknown address family or transport")
    if len(data) < total:
        return None
    need = ADDRESS_LENGTH[family]
    if length < need:
        raise ProxyProtocolError("v2 header: address block shorter than its family needs")
    i = 16 + need
    while i < total:        # TLVs: type, 2-byte length, value; skipped, but each must fit
        if total - i < 3:
            raise ProxyProtocolError("v2 header: truncated TLV")
        n = int.from_bytes(data[i + 1:i + 3], "big")
        if n > total - i - 3:
            raise ProxyProtocolError("v2 header: TLV longer than the header")
        i += 3 + n
    cmd = "PROXY" if command == 1 else "LOCAL"
    if command == 0 or family == 0:
        return (total, 2, cmd, "UNSPEC", None, 0, None, 0)
    if transport != 1:
        raise ProxyProtocolError("v2 header: not a stream (TCP) connection")
    if family == 3:
        return (total, 2, cmd, "UNIX", None, 0, None, 0)
    n = 4 if family == 1 else 16
    af = socket.AF_INET if family == 1 else socket.AF_INET6
    a = data[16:16 + 2 * n + 4]
    src, dst = socket.inet_ntop(af, a[:n]), socket.inet_ntop(af, a[n:2 * n])
    sport = int.from_bytes(a[2 * n:2 * n + 2], "big")
    dport = int.from_bytes(a[2 * n + 2:2 * n + 4], "big")
    return (total, 2, cmd, FAMILIES[family], src, sport, dst, dport)


def _packed(text: str | None) -> bytes | None:
    """The address in network order (4 or 16 bytes), or None."""
    for af in (socket.AF_INET, socket.AF_INET6):
        try:
            return socket.inet_pton(af, text) if text else None
        except (OSError, ValueError):
            continue
    return None


def header(version: int, src: str | None, sport: int, dst: str | None, dport: int) -> bytes:
    """The header (version 1 or 2) for a connection from src:sport to
    dst:dport; mixed families are written as IPv6 (IPv4-mapped); an address
    that is not an IP gives v1's UNKNOWN or v2's UNSPEC family."""
    a, b = _packed(src), _packed(dst)
    if a is None or b is None or not (0 <= sport <= 65535 and 0 <= dport <= 65535):
        return b"PROXY UNKNOWN\r\n" if version == 1 else V2_SIGNATURE + b"\x21\x00\x00\x00"
    if len(a) != len(b):
        a, b = [b"\0" * 10 + b"\xff\xff" + x if len(x) == 4 else x for x in (a, b)]
    af = socket.AF_INET6 if len(a) == 16 else socket.AF_INET
    if version == 1:
        return b"PROXY %s %s %s %d %d\r\n" % (b"TCP6" if len(a) == 16 else b"TCP4",
                                               socket.inet_ntop(af, a).encode(),
                                               socket.inet_ntop(af, b).encode(), sport, dport)
    fam = b"\x21\x21\x00\x24" if len(a) == 16 else b"\x21\x11\x00\x0c"
    return V2_SIGNATURE + fam + a + b + sport.to_bytes(2, "big") + dport.to_bytes(2, "big")
