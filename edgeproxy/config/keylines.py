"""Where each key of a TOML document is written: key path -> line number, for error messages.

`tomllib` gives values without positions, so `key_lines(text)` scans the
text once more (after tomllib has accepted it) and records the line of
every table header, every `key = value`, every item of an array and every
key of an inline table.  Paths are tuples of names and array indices in
the form the loader's key paths use: `[[route]]` tables are
`("route", 0)`, `("route", 1)`...; `tls.certs = [{...}, {...}]` gives
`("tls", "certs", 1)` for the second table.

It is best effort by design: `Locations.line_of(path)` answers the line of
the longest prefix of `path` that was recorded, so an error about a value
the file left out points at its table's header.
"""
from __future__ import annotations

import bisect
import json
import re
import tomllib
from collections.abc import Iterable

__all__ = ["KeyPath", "format_key_path", "key_lines", "parse_key_path"]

KeyPath = tuple[str | int, ...]

_BARE = re.compile(r"[A-Za-z0-9_-]+")
_SCALAR = re.compile(r"[^,\]}#\r\n]*")   # a number, boolean or date/time
_WS = " \t"


class _Scanner:
    """One pass over a document tomllib has accepted (so it can be lenient)."""

    def __init__(self, text: str):
        self.text = text
        self.pos = 0
        self.starts = [0] + [m.end() for m in re.finditer("\n", text)]
        self.lines: dict[KeyPath, int] = {}
        self.counts: dict[KeyPath, int] = {}   # array-of-tables path -> tables so far

    def line(self, pos: int) -> int:
        return bisect.bisect_right(self.starts, pos)

    def note(self, path: KeyPath, pos: int) -> None:
        self.lines.setdefault(path, self.line(pos))

    def peek(self, n: int = 1) -> str:
        return self.text[self.pos:self.pos + n]

    def skip(self, newlines: bool) -> None:
        """Spaces, comments and (with `newlines`) line ends."""
        text, n = self.text, len(self.text)
        while self.pos < n:
            c = text[self.pos]
            if c in _WS or (newlines and c in "\r\n"):
                self.pos += 1
            elif c == "#":
                end = text.find("\n", self.pos)
                self.pos = n if end < 0 else end
            else:
                break

    def string(self) -> str:
        """A string at pos (any of the four kinds); returns its source text."""
        text, start = self.text, self.pos
        for quote in ('"""', "'''"):
            if text.startswith(quote, start):
                i = start + 3
                while True:
                    j = text.find(quote, i)
                    if j < 0:
                        self.pos = len(text)
                        return text[start:]
                    if quote == '"""' and _escaped(text, j):
                        i = j + 1
                        continue
                    while text.startswith(quote[0], j + 3):   # """a"""" ends with a quote
                        j += 1
                    self.pos = j + 3
                    return text[start:self.pos]
        quote = text[start]
        i = start + 1
        while i < len(text) and text[i] != "\n":
            if text[i] == quote and (quote == "'" or not _escaped(text, i)):
                break
            i += 1
        self.pos = i + 1
        return text[start:self.pos]

    def key(self) -> list[str]:
        """A dotted key: its parts, unquoted."""
        parts = []
        while True:
            self.skip(False)
            c = self.peek()
            if c in ('"', "'"):
                raw = self.string()
                try:
                    parts.append(tomllib.loads(f"k = {raw}")["k"])
                except tomllib.TOMLDecodeError:
                    parts.append(raw.strip("\"'"))
            else:
                m = _BARE.match(self.text, self.pos)
                if not m:
                    return parts
                parts.append(m.group())
                self.pos = m.end()
            self.skip(False)
            if self.peek() != ".":
                return parts
            self.pos += 1

    def value(self, path: KeyPath) -> None:
        c = self.peek()
        if c in ('"', "'"):
            self.string()
        elif c == "[":
            self.pos += 1
            i = 0
            while True:
                self.skip(True)
                if self.peek() in ("]", ""):
                    self.pos += 1
                    return
                at = self.pos
                self.note(path + (i,), at)
                self.value(path + (i,))
                self.skip(True)
                if self.peek() == ",":
                    self.pos += 1
                elif self.pos == at:      # never stuck, whatever the text
                    self.pos += 1
                i += 1
        elif c == "{":
            self.pos += 1
            while True:
                self.skip(True)
                if self.peek() in ("}", ""):
                    self.pos += 1
                    return
                at = self.pos
                self.pair(path)
                self.skip(True)
                if self.peek() == ",":
                    self.pos += 1
                elif self.pos == at:
                    self.pos += 1
        else:
            self.pos = _SCALAR.match(self.text, self.pos).end()

    def pair(self, table: KeyPath) -> None:
        """key = value, inside `table`."""
        at = self.pos
        parts = self.key()
        for i in range(1, len(parts) + 1):
            self.note(table + tuple(parts[:i]), at)
        self.skip(False)
        if self.peek() == "=":
            self.pos += 1
        self.skip(False)
        self.value(table + tuple(parts))

    def resolve(self, parts: Iterable[str]) -> KeyPath:
        """A header's names with the index of the current table of each array of tables."""
        out: list[str | int] = []
        for part in parts:
            out.append(part)
            count = self.counts.get(tuple(out))
            if count:
                out.append(count - 1)
        return tuple(out)

    def document(self) -> dict[KeyPath, int]:
        table: KeyPath = ()
        n = len(self.text)
        while True:
            self.skip(True)
            if self.pos >= n:
                return self.lines
            at = self.pos
            if self.text.startswith("[[", self.pos):
                self.pos += 2
                parts = self.key()
                base = self.resolve(parts[:-1]) + tuple(parts[-1:])
                self.counts[base] = self.counts.get(base, 0) + 1
                self.note(base, at)
                table = base + (self.counts[base] - 1,)
                self.note(table, at)
            elif self.peek() == "[":
                self.pos += 1
                table = self.resolve(self.key())
                for i in range(1, len(table) + 1):
                    self.note(table[:i], at)
            else:
                self.pair(table)
            end = self.text.find("\n", self.pos)     # the rest of the line: "]", a comment
            self.pos = n if end < 0 else end + 1


def _escaped(text: str, i: int) -> bool:
    """Whether the character at i is preceded by an odd number of backslashes."""
    k = i
    while k > 0 and text[k - 1] == "\\":
        k -= 1
    return (i - k) % 2 == 1


def key_lines(text: str) -> dict[KeyPath, int]:
    """{key path: line (from 1)} for a document tomllib accepts.

    Best effort: what it could not place is missing, and it never raises.
    """
    scanner = _Scanner(text)
    try:
        return scanner.document()
    except Exception:  # noqa: BLE001 - positions are a nicety; the values came from tomllib
        return scanner.lines


_PATH_PART = re.compile(r'\.?(?:([A-Za-z0-9_-]+)|("(?:[^"\\]|\\.)*")|\[(\d+)\])')


def parse_key_path(text: str) -> KeyPath | None:
    """The loader's key path text ('pool."my pool".backends[0]') as a tuple; None if it is not one."""
    out: list[str | int] = []
    pos = 0
    while pos < len(text):
        m = _PATH_PART.match(text, pos)
        if not m or (m.group(0).startswith(".") and not out):
            return None
        bare, quoted, index = m.groups()
        if index is not None:
            out.append(int(index))
        elif quoted is not None:
            try:
                out.append(json.loads(quoted))
            except ValueError:
                return None
        else:
            out.append(bare)
        pos = m.end()
    return tuple(out)


def format_key_path(path: KeyPath) -> str:
    """The loader's text for a key path: ('pool', 'my pool', 'backends', 0) -> 'pool."my pool".backends[0]'."""
    out = ""
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            name = part if _BARE.fullmatch(part) else json.dumps(part, ensure_ascii=False)
            out = f"{out}.{name}" if out else name
    return out
