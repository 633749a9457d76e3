"""SecLang transformations (`t:name`) as plain functions of a latin-1 str.

Values are bytes decoded as latin-1 (one code point per byte), as ModSecurity
sees bytes. Each function is linear in its input. `TRANSFORMS` maps a name to
its function; the compiler builds a tuple of them per rule.
"""

from __future__ import annotations

import base64
import binascii
import hashlib

import re2

__all__ = ["TRANSFORMS"]

_HEX = "0123456789abcdefABCDEF"
_ASCII_LOWER = {c: c + 32 for c in range(65, 91)}
_ASCII_UPPER = {c: c - 32 for c in range(97, 123)}


def _lower(s: str) -> str:
    return s.lower() if s.isascii() else s.translate(_ASCII_LOWER)


def _upper(s: str) -> str:
    return s.upper() if s.isascii() else s.translate(_ASCII_UPPER)


def _ishex(c: str) -> bool:
    return c in _HEX


def _url_decode(s: str) -> str:
    if "%" not in s and "+" not in s:
        return s
    out = []
    i, n = 0, len(s)
    while i < n:
        c = s[i]
        if c == "%" and i + 2 < n and _ishex(s[i + 1]) and _ishex(s[i + 2]):
            out.append(chr(int(s[i + 1:i + 3], 16)))
            i += 3
            continue
        if c == "+":
            out.append(" ")
        else:
            out.append(c)
        i += 1
    return "".join(out)


def _url_decode_uni(s: str) -> str:
    if "%" not in s and "+" not in s:
        return s
    out = []
    i, n = 0, len(s)
    while i < n:
        c = s[i]
        if c == "%":
            if (i + 5 < n and s[i + 1] in "uU" and _ishex(s[i + 2]) and _ishex(s[i + 3])
                    and _ishex(s[i + 4]) and _ishex(s[i + 5])):
                b = int(s[i + 4:i + 6], 16)
                if 0 < b < 0x5F and s[i + 2] in "fF" and s[i + 3] in "fF":
                    out.append(chr(b + 0x20))  # full-width ASCII
                else:
                    out.append("x")  # ModSecurity's placeholder for other code points
                i += 6
                continue
            if i + 2 < n and _ishex(s[i + 1]) and _ishex(s[i + 2]):
                out.append(chr(int(s[i + 1:i + 3], 16)))
                i += 3
                continue
            out.append(c)
        elif c == "+":
            out.append(" ")
        else:
            out.append(c)
        i += 1
    return "".join(out)


_ENTITIES = {"quot": '"', "amp": "&", "lt": "<", "gt": ">", "nbsp": "\xa0"}
_ENTITY_RE = re2.compile(r"&(?:#[xX]([0-9a-fA-F]+);?|#([0-9]+);?|((?i:quot|amp|lt|gt|nbsp));?)")


def _entity(m) -> str:
    if m.group(1):
        return chr(int(m.group(1)[-8:], 16) & 0xFF)
    if m.group(2):
        return chr(int(m.group(2)[-10:]) & 0xFF)
    return _ENTITIES[m.group(3).lower()]


def _html_entity_decode(s: str) -> str:
    # A fixed, non-nested pattern: linear in the input.
    if "&" not in s:
        return s
    return _ENTITY_RE.sub(_entity, s)


_JS_SIMPLE = {"a": "\a", "b": "\b", "f": "\f", "n": "\n", "r": "\r", "t": "\t", "v": "\v"}


def _js_decode(s: str) -> str:
    if "\\" not in s:
        return s
    out = []
    i, n = 0, len(s)
    while i < n:
        c = s[i]
        if c != "\\" or i + 1 >= n:
            out.append(c)
            i += 1
            continue
        d = s[i + 1]
        if d in "uU" and i + 5 < n and all(_ishex(x) for x in s[i + 2:i + 6]):
            b = int(s[i + 4:i + 6], 16)
            if 0 < b < 0x5F and s[i + 2] in "fF" and s[i + 3] in "fF":
                b += 0x20
            out.append(chr(b))
            i += 6
        elif d in "xX" and i + 3 < n and _ishex(s[i + 2]) and _ishex(s[i + 3]):
            out.append(chr(int(s[i + 2:i + 4], 16)))
            i += 4
        elif d in "01234567":
            j = i + 1
            while j < n and j < i + 4 and s[j] in "01234567":
                j += 1
            out.append(chr(int(s[i + 1:j], 8) & 0xFF))
            i = j
        elif d in _JS_SIMPLE:
            out.append(_JS_SIMPLE[d])
            i += 2
        else:
            out.append(d)
            i += 2
    return "".join(out)


def _css_decode(s: str) -> str:
    if "\\" not in s:
        return s
    out = []
    i, n = 0, len(s)
    while i < n:
        c = s[i]
        if c != "\\":
            out.append(c)
            i += 1
            continue
        if i + 1 >= n:
            i += 1  # a trailing backslash is dropped
            continue
        j = i + 1
        while j < n and j < i + 7 and _ishex(s[j]):
            j += 1
        if j > i + 1:
            h = s[i + 1:j]
            if len(h) >= 2:
                b = int(h[-2:], 16)
                if len(h) >= 4 and 0 < b < 0x5F and h[-4:-2] in ("ff", "FF", "fF", "Ff"):
                    b += 0x20
            else:
                b = int(h, 16)
            out.append(chr(b))
            if j < n and s[j] in " \t\n\r\f":
                j += 1
            i = j
            continue
        d = s[i + 1]
        if d == "\n":
            i += 2
            continue
        out.append(d)
        i += 2
    return "".join(out)


_WS = " \t\n\r\f\v"


def _cmd_line(s: str) -> str:
    out: list[str] = []
    space = False
    for c in s:
        if c in "\\\"'^":
            continue
        if c in _WS or c in ",;":
            space = True
            continue
        if c in "/(":
            space = False  # spaces before / and ( are removed
        elif space:
            if out:
                out.append(" ")
            space = False
        out.append(c)
    if space and out:
        out.append(" ")
    return _lower("".join(out))


_WS_CHARS = " \t\n\r\f\v\xa0"
_WS_TO_SPACE = str.maketrans({c: " " for c in _WS_CHARS})
_WS_DELETE = str.maketrans("", "", _WS_CHARS)


def _compress_ws(s: str) -> str:
    t = s.translate(_WS_TO_SPACE)
    while "  " in t:  # each pass halves the longest run: O(n log n) at worst
        t = t.replace("  ", " ")
    return t


def _remove_ws(s: str) -> str:
    return s.translate(_WS_DELETE)


def _replace_comments(s: str) -> str:
    if "/*" not in s:
        return s
    out = []
    i, n = 0, len(s)
    while i < n:
        j = s.find("/*", i)
        if j < 0:
            out.append(s[i:])
            break
        out.append(s[i:j])
        k = s.find("*/", j + 2)
        out.append(" ")
        if k < 0:
            break
        i = k + 2
    return "".join(out)


def _remove_comments(s: str) -> str:
    out = []
    i, n = 0, len(s)
    while i < n:
        if s.startswith("/*", i):
            k = s.find("*/", i + 2)
            if k < 0:
                break
            i = k + 2
        elif s.startswith("<!--", i):
            k = s.find("-->", i + 4)
            if k < 0:
                break
            i = k + 3
        elif s.startswith("--", i) or s[i] == "#":
            break
        else:
            out.append(s[i])
            i += 1
    return "".join(out)


def _remove_comments_char(s: str) -> str:
    for t in ("/*", "*/", "<!--", "-->", "--", "#"):
        s = s.replace(t, "")
    return s


def _normalize_path(s: str) -> str:
    if not s:
        return s
    absolute = s.startswith("/")
    trailing = s.endswith("/") or s.endswith("/.") or s.endswith("/..")
    parts: list[str] = []
    for seg in s.split("/"):
        if seg in ("", "."):
            continue
        if seg == "..":
            if parts and parts[-1] != "..":
                parts.pop()
            elif not absolute:
                parts.append("..")
            continue
        parts.append(seg)
    out = ("/" if absolute else "") + "/".join(parts)
    if trailing and parts:
        out += "/"
    return out


def _normalize_path_win(s: str) -> str:
    return _normalize_path(s.replace("\\", "/"))


def _utf8_to_unicode(s: str) -> str:
    if s.isascii():
        return s
    b = s.encode("latin-1")
    out = []
    i, n = 0, len(b)
    while i < n:
        c = b[i]
        if c < 0x80:
            out.append(chr(c))
            i += 1
            continue
        if 0xC2 <= c <= 0xDF:
            ln = 2
        elif 0xE0 <= c <= 0xEF:
            ln = 3
        elif 0xF0 <= c <= 0xF4:
            ln = 4
        else:
            out.append(chr(c))
            i += 1
            continue
        seq = b[i:i + ln]
        try:
            ch = seq.decode("utf-8")
        except UnicodeDecodeError:
            out.append(chr(c))
            i += 1
            continue
        out.append(f"%u{ord(ch):04x}")
        i += ln
    return "".join(out)


_B64_KEEP = re2.compile(r"[^A-Za-z0-9+/]")


def _base64_decode(s: str) -> str:
    t = s.split("=", 1)[0]
    t = _B64_KEEP.sub("", t) if not s.isalnum() else t
    t = t[: len(t) - (len(t) % 4 == 1)]
    try:
        return base64.b64decode(t + "=" * (-len(t) % 4)).decode("latin-1")
    except (binascii.Error, ValueError):
        return ""


def _base64_encode(s: str) -> str:
    return base64.b64encode(s.encode("latin-1")).decode("ascii")


def _hex_decode(s: str) -> str:
    t = s[: len(s) & ~1]
    try:
        return bytes.fromhex(t).decode("latin-1")
    except ValueError:
        return s


def _hex_encode(s: str) -> str:
    return s.encode("latin-1").hex()


def _sha1(s: str) -> str:
    return hashlib.sha1(s.encode("latin-1")).digest().decode("latin-1")


def _md5(s: str) -> str:
    return hashlib.md5(s.encode("latin-1")).digest().decode("latin-1")


_ESC_SIMPLE = dict(_JS_SIMPLE, **{"\\": "\\", "?": "?", "'": "'", '"': '"'})


def _escape_seq_decode(s: str) -> str:
    if "\\" not in s:
        return s
    out = []
    i, n = 0, len(s)
    while i < n:
        c = s[i]
        if c != "\\" or i + 1 >= n:
            out.append(c)
            i += 1
            continue
        d = s[i + 1]
        if d in _ESC_SIMPLE:
            out.append(_ESC_SIMPLE[d])
            i += 2
        elif d in "xX" and i + 3 < n and _ishex(s[i + 2]) and _ishex(s[i + 3]):
            out.append(chr(int(s[i + 2:i + 4], 16)))
            i += 4
        elif d in "01234567":
            j = i + 1
            while j < n and j < i + 4 and s[j] in "01234567":
                j += 1
            out.append(chr(int(s[i + 1:j], 8) & 0xFF))
            i = j
        else:
            out.append(c)
            i += 1
    return "".join(out)


_SQL_HEX = re2.compile(r"0x((?:[0-9a-fA-F]{2})+)")


def _sql_hex_decode(s: str) -> str:
    return _SQL_HEX.sub(lambda m: bytes.fromhex(m.group(1)).decode("latin-1"), s)


def _url_encode(s: str) -> str:
    out = []
    for c in s:
        if c.isalnum() and c.isascii() or c in "-_.*":
            out.append(c)
        elif c == " ":
            out.append("+")
        else:
            out.append(f"%{ord(c):02x}")
    return "".join(out)


TRANSFORMS = {
    "lowercase": _lower,
    "uppercase": _upper,
    "urlDecode": _url_decode,
    "urlDecodeUni": _url_decode_uni,
    "htmlEntityDecode": _html_entity_decode,
    "jsDecode": _js_decode,
    "cssDecode": _css_decode,
    "cmdLine": _cmd_line,
    "compressWhitespace": _compress_ws,
    "removeWhitespace": _remove_ws,
    "removeNulls": lambda s: s.replace("\x00", "") if "\x00" in s else s,
    "replaceNulls": lambda s: s.replace("\x00", " ") if "\x00" in s else s,
    "replaceComments": _replace_comments,
    "removeComments": _remove_comments,
    "removeCommentsChar": _remove_comments_char,
    "normalisePath": _normalize_path,
    "normalizePath": _normalize_path,
    "normalisePathWin": _normalize_path_win,
    "normalizePathWin": _normalize_path_win,
    "utf8toUnicode": _utf8_to_unicode,
    "base64Decode": _base64_decode,
    "base64DecodeExt": _base64_decode,
    "base64Encode": _base64_encode,
    "hexDecode": _hex_decode,
    "hexEncode": _hex_encode,
    "length": lambda s: str(len(s)),
    "sha1": _sha1,
    "md5": _md5,
    "trim": lambda s: s.strip(_WS),
    "trimLeft": lambda s: s.lstrip(_WS),
    "trimRight": lambda s: s.rstrip(_WS),
    "escapeSeqDecode": _escape_seq_decode,
    "sqlHexDecode": _sql_hex_decode,
    "urlEncode": _url_encode,
}
