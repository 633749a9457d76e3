"""The [[limit]] tables, route and server `limits`, and `access` lists in the
config loader: defaults, normal forms, and one clear error per bad key."""

from __future__ import annotations

import pytest

from edgeproxy.config import ConfigError, parse_config
from edgeproxy.limits.rules import parse_rate, parse_store

BASE = ('[[listen]]\nbind = "127.0.0.1:8080"\n\n[pool.web]\nbackends = ["http://127.0.0.1:9"]\n\n'
        '[[route]]\npath = "/"\npool = "web"\n')


def errors(text: str) -> list[str]:
    with pytest.raises(ConfigError) as e:
        parse_config(BASE + text)
    return e.value.errors


def test_defaults_and_normal_forms():
    c = parse_config(BASE + 'limits = ["a"]\naccess = ["allow 10.0.0.0/8", "deny all"]\n\n'
                     '[[limit]]\nname = "a"\nrate = "30r/m"\n\n'
                     '[[limit]]\nname = "b"\nrate = "2.5r/s"\nburst = 5\ndelay = 5\n'
                     'key = "Header:X-Api-Key"\nstore = "redis://h"\non_store_error = "deny"\n'
                     'mode = "dry-run"\nsize = 64\n')
    a, b = c.rate_limits
    assert (a.name, a.rate, a.rate_text, a.key, a.burst, a.delay, a.store, a.mode, a.size) == \
        ("a", 0.5, "30r/m", "ip", 0, 0, "local", "enforce", 65536)
    assert (b.rate, b.key, b.store, b.on_store_error, b.mode) == \
        (2.5, "header:x-api-key", "redis://h:6379/0", "deny", "dry-run")
    assert c.routes[0].limits == ("a",)
    assert [(r.allow, r.network) for r in c.routes[0].access] == [(True, "10.0.0.0/8"),
                                                                  (False, None)]
    assert parse_store("redis://u:p@[::1]:7000/3") == "redis://u:p@[::1]:7000/3"
    assert parse_rate(" 10 r/s ") == 10.0


@pytest.mark.parametrize(("text", "want"), [
    ('[[limit]]\nname = "a"\nrate = "10/s"\n', 'limit[0].rate: \'10/s\' is not a rate'),
    ('[[limit]]\nname = "a"\nrate = "0r/s"\n', "limit[0].rate: '0r/s': the rate must be more than 0"),
    ('[[limit]]\nname = "a"\n', "limit[0].rate: missing (required)"),
    ('[[limit]]\nname = "a"\nrate = "1r/s"\nburst = -1\n', "limit[0].burst: -1 must be 0 to"),
    ('[[limit]]\nname = "a"\nrate = "1r/s"\nburst = 2\ndelay = 3\n',
     "limit[0].delay: 3 is more than burst (2)"),
    ('[[limit]]\nname = "a"\nrate = "1r/s"\nkey = "query x"\n', "limit[0].key: 'query x' is not"),
    ('[[limit]]\nname = "a"\nrate = "1r/s"\nkey = "no_such_module:fn"\n',
     'limit[0].key: "no_such_module:fn" is not "ip", "route", "header:<name>" or '
     '"cookie:<name>"; as a hook "module:attr": no module named \'no_such_module\''),
    ('[[limit]]\nname = "a"\nrate = "1r/s"\nstore = "redis://h:99999"\n', "limit[0].store:"),
    ('[[limit]]\nname = "a"\nrate = "1r/s"\nstore = "redis://h/x"\n',
     "limit[0].store: 'redis://h/x': the path must be a database number"),
    ('[[limit]]\nname = "a"\nrate = "1r/s"\non_store_error = "deny"\n',
     "limit[0].on_store_error: only used with a redis:// store"),
    ('[[limit]]\nname = "a"\nrate = "1r/s"\nmode = "warn"\n', "limit[0].mode:"),
    ('[[limit]]\nname = "a"\nrate = "1r/s"\nsize = 10\n', "limit[0].size: 10 must be 64 to"),
    ('[[limit]]\nname = "a"\nrate = "1r/s"\n\n[[limit]]\nname = "a"\nrate = "2r/s"\n',
     'limit[1].name: "a" is already limit[0]'),
    ('[[limit]]\nname = "api"\nrate = "1r/s"\nlimits = 1\n', "limit[0].limits: unknown key"),
])
def test_bad_limits_are_named_by_key(text, want):
    assert any(e.startswith(want) for e in errors(text)), errors(text)


def test_unknown_and_repeated_limit_names():
    errs = errors('limits = ["apii", "api", "api"]\n\n[server]\nlimits = ["nope"]\n\n'
                  '[[limit]]\nname = "api"\nrate = "1r/s"\n')
    assert 'route[0].limits[0]: no [[limit]] named "apii" (did you mean "api"?)' in errs
    assert 'route[0].limits[2]: "api" is listed twice' in errs
    assert 'server.limits[0]: no [[limit]] named "nope"' in errs


@pytest.mark.parametrize(("rule", "want"), [
    ("allow 10.0.0.0/33", "the prefix length must be 0 to 32 for IPv4, not '33'"),
    ("allow 10.0.0.1/8", "has host bits set"),
    ("permit 10.0.0.0/8", "is not \"allow <CIDR>\""),
    ("deny", "is not \"allow <CIDR>\""),
    ("allow 2001:db8::/129", "the prefix length must be 0 to 128 for IPv6"),
    ("allow example.com", "'example.com' is not an IPv4 or IPv6 address"),
])
def test_bad_access_rules_on_routes_and_listeners(rule, want):
    errs = errors(f'access = ["{rule}"]\n')
    assert any(e.startswith("route[0].access[0]: ") and want in e for e in errs), errs
    with pytest.raises(ConfigError) as e:
        parse_config(BASE.replace('bind = "127.0.0.1:8080"\n',
                                  f'bind = "127.0.0.1:8080"\naccess = ["{rule}"]\n'))
    assert any(x.startswith("listen[0].access[0]: ") for x in e.value.errors)
