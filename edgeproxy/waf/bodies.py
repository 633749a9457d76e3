"""Request parts as the firewall sees them: query strings, cookies and bodies.

Sans I/O: functions of latin-1 str (one code point per byte) that return lists
of (name, value) and error flags, named as ModSecurity names them (JSON keys
flattened to `json.a.b`, arrays by index).
"""

from __future__ import annotations

import json

__all__ = ["parse_urlencoded", "parse_cookies", "parse_json", "parse_xml", "parse_multipart",
           "url_decode_arg", "Multipart"]

_HEX = "0123456789abcdefABCDEF"


def url_decode_arg(s: str) -> tuple[str, bool]:
    """Non-strict %-decoding with `+` as space; (value, had an invalid escape)."""
    if "%" not in s and "+" not in s:
        return s, False
    out = []
    bad = False
    i, n = 0, len(s)
    while i < n:
        c = s[i]
        if c == "%":
            if i + 2 < n and s[i + 1] in _HEX and s[i + 2] in _HEX:
                out.append(chr(int(s[i + 1:i + 3], 16)))
                i += 3
                continue
            bad = True
            out.append(c)
        elif c == "+":
            out.append(" ")
        else:
            out.append(c)
        i += 1
    return "".join(out), bad


def parse_urlencoded(s: str, limit: int = 1000) -> tuple[list[tuple[str, str]], bool]:
    args: list[tuple[str, str]] = []
    bad = False
    for part in s.split("&"):
        if not part:
            continue
        k, _, v = part.partition("=")
        k, b1 = url_decode_arg(k)
        v, b2 = url_decode_arg(v)
        bad = bad or b1 or b2
        if len(args) < limit:
            args.append((k, v))
    return args, bad


def parse_cookies(value: str, out: list[tuple[str, str]]) -> None:
    parts = value.split(";")
    if parts:
        parts[-1] = parts[-1].rstrip()
    for c in parts:
        if not c:
            continue
        k, sep, v = c.partition("=")
        k = k.lstrip()
        if not k:
            continue
        out.append((k, v))


def parse_json(s: str, depth_limit: int = 512) -> tuple[list[tuple[str, str]], str]:
    """(args, error message or "")."""
    if not s.strip():
        return [], ""
    try:
        doc = json.loads(s.encode("latin-1").decode("utf-8", "surrogateescape"))
    except (ValueError, RecursionError) as e:
        return [], f"JSON parsing error: {e}"
    out: list[tuple[str, str]] = []
    stack = [("json", doc, 0)]
    while stack:
        name, v, depth = stack.pop()
        if depth > depth_limit:
            return out, "JSON parsing error: depth limit exceeded"
        if isinstance(v, dict):
            for k, x in reversed(list(v.items())):
                stack.append((f"{name}.{k}", x, depth + 1))
        elif isinstance(v, list):
            for i in range(len(v) - 1, -1, -1):
                stack.append((f"{name}.{i}", v[i], depth + 1))
        else:
            if v is True:
                t = "true"
            elif v is False:
                t = "false"
            elif v is None:
                t = ""
            else:
                t = str(v)
            out.append((_latin(name), _latin(t)))
    return out, ""


def _latin(s: str) -> str:
    return s.encode("utf-8", "surrogateescape").decode("latin-1")


def parse_xml(s: str) -> tuple[str, list[str], str]:
    """(text of every element, attribute values, error): XML:/* and XML://@*."""
    from xml.etree.ElementTree import ParseError

    import defusedxml.ElementTree as ET
    from defusedxml import DefusedXmlException
    try:
        root = ET.fromstring(s.encode("latin-1"))
    except (ParseError, DefusedXmlException, ValueError) as e:
        return "", [], f"XML parsing error: {e}"
    text = _latin("".join(root.itertext()))
    attrs = [_latin(v) for el in root.iter() for v in el.attrib.values()]
    return text, attrs, ""


class Multipart:
    """A multipart/form-data body split into parts, with ModSecurity's strictness flags."""

    def __init__(self) -> None:
        self.args: list[tuple[str, str]] = []
        self.files: list[tuple[str, str]] = []
        self.files_sizes: list[tuple[str, str]] = []
        self.part_headers: list[tuple[str, str]] = []
        self.flags: dict[str, int] = {}
        self.error = ""
        self.filename = ""
        self.name = ""

    def flag(self, name: str) -> None:
        self.flags[name] = 1


_FLAGS = ("MULTIPART_BOUNDARY_QUOTED", "MULTIPART_BOUNDARY_WHITESPACE", "MULTIPART_DATA_BEFORE",
          "MULTIPART_DATA_AFTER", "MULTIPART_HEADER_FOLDING", "MULTIPART_LF_LINE",
          "MULTIPART_MISSING_SEMICOLON", "MULTIPART_INVALID_QUOTING", "MULTIPART_INVALID_PART",
          "MULTIPART_INVALID_HEADER_FOLDING", "MULTIPART_FILE_LIMIT_EXCEEDED",
          "MULTIPART_UNMATCHED_BOUNDARY", "MULTIPART_CRLF_LF_LINES")


def _boundary(ctype: str, mp: Multipart) -> str | None:
    low = ctype.lower()
    i = low.find("boundary")
    if i < 0:
        return None
    rest = ctype[i + 8:]
    j = 0
    while j < len(rest) and rest[j] in " \t":
        mp.flag("MULTIPART_BOUNDARY_WHITESPACE")
        j += 1
    if j >= len(rest) or rest[j] != "=":
        return None
    b = rest[j + 1:]
    if b[:1] in " \t":
        mp.flag("MULTIPART_BOUNDARY_WHITESPACE")
        b = b.lstrip(" \t")
    if b.startswith('"'):
        mp.flag("MULTIPART_BOUNDARY_QUOTED")
        end = b.find('"', 1)
        if end < 0:
            return None
        b = b[1:end]
    else:
        b = b.split(";", 1)[0].rstrip()
        if " " in b or "\t" in b:
            mp.flag("MULTIPART_BOUNDARY_WHITESPACE")
    if not b or len(b) > 70 or any(ord(c) < 32 or ord(c) > 126 for c in b):
        return None
    return b


def _disposition(value: str, mp: Multipart) -> tuple[str | None, str | None]:
    """name and filename of a Content-Disposition: form-data value."""
    v = value.strip()
    if not v.lower().startswith("form-data"):
        mp.flag("MULTIPART_INVALID_PART")
        return None, None
    rest = v[9:]
    name = filename = None
    while rest:
        rest = rest.lstrip(" \t")
        if not rest:
            break
        if rest[0] != ";":
            mp.flag("MULTIPART_MISSING_SEMICOLON")
        else:
            rest = rest[1:].lstrip(" \t")
        k, eq, rest2 = rest.partition("=")
        if not eq:
            mp.flag("MULTIPART_INVALID_PART")
            break
        k = k.strip().lower()
        rest2 = rest2.lstrip(" \t")
        if rest2.startswith('"'):
            j = 1
            val = []
            while j < len(rest2) and rest2[j] != '"':
                if rest2[j] == "\\" and j + 1 < len(rest2) and rest2[j + 1] in '"\\':
                    val.append(rest2[j + 1])
                    j += 2
                    continue
                val.append(rest2[j])
                j += 1
            if j >= len(rest2):
                mp.flag("MULTIPART_INVALID_QUOTING")
            value_s = "".join(val)
            rest = rest2[j + 1:]
        else:
            end = rest2.find(";")
            value_s = rest2 if end < 0 else rest2[:end]
            value_s = value_s.strip()
            if "'" in value_s or '"' in value_s:
                mp.flag("MULTIPART_INVALID_QUOTING")
            rest = "" if end < 0 else rest2[end:]
        if k == "name":
            name = value_s
        elif k == "filename":
            filename = value_s
        elif k == "filename*":
            filename = value_s
        else:
            mp.flag("MULTIPART_INVALID_PART")
    return name, filename


def parse_multipart(ctype: str, body: str) -> Multipart:
    mp = Multipart()
    b = _boundary(ctype, mp)
    if b is None:
        mp.error = "Multipart: invalid boundary in Content-Type"
        return mp
    delim = "--" + b
    first = body.find(delim)
    if first < 0:
        mp.error = "Multipart: boundary not found"
        return mp
    if first > 0:
        mp.flag("MULTIPART_DATA_BEFORE")
    pos = first
    closed = False
    crlf = lf = False
    while True:
        after = pos + len(delim)
        if body.startswith("--", after):
            closed = True
            tail = body[after + 2:]
            if tail.strip("\r\n"):
                mp.flag("MULTIPART_DATA_AFTER")
            break
        # the line after a boundary
        eol = body.find("\n", after)
        if eol < 0:
            break
        if body[after:eol].rstrip("\r").strip(" \t"):
            mp.flag("MULTIPART_INVALID_PART")
        if eol > 0 and body[eol - 1] == "\r":
            crlf = True
        else:
            lf = True
        start = eol + 1
        nxt = body.find("\n" + delim, start)
        if nxt < 0:
            mp.error = "Multipart: final boundary missing"
            mp.flag("MULTIPART_INVALID_PART")
            break
        end = nxt - 1 if nxt > 0 and body[nxt - 1] == "\r" else nxt
        _part(body[start:end], mp)
        pos = nxt + 1
    if not closed and not mp.error:
        mp.error = "Multipart: final boundary missing"
    # A line that looks like a boundary but is not ours.
    for line in body.split("\n"):
        if line.startswith("--") and not line.rstrip("\r").startswith(delim) and len(line) > 2:
            if line.rstrip("\r")[2:].strip("-") and b[:4] in line:
                mp.flag("MULTIPART_UNMATCHED_BOUNDARY")
    if crlf and lf:
        mp.flag("MULTIPART_CRLF_LF_LINES")
    elif lf:
        mp.flag("MULTIPART_LF_LINE")
    return mp


def _part(text: str, mp: Multipart) -> None:
    i = text.find("\r\n\r\n")
    sep = 4
    j = text.find("\n\n")
    if i < 0 or (0 <= j < i):
        i, sep = j, 2
    if i < 0:
        mp.flag("MULTIPART_INVALID_PART")
        return
    head, data = text[:i], text[i + sep:]
    headers: list[tuple[str, str]] = []
    for raw in head.split("\n"):
        line = raw.rstrip("\r")
        if not line:
            continue
        if line[0] in " \t":
            mp.flag("MULTIPART_HEADER_FOLDING")
            if headers:
                headers[-1] = (headers[-1][0], headers[-1][1] + " " + line.strip())
            else:
                mp.flag("MULTIPART_INVALID_HEADER_FOLDING")
            continue
        k, colon, v = line.partition(":")
        if not colon or not k.strip():
            mp.flag("MULTIPART_INVALID_PART")
            continue
        if any(not (0x21 <= ord(ch) <= 0x7E) for ch in k):
            mp.error = mp.error or "Multipart: Invalid part header (contains invalid character)"
        headers.append((k.strip(), v.strip()))
    name = filename = None
    for k, v in headers:
        if k.lower() == "content-disposition":
            name, filename = _disposition(v, mp)
    for k, v in headers:
        mp.part_headers.append((name or "", f"{k}: {v}"))
    if name is None:
        mp.flag("MULTIPART_INVALID_PART")
        return
    mp.name = name
    if filename is not None:
        mp.files.append((name, filename))
        mp.files_sizes.append((name, str(len(data))))
        mp.filename = filename
    else:
        mp.args.append((name, data))


def strict_error(mp: Multipart) -> int:
    return 1 if (mp.error or any(mp.flags.get(f) for f in _FLAGS if f != "MULTIPART_UNMATCHED_BOUNDARY")) else 0
