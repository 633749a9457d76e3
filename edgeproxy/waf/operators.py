"""SecLang operators (`@rx`, `@pm`, ...) compiled once into match functions.

`compile_operator(name, arg, base_dir)` returns `(fn, dynamic)`: `fn(value, arg)`
returns None (no match) or a tuple of captures (the match first). When the
argument holds macros (`%{tx.x}`), `dynamic` is True and the engine passes the
expanded argument per request; otherwise `arg` is ignored. Regular expressions
run in RE2 (linear time); phrase lists in an Aho-Corasick automaton;
`@detectSQLi`/`@detectXSS` in libinjection.
"""

from __future__ import annotations

import ipaddress
import os

import re2

__all__ = ["OperatorError", "compile_operator", "RX_OPTIONS", "UNSUPPORTED"]

try:  # Aho-Corasick for @pm: C, linear in the input and the phrases
    import ahocorasick
except ImportError:  # pragma: no cover - a dependency
    ahocorasick = None

try:  # libinjection's SQLi and XSS tokenizers
    import libinjection
except ImportError:  # pragma: no cover - a dependency
    libinjection = None

# Operators that load but never match (reported by the compiler).
UNSUPPORTED: set[str] = {"geoLookup", "rbl", "gsbLookup", "inspectFile", "fuzzyHash", "verifyCC",
                         "verifyCPF", "verifySSN", "verifySVNR", "rsub"}
if libinjection is None:  # pragma: no cover
    UNSUPPORTED |= {"detectSQLi", "detectXSS"}


class OperatorError(ValueError):
    pass


RX_OPTIONS = re2.Options()
RX_OPTIONS.dot_nl = True  # ModSecurity compiles with PCRE_DOTALL
RX_OPTIONS.max_mem = 64 << 20
RX_OPTIONS.log_errors = False  # errors are raised, with the rule's file and line

_MATCH = ("",)


def compile_rx(pattern: str):
    try:
        return re2.compile(pattern, RX_OPTIONS)
    except re2.error as e:
        raise OperatorError(f"@rx does not compile in RE2: {e}") from None


def _rx(arg: str, capture: bool):
    rx = compile_rx(arg)
    search = rx.search

    if capture:
        def op(v, _a):
            m = search(v)
            if m is None:
                return None
            return (m.group(0),) + tuple(g if g is not None else "" for g in m.groups())[:9]
    else:
        def op(v, _a):
            m = search(v)
            return None if m is None else (m.group(0),)
    return op


def _phrases_automaton(phrases):
    phrases = [p.lower() for p in phrases if p]
    if ahocorasick is None:  # pragma: no cover
        raise OperatorError("@pm needs pyahocorasick")
    a = ahocorasick.Automaton()
    for p in phrases:
        a.add_word(p, p)
    if not phrases:
        return None
    a.make_automaton()
    return a


def _pm_op(a):
    if a is None:
        return lambda v, _a: None
    it = a.iter

    def op(v, _a):
        s = v.lower() if v.isascii() else v.translate(_LOWER)
        for _end, p in it(s):
            return (p,)
        return None
    return op


_LOWER = {c: c + 32 for c in range(65, 91)}


def _pm_from_file(arg: str, base_dir: str):
    phrases: list[str] = []
    for name in arg.split():
        path = name if os.path.isabs(name) else os.path.join(base_dir, name)
        try:
            with open(path, "rb") as f:
                text = f.read().decode("latin-1")
        except OSError as e:
            raise OperatorError(f"@pmFromFile cannot read {path}: {e.strerror}") from None
        for line in text.splitlines():
            line = line.strip()
            if line and not line.startswith("#"):
                phrases.append(line)
    return _pm_op(_phrases_automaton(phrases))


def _to_int(s: str) -> int:
    try:
        return int(s)
    except ValueError:
        pass
    s = s.strip()
    i = 0
    if s[:1] in "+-":
        i = 1
    j = i
    while j < len(s) and s[j].isdigit() and s[j].isascii():
        j += 1
    if j == i:
        return 0
    return int(s[:j])


def _numeric(cmp):
    def op(v, a):
        return (v,) if cmp(_to_int(v), _to_int(a)) else None
    return op


def _byte_ranges(arg: str):
    allowed = bytearray(256)
    for part in arg.replace(",", " ").split():
        lo, _, hi = part.partition("-")
        try:
            lo_i = int(lo)
            hi_i = int(hi) if hi else lo_i
        except ValueError:
            raise OperatorError(f"bad byte range {part!r}") from None
        if not (0 <= lo_i <= hi_i <= 255):
            raise OperatorError(f"bad byte range {part!r}")
        for b in range(lo_i, hi_i + 1):
            allowed[b] = 1
    bad = "".join(chr(b) for b in range(256) if not allowed[b])
    table = str.maketrans("", "", bad)

    def op(v, _a):
        # A value is out of range when deleting the bad bytes changes it.
        return None if len(v.translate(table)) == len(v) else (v,)
    return op


def _validate_url_encoding(v: str, _a):
    i, n = 0, len(v)
    while True:
        i = v.find("%", i)
        if i < 0:
            return None
        if i + 2 >= n:
            return (v,)
        a, b = v[i + 1], v[i + 2]
        if a not in "0123456789abcdefABCDEF" or b not in "0123456789abcdefABCDEF":
            return (v,)
        i += 3


def _validate_utf8(v: str, _a):
    if v.isascii():
        return None
    try:
        v.encode("latin-1").decode("utf-8")  # strict: rejects overlong and surrogates
    except UnicodeDecodeError:
        return (v,)
    return None


def _ip_match(arg: str):
    nets = []
    for part in arg.replace(",", " ").split():
        try:
            nets.append(ipaddress.ip_network(part, strict=False))
        except ValueError:
            raise OperatorError(f"@ipMatch: bad address {part!r}") from None

    def op(v, _a):
        try:
            ip = ipaddress.ip_address(v.strip())
        except ValueError:
            return None
        for n in nets:
            if ip.version == n.version and ip in n:
                return (v,)
        return None
    return op


def _detect_sqli(v, _a):
    if not v:
        return None
    r = libinjection.is_sql_injection(v)
    return (r["fingerprint"],) if r["is_sqli"] else None


def _detect_xss(v, _a):
    if not v:
        return None
    r = libinjection.is_xss(v)
    return (v,) if r["is_xss"] else None


def _contains_word(v, a):
    i = v.find(a)
    while i >= 0:
        before = v[i - 1] if i > 0 else " "
        j = i + len(a)
        after = v[j] if j < len(v) else " "
        if not (before.isalnum() or before == "_") and not (after.isalnum() or after == "_"):
            return (a,)
        i = v.find(a, i + 1)
    return None


def _none(v, _a):
    return None


def compile_operator(name: str, arg: str, base_dir: str, capture: bool = False, dynamic: bool = False):
    """The match function of one operator; `dynamic` when `arg` holds macros."""
    if name == "rx":
        if dynamic:
            raise OperatorError("@rx with a macro in its pattern is not supported")
        return _rx(arg, capture)
    if name == "pm":
        return _pm_op(_phrases_automaton(arg.split()))
    if name in ("pmFromFile", "pmf"):
        return _pm_from_file(arg, base_dir)
    if name == "streq":
        return lambda v, a: (v,) if v == a else None
    if name == "beginsWith":
        return lambda v, a: (a,) if v.startswith(a) else None
    if name == "endsWith":
        return lambda v, a: (a,) if v.endswith(a) else None
    if name == "contains":
        return lambda v, a: (a,) if a in v else None
    if name == "containsWord":
        return _contains_word
    if name == "within":
        return lambda v, a: (v,) if v in a else None
    if name == "strmatch":
        return lambda v, a: (a,) if a in v else None
    if name == "eq":
        return _numeric(lambda x, y: x == y)
    if name == "ge":
        return _numeric(lambda x, y: x >= y)
    if name == "gt":
        return _numeric(lambda x, y: x > y)
    if name == "le":
        return _numeric(lambda x, y: x <= y)
    if name == "lt":
        return _numeric(lambda x, y: x < y)
    if name == "validateByteRange":
        return _byte_ranges(arg)
    if name == "validateUrlEncoding":
        return _validate_url_encoding
    if name == "validateUtf8Encoding":
        return _validate_utf8
    if name == "ipMatch":
        return _ip_match(arg)
    if name == "ipMatchFromFile":
        path = arg if os.path.isabs(arg) else os.path.join(base_dir, arg)
        try:
            with open(path) as f:
                return _ip_match(" ".join(ln.strip() for ln in f if ln.strip() and not ln.startswith("#")))
        except OSError as e:
            raise OperatorError(f"@ipMatchFromFile cannot read {path}: {e.strerror}") from None
    if name == "detectSQLi":
        return _detect_sqli if libinjection is not None else _none
    if name == "detectXSS":
        return _detect_xss if libinjection is not None else _none
    if name == "unconditionalMatch":
        return lambda v, _a: (v,)
    if name == "noMatch" or name in UNSUPPORTED:
        return _none
    raise OperatorError(f"operator @{name} is not supported")
