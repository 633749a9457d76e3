"""The routing path (docs/parser-contract.md, "The routing path").

Unit tables for the normaliser on both implementations, a property test that
they agree on generated paths, then real proxy processes with a `/` route and
an `/admin/` route to two origins, sent every spelling of a path: each must
take the route its normal form takes, or be refused.  Also the Host port
checks and absolute-form targets without a path, end to end.
"""
from __future__ import annotations

import pytest
from harness import Client, Origin, raw_exchange, start_proxy
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


# ---- end to end ------------------------------------------------------------

ROUTES = """
[timeout]
read = 3.0
header = 2.0

[[route]]
path = "/"
pool = "web"

[[route]]
path = "/admin/"
pool = "admin"

[pool.web]
backends = ["{web}"]

[pool.admin]
backends = ["{admin}"]
"""


class TwoRoutes:
    def __init__(self, tmp_path, extra: str = ""):
        self.web = Origin().start()
        self.admin = Origin().start()
        self.proxy = start_proxy(tmp_path, extra + ROUTES.format(web=self.web.url,
                                                                 admin=self.admin.url))

    def stop(self):
        self.proxy.stop()
        self.web.stop()
        self.admin.stop()

    def send(self, target: str, host: str = "t"):
        """(status, which origin got it or None, the target it got)."""
        seen = len(self.web.requests), len(self.admin.requests)
        with Client(self.proxy.port) as c:
            resp = c.request("GET", target, host=host)
        got = [o for o, n in zip((self.web, self.admin), seen, strict=True) if len(o.requests) > n]
        assert len(got) <= 1
        if not got:
            return resp.status, None, None
        return resp.status, ("web" if got[0] is self.web else "admin"), got[0].requests[-1].target


@pytest.fixture(scope="module")
def two_routes(tmp_path_factory):
    t = TwoRoutes(tmp_path_factory.mktemp("route"))
    yield t
    t.stop()


@pytest.fixture(scope="module")
def two_routes_normalizing(tmp_path_factory):
    t = TwoRoutes(tmp_path_factory.mktemp("route-norm"), "[server]\nnormalize_target = true\n")
    yield t
    t.stop()


# target -> the route it must take ("web", "admin") or the status it gets
ENCODINGS = {
    "/admin/": "admin",
    "/admin/x?y=1": "admin",
    "/x/../admin/": "admin",
    "/%61dmin/": "admin",
    "/%61%64%6D%69%6e/": "admin",
    "/adm%69n/": "admin",
    "//admin/": "admin",
    "/./admin/": "admin",
    "/x/%2e%2e/admin/": "admin",
    "/x/.%2E/admin/": "admin",
    "/admin/x/../y": "admin",
    "/admin/?q=/../": "admin",
    "/admin/..": "web",
    "/admin/../x": "web",
    "/admin/%2e%2e/x": "web",
    "/admin": "web",
    "/x?/admin/": "web",
    "/%2fadmin/": 400,
    "/%2Fadmin/": 400,
    "/admin%2F": 400,
    "/../admin/": 400,
    "/%2e%2e/admin/": 400,
    "/%zzadmin/": 400,
    "/admin/%00": 400,
    "/admin/#x": 400,
}


@pytest.mark.parametrize("target", ENCODINGS)
def test_every_spelling_takes_its_route(two_routes, target):
    want = ENCODINGS[target]
    status, route, forwarded = two_routes.send(target)
    if want == 400:
        assert (status, route) == (400, None)
    else:
        assert (status, route) == (404, want)     # the origins answer 404 there
        assert forwarded == target                # forwarded as received by default


@pytest.mark.parametrize("target, route, forwarded", [
    ("/x/../admin/?q=%2e%2e/", "admin", "/admin/?q=%2e%2e/"),
    ("/%61dmin//a/%3a", "admin", "/admin/a/%3A"),
    ("/admin/../x", "web", "/x"),
    ("/admin/", "admin", "/admin/"),
])
def test_normalize_target_forwards_the_routing_path(two_routes_normalizing, target, route,
                                                    forwarded):
    assert two_routes_normalizing.send(target) == (404, route, forwarded)


def test_refused_path_closes_the_connection(two_routes):
    out = raw_exchange(two_routes.proxy.port,
                       b"GET /../x HTTP/1.1\r\nHost: t\r\n\r\nGET /admin/ HTTP/1.1\r\nHost: t\r\n\r\n")
    assert out.startswith(b"HTTP/1.1 400 ") and out.count(b"HTTP/1.1") == 1


@pytest.mark.parametrize("target, forwarded", [
    ("http://t", "/"), ("http://t?x=1", "/?x=1"), ("HTTP://t:80", "/"),
    ("http://t/admin/", "/admin/"),
])
def test_absolute_form_without_a_path_routes_as_root(two_routes, target, forwarded):
    status, route, got = two_routes.send(target)
    assert (status, got) == (404, forwarded)
    assert route == ("admin" if forwarded.startswith("/admin/") else "web")


@pytest.mark.parametrize("host, status", [
    ("t:99999", 400), ("t:65536", 400), ("t:abc", 400), ("t:80:80", 400), ("[::1]x", 400),
    ("t:", 404), ("t:65535", 404), ("[::1]:8080", 404),
])
def test_host_port(two_routes, host, status):
    assert two_routes.send("/admin/", host=host)[0] == status
    assert two_routes.send(f"http://{host}/admin/")[0] == status


# ---- the cache key is the target forwarded --------------------------------

CACHED = """
[cache]
path = "{path}"
max_size = "64MiB"

[[route]]
path = "/"
pool = "web"
cache = true

[pool.web]
backends = ["{web}"]
"""


@pytest.mark.parametrize("normalize", [False, True])
def test_cache_key_is_the_forwarded_target(origin, proxy_factory, tmp_path, normalize):
    """Keyed on what the backend saw.  Forwarded as received, another
    spelling of the path is another key: it goes to the backend (which,
    not normalising, answers 404) instead of getting the entry of
    /cache/k; had it been keyed on the normal form, /x/../cache/k could
    fill the entry of /cache/k with another answer.  Forwarded in normal
    form, every spelling shares the one entry."""
    extra = "[server]\nnormalize_target = true\n" if normalize else ""
    p = proxy_factory(extra + CACHED.format(path=tmp_path / "cache", web=origin.url))
    statuses = []
    for target in ("/cache/k?cc=max-age=60", "/x/../cache/k?cc=max-age=60",
                   "/%63ache/k?cc=max-age=60", "/%63ache/k?cc=max-age=60"):
        with Client(p.port) as c:
            statuses.append(c.request("GET", target).status)
    assert statuses == ([200] * 4 if normalize else [200, 404, 404, 404])
    assert origin.hits["k"] == 1


def test_routing_path_errors_are_the_parser_errors():
    """Both twins raise their implementation's ParseError (an HTTPError)."""
    with pytest.raises(_pure.ParseError):
        _path.normalize_path(b"/..")
    ext = load_parser("c-parser")
    with pytest.raises(ext.ParseError):
        ext.normalize_path(b"/..")
