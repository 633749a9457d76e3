"""The firewall engine: SecLang rules compiled once into a plan, evaluated per request.

`Engine.load(paths)` parses the files (`seclang`), applies the load-time
exclusions (SecRuleRemoveById/ByTag, SecRuleUpdateTargetById/ByTag) and
compiles every rule: targets into extractor records, transformations into a
tuple of functions, the operator into a match function (`operators`), actions
into flags, compiled macros and setvar records. `Engine.transaction(request)`
returns a `Transaction`, whose `run_request()` evaluates phases 1 and 2 (the
body processed between them) and `run_response()` phases 3 and 4, as
ModSecurity v3 does: setvar and capture per matching value, the other actions
after a whole chain matched, skipAfter to a marker within the phase.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field

import re2

from . import bodies
from .operators import UNSUPPORTED, OperatorError, compile_operator, compile_rx
from .seclang import VARIABLES as _IS_COLLECTION
from .seclang import Directive, Rule, SecLangError, Variable, expand_globs, parse_files
from .transforms import TRANSFORMS

__all__ = ["Engine", "Request", "Transaction", "Verdict"]

_PHASES = {"1": 1, "2": 2, "3": 3, "4": 4, "5": 5, "request": 2, "response": 4, "logging": 5}
_DISRUPTIVE = ("deny", "block", "pass", "allow", "drop", "redirect")
_KEY_OPTIONS = re2.Options()
_KEY_OPTIONS.case_sensitive = False
_KEY_OPTIONS.dot_nl = True


@dataclass
class Request:
    """A request as the firewall sees it: latin-1 str fields (one code point per byte)."""

    method: str
    uri: str
    version: str = "1.1"
    headers: list[tuple[str, str]] = field(default_factory=list)
    body: str = ""
    remote_addr: str = "127.0.0.1"
    remote_port: int = 0
    server_port: int = 80
    request_id: str = ""


@dataclass
class Verdict:
    """What one transaction decided, and what to write to the audit log."""

    action: str  # pass | block | detect
    status: int
    rule_ids: list[int]
    messages: list[str]
    anomaly_score: int


# ------------------------------------------------------------------ macros

class Macro:
    """A text with %{VAR.key} parts, resolved per transaction."""

    __slots__ = ("parts", "static")

    def __init__(self, text: str) -> None:
        parts: list = []
        i = 0
        while True:
            j = text.find("%{", i)
            if j < 0:
                break
            k = text.find("}", j)
            if k < 0:
                break
            if j > i:
                parts.append(text[i:j])
            ref = text[j + 2:k]
            name, _, key = ref.partition(".")
            parts.append((name.upper(), key))
            i = k + 1
        if i < len(text):
            parts.append(text[i:])
        self.parts = tuple(parts)
        self.static = text if all(isinstance(p, str) for p in parts) else None

    def expand(self, tx: Transaction) -> str:
        if self.static is not None:
            return self.static
        out = []
        for p in self.parts:
            if isinstance(p, str):
                out.append(p)
            else:
                out.append(tx.macro_value(p[0], p[1]))
        return "".join(out)


# ------------------------------------------------------------------ compiled records

class Target:
    __slots__ = ("name", "key", "key_re", "count", "excludes", "sig")

    def __init__(self, v: Variable) -> None:
        self.name = v.name
        self.count = v.count
        self.key = None
        self.key_re = None
        if v.key is not None:
            if v.key_regex:
                try:
                    self.key_re = re2.compile(v.key, _KEY_OPTIONS)
                except re2.error as e:
                    raise OperatorError(f"variable key /{v.key}/ does not compile in RE2: {e}") from None
            else:
                self.key = v.key.lower()
        self.excludes: list = []  # (key lowercased | None, compiled re | None)
        self.sig = None  # set by Engine once exclusions are final: the per-request cache key

    def seal(self) -> None:
        self.sig = (self.name, self.key, self.key_re.pattern if self.key_re is not None else None,
                    self.count, tuple((k, r.pattern if r is not None else None) for k, r in self.excludes))


def _exclude_record(v: Variable):
    if v.key_regex:
        return (None, re2.compile(v.key, _KEY_OPTIONS))
    return (v.key.lower() if v.key is not None else None, None)


class SetVar:
    __slots__ = ("delete", "collection", "key", "op", "value")

    def __init__(self, text: str, where: str, line: int) -> None:
        self.delete = text.startswith("!")
        if self.delete:
            text = text[1:]
        name, eq, value = text.partition("=")
        coll, dot, key = name.partition(".")
        if not dot:
            raise SecLangError(where, line, f"setvar needs collection.name: {text!r}")
        self.collection = coll.upper()
        self.key = Macro(key.lower())
        self.op = "="
        if eq and value[:1] in "+-" and len(value) > 1:
            self.op = value[0]
            value = value[1:]
        self.value = Macro(value if eq else "1")


class Ctl:
    __slots__ = ("option", "value", "ids", "target")

    def __init__(self, text: str, where: str, line: int) -> None:
        opt, _, value = text.partition("=")
        self.option = opt
        self.value = value
        self.ids = None
        self.target = None
        if opt in ("ruleRemoveTargetById", "ruleRemoveTargetByTag", "ruleRemoveTargetByMsg"):
            what, _, var = value.partition(";")
            if not var:
                raise SecLangError(where, line, f"ctl:{opt} needs id;VARIABLE")
            from .seclang import parse_variables
            self.value = what
            self.target = parse_variables(var, where, line)[0]
            if opt == "ruleRemoveTargetById":
                self.ids = _id_ranges(what, where, line)
        elif opt == "ruleRemoveById":
            self.ids = _id_ranges(value, where, line)


def _id_ranges(text: str, where: str, line: int) -> list[tuple[int, int]]:
    out = []
    for part in text.replace(",", " ").split():
        lo, _, hi = part.partition("-")
        try:
            out.append((int(lo), int(hi) if hi else int(lo)))
        except ValueError:
            raise SecLangError(where, line, f"bad rule id or range {part!r}") from None
    return out


class CRule:
    """One compiled rule (a chain is a linked list through `chain`)."""

    __slots__ = ("id", "phase", "where", "line", "targets", "op", "op_arg", "op_dynamic",
                 "op_name", "negated", "transforms", "tkey", "multi", "capture", "chain",
                 "setvars", "msg", "logdata", "tags", "severity", "log", "auditlog",
                 "disruptive", "status", "skip_after", "skip", "ctls", "is_action",
                 "marker", "unsupported", "set_gid", "set_index", "rx_pattern")

    def __init__(self) -> None:
        self.marker = None
        self.chain = None
        self.unsupported = None
        self.set_gid = -1
        self.set_index = -1
        self.rx_pattern = None


# ------------------------------------------------------------------ the engine

class Engine:
    """Rules compiled once; `transaction()` per request."""

    def __init__(self) -> None:
        self.phases: dict[int, list[CRule]] = {1: [], 2: [], 3: [], 4: [], 5: []}
        self.markers: dict[int, dict[str, int]] = {p: {} for p in self.phases}
        self.config: dict[str, str] = {}
        self.defaults: dict[int, dict] = {}
        self.notes: list[str] = []
        self.rule_count = 0
        self.engine_mode = "On"
        self.arguments_limit = 1000
        self.json_depth = 512
        self.load_seconds = 0.0
        self.strict = True
        self._tcache_ids: dict[tuple, int] = {}
        self._all: list[CRule] = []
        self._rx_rules: list[CRule] = []
        self.sets: list = []

    # -- loading

    @classmethod
    def load(cls, patterns: list[str], extra_text: str | None = None, strict: bool = True) -> Engine:
        """Parse and compile rule files (globs expanded in order).

        `strict`: a pattern RE2 cannot run (a lookbehind, a backreference) is
        an error; otherwise the rule loads as never matching and is listed in
        `notes`.
        """
        from .seclang import parse_text
        t0 = time.perf_counter()
        items = []
        if extra_text is not None:
            items.extend(parse_text(extra_text, "<config>"))
        items.extend(parse_files(expand_globs(patterns)))
        eng = cls()
        eng.strict = strict
        eng._compile(items)
        eng.load_seconds = time.perf_counter() - t0
        return eng

    @classmethod
    def from_items(cls, items) -> Engine:
        eng = cls()
        eng._compile(items)
        return eng

    def _compile(self, items) -> None:
        # Default actions per phase, as seen when each rule is defined.
        defaults: dict[int, list] = {}
        removals: list[Directive] = []
        rules: list[tuple[Rule, dict]] = []
        for it in items:
            if isinstance(it, Rule):
                rules.append((it, dict(defaults)))
            elif it.name == "SecDefaultAction":
                ph = _PHASES[next(a.value for a in it.actions if a.name == "phase")]
                defaults[ph] = it.actions
            elif it.name == "SecMarker":
                rules.append((it, {}))
            elif it.name.startswith("SecRuleRemove") or it.name.startswith("SecRuleUpdate"):
                removals.append(it)
            else:
                self.config[it.name] = " ".join(it.args)
                if it.name == "SecRuleEngine":
                    if it.args[0] not in ("On", "Off", "DetectionOnly"):
                        raise SecLangError(it.where, it.line, f"SecRuleEngine {it.args[0]!r}: On, Off or DetectionOnly")
                    self.engine_mode = it.args[0]
                elif it.name == "SecArgumentsLimit":
                    self.arguments_limit = _int_arg(it)
                elif it.name == "SecRequestBodyJsonDepthLimit":
                    self.json_depth = _int_arg(it)
        compiled: list[CRule] = []
        for r, dflt in rules:
            if isinstance(r, Directive):
                m = CRule()
                m.marker = r.args[0]
                m.id = 0
                compiled.append(m)
                continue
            compiled.append(self._compile_rule(r, dflt, None))
        self._build_sets()
        by_id = {c.id: c for c in compiled if c.marker is None}
        removed: set[int] = set()
        for d in removals:
            self._apply_removal(d, compiled, by_id, removed)
        for c in compiled:
            link = c
            while link is not None and link.marker is None:
                for t in link.targets:
                    t.seal()
                link = link.chain
        for c in compiled:
            if c.marker is not None:
                for p in self.phases:  # markers belong to every phase
                    self.markers[p][c.marker] = len(self.phases[p])
                    self.phases[p].append(c)
                continue
            if c.id in removed:
                continue
            self.phases[c.phase].append(c)
            self.rule_count += 1
            self._all.append(c)

    def _apply_removal(self, d: Directive, compiled, by_id, removed: set[int]) -> None:
        rules = [c for c in compiled if c.marker is None]
        if d.name == "SecRuleRemoveById":
            for lo, hi in _id_ranges(" ".join(d.args), d.where, d.line):
                removed.update(c.id for c in rules if lo <= c.id <= hi)
        elif d.name == "SecRuleRemoveByTag":
            for c in rules:
                if any(re2.search(d.args[0], t) for t in c.tags):
                    removed.add(c.id)
        elif d.name == "SecRuleRemoveByMsg":
            for c in rules:
                if c.msg is not None and d.args[0] in (c.msg.static or ""):
                    removed.add(c.id)
        elif d.name in ("SecRuleUpdateTargetById", "SecRuleUpdateTargetByTag", "SecRuleUpdateTargetByMsg"):
            if d.name == "SecRuleUpdateTargetById":
                ranges = _id_ranges(d.args[0], d.where, d.line)
                chosen = [c for c in rules if any(lo <= c.id <= hi for lo, hi in ranges)]
            elif d.name == "SecRuleUpdateTargetByTag":
                chosen = [c for c in rules if any(re2.search(d.args[0], t) for t in c.tags)]
            else:
                chosen = [c for c in rules if c.msg is not None and d.args[0] in (c.msg.static or "")]
            for c in chosen:
                for v in d.variables:
                    if v.exclude:
                        for t in c.targets:
                            if t.name == v.name:
                                t.excludes.append(_exclude_record(v))
                    else:
                        c.targets = c.targets + (Target(v),)
        elif d.name == "SecRuleUpdateActionById":
            self.notes.append(f"{d.where}:{d.line}: SecRuleUpdateActionById is not supported yet; ignored")

    def _compile_rule(self, r: Rule, dflt: dict, parent: CRule | None) -> CRule:
        c = CRule()
        c.where, c.line = r.where, r.line
        c.is_action = r.directive == "SecAction"
        acts = r.actions
        if parent is None:
            c.id = r.id
            ph = r.first("phase")
            c.phase = _PHASES[ph] if ph else 2
        else:
            c.id = parent.id
            c.phase = parent.phase
        d_acts = dflt.get(c.phase, []) if parent is None else []
        # transformations: the defaults', then the rule's; t:none clears.
        chain_t: list[str] = []
        for a in list(d_acts) + list(acts):
            if a.name == "t":
                if a.value == "none":
                    chain_t = []
                else:
                    chain_t.append(a.value)
        c.transforms = tuple(TRANSFORMS[n] for n in chain_t)
        key = tuple(chain_t)
        c.tkey = self._tcache_ids.setdefault(key, len(self._tcache_ids))
        names = {a.name for a in acts}
        c.multi = "multiMatch" in names
        c.capture = "capture" in names
        c.setvars = tuple(SetVar(a.value, r.where, r.line) for a in acts if a.name == "setvar")
        c.ctls = tuple(Ctl(a.value, r.where, r.line) for a in acts if a.name == "ctl")
        msg = r.first("msg")
        logdata = r.first("logdata")
        c.msg = Macro(msg) if msg is not None else None
        c.logdata = Macro(logdata) if logdata is not None else None
        c.tags = tuple(r.all("tag")) if parent is None else parent.tags  # a link is its rule's
        c.severity = r.first("severity")
        # log / disruptive: the rule's own, else the phase default's.
        d_names = {a.name for a in d_acts}
        if "nolog" in names:
            c.log = False
        elif "log" in names:
            c.log = True
        else:
            c.log = "nolog" not in d_names if parent is None else True
        c.auditlog = "noauditlog" not in names
        disr = [a.name for a in acts if a.name in _DISRUPTIVE]
        d_disr = [a.name for a in d_acts if a.name in _DISRUPTIVE]
        dis = disr[-1] if disr else None
        if dis == "block" or (dis is None and parent is None):
            dis = d_disr[-1] if d_disr else "pass"
            if dis == "block":
                dis = "pass"
        c.disruptive = dis
        st = r.first("status")
        if st is None:
            st = next((a.value for a in d_acts if a.name == "status"), None)
        c.status = int(st) if st else 403
        c.skip_after = r.first("skipAfter")
        sk = r.first("skip")
        c.skip = int(sk) if sk else 0
        # targets and operator
        c.targets = ()
        tlist = []
        excl: list[Variable] = []
        for v in r.variables:
            if v.exclude:
                excl.append(v)
            else:
                tlist.append(Target(v))
        for v in excl:
            for t in tlist:
                if t.name == v.name:
                    t.excludes.append(_exclude_record(v))
        c.targets = tuple(tlist)
        if r.operator is None:
            c.op = None
            c.op_name = None
            c.negated = False
            c.op_arg = None
            c.op_dynamic = False
        else:
            op = r.operator
            c.op_name = op.name
            c.negated = op.negated
            dynamic = "%{" in op.arg and op.name != "rx"
            base = os.path.dirname(r.where) if r.where and not r.where.startswith("<") else "."
            try:
                c.op = compile_operator(op.name, op.arg, base, c.capture, dynamic)
            except OperatorError as e:
                if self.strict or op.name != "rx":
                    raise SecLangError(r.where, r.line, str(e)) from None
                # Lenient loading (CRS 3.3's lookbehind in 920120): the rule loads,
                # never matches, and the load notes name it.
                c.op = compile_operator("noMatch", "", base)
                op = type(op)("noMatch", "", op.negated)
                c.unsupported = f"{e}; never matches"
                self.notes.append(f"{r.where}:{r.line}: rule {c.id}: {c.unsupported}")
            c.op_name = op.name
            c.op_dynamic = dynamic
            c.op_arg = Macro(op.arg) if dynamic else op.arg
            if op.name == "rx":
                c.rx_pattern = op.arg
                self._rx_rules.append(c)
            if op.name in UNSUPPORTED:
                c.unsupported = f"@{op.name} is not supported; never matches"
                self.notes.append(f"{r.where}:{r.line}: rule {c.id}: {c.unsupported}")
        if r.chain and parent is None:
            prev = c
            for link in r.chain:
                nxt = self._compile_rule(link, {}, c)
                prev.chain = nxt
                prev = nxt
        return c

    def _build_sets(self) -> None:
        """One RE2 set per transformation chain over its rules' @rx patterns.

        A value is matched once against its chain's set (cached per
        transaction); a rule then runs its own pattern only when the set says
        it matches and it needs the captures.
        """
        groups: dict[int, list[CRule]] = {}
        for c in self._rx_rules:
            groups.setdefault(c.tkey, []).append(c)
        from .operators import RX_OPTIONS
        for rules in groups.values():
            st = re2.Set.SearchSet(RX_OPTIONS)
            for i, c in enumerate(rules):
                if st.Add(c.rx_pattern) != i:
                    raise SecLangError(c.where, c.line, "pattern not accepted by an RE2 set")
            try:
                if st.Compile() is False:
                    continue  # too large for one set: the rules run their own patterns
            except re2.error:
                continue
            gid = len(self.sets)
            self.sets.append(st)
            for i, c in enumerate(rules):
                c.set_gid = gid
                c.set_index = i

    def rule_ids(self) -> list[int]:
        return [c.id for c in self._all]

    def transaction(self, request: Request) -> Transaction:
        return Transaction(self, request)


def _int_arg(d: Directive) -> int:
    try:
        return int(d.args[0])
    except (ValueError, IndexError):
        raise SecLangError(d.where, d.line, f"{d.name} takes a number") from None


# ------------------------------------------------------------------ a transaction

_MATCHED = ("",)
# Collections that change while a phase runs: never cached.
_VOLATILE = frozenset(("TX", "MATCHED_VARS", "MATCHED_VAR", "MATCHED_VAR_NAME"))
_SCALARS_REQ = ("REQUEST_METHOD", "REQUEST_PROTOCOL", "REQUEST_LINE", "REQUEST_URI",
                "REQUEST_URI_RAW", "REQUEST_FILENAME", "REQUEST_BASENAME", "QUERY_STRING")


class Transaction:
    """The state of one request's evaluation: collections, TX, matches, removals."""

    def __init__(self, engine: Engine, req: Request) -> None:
        self.engine = engine
        self.req = req
        self.mode = engine.engine_mode
        self.tx: dict[str, str] = {}
        self.coll: dict[str, list[tuple[str, str]]] = {}
        self.scalars: dict[str, str] = {}
        self.matched_var = ""
        self.matched_var_name = ""
        self.matched_vars: list[tuple[str, str]] = []
        self.rule_ids: list[int] = []
        self.messages: list[str] = []
        self.details: list[tuple[int, str, str]] = []  # (rule id, msg, logdata) per logged match
        self.removed_ids: list[tuple[int, int]] = []
        self.removed_tags: list[str] = []
        self.removed_targets: list = []  # (ranges | None, tag | None, Variable)
        self.removed_names: set[str] = set()
        self.body_processor = ""
        self.interrupted = False
        self.status = 200
        self.allowed = False
        self.tcache: dict = {}
        self.scache: dict = {}
        self.vcache: dict = {}
        self.current_rule: CRule | None = None
        self._setup_request()

    # -- request variables

    def _setup_request(self) -> None:
        req = self.req
        s = self.scalars
        uri = req.uri
        s["REQUEST_METHOD"] = req.method
        s["REQUEST_PROTOCOL"] = "HTTP/" + req.version
        s["REQUEST_LINE"] = f"{req.method} {uri} HTTP/{req.version}"
        s["REQUEST_URI_RAW"] = uri
        decoded = _uri_decode(uri)
        qpos = decoded.find("?")
        path_info = decoded if qpos < 0 else decoded[:qpos]
        raw_q = uri.find("?")
        if raw_q >= 0:
            s["QUERY_STRING"] = uri[raw_q + 1:]
        s["REQUEST_FILENAME"] = path_info
        off = max(path_info.rfind("/"), path_info.rfind("\\"))
        if off >= 0 and len(path_info) > off + 1:
            s["REQUEST_BASENAME"] = path_info[off + 1:]
        parsed = decoded
        if decoded and decoded[0] != "/":
            c = decoded.find(":")
            if c >= 0 and decoded.startswith("//", c + 1):
                p = decoded.find("/", c + 3)
                if p >= 0:
                    parsed = decoded[p:]
        s["REQUEST_URI"] = parsed
        s["REMOTE_ADDR"] = req.remote_addr
        s["REMOTE_PORT"] = str(req.remote_port)
        s["SERVER_PORT"] = str(req.server_port)
        s["UNIQUE_ID"] = req.request_id
        s["INBOUND_DATA_ERROR"] = "0"
        heads: list[tuple[str, str]] = []
        names: list[tuple[str, str]] = []
        cookies: list[tuple[str, str]] = []
        for k, v in req.headers:
            heads.append((k, v))
            names.append((k, k))
            kl = k.lower()
            if kl == "cookie":
                bodies.parse_cookies(v, cookies)
            elif kl == "content-type":
                lv = v.lower()
                if lv.startswith("multipart/form-data"):
                    self.body_processor = "MULTIPART"
                elif lv.startswith("application/x-www-form-urlencoded"):
                    self.body_processor = "URLENCODED"
            elif kl == "host":
                s["SERVER_NAME"] = v.split(":", 1)[0]
        if self.body_processor:
            s["REQBODY_PROCESSOR"] = self.body_processor
        self.coll["REQUEST_HEADERS"] = heads
        self.coll["REQUEST_HEADERS_NAMES"] = names
        self.coll["REQUEST_COOKIES"] = cookies
        self.coll["REQUEST_COOKIES_NAMES"] = [(k, k) for k, _ in cookies]
        get: list[tuple[str, str]] = []
        if "QUERY_STRING" in s and s["QUERY_STRING"]:
            get, bad = bodies.parse_urlencoded(s["QUERY_STRING"], self.engine.arguments_limit)
            if bad:
                s["URLENCODED_ERROR"] = "1"
        self._set_args(get, [])

    def _set_args(self, get, post) -> None:
        self.vcache.clear()
        c = self.coll
        c["ARGS_GET"] = get
        c["ARGS_POST"] = post
        args = get + post
        lim = self.engine.arguments_limit
        if len(args) > lim:
            args = args[:lim]
        c["ARGS"] = args
        c["ARGS_NAMES"] = [(k, k) for k, _ in args]
        c["ARGS_GET_NAMES"] = [(k, k) for k, _ in get]
        c["ARGS_POST_NAMES"] = [(k, k) for k, _ in post]
        self.scalars["ARGS_COMBINED_SIZE"] = str(sum(len(k) + len(v) for k, v in args))

    def process_body(self) -> None:
        req = self.req
        s = self.scalars
        body = req.body
        proc = self.body_processor
        err = ""
        ctype = ""
        for k, v in req.headers:
            if k.lower() == "content-type":
                ctype = v
                break
        if proc == "URLENCODED":
            post, bad = bodies.parse_urlencoded(body, self.engine.arguments_limit)
            if bad:
                s["URLENCODED_ERROR"] = "1"
            self._set_args(self.coll["ARGS_GET"], post)
        elif proc == "JSON":
            post, err = bodies.parse_json(body, self.engine.json_depth)
            self._set_args(self.coll["ARGS_GET"], post)
        self.vcache.clear()
        if proc == "XML":
            text, attrs, err = bodies.parse_xml(body)
            if not err:
                self.coll["XML"] = [("/*", text)] + [("//@*", a) for a in attrs]
        if proc == "MULTIPART":
            mp = bodies.parse_multipart(ctype, body)
            err = "Multipart parsing error: " + mp.error if mp.error else ""
            self._set_args(self.coll["ARGS_GET"], mp.args)
            self.coll["FILES"] = mp.files
            self.coll["FILES_NAMES"] = [(k, k) for k, _ in mp.files]
            self.coll["FILES_SIZES"] = mp.files_sizes
            self.coll["MULTIPART_PART_HEADERS"] = mp.part_headers
            s["FILES_COMBINED_SIZE"] = str(sum(int(v) for _, v in mp.files_sizes))
            s["MULTIPART_FILENAME"] = mp.filename
            s["MULTIPART_NAME"] = mp.name
            for f in bodies._FLAGS:
                s[f] = str(mp.flags.get(f, 0))
            s["MULTIPART_STRICT_ERROR"] = str(bodies.strict_error(mp))
        if proc and proc not in ("URLENCODED", "JSON", "XML", "MULTIPART"):
            err = f"Unknown request body processor: {proc}"
        self.vcache.clear()
        s["REQBODY_ERROR"] = "1" if err else "0"
        s["REQBODY_PROCESSOR_ERROR"] = s["REQBODY_ERROR"]
        if err:
            s["REQBODY_ERROR_MSG"] = err
            s["REQBODY_PROCESSOR_ERROR_MSG"] = err
        if body:
            s["REQUEST_BODY"] = body
            s["REQUEST_BODY_LENGTH"] = str(len(body))
        s.setdefault("FILES_COMBINED_SIZE", "0")

    def set_response(self, status: int, headers: list[tuple[str, str]], body: str = "",
                     protocol: str = "HTTP/1.1") -> None:
        self.vcache.clear()
        s = self.scalars
        s["RESPONSE_STATUS"] = str(status)
        s["RESPONSE_PROTOCOL"] = protocol
        self.coll["RESPONSE_HEADERS"] = list(headers)
        self.coll["RESPONSE_HEADERS_NAMES"] = [(k, k) for k, _ in headers]
        for k, v in headers:
            if k.lower() == "content-type":
                s["RESPONSE_CONTENT_TYPE"] = v.split(";", 1)[0]
            elif k.lower() == "content-length":
                s["RESPONSE_CONTENT_LENGTH"] = v
        if body:
            s["RESPONSE_BODY"] = body

    # -- values of a target

    def _source(self, name: str):
        """(vname, lowercased key, value) triples of a collection, cached per transaction."""
        got = self.vcache.get(name)
        if got is not None:
            return got
        if name == "TX":
            return [(f"TX:{k}", k, v) for k, v in self.tx.items()]
        if name == "MATCHED_VARS":
            return [(n, n.partition(":")[2].lower(), v) for n, v in self.matched_vars]
        src = self.coll.get(name)
        if src is None:
            return None
        got = [(f"{name}:{k}", k.lower(), v) for k, v in src]
        self.vcache[name] = got
        return got

    def values(self, t: Target, rule: CRule) -> list[tuple[str, str]]:
        name = t.name
        if name in _VOLATILE or (self.removed_targets and name in self.removed_names):
            return self._values(t, rule)
        got = self.vcache.get(t.sig)
        if got is None:
            got = self.vcache[t.sig] = self._values(t, rule)
        return got

    def _values(self, t: Target, rule: CRule) -> list[tuple[str, str]]:
        name = t.name
        key = t.key
        if name == "TX" and key is not None and t.key_re is None:
            v = self.tx.get(key)
            sel = [] if v is None else [(f"TX:{key}", key, v)]
        elif name == "MATCHED_VAR":
            return [("", "1")] if t.count else [("MATCHED_VAR", self.matched_var)]
        elif name == "MATCHED_VAR_NAME":
            return [("MATCHED_VAR_NAME", self.matched_var_name)]
        else:
            src = self._source(name)
            if src is None:
                if self.removed_targets and name in self.removed_names and \
                        not self._runtime_excludes(name, [(name, "", "")], rule):
                    return [(name, "0")] if t.count else []
                if name in self.scalars:
                    return [(name, "1")] if t.count else [(name, self.scalars[name])]
                if t.count:
                    return [(name, "0")]
                # ModSecurity's anchored (single-value) variables always exist, empty by default.
                return [] if _IS_COLLECTION.get(name, True) else [(name, "")]
            if key is not None:
                sel = [x for x in src if x[1] == key]
            elif t.key_re is not None:
                srch = t.key_re.search
                n0 = len(name) + 1
                sel = [x for x in src if srch(x[0][n0:])]
            else:
                sel = src
        if t.excludes:
            sel = [x for x in sel if not _excluded3(x, len(name) + 1, t.excludes)]
        if self.removed_targets and name in self.removed_names:
            sel = self._runtime_excludes(name, sel, rule)
        if t.count:
            return [(name, str(len(sel)))]
        return [(x[0], x[2]) for x in sel]

    def _runtime_excludes(self, name, sel, rule: CRule):
        for ranges, tag, v in self.removed_targets:
            if v.name != name:
                continue
            if ranges is not None and not any(lo <= rule.id <= hi for lo, hi in ranges):
                continue
            if tag is not None and tag not in rule.tags:
                continue
            if v.key is None:
                return []  # the whole variable is removed from this rule
            rec = [_exclude_record(v)]
            sel = [x for x in sel if not _excluded3(x, len(name) + 1, rec)]
        return sel

    # -- macros

    def macro_value(self, name: str, key: str) -> str:
        if name == "TX":
            return self.tx.get(key.lower(), "")
        if name == "MATCHED_VAR":
            return self.matched_var
        if name == "MATCHED_VAR_NAME":
            return self.matched_var_name
        if name == "RULE":
            r = self.current_rule
            k = key.lower()
            if r is None:
                return ""
            if k == "id":
                return str(r.id)
            if k == "msg":
                return r.msg.expand(self) if r.msg else ""
            if k == "severity":
                return r.severity or ""
            return ""
        if name in self.coll:
            kl = key.lower()
            for k, v in self.coll[name]:
                if k.lower() == kl:
                    return v
            return ""
        return self.scalars.get(name, "")

    # -- evaluation

    def run_request(self) -> None:
        self.run_phase(1)
        if self.interrupted or self.allowed:
            return
        self.process_body()
        self.run_phase(2)

    def run_response(self) -> None:
        if self.interrupted or self.allowed:
            return
        self.run_phase(3)
        if not self.interrupted:
            self.run_phase(4)

    def run_phase(self, phase: int) -> None:
        if self.mode == "Off":
            return
        rules = self.engine.phases[phase]
        markers = self.engine.markers[phase]
        i, n = 0, len(rules)
        while i < n:
            r = rules[i]
            i += 1
            if r.marker is not None:
                continue
            if self.removed_ids and any(lo <= r.id <= hi for lo, hi in self.removed_ids):
                continue
            if self.removed_tags and any(t in self.removed_tags for t in r.tags):
                continue
            self.matched_vars = []
            if not self._eval(r):
                continue
            self._after_match(r)
            if self.interrupted or self.allowed:
                return
            if r.skip_after is not None:
                j = markers.get(r.skip_after)
                if j is not None and j >= i:
                    i = j + 1
                else:
                    i = n if j is None else i
            elif r.skip:
                k = r.skip
                while k > 0 and i < n:
                    if rules[i].marker is None:
                        k -= 1
                    i += 1

    def _eval(self, r: CRule) -> bool:
        self.current_rule = r
        if r.op is None:  # SecAction
            self._independent(r)
            return True
        hit = False
        arg = r.op_arg.expand(self) if r.op_dynamic else r.op_arg
        op = r.op
        neg = r.negated
        gid = r.set_gid
        scache = self.scache
        sets = self.engine.sets
        for t in r.targets:
            for vname, value in self.values(t, r):
                if r.transforms:
                    vals = self._transformed(r, value)
                else:
                    vals = (value,)
                for v in vals:
                    if gid >= 0:
                        hits = scache.get((gid, v))
                        if hits is None:
                            hits = scache[(gid, v)] = frozenset(sets[gid].Match(v) or ())
                        if r.set_index not in hits:
                            caps = None
                        elif r.capture:
                            caps = op(v, arg)
                        else:
                            caps = _MATCHED
                    else:
                        caps = op(v, arg)
                    if neg:
                        if caps is not None:
                            continue
                    elif caps is None:
                        continue
                    hit = True
                    self.matched_var = v
                    self.matched_var_name = vname
                    self.matched_vars.append((vname, v))
                    if r.capture and caps is not None:
                        for i, c in enumerate(caps):
                            self.tx[str(i)] = c
                    self._independent(r)
        if not hit:
            return False
        if r.chain is not None:
            return self._eval_chain(r.chain)
        return True

    def _eval_chain(self, r: CRule) -> bool:
        if not self._eval(r):
            return False
        return True

    def _transformed(self, r: CRule, value: str):
        key = (r.tkey, value)
        got = self.tcache.get(key)
        if got is not None:
            return got
        if r.multi:
            out = [value]
            v = value
            for f in r.transforms:
                v = f(v)
                if v != out[-1]:
                    out.append(v)
            got = tuple(out)
        else:
            v = value
            for f in r.transforms:
                v = f(v)
            got = (v,)
        self.tcache[key] = got
        return got

    def _independent(self, r: CRule) -> None:
        for sv in r.setvars:
            self._setvar(sv)

    def _setvar(self, sv: SetVar) -> None:
        if sv.collection != "TX":
            return  # IP, GLOBAL, ... persistent collections are not kept (initcol is a no-op)
        key = sv.key.expand(self)
        if sv.delete:
            self.tx.pop(key, None)
            return
        val = sv.value.expand(self)
        if sv.op == "=":
            self.tx[key] = val
        else:
            from .operators import _to_int
            cur = _to_int(self.tx.get(key, "0"))
            delta = _to_int(val)
            self.tx[key] = str(cur + delta if sv.op == "+" else cur - delta)

    def _after_match(self, r: CRule) -> None:
        # Actions of every link that run only once the whole chain matched.
        link: CRule | None = r
        while link is not None:
            for c in link.ctls:
                self._ctl(c)
            link = link.chain
        self.current_rule = r
        if r.log:
            self.rule_ids.append(r.id)
            msg = r.msg.expand(self) if r.msg is not None else ""
            data = r.logdata.expand(self) if r.logdata is not None else ""
            self.details.append((r.id, msg, data))
            self.messages.append(f"{msg} {data}" if msg and data else msg or data)
        dis = r.disruptive
        if dis is None or dis == "pass":
            return
        if self.mode != "On":
            return
        if dis == "allow":
            self.allowed = True
            return
        self.interrupted = True
        self.status = r.status if dis in ("deny", "redirect") else 403

    def _ctl(self, c: Ctl) -> None:
        o = c.option
        if o == "ruleRemoveById":
            self.removed_ids.extend(c.ids)
        elif o == "ruleRemoveByTag":
            self.removed_tags.append(c.value)
        elif o == "ruleRemoveTargetById":
            self.removed_targets.append((c.ids, None, c.target))
            self.removed_names.add(c.target.name)
        elif o == "ruleRemoveTargetByTag":
            self.removed_targets.append((None, c.value, c.target))
            self.removed_names.add(c.target.name)
        elif o == "ruleEngine":
            if c.value in ("On", "Off", "DetectionOnly"):
                self.mode = c.value
        elif o == "requestBodyProcessor":
            self.body_processor = c.value.upper()
            self.scalars["REQBODY_PROCESSOR"] = self.body_processor
            self.vcache.clear()
        # forceRequestBodyVariable, auditEngine, requestBodyAccess and the
        # limits are no-ops: REQUEST_BODY is always set, the audit log is ours.

    def verdict(self) -> Verdict:
        score = 0
        for k in ("blocking_inbound_anomaly_score", "anomaly_score"):
            if k in self.tx:
                from .operators import _to_int
                score = _to_int(self.tx[k])
                break
        if self.interrupted:
            action = "block"
        elif self.engine.engine_mode == "DetectionOnly" and self.rule_ids:
            action = "detect"
        else:
            action = "pass"
        return Verdict(action, self.status if self.interrupted else 200,
                       list(self.rule_ids), list(self.messages), score)


def _excluded3(x, n0: int, excludes) -> bool:
    for key, rx in excludes:
        if key is not None and x[1] == key:
            return True
        if rx is not None and rx.search(x[0][n0:]):
            return True
    return False


def _excluded(k: str, excludes) -> bool:
    kl = k.lower()
    for key, rx in excludes:
        if key is not None and kl == key:
            return True
        if rx is not None and rx.search(k):
            return True
    return False


def _uri_decode(s: str) -> str:
    if "%" not in s:
        return s
    out = []
    i, n = 0, len(s)
    while i < n:
        c = s[i]
        if c == "%" and i + 2 < n and s[i + 1] in bodies._HEX and s[i + 2] in bodies._HEX:
            out.append(chr(int(s[i + 1:i + 3], 16)))
            i += 3
            continue
        out.append(c)
        i += 1
    return "".join(out)


_ = compile_rx  # re-exported for the compiler's users
