"""SecLang front end: ModSecurity rule files parsed into plain directive records.

The parser knows the directives, variables, operators, transformations and
actions that the OWASP Core Rule Set (v4, and 3.3) uses. It checks names, not
semantics: the compiler (`edgeproxy.waf.compile`) turns the records into an
evaluation plan. Every error names its file and line (`SecLangError`).
"""

from __future__ import annotations

import glob
import os
from dataclasses import dataclass, field

__all__ = [
    "Action", "Directive", "Operator", "Rule", "SecLangError", "Variable",
    "parse_files", "parse_text", "split_actions", "parse_variables", "parse_operator",
]


class SecLangError(ValueError):
    """A rule file that cannot be loaded: the message starts with `file:line:`."""

    def __init__(self, where: str, line: int, message: str) -> None:
        super().__init__(f"{where}:{line}: {message}")
        self.where = where
        self.line = line
        self.reason = message


# Variables (collections and scalars) the engine knows; the value says whether
# it is a collection (takes :key selectors).
VARIABLES = {
    "ARGS": True, "ARGS_GET": True, "ARGS_POST": True, "ARGS_NAMES": True,
    "ARGS_GET_NAMES": True, "ARGS_POST_NAMES": True, "ARGS_COMBINED_SIZE": False,
    "REQUEST_HEADERS": True, "REQUEST_HEADERS_NAMES": True,
    "REQUEST_COOKIES": True, "REQUEST_COOKIES_NAMES": True,
    "REQUEST_URI": False, "REQUEST_URI_RAW": False, "REQUEST_LINE": False,
    "REQUEST_FILENAME": False, "REQUEST_BASENAME": False, "QUERY_STRING": False,
    "REQUEST_METHOD": False, "REQUEST_PROTOCOL": False, "REQUEST_BODY": False,
    "REQUEST_BODY_LENGTH": False, "REQBODY_PROCESSOR": False, "REQBODY_ERROR": False,
    "REQBODY_ERROR_MSG": False, "REQBODY_PROCESSOR_ERROR": False,
    "FILES": True, "FILES_NAMES": True, "FILES_SIZES": True, "FILES_COMBINED_SIZE": False,
    "FILES_TMPNAMES": True, "MULTIPART_PART_HEADERS": True, "MULTIPART_FILENAME": False,
    "MULTIPART_NAME": False, "MULTIPART_STRICT_ERROR": False,
    "MULTIPART_UNMATCHED_BOUNDARY": False, "MULTIPART_BOUNDARY_QUOTED": False,
    "MULTIPART_BOUNDARY_WHITESPACE": False, "MULTIPART_DATA_BEFORE": False,
    "MULTIPART_DATA_AFTER": False, "MULTIPART_HEADER_FOLDING": False,
    "MULTIPART_LF_LINE": False, "MULTIPART_MISSING_SEMICOLON": False,
    "MULTIPART_INVALID_QUOTING": False, "MULTIPART_INVALID_PART": False,
    "MULTIPART_INVALID_HEADER_FOLDING": False, "MULTIPART_FILE_LIMIT_EXCEEDED": False,
    "MULTIPART_CRLF_LF_LINES": False,
    "XML": True, "TX": True, "IP": True, "GLOBAL": True, "SESSION": True, "USER": True,
    "RESOURCE": True, "ENV": True,
    "MATCHED_VAR": False, "MATCHED_VARS": True, "MATCHED_VAR_NAME": False,
    "MATCHED_VARS_NAMES": True, "REMOTE_ADDR": False, "REMOTE_PORT": False,
    "SERVER_NAME": False, "SERVER_PORT": False, "SERVER_ADDR": False,
    "UNIQUE_ID": False, "DURATION": False, "TIME": False, "TIME_EPOCH": False,
    "RESPONSE_BODY": False, "RESPONSE_HEADERS": True, "RESPONSE_HEADERS_NAMES": True,
    "RESPONSE_STATUS": False, "RESPONSE_PROTOCOL": False, "RESPONSE_CONTENT_TYPE": False,
    "RESPONSE_CONTENT_LENGTH": False, "STATUS_LINE": False, "INBOUND_DATA_ERROR": False,
    "OUTBOUND_DATA_ERROR": False, "FULL_REQUEST": False, "FULL_REQUEST_LENGTH": False,
    "AUTH_TYPE": False, "HIGHEST_SEVERITY": False, "RULE": True, "WEBAPPID": False,
    "URLENCODED_ERROR": False, "GEO": True, "PATH_INFO": False, "REMOTE_HOST": False,
    "USERID": False, "SESSIONID": False,
}

OPERATORS = {
    "rx", "pm", "pmf", "pmFromFile", "streq", "beginsWith", "endsWith", "contains",
    "containsWord", "within", "eq", "ge", "gt", "le", "lt", "validateByteRange",
    "validateUrlEncoding", "validateUtf8Encoding", "ipMatch", "ipMatchFromFile",
    "detectSQLi", "detectXSS", "unconditionalMatch", "noMatch", "strmatch",
    # known, loaded, never match (the engine's load notes say so): no GeoIP
    # database or DNS blocklist lookups at the edge
    "geoLookup", "rbl", "gsbLookup", "inspectFile", "fuzzyHash", "verifyCC",
    "verifyCPF", "verifySSN", "verifySVNR", "rsub",
}

TRANSFORMATIONS = {
    "none", "lowercase", "uppercase", "urlDecode", "urlDecodeUni", "htmlEntityDecode",
    "jsDecode", "cssDecode", "cmdLine", "compressWhitespace", "removeWhitespace",
    "removeNulls", "replaceNulls", "replaceComments", "removeComments", "removeCommentsChar",
    "normalisePath", "normalizePath", "normalisePathWin", "normalizePathWin",
    "utf8toUnicode", "base64Decode", "base64DecodeExt", "base64Encode", "hexDecode",
    "hexEncode", "length", "sha1", "md5", "trim", "trimLeft", "trimRight",
    "escapeSeqDecode", "sqlHexDecode", "urlEncode",
}

# Actions: the value tells whether the action takes an argument
# (True: required, False: none, None: optional).
ACTIONS = {
    "id": True, "phase": True, "chain": False, "deny": False, "block": False,
    "pass": False, "allow": None, "drop": False, "redirect": True, "status": True,
    "log": False, "nolog": False, "auditlog": False, "noauditlog": False,
    "msg": True, "logdata": True, "tag": True, "severity": True, "rev": True,
    "ver": True, "maturity": True, "accuracy": True, "capture": False,
    "setvar": True, "skipAfter": True, "skip": True, "ctl": True, "t": True,
    "multiMatch": False, "initcol": True, "expirevar": True, "setenv": True,
    "setuid": True, "setsid": True, "sanitiseMatched": False, "sanitiseArg": True,
    "sanitiseMatchedBytes": None, "exec": True, "deprecatevar": True, "xmlns": True,
}

CTL_OPTIONS = {
    "ruleRemoveById", "ruleRemoveByTag", "ruleRemoveByMsg", "ruleRemoveTargetById",
    "ruleRemoveTargetByTag", "ruleRemoveTargetByMsg", "ruleEngine",
    "requestBodyProcessor", "requestBodyAccess", "forceRequestBodyVariable",
    "auditEngine", "auditLogParts", "responseBodyAccess", "requestBodyLimit",
    "responseBodyLimit",
}

# Configuration directives that take arguments and are kept as (name, args).
CONFIG_DIRECTIVES = {
    "SecRuleEngine", "SecRequestBodyAccess", "SecResponseBodyAccess",
    "SecRequestBodyLimit", "SecRequestBodyNoFilesLimit", "SecRequestBodyInMemoryLimit",
    "SecRequestBodyLimitAction", "SecRequestBodyJsonDepthLimit", "SecArgumentsLimit",
    "SecResponseBodyLimit", "SecResponseBodyLimitAction", "SecResponseBodyMimeType",
    "SecComponentSignature", "SecCollectionTimeout", "SecPcreMatchLimit",
    "SecPcreMatchLimitRecursion", "SecTmpDir", "SecDataDir", "SecAuditEngine",
    "SecAuditLog", "SecAuditLogParts", "SecAuditLogType", "SecAuditLogRelevantStatus",
    "SecAuditLogFormat", "SecAuditLogStorageDir", "SecDebugLog", "SecDebugLogLevel",
    "SecArgumentSeparator", "SecCookieFormat", "SecUnicodeMapFile", "SecStatusEngine",
    "SecServerSignature", "SecUploadDir", "SecUploadKeepFiles", "SecUploadFileMode",
    "SecTmpSaveUploadedFiles", "SecWebAppId", "SecHttpBlKey", "SecGeoLookupDb",
}

RULE_DIRECTIVES = {"SecRule", "SecAction"}
OTHER_DIRECTIVES = {
    "SecMarker", "SecDefaultAction", "SecRuleRemoveById", "SecRuleRemoveByTag",
    "SecRuleRemoveByMsg", "SecRuleUpdateTargetById", "SecRuleUpdateTargetByTag",
    "SecRuleUpdateTargetByMsg", "SecRuleUpdateActionById",
}


@dataclass(frozen=True)
class Variable:
    """One target: `name[:key]`, `!name:key` (exclusion), `&name` (count)."""

    name: str
    key: str | None = None
    key_regex: bool = False
    exclude: bool = False
    count: bool = False


@dataclass(frozen=True)
class Operator:
    name: str
    arg: str
    negated: bool = False


@dataclass(frozen=True)
class Action:
    name: str
    value: str | None = None


@dataclass
class Rule:
    """A SecRule or SecAction, with its chained rules under `chain`."""

    where: str
    line: int
    variables: list[Variable]
    operator: Operator | None
    actions: list[Action]
    chain: list[Rule] = field(default_factory=list)
    directive: str = "SecRule"

    def first(self, name: str) -> str | None:
        for a in self.actions:
            if a.name == name:
                return a.value
        return None

    def all(self, name: str) -> list[str]:
        return [a.value or "" for a in self.actions if a.name == name]

    @property
    def id(self) -> int | None:
        v = self.first("id")
        return int(v) if v is not None else None

    @property
    def chained(self) -> bool:
        return any(a.name == "chain" for a in self.actions)


@dataclass
class Directive:
    """A directive that is not a rule: `SecMarker`, `SecRuleRemoveById`, config."""

    name: str
    args: list[str]
    where: str
    line: int
    actions: list[Action] = field(default_factory=list)
    variables: list[Variable] = field(default_factory=list)


# ---------------------------------------------------------------- lexing

def _logical_lines(text: str):
    """(line number, text) of each logical line: continuations joined, comments dropped."""
    buf: list[str] = []
    start = 0
    for n, raw in enumerate(text.split("\n"), 1):
        line = raw.rstrip("\r")
        if not buf:
            stripped = line.lstrip()
            if not stripped or stripped.startswith("#"):
                continue
            start = n
        if line.endswith("\\"):
            buf.append(line[:-1])
            continue
        buf.append(line)
        yield start, "".join(buf)
        buf = []
    if buf:
        yield start, "".join(buf)


def _words(s: str, where: str, line: int) -> list[str]:
    """Split a directive line into words; double quotes group, `\\"` is a quote."""
    out: list[str] = []
    i, n = 0, len(s)
    while i < n:
        c = s[i]
        if c in " \t":
            i += 1
            continue
        if c == '"':
            i += 1
            cur: list[str] = []
            while True:
                if i >= n:
                    raise SecLangError(where, line, "unterminated double quote")
                c = s[i]
                if c == "\\" and i + 1 < n and s[i + 1] == '"':
                    cur.append('"')
                    i += 2
                    continue
                if c == '"':
                    i += 1
                    break
                cur.append(c)
                i += 1
            if i < n and s[i] not in " \t":
                raise SecLangError(where, line, "text right after a closing quote")
            out.append("".join(cur))
            continue
        j = i
        while j < n and s[j] not in " \t":
            j += 1
        out.append(s[i:j])
        i = j
    return out


def split_actions(text: str, where: str = "<text>", line: int = 0) -> list[Action]:
    """`id:1,phase:2,msg:'a, b'` into actions; single quotes group a value."""
    acts: list[Action] = []
    i, n = 0, len(text)
    while i < n:
        while i < n and text[i] in " \t,":
            i += 1
        if i >= n:
            break
        j = i
        while j < n and text[j] not in ":,":
            j += 1
        name = text[i:j].strip()
        value: str | None = None
        if j < n and text[j] == ":":
            j += 1
            while j < n and text[j] in " \t":
                j += 1
            if j < n and text[j] == "'":
                j += 1
                cur: list[str] = []
                while True:
                    if j >= n:
                        raise SecLangError(where, line, f"unterminated quote in action {name!r}")
                    c = text[j]
                    if c == "\\" and j + 1 < n and text[j + 1] == "'":
                        cur.append("'")
                        j += 2
                        continue
                    if c == "'":
                        j += 1
                        break
                    cur.append(c)
                    j += 1
                value = "".join(cur)
                while j < n and text[j] in " \t":
                    j += 1
                if j < n and text[j] != ",":
                    raise SecLangError(where, line, f"text after the quoted value of {name!r}")
            else:
                k = j
                while k < n and text[k] != ",":
                    k += 1
                value = text[j:k].strip()
                j = k
        _check_action(name, value, where, line)
        acts.append(Action(name, value))
        i = j + 1
    return acts


def _check_action(name: str, value: str | None, where: str, line: int) -> None:
    if name not in ACTIONS:
        raise SecLangError(where, line, f"unknown action {name!r}")
    need = ACTIONS[name]
    if need is True and value is None:
        raise SecLangError(where, line, f"action {name!r} needs a value")
    if need is False and value is not None:
        raise SecLangError(where, line, f"action {name!r} takes no value")
    if name == "t" and value not in TRANSFORMATIONS:
        raise SecLangError(where, line, f"unknown transformation t:{value}")
    if name == "ctl":
        opt = value.split("=", 1)[0] if value else ""
        if opt not in CTL_OPTIONS:
            raise SecLangError(where, line, f"unknown ctl option {opt!r}")
    if name == "phase" and value not in ("1", "2", "3", "4", "5", "request", "response", "logging"):
        raise SecLangError(where, line, f"bad phase {value!r}")
    if name == "id" and not (value and value.isdigit()):
        raise SecLangError(where, line, f"bad rule id {value!r}")


def parse_variables(text: str, where: str = "<text>", line: int = 0) -> list[Variable]:
    """`ARGS|!ARGS:x|&TX:y|REQUEST_COOKIES:/^re|x$/` into variables."""
    out: list[Variable] = []
    i, n = 0, len(text)
    while i < n:
        j = i
        # Split at '|' outside a /regex/ or 'quoted' key.
        in_re = in_q = False
        colon = False
        while j < n:
            c = text[j]
            if c == "\\" and in_re and j + 1 < n:
                j += 2
                continue
            if colon and not in_re and not in_q and c == "/" and text[j - 1] == ":":
                # a /regex/ key ends with "/" before the next "|" or the end
                in_re = _regex_key_end(text, j) > j
            elif in_re and c == "/" and (j + 1 == n or text[j + 1] == "|"):
                in_re = False
            elif colon and c == "'" and text[j - 1] == ":" and not in_re:
                in_q = True
            elif in_q and c == "'":
                in_q = False
            elif c == ":":
                colon = True
            elif c == "|" and not in_re and not in_q:
                break
            j += 1
        part = text[i:j].strip()
        i = j + 1
        if not part:
            raise SecLangError(where, line, f"empty variable in {text!r}")
        exclude = part.startswith("!")
        count = part.startswith("&")
        if exclude or count:
            part = part[1:]
        name, sep, key = part.partition(":")
        name_u = name.upper()
        if name_u not in VARIABLES:
            raise SecLangError(where, line, f"unknown variable {name!r}")
        if not sep:
            if exclude:
                raise SecLangError(where, line, f"an exclusion needs a key: !{name}")
            out.append(Variable(name_u, None, False, False, count))
            continue
        if not VARIABLES[name_u] and name_u not in ("XML",):
            raise SecLangError(where, line, f"variable {name_u} takes no key")
        if len(key) >= 2 and key[0] == "'" and key[-1] == "'":
            key = key[1:-1]
        is_re = len(key) >= 2 and key[0] == "/" and key[-1] == "/"
        if is_re:
            key = key[1:-1]
        out.append(Variable(name_u, key, is_re, exclude, count))
    return out


def _regex_key_end(text: str, start: int) -> int:
    """Where the /regex/ key starting at `start` closes, or -1 (then it is a plain key)."""
    k = start + 1
    while True:
        k = text.find("/", k)
        if k < 0:
            return -1
        if k + 1 == len(text) or text[k + 1] == "|":
            return k
        k += 1


def parse_operator(text: str, where: str = "<text>", line: int = 0) -> Operator:
    neg = False
    s = text
    if s.startswith("!"):
        neg = True
        s = s[1:]
    if not s.startswith("@"):
        return Operator("rx", s, neg)
    name, _, arg = s[1:].partition(" ")
    if name not in OPERATORS:
        raise SecLangError(where, line, f"unknown operator @{name}")
    return Operator(name, arg.strip() if name not in ("rx",) else arg, neg)


# ---------------------------------------------------------------- parsing

def parse_text(text: str, where: str = "<text>") -> list[Rule | Directive]:
    """Parse one file's text into rules (chains folded) and directives."""
    items: list[Rule | Directive] = []
    open_chain: Rule | None = None
    for line, logical in _logical_lines(text):
        words = _words(logical, where, line)
        if not words:
            continue
        name = words[0]
        args = words[1:]
        if name == "SecRule":
            if len(args) not in (2, 3):
                raise SecLangError(where, line, f"SecRule takes 2 or 3 arguments, got {len(args)}")
            variables = parse_variables(args[0], where, line)
            operator = parse_operator(args[1], where, line)
            actions = split_actions(args[2], where, line) if len(args) == 3 else []
            rule = Rule(where, line, variables, operator, actions)
        elif name == "SecAction":
            if len(args) != 1:
                raise SecLangError(where, line, "SecAction takes 1 argument")
            rule = Rule(where, line, [], None, split_actions(args[0], where, line),
                        directive="SecAction")
        else:
            if open_chain is not None:
                raise SecLangError(where, line, f"{name} inside a chain (the rule above ends in 'chain')")
            items.append(_directive(name, args, where, line))
            continue
        if open_chain is not None:
            for a in rule.actions:
                if a.name in ("id", "phase", "msg", "severity") and a.name in ("id", "phase"):
                    raise SecLangError(where, line, f"a chained rule cannot set {a.name}")
            open_chain.chain.append(rule)
            if not rule.chained:
                open_chain = None
            continue
        if rule.id is None:
            raise SecLangError(where, line, f"{name} without an id")
        items.append(rule)
        if rule.chained:
            open_chain = rule
    if open_chain is not None:
        raise SecLangError(where, open_chain.line, "the chain of this rule is never closed")
    return items


def _directive(name: str, args: list[str], where: str, line: int) -> Directive:
    if name == "SecMarker":
        if len(args) != 1:
            raise SecLangError(where, line, "SecMarker takes 1 argument")
        return Directive(name, args, where, line)
    if name == "SecDefaultAction":
        if len(args) != 1:
            raise SecLangError(where, line, "SecDefaultAction takes 1 argument")
        acts = split_actions(args[0], where, line)
        if not any(a.name == "phase" for a in acts):
            raise SecLangError(where, line, "SecDefaultAction needs a phase")
        return Directive(name, args, where, line, acts)
    if name in ("SecRuleRemoveById", "SecRuleRemoveByTag", "SecRuleRemoveByMsg"):
        if not args:
            raise SecLangError(where, line, f"{name} needs an argument")
        if name == "SecRuleRemoveById":
            for a in args:
                lo, _, hi = a.partition("-")
                if not lo.isdigit() or (hi and not hi.isdigit()):
                    raise SecLangError(where, line, f"bad rule id or range {a!r}")
        return Directive(name, args, where, line)
    if name in ("SecRuleUpdateTargetById", "SecRuleUpdateTargetByTag", "SecRuleUpdateTargetByMsg"):
        if len(args) not in (2, 3):
            raise SecLangError(where, line, f"{name} takes 2 or 3 arguments")
        return Directive(name, args, where, line, variables=parse_variables(args[1], where, line))
    if name == "SecRuleUpdateActionById":
        if len(args) != 2:
            raise SecLangError(where, line, f"{name} takes 2 arguments")
        return Directive(name, args, where, line, split_actions(args[1], where, line))
    if name in CONFIG_DIRECTIVES:
        return Directive(name, args, where, line)
    if name == "Include":
        raise SecLangError(where, line, "Include is not supported: list the files in [waf] rules")
    raise SecLangError(where, line, f"unknown directive {name!r}")


def expand_globs(patterns: list[str]) -> list[str]:
    """Files named by the patterns, each glob's matches sorted, in the order given."""
    files: list[str] = []
    for p in patterns:
        if any(ch in p for ch in "*?["):
            files.extend(sorted(glob.glob(p)))
        else:
            files.append(p)
    return files


def parse_files(paths: list[str]) -> list[Rule | Directive]:
    items: list[Rule | Directive] = []
    for path in paths:
        try:
            with open(path, "rb") as f:
                text = f.read().decode("latin-1")
        except OSError as e:
            raise SecLangError(path, 0, f"cannot read: {e.strerror}") from None
        items.extend(parse_text(text, os.path.relpath(path) if not os.path.isabs(path) else path))
    return items
