"""The SecLang front end: CRS files parse, and bad rule files name file and line."""

from __future__ import annotations

import glob
import os

import pytest
from waf_ftw import crs_dir

from edgeproxy.waf import seclang
from edgeproxy.waf.engine import Engine
from edgeproxy.waf.seclang import SecLangError, parse_text, parse_variables

CRS = crs_dir()
needs_crs = pytest.mark.skipif(CRS is None, reason="CRS v4 not found (set EDGEPROXY_CRS_DIR or put it at ../shared/crs)")


@needs_crs
def test_every_crs_file_parses_and_every_rule_compiles():
    files = [os.path.join(CRS, "crs-setup.conf.example")] + sorted(glob.glob(os.path.join(CRS, "rules", "*.conf")))
    items = seclang.parse_files(files)
    rules = [i for i in items if isinstance(i, seclang.Rule)]
    # CRS v4.28.0: 630 SecRule/SecAction starts (703 with chained links) outside comments.
    assert len(rules) == 630
    assert sum(1 + len(r.chain) for r in rules) == 703
    eng = Engine.from_items(items)
    assert eng.rule_count == 630  # no rule skipped
    assert eng.notes == []  # nothing unsupported


def test_continuations_quotes_and_chains():
    text = (
        '# a comment\n'
        'SecRule ARGS|!ARGS:foo|&TX:x|REQUEST_COOKIES:/^__utm|_ga$/ "@rx a\\"b" \\\n'
        '    "id:1,phase:2,block,t:none,t:lowercase,\\\n'
        "    msg:'a, b: c',logdata:'it\\'s',setvar:'tx.a=+%{tx.b}',chain\"\n"
        '    SecRule REQUEST_URI "!@beginsWith /x" "t:none"\n'
        'SecMarker END\n'
    )
    items = parse_text(text, "t.conf")
    rule, marker = items
    assert rule.line == 2 and rule.id == 1
    assert rule.operator.arg == 'a"b'
    assert [v.name for v in rule.variables] == ["ARGS", "ARGS", "TX", "REQUEST_COOKIES"]
    assert rule.variables[1].exclude and rule.variables[1].key == "foo"
    assert rule.variables[2].count
    assert rule.variables[3].key_regex and rule.variables[3].key == "^__utm|_ga$"
    assert rule.first("msg") == "a, b: c"
    assert rule.first("logdata") == "it's"
    assert rule.chain[0].operator.negated and rule.chain[0].operator.name == "beginsWith"
    assert marker.name == "SecMarker" and marker.args == ["END"]


def test_xml_targets_are_not_regex_keys():
    vs = parse_variables("ARGS|XML:/*|XML://@*")
    assert [(v.name, v.key, v.key_regex) for v in vs] == [("ARGS", None, False), ("XML", "/*", False),
                                                           ("XML", "//@*", False)]


@pytest.mark.parametrize("text,line,words", [
    ('SecRule ARGS "@rx a" "id:1,phase:2,pass"\nSecFoo On\n', 2, "unknown directive"),
    ('\n\nSecRule ARGS "@bogus a" "id:1,phase:2,pass"\n', 3, "unknown operator @bogus"),
    ('SecRule NOPE "@rx a" "id:1,phase:2,pass"\n', 1, "unknown variable"),
    ('SecRule ARGS "@rx a" "id:1,phase:2,t:nothing"\n', 1, "unknown transformation"),
    ('SecRule ARGS "@rx a" "id:1,phase:2,frobnicate"\n', 1, "unknown action"),
    ('SecRule ARGS "@rx a" "id:1,phase:2,pass,chain"\n', 1, "never closed"),
    ('SecRule ARGS "@rx a \\\n   id:1\n', 1, "unterminated double quote"),
    ('SecRule ARGS "@rx a" "id:1"x\n', 1, "text right after a closing quote"),
    ('SecRule ARGS "@rx a" "phase:2,pass"\n', 1, "without an id"),
    ("SecRule ARGS \"@rx a\" \"id:1,msg:'open\"\n", 1, "unterminated quote"),
])
def test_errors_name_file_and_line(text, line, words):
    with pytest.raises(SecLangError) as e:
        parse_text(text, "bad.conf")
    assert str(e.value).startswith(f"bad.conf:{line}:")
    assert words in str(e.value)


def test_a_pattern_re2_refuses_names_its_rule(tmp_path):
    p = tmp_path / "rx.conf"
    p.write_text('SecAction "id:1,phase:1,pass"\n\nSecRule ARGS "@rx (a)\\1" "id:2,phase:2,pass"\n')
    with pytest.raises(SecLangError) as e:
        Engine.load([str(p)])
    assert str(e.value).startswith(f"{p}:3:") and "RE2" in str(e.value)


def test_a_missing_file_is_an_error(tmp_path):
    with pytest.raises(SecLangError) as e:
        Engine.load([str(tmp_path / "nope.conf")])
    assert "cannot read" in str(e.value)


CRS33 = "/usr/share/modsecurity-crs"


@pytest.mark.skipif(not os.path.isdir(CRS33), reason="Debian's modsecurity-crs (CRS 3.3) is not installed")
def test_debian_crs_3_3_loads_with_its_pcre_only_rules_listed():
    setup = "/etc/modsecurity/crs/crs-setup.conf"
    files = ([setup] if os.path.exists(setup) else []) + [f"{CRS33}/rules/*.conf"]
    with pytest.raises(SecLangError) as e:
        Engine.load(files)  # strict: a pattern RE2 cannot run is an error naming file and line
    assert "RE2" in str(e.value) and ".conf:" in str(e.value)
    eng = Engine.load(files, strict=False)
    assert eng.rule_count > 500
    # Every rule that cannot match is named, by file, line and id.
    for note in eng.notes:
        assert ".conf:" in note and "rule 9" in note and "never matches" in note
    assert len(eng.notes) <= 8
