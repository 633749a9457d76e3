"""One raw document from a configuration file and the files it includes, with `${ENV}` substituted.

`include = ["conf.d/*.toml", "extra.toml"]` (a top-level key, a string or
an array of strings) reads more files, relative to the including file's
directory.  A glob's matches are read in sorted order and may be none; a
path without a glob character must exist.  Included files may include
others; a cycle, or a file reached twice, is an error.  The order is depth
first: the including file's own keys, then each include in turn (with its
own includes right after it).

Merging: tables merge key by key, arrays of tables (`[[route]]`,
`[[listen]]`) append in that order, and any other key set in two files is
an error naming both (file and line).

After the merge, every string value (not keys, not other types) has
`${NAME}` replaced by the environment variable NAME (an error when it is
not set), `${NAME:-default}` by NAME, or `default` when NAME is unset or
empty, and `$${` by a literal `${`.  This runs on parsed values, so a
variable can never add TOML syntax; a substituted value is not scanned again.

Each key path keeps the file and line it came from (`Composed.where`),
for error messages; see `edgeproxy.config.keylines`.
"""
from __future__ import annotations

import glob
import os
import re
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from edgeproxy.config.keylines import KeyPath, format_key_path, key_lines, parse_key_path

__all__ = ["Composed", "Problem", "compose", "locate", "substitute"]

_GLOB_CHARS = re.compile(r"[*?\[]")
_REFERENCE = re.compile(r"\$\$\{|\$\{(?P<body>[^}]*)(?P<close>\})?")
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


@dataclass(frozen=True)
class Problem:
    """One error: "<key path>: <what is wrong>" (or a file's own message) and where, "file:line"."""

    message: str
    where: str | None = None


class EnvError(ValueError):
    """A string's `${...}` cannot be substituted; the message says why."""


def substitute(value: str, environ: Mapping[str, str]) -> str:
    """`value` with its `${NAME}`, `${NAME:-default}` and `$${` replaced."""
    if "$" not in value:
        return value

    def replace(m: re.Match) -> str:
        if m.group(0) == "$${":
            return "${"
        body = m.group("body")
        if m.group("close") is None:
            raise EnvError('"${" without a closing "}" (write "$${" for a literal "${")')
        name, default_sep, default = body.partition(":-")
        if not _NAME.fullmatch(name):
            raise EnvError(f'"${{{body}}}" is not ${{NAME}} or ${{NAME:-default}} '
                           '(write "$${" for a literal "${")')
        found = environ.get(name)
        if default_sep:
            return found if found else default
        if found is None:
            raise EnvError(f"the environment variable {name} is not set and ${{{name}}} "
                           f"has no default (write ${{{name}:-default}} to give one)")
        return found

    return _REFERENCE.sub(replace, value)


def _is_tables(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(v, dict) for v in value)


@dataclass
class Composed:
    """The merged document, the files read (absolute, in order) and where each key came from."""

    raw: dict
    files: list[str] = field(default_factory=list)
    origins: dict[KeyPath, tuple[str, int]] = field(default_factory=dict)  # -> (shown name, line)

    def where(self, path: KeyPath | str) -> str | None:
        """"file:line" of `path` or of its longest recorded prefix; None when unknown."""
        if isinstance(path, str):
            parsed = parse_key_path(path)
            if parsed is None:
                return None
            path = parsed
        for n in range(len(path), 0, -1):
            found = self.origins.get(path[:n])
            if found:
                return f"{found[0]}:{found[1]}"
        return None


class _Composer:
    def __init__(self, source: str | None, base_dir: str, environ: Mapping[str, str]):
        self.source = source
        self.base_dir = base_dir
        self.environ = environ
        self.result = Composed({})
        self.problems: list[Problem] = []
        self.included_from: dict[str, str] = {}   # realpath -> the name of the file that included it

    def shown(self, path: str) -> str:
        """An included file's name as the user would type it from where `source` was given."""
        rel = os.path.relpath(path, self.base_dir)
        if rel.startswith(os.pardir):
            return path
        if self.source and not os.path.isabs(self.source):
            return os.path.normpath(os.path.join(os.path.dirname(self.source), rel))
        return os.path.join(self.base_dir, rel) if self.source else rel

    def problem(self, message: str, where: str | None = None) -> None:
        self.problems.append(Problem(message, where))

    # --- reading ---------------------------------------------------------------------

    def add_text(self, text: str, name: str, directory: str, stack: tuple[tuple[str, str], ...]) -> None:
        try:
            doc = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            self.problem(f"{name}: invalid TOML: {exc}")
            return
        lines = key_lines(text)

        def where(path: KeyPath) -> str | None:
            for n in range(len(path), 0, -1):
                if path[:n] in lines:
                    return f"{name}:{lines[path[:n]]}"
            return None

        includes = doc.pop("include", [])
        if isinstance(includes, str):
            includes = [includes]
        patterns: list[tuple[int, str]] = []
        if not isinstance(includes, list) or not all(isinstance(i, str) for i in includes):
            self.problem(f"include: expected a path or an array of paths (strings), in {name}",
                         where(("include",)))
        else:
            for i, pattern in enumerate(includes):
                try:
                    patterns.append((i, substitute(pattern, self.environ)))
                except EnvError as exc:
                    self.problem(f"include[{i}]: {exc}", where(("include", i)))
        offsets: dict[KeyPath, int] = {}
        self.merge(self.result.raw, doc, (), name, lines, offsets)
        for lpath, line in lines.items():
            if lpath[:1] != ("include",):
                self.result.origins.setdefault(_translate(lpath, offsets), (name, line))
        for i, pattern in patterns:
            self.add_pattern(pattern, directory, name, stack, where(("include", i)), i)

    def add_pattern(self, pattern: str, directory: str, name: str, stack: tuple[tuple[str, str], ...],
                    at: str | None, index: int) -> None:
        if not pattern:
            self.problem(f"include[{index}]: an empty path, in {name}", at)
            return
        full = os.path.join(directory, os.path.expanduser(pattern))
        if _GLOB_CHARS.search(pattern):
            paths = sorted(p for p in glob.glob(full) if os.path.isfile(p))
        elif not os.path.exists(full):
            self.problem(f"include[{index}]: {pattern!r} not found (looked for "
                         f"{os.path.abspath(full)}; a glob such as \"conf.d/*.toml\" may "
                         "match nothing, a plain path must exist)", at)
            return
        else:
            paths = [full]
        for path in paths:
            self.add_file(os.path.abspath(path), name, stack, at, index)

    def add_file(self, path: str, including: str, stack: tuple[tuple[str, str], ...], at: str | None,
                 index: int) -> None:
        real = os.path.realpath(path)
        shown = self.shown(path)
        if real in (r for r, _ in stack):
            chain = " -> ".join([s for _, s in stack] + [shown])
            self.problem(f"include[{index}]: include cycle: {chain}", at)
            return
        if real in self.included_from:
            self.problem(f"include[{index}]: {shown} is already included by "
                         f"{self.included_from[real]}", at)
            return
        self.included_from[real] = including
        text = self.read(path, shown, at)
        if text is not None:
            self.result.files.append(path)
            self.add_text(text, shown, os.path.dirname(path), stack + ((real, shown),))

    def read(self, path: str, shown: str, at: str | None) -> str | None:
        try:
            with open(path, "rb") as f:
                data = f.read()
        except OSError as exc:
            self.problem(f"{shown}: cannot read: {exc.strerror}", at)
            return None
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError as exc:
            self.problem(f"{shown}: not UTF-8 text (byte {exc.start})", at)
            return None

    # --- merging -----------------------------------------------------------------------

    def merge(self, into: dict, new: dict, path: KeyPath, name: str, lines: dict[KeyPath, int],
              offsets: dict[KeyPath, int]) -> None:
        """Merge one file's table `new` into `into`; `path` is both the local and the
        global path (merging only descends through tables, which have no index)."""
        for key, value in new.items():
            here = path + (key,)
            if key not in into:
                into[key] = value
            elif isinstance(into[key], dict) and isinstance(value, dict):
                self.merge(into[key], value, here, name, lines, offsets)
            elif _is_tables(into[key]) and _is_tables(value):
                offsets[here] = len(into[key])
                into[key].extend(value)
            else:
                before = self.result.where(here) or "an earlier file"
                line = lines.get(here)
                now = f"{name}:{line}" if line else name
                self.problem(f"{format_key_path(here)}: set in {before} and again in {now} "
                             "(only tables merge and arrays of tables append; any other key "
                             "may be set in one file only)", now)

    # --- environment --------------------------------------------------------------------

    def substitute_all(self, value: Any, path: KeyPath) -> Any:
        if isinstance(value, str):
            try:
                return substitute(value, self.environ)
            except EnvError as exc:
                self.problem(f"{format_key_path(path)}: {exc}", self.result.where(path))
                return value
        if isinstance(value, dict):
            return {k: self.substitute_all(v, path + (k,)) for k, v in value.items()}
        if isinstance(value, list):
            return [self.substitute_all(v, path + (i,)) for i, v in enumerate(value)]
        return value


def _translate(path: KeyPath, offsets: dict[KeyPath, int]) -> KeyPath:
    """A key path in one file -> its path in the merged document (arrays of tables shifted)."""
    if not offsets:
        return path
    out = list(path)
    for i, part in enumerate(path):
        if isinstance(part, int) and path[:i] in offsets:
            out[i] = part + offsets[path[:i]]
    return tuple(out)


def compose(text: str, source: str | None, base_dir: str,
            environ: Mapping[str, str] | None = None) -> tuple[Composed, list[Problem]]:
    """Read `text` (the file `source`, relative paths against `base_dir`) and its includes.

    Returns the composed document and the problems found (none: it is usable).
    """
    composer = _Composer(source, base_dir, os.environ if environ is None else environ)
    name = source or "<config>"
    real = os.path.realpath(source) if source else "<config>"
    if source:
        composer.result.files.append(os.path.abspath(source))
        composer.included_from[real] = name
    composer.add_text(text, name, base_dir, ((real, name),))
    if not composer.problems:
        composer.result.raw = composer.substitute_all(composer.result.raw, ())
    return composer.result, composer.problems


def locate(source: str) -> Callable[[str], str | None]:
    """For problems found after loading (certificates that do not load, ...):
    "<key path>: ..." -> the "file:line" of its key, by reading `source` and its
    includes again; a function that knows nothing when they cannot be read."""
    try:
        with open(source, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError):
        return lambda problem: None
    composed, _ = compose(text, source, os.path.dirname(os.path.abspath(source)))
    return lambda problem: composed.where(problem.partition(": ")[0])
