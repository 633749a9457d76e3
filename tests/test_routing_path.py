"""The routing path (docs/parser-contract.md, "The routing path").

Unit tables for the normaliser on both implementations, and a property test
that they agree on generated paths.
"""
from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from parser_cases import load_parser

from edgeproxy.http import _path, _pure

PATH_IDS = ["py-path", "c-path"]

MALFORMED = "malformed percent-encoding in the path"
SLASH = "encoded slash (%2F) in the path"
NUL = "encoded NUL (%00) in the path"
FRAGMENT = "fragment (#) in the request target"
ABOVE = "the path climbs above the root (..)"

# target -> its routing path, or the message of the 400 it gets
NORMAL_FORMS = {
    b"/": b"/",
    b"/admin/": b"/admin/",
    b"/a/b?c=d": b"/a/b",
    b"/?/../..": b"/",                        # the query is not part of the path
    b"/a%20b/%C3%A9": b"/a%20b/%C3%A9",        # already normal
    # unreserved escapes decoded, the others upper-cased
    b"/%61dmin/": b"/admin/",
    b"/%41%5a%30%39%2D%2e%5F%7e": b"/AZ09-._~",
    b"/%3a%c3%a9": b"/%3A%C3%A9",
    b"/%25": b"/%25",
    b"/%2561": b"/%2561",                     # decoded once only
    # duplicate slashes
    b"//admin/": b"/admin/",
    b"/a///b//": b"/a/b/",
    b"//": b"/",
    # dot segments, RFC 3986 5.2.4, with their escaped forms
    b"/x/../admin/": b"/admin/",
    b"/./admin/": b"/admin/",
    b"/a/./b/../c": b"/a/c",
    b"/a/b/..": b"/a/",
    b"/a/b/.": b"/a/b/",
    b"/a/.": b"/a/",
    b"/.": b"/",
    b"/a/..": b"/",
    b"/x/%2e%2e/admin/": b"/admin/",
    b"/x/.%2E/admin/": b"/admin/",
    b"/x/%2e/admin/": b"/x/admin/",
    b"/a//..//b": b"/b",
    b"/.../..a/a../.a": b"/.../..a/a../.a",   # not dot segments
    # refused
    b"/../x": ABOVE,
    b"/..": ABOVE,
    b"/%2e%2e/x": ABOVE,
    b"/a/../../x": ABOVE,
    b"//../x": ABOVE,
    b"/%2fadmin/": SLASH,
    b"/%2Fadmin/": SLASH,
    b"/a/%2f/../..": SLASH,                   # errors in the order they appear
    b"/%00": NUL,
    b"/%": MALFORMED,
    b"/a%4": MALFORMED,
    b"/a%4/": MALFORMED,
    b"/%zz": MALFORMED,
    b"/%g0": MALFORMED,
    b"/%?a": MALFORMED,
    b"/a#b": FRAGMENT,
    b"/%#": MALFORMED,
    b"/a?b#c": b"/a",                         # in the query: not the path's business
}


@pytest.fixture(params=PATH_IDS)
def impl(request):
    return _path if request.param == "py-path" else load_parser("c-parser")


def outcome(impl, target: bytes):
    """The routing path, or ("error", status, message)."""
    try:
        return impl.normalize_path(target)
    except Exception as exc:      # each implementation has its own ParseError
        if not hasattr(exc, "status"):
            raise
        return ("error", exc.status, exc.message)


@pytest.mark.parametrize("target", NORMAL_FORMS, ids=[t.decode() for t in NORMAL_FORMS])
def test_normal_form(impl, target):
    want = NORMAL_FORMS[target]
    got = outcome(impl, target)
    if isinstance(want, str):
        assert got == ("error", 400, want)
        assert not impl.path_is_normal(target)
    else:
        assert got == want
        assert impl.path_is_normal(target) == (want == target.partition(b"?")[0])


def test_long_paths(impl):
    assert impl.normalize_path(b"/a" * 4000 + b"/.." * 4000) == b"/"
    assert impl.normalize_path(b"/" * 8000 + b"x") == b"/x"
    assert impl.normalize_path(b"/%61" * 3000) == b"/a" * 3000
    long_normal = b"/seg" * 2000 + b"?" + b"/.." * 100
    assert impl.path_is_normal(long_normal)


def test_not_origin_form(impl):
    with pytest.raises(ValueError):
        impl.normalize_path(b"*")


PIECES = [b"/", b"/", b"//", b".", b"..", b"/./", b"/../", b"a", b"b", b"~", b"-",
          b"%", b"%2e", b"%2E", b"%2f", b"%2F", b"%00", b"%61", b"%7e", b"%3a", b"%3A",
          b"%C3", b"%zz", b"%4", b"%25", b"#", b"?", b"0", b"f", b"F"]
PATHS = st.lists(st.sampled_from(PIECES), max_size=24).map(lambda parts: b"/" + b"".join(parts))
PROPS = settings(max_examples=1500, deadline=None, derandomize=True,
                 suppress_health_check=[HealthCheck.too_slow])


@PROPS
@given(PATHS)
def test_twins_agree(target):
    ext = load_parser("c-parser")
    assert outcome(ext, target) == outcome(_path, target)
    assert ext.path_is_normal(target) == _path.path_is_normal(target)


@PROPS
@given(PATHS)
def test_normal_form_properties(target):
    for impl in (_path, load_parser("c-parser")):
        got = outcome(impl, target)
        path = target.partition(b"?")[0]
        assert impl.path_is_normal(target) == (got == path)
        if isinstance(got, tuple):
            assert got[1] == 400
            continue
        assert got.startswith(b"/") and b"//" not in got
        assert impl.path_is_normal(got) and impl.normalize_path(got) == got


def test_routing_path_errors_are_the_parser_errors():
    """Both twins raise their implementation's ParseError (an HTTPError)."""
    with pytest.raises(_pure.ParseError):
        _path.normalize_path(b"/..")
    ext = load_parser("c-parser")
    with pytest.raises(ext.ParseError):
        ext.normalize_path(b"/..")
