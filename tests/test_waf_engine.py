"""The firewall engine on small rule sets, and on CRS in block mode."""

from __future__ import annotations

import pytest
from waf_ftw import crs_dir

from edgeproxy.waf.engine import Engine, Request
from edgeproxy.waf.seclang import parse_text
from edgeproxy.waf.transforms import TRANSFORMS

CRS = crs_dir()
needs_crs = pytest.mark.skipif(CRS is None, reason="CRS v4 not found (set EDGEPROXY_CRS_DIR or put it at ../shared/crs)")


def engine(text: str) -> Engine:
    return Engine.from_items(parse_text("SecRuleEngine On\n" + text, "t.conf"))


def run(eng: Engine, method="GET", uri="/", headers=(), body=""):
    tx = eng.transaction(Request(method, uri, "1.1", [("Host", "localhost"), *headers], body))
    tx.run_request()
    return tx


@pytest.mark.parametrize("name,value,out", [
    ("urlDecodeUni", "a%20b%u0041%uff41+c%", "a bxa c%"),
    ("urlDecode", "a%20b+c%zz", "a b c%zz"),
    ("htmlEntityDecode", "&lt;a&#x41;&#66;&quot", '<aAB"'),
    ("jsDecode", r"\x41\u0042\n\'", "AB\n'"),
    ("cssDecode", r"\61 b\\", "ab\\"),
    ("cmdLine", "C^a\"t  /etc,pass;wd", "cat/etc pass wd"),
    ("compressWhitespace", "a \t\n b", "a b"),
    ("removeWhitespace", "a \t\n b", "ab"),
    ("removeNulls", "a\x00b", "ab"),
    ("replaceComments", "a/*x*/b/*y", "a b "),
    ("normalizePath", "/a/./b/../c//d", "/a/c/d"),
    ("normalizePathWin", "\\a\\..\\b", "/b"),
    ("utf8toUnicode", "\xc3\xa9", "%u00e9"),
    ("base64Decode", "aGVsbG8=", "hello"),
    ("hexDecode", "414243", "ABC"),
    ("length", "abcd", "4"),
    ("lowercase", "AbC\xc9", "abc\xc9"),
])
def test_transformations(name, value, out):
    assert TRANSFORMS[name](value) == out


def test_args_chain_setvar_and_anomaly_block():
    eng = engine(
        'SecRule ARGS "@rx (?i)union\\s+select" "id:10,phase:2,pass,t:none,t:urlDecodeUni,capture,'
        "msg:'sqli',logdata:'%{TX.0} in %{MATCHED_VAR_NAME}',setvar:tx.score=+5\"\n"
        'SecRule TX:score "@ge 5" "id:20,phase:2,deny,status:403,msg:\'score %{tx.score}\'"\n'
    )
    tx = run(eng, uri="/?q=1%20UNION%20%20select%201")
    v = tx.verdict()
    assert v.rule_ids == [10, 20] and v.action == "block" and v.status == 403
    assert v.messages == ["sqli UNION  select in ARGS:q", "score 5"]
    assert run(eng, uri="/?q=hello").verdict().rule_ids == []


def test_chain_needs_every_link_and_skip_after_marker():
    eng = engine(
        'SecRule REQUEST_METHOD "@streq POST" "id:1,phase:1,pass,chain"\n'
        '    SecRule REQUEST_HEADERS:Content-Type "@contains json" "t:lowercase"\n'
        'SecRule REQUEST_URI "@beginsWith /skip" "id:2,phase:1,pass,nolog,skipAfter:END"\n'
        'SecRule REQUEST_URI "@unconditionalMatch" "id:3,phase:1,pass"\n'
        'SecMarker END\n'
    )
    assert run(eng, "POST", "/", [("Content-Type", "Application/JSON")]).rule_ids == [1, 3]
    assert run(eng, "POST", "/", [("Content-Type", "text/plain")]).rule_ids == [3]
    assert run(eng, "GET", "/skip/x").rule_ids == []


def test_exclusions_counts_and_ctl():
    eng = engine(
        'SecRule ARGS|!ARGS:safe "@contains evil" "id:1,phase:2,pass"\n'
        'SecRule &ARGS "@eq 3" "id:2,phase:2,pass"\n'
        'SecRule REQUEST_HEADERS:X-Off "@streq 1" "id:3,phase:1,pass,nolog,ctl:ruleRemoveById=1"\n'
        'SecRule REQUEST_COOKIES:/^s_/ "@rx ." "id:4,phase:1,pass"\n'
    )
    assert run(eng, uri="/?safe=evil&a=b&c=d").rule_ids == [2]
    assert run(eng, uri="/?x=evil").rule_ids == [1]
    assert run(eng, uri="/?x=evil", headers=[("X-Off", "1")]).rule_ids == []
    assert run(eng, headers=[("Cookie", "S_ID=1; other=2")]).rule_ids == [4]


def test_update_target_by_id_and_remove_by_tag():
    eng = engine(
        "SecRule ARGS \"@contains x\" \"id:1,phase:2,pass,tag:'a'\"\n"
        "SecRule ARGS \"@contains x\" \"id:2,phase:2,pass,tag:'b'\"\n"
        'SecRuleUpdateTargetById 1 "!ARGS:ok"\n'
        'SecRuleRemoveByTag b\n'
    )
    assert eng.rule_ids() == [1]
    assert run(eng, uri="/?ok=x").rule_ids == []
    assert run(eng, uri="/?no=x").rule_ids == [1]


def test_body_processors_json_multipart_xml_urlencoded():
    eng = engine(
        'SecRule REQUEST_HEADERS:Content-Type "^application/json" "id:100,phase:1,pass,nolog,ctl:requestBodyProcessor=JSON"\n'
        'SecRule REQUEST_HEADERS:Content-Type "^text/xml" "id:101,phase:1,pass,nolog,ctl:requestBodyProcessor=XML"\n'
        'SecRule ARGS:json.a.b.1 "@streq evil" "id:1,phase:2,pass"\n'
        'SecRule FILES "@endsWith .php" "id:2,phase:2,pass"\n'
        'SecRule ARGS_POST:field "@streq v" "id:3,phase:2,pass"\n'
        'SecRule XML:/* "@contains evil" "id:4,phase:2,pass"\n'
        'SecRule REQBODY_ERROR "!@eq 0" "id:5,phase:2,pass"\n'
    )
    ct = [("Content-Type", "application/json")]
    assert run(eng, "POST", "/", ct, '{"a": {"b": ["ok", "evil"]}}').rule_ids == [1]
    assert run(eng, "POST", "/", ct, '{"a": ').rule_ids == [5]
    mp = ("--xx\r\nContent-Disposition: form-data; name=\"field\"\r\n\r\nv\r\n"
          "--xx\r\nContent-Disposition: form-data; name=\"f\"; filename=\"a.php\"\r\n"
          "Content-Type: text/plain\r\n\r\n<?php\r\n--xx--\r\n")
    assert run(eng, "POST", "/", [("Content-Type", "multipart/form-data; boundary=xx")], mp).rule_ids == [2, 3]
    assert run(eng, "POST", "/", [("Content-Type", "text/xml")], "<a><b>evil</b></a>").rule_ids == [4]
    assert run(eng, "POST", "/", [("Content-Type", "text/xml")], "<a><b>").rule_ids == [5]
    form = [("Content-Type", "application/x-www-form-urlencoded")]
    assert run(eng, "POST", "/", form, "field=v").rule_ids == [3]


def test_xml_entity_expansion_is_refused():
    eng = engine(
        'SecRule REQUEST_HEADERS:Content-Type "^text/xml" "id:101,phase:1,pass,nolog,ctl:requestBodyProcessor=XML"\n'
        'SecRule REQBODY_ERROR "!@eq 0" "id:5,phase:2,pass"\n'
    )
    bomb = '<?xml version="1.0"?><!DOCTYPE a [<!ENTITY x "xxxxxxxx">]><a>&x;&x;</a>'
    assert run(eng, "POST", "/", [("Content-Type", "text/xml")], bomb).rule_ids == [5]


def test_operators():
    eng = engine(
        'SecRule ARGS:a "@pm foo BAR" "id:1,phase:2,pass"\n'
        'SecRule ARGS:b "@within GET POST" "id:2,phase:2,pass"\n'
        'SecRule ARGS:c "@validateByteRange 32-126" "id:3,phase:2,pass"\n'
        'SecRule REQUEST_URI_RAW "@validateUrlEncoding" "id:4,phase:1,pass"\n'
        'SecRule ARGS:d "@validateUtf8Encoding" "id:5,phase:2,pass"\n'
        'SecRule REMOTE_ADDR "@ipMatch 10.0.0.0/8,::1" "id:6,phase:1,pass"\n'
        'SecRule ARGS:e "@detectSQLi" "id:7,phase:2,pass"\n'
        'SecRule ARGS:f "@detectXSS" "id:8,phase:2,pass"\n'
        'SecRule ARGS:g "@lt 10" "id:9,phase:2,pass"\n'
    )
    assert run(eng, uri="/?a=xxbarxx&b=POST&g=3").rule_ids == [1, 2, 9]
    assert run(eng, uri="/?a=fo&b=PUT&g=11").rule_ids == []
    assert run(eng, uri="/?c=%01").rule_ids == [3]
    assert run(eng, uri="/?x=%zz").rule_ids == [4]
    assert run(eng, uri="/?d=%c3%28").rule_ids == [5]
    assert run(eng, uri="/?d=%c3%a9").rule_ids == []
    assert run(eng, uri="/?e=1'%20or%20'1'='1").rule_ids == [7]
    assert run(eng, uri="/?f=<script>alert(1)</script>").rule_ids == [8]
    tx = Engine.transaction(eng, Request("GET", "/", "1.1", [("Host", "h")], remote_addr="10.1.2.3"))
    tx.run_request()
    assert tx.rule_ids == [6]


def test_detection_only_logs_but_never_blocks():
    eng = Engine.from_items(parse_text(
        'SecRuleEngine DetectionOnly\nSecRule ARGS "@contains x" "id:1,phase:2,deny"\n', "t.conf"))
    v = run(eng, uri="/?a=x").verdict()
    assert v.action == "detect" and v.status == 200 and v.rule_ids == [1]


@pytest.fixture(scope="module")
def crs_block():
    if CRS is None:
        pytest.skip("CRS v4 not found")
    # paranoia level 1, block mode: CRS as it ships.
    return Engine.load([f"{CRS}/crs-setup.conf.example", f"{CRS}/rules/*.conf"], extra_text="SecRuleEngine On\n")


@needs_crs
@pytest.mark.parametrize("uri,headers,body", [
    ("/?id=1%27%20UNION%20SELECT%20password%20FROM%20users--", [], ""),
    ("/?q=%3Cscript%3Ealert(document.cookie)%3C/script%3E", [], ""),
    ("/download?file=../../../../etc/passwd", [], ""),
    ("/?cmd=;cat%20/etc/passwd", [], ""),
    ("/", [("User-Agent", "sqlmap/1.7.2#stable (https://sqlmap.org)")], ""),
])
def test_crs_blocks_classic_attacks(crs_block, uri, headers, body):
    tx = crs_block.transaction(Request("GET", uri, "1.1", [
        ("Host", "localhost"), ("User-Agent", "Mozilla/5.0"), ("Accept", "text/html")] + headers, body))
    tx.run_request()
    v = tx.verdict()
    assert v.action == "block" and v.status == 403, v
    assert 949110 in v.rule_ids and v.anomaly_score >= 5


@needs_crs
def test_crs_passes_a_clean_browser_request(crs_block):
    tx = crs_block.transaction(Request("GET", "/search?q=hello+world&page=2", "1.1", [
        ("Host", "localhost"), ("User-Agent", "Mozilla/5.0 (X11; Linux x86_64) Firefox/120.0"),
        ("Accept", "text/html,application/xhtml+xml"), ("Accept-Language", "en-US,en;q=0.5"),
        ("Accept-Encoding", "gzip, deflate"), ("Cookie", "session=abc123")]))
    tx.run_request()
    v = tx.verdict()
    assert v.action == "pass" and v.rule_ids == [] and v.anomaly_score == 0


def test_ctl_remove_target_by_tag_covers_single_value_variables():
    # CRS 941010: a plain REQUEST_FILENAME is taken out of the xss-perf-disable rules.
    eng = engine(
        'SecRule REQUEST_FILENAME "!@validateByteRange 45-57,65-90,97-122" '
        '"id:1,phase:1,pass,nolog,ctl:ruleRemoveTargetByTag=perf;REQUEST_FILENAME"\n'
        "SecRule REQUEST_FILENAME|ARGS \"@contains cookie\" \"id:2,phase:2,pass,tag:'perf'\"\n"
    )
    assert run(eng, uri="/a/document.cookie").rule_ids == []
    assert run(eng, uri="/a/document.cookie?x=cookie").rule_ids == [2]
    assert run(eng, uri="/a/<cookie>").rule_ids == [2]


def test_single_value_variables_exist_empty():
    # libmodsecurity's anchored variables: REQUEST_BASENAME of "/" is "" (CRS 920200 relies on it).
    eng = engine('SecRule REQUEST_BASENAME "!@endsWith .pdf" "id:1,phase:1,pass"\n'
                 'SecRule QUERY_STRING "@rx ^$" "id:2,phase:1,pass"\n')
    assert run(eng, uri="/").rule_ids == [1, 2]
    assert run(eng, uri="/a.pdf?x=1").rule_ids == []
