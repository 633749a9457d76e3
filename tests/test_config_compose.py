"""Config composition over real files: `include` (globs, merge rules, nesting, cycles),
`${ENV}` substitution, the file:line of every error, and a running proxy that
takes its included files and environment at start and re-reads the files on SIGHUP."""
from __future__ import annotations

import hashlib
import os
import random
import signal
import subprocess
import sys
import textwrap
import tomllib

import pytest
from harness import ROOT, Client, free_port, wait_port
from ops_support import status, wait_until

from edgeproxy.config import ConfigError, load_config, parse_config
from edgeproxy.config.compose import substitute
from edgeproxy.config.keylines import format_key_path, key_lines, parse_key_path

BASE = """\
[[listen]]
bind = "127.0.0.1:8080"
[[route]]
pool = "web"
[pool.web]
backends = ["http://127.0.0.1:5000"]
"""


def write(path, text: str) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text))
    return str(path)


def failure(path, **kw) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        load_config(path, **kw)
    return info.value


def lines_of(error: ConfigError) -> list[str]:
    return str(error).splitlines()[1:]


# --- include ----------------------------------------------------------------------------

def test_globs_are_read_in_sorted_order_and_arrays_of_tables_append(tmp_path):
    main = write(tmp_path / "edgeproxy.toml", 'include = ["conf.d/*.toml"]\n' + BASE)
    write(tmp_path / "conf.d/20-b.toml", """
        [[route]]
        path = "/b/"
        pool = "b"
        [pool.b]
        backends = ["http://127.0.0.1:5002"]
        """)
    write(tmp_path / "conf.d/10-a.toml", """
        [[listen]]
        bind = "127.0.0.1:8081"
        [[route]]
        path = "/a/"
        pool = "a"
        [pool.a]
        backends = ["http://127.0.0.1:5001"]
        """)
    write(tmp_path / "conf.d/notes.txt", "not toml, not matched")
    config = load_config(main)
    assert [r.path for r in config.routes] == ["/", "/a/", "/b/"]
    assert [lc.port for lc in config.listen] == [8080, 8081]
    assert list(config.pools) == ["web", "a", "b"]
    assert config.files == (main, str(tmp_path / "conf.d/10-a.toml"),
                            str(tmp_path / "conf.d/20-b.toml"))


def test_tables_merge_key_by_key(tmp_path):
    main = write(tmp_path / "main.toml", """\
        include = "more.toml"
        [server]
        workers = 3
        [[listen]]
        bind = "127.0.0.1:8080"
        [[route]]
        pool = "web"
        [pool.web]
        backends = ["http://127.0.0.1:5000"]
        """)
    write(tmp_path / "more.toml", """
        [server]
        grace = 7
        [pool.web]
        keepalive = 5
        health.path = "/healthz"
        """)
    config = load_config(main)
    assert (config.server.workers, config.server.grace) == (3, 7.0)
    web = config.pools["web"]
    assert (web.keepalive, web.health.path, len(web.backends)) == (5, "/healthz", 1)


def test_a_key_set_in_two_files_names_both(tmp_path):
    main = write(tmp_path / "main.toml", 'include = ["conf.d/*.toml"]\n' + BASE + "[server]\nworkers = 2\n")
    write(tmp_path / "conf.d/a.toml", "# workers again\n[server]\nworkers = 4\n")
    write(tmp_path / "conf.d/b.toml", '[pool.web]\nbackends = ["http://127.0.0.1:6000"]\n')
    error = failure(main)
    assert error.errors == [
        f"server.workers: set in {main}:9 and again in {tmp_path}/conf.d/a.toml:3 (only tables "
        "merge and arrays of tables append; any other key may be set in one file only)",
        f"pool.web.backends: set in {main}:7 and again in {tmp_path}/conf.d/b.toml:2 (only tables "
        "merge and arrays of tables append; any other key may be set in one file only)",
    ]
    assert error.locations == [f"{tmp_path}/conf.d/a.toml:3", f"{tmp_path}/conf.d/b.toml:2"]


def test_a_table_and_a_value_for_one_key_is_an_error(tmp_path):
    main = write(tmp_path / "main.toml", 'include = "x.toml"\n' + BASE + "[server]\nworkers = 1\n")
    write(tmp_path / "x.toml", 'server = "yes"\n')
    assert failure(main).errors[0].startswith(f"server: set in {main}:8 and again in "
                                              f"{tmp_path}/x.toml:1")


def test_nested_includes_are_relative_to_the_including_file(tmp_path):
    main = write(tmp_path / "main.toml", 'include = ["sites/*.toml"]\n' + BASE)
    write(tmp_path / "sites/shop.toml", 'include = ["shop.d/*.toml"]\n')
    write(tmp_path / "sites/shop.d/routes.toml", """
        [[route]]
        host = "shop.example.com"
        pool = "web"
        """)
    config = load_config(main)
    assert [r.host for r in config.routes] == [None, "shop.example.com"]
    assert config.files[-1] == str(tmp_path / "sites/shop.d/routes.toml")


def test_an_include_cycle_is_an_error(tmp_path):
    main = write(tmp_path / "main.toml", 'include = "a.toml"\n' + BASE)
    write(tmp_path / "a.toml", 'include = "b.toml"\n')
    write(tmp_path / "b.toml", 'include = "main.toml"\n')
    error = failure(main)
    assert error.errors == [f"include[0]: include cycle: {main} -> {tmp_path}/a.toml -> "
                            f"{tmp_path}/b.toml -> {main}"]
    assert error.locations == [f"{tmp_path}/b.toml:1"]


def test_a_file_reached_twice_is_an_error(tmp_path):
    main = write(tmp_path / "main.toml", 'include = ["conf.d/*.toml", "conf.d/a.toml"]\n' + BASE)
    write(tmp_path / "conf.d/a.toml", "")
    assert failure(main).errors == [
        f"include[1]: {tmp_path}/conf.d/a.toml is already included by {main}"]


def test_a_glob_may_match_nothing_but_a_plain_path_must_exist(tmp_path):
    main = write(tmp_path / "main.toml", 'include = ["conf.d/*.toml"]\n' + BASE)
    assert load_config(main).files == (main,)
    missing = write(tmp_path / "missing.toml", 'include = ["conf.d/*.toml", "site.toml"]\n' + BASE)
    error = failure(missing)
    assert error.errors == [f"include[1]: 'site.toml' not found (looked for {tmp_path}/site.toml; "
                            'a glob such as "conf.d/*.toml" may match nothing, a plain path must exist)']
    assert error.locations == [f"{missing}:1"]


def test_include_must_be_paths(tmp_path):
    main = write(tmp_path / "main.toml", "include = [1]\n" + BASE)
    assert failure(main).errors == [
        f"include: expected a path or an array of paths (strings), in {main}"]
    inside = write(tmp_path / "inside.toml", BASE + 'include = "x.toml"\n')   # in [pool.web]
    assert failure(inside).errors == ["pool.web.include: unknown key"]


def test_errors_in_an_included_file_name_that_file_and_keep_toml_lines(tmp_path):
    main = write(tmp_path / "main.toml", 'include = "conf.d/*.toml"\n' + BASE)
    write(tmp_path / "conf.d/a.toml", "[[route]]\npath = '/a/'\npool = \"web\"\n\n[timeout]\nread = 'x'\n")
    write(tmp_path / "conf.d/b.toml", '[[route]]\npath = "/b/"\npool = "api"\n')
    error = failure(main)
    assert error.errors == ['timeout.read: expected a number, got "x"',
                            'route[2].pool: no pool named "api"']
    assert error.locations == [f"{tmp_path}/conf.d/a.toml:6", f"{tmp_path}/conf.d/b.toml:3"]
    write(tmp_path / "conf.d/b.toml", '[[route]\npath = "/b/"\n')
    error = failure(main)
    assert len(error.errors) == 1
    assert error.errors[0].startswith(f"{tmp_path}/conf.d/b.toml: invalid TOML: ")
    assert "line 1" in error.errors[0]


def test_check_prints_file_and_line_relative_as_given(tmp_path):
    write(tmp_path / "main.toml", 'include = ["conf.d/*.toml"]\n' + BASE)
    write(tmp_path / "conf.d/api.toml", '\n[[route]]\npath = "/api/"\npool = "apii"\n')
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "edgeproxy", "check", "-c", "main.toml"],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=60)
    assert proc.returncode == 1
    assert proc.stderr.splitlines() == [
        "edgeproxy: invalid configuration in main.toml (1 error):",
        '  conf.d/api.toml:4: route[1].pool: no pool named "apii"',
    ]


def test_check_locates_certificate_problems_in_included_files(tmp_path):
    from tlsutil import CA
    ca = CA()
    a = ca.issue("a.test").write(str(tmp_path), "a")
    b = ca.issue("b.test").write(str(tmp_path), "b")
    write(tmp_path / "main.toml", 'include = "tls.toml"\n' + BASE)
    write(tmp_path / "tls.toml", f'# HTTPS\n[[listen]]\nbind = "127.0.0.1:8443"\n'
                                  f'tls.certs = [{{ cert = "{a.cert}", key = "{b.key}" }}]\n')
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "edgeproxy", "check", "-c", "main.toml"],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=60)
    assert proc.returncode == 1
    lines = proc.stderr.splitlines()
    assert lines[0] == "edgeproxy: main.toml: 1 problem(s):"
    assert lines[1].startswith("  tls.toml:4: listen[1].tls: ") and "does not match" in lines[1]


# --- ${ENV} -----------------------------------------------------------------------------

def test_substitute_forms():
    env = {"A": "alpha", "EMPTY": ""}
    assert substitute("x-${A}-y", env) == "x-alpha-y"
    assert substitute("${MISSING:-fallback}", env) == "fallback"
    assert substitute("${EMPTY:-fallback}", env) == "fallback"
    assert substitute("${A:-fallback}", env) == "alpha"
    assert substitute("${MISSING:-}", env) == ""
    assert substitute("$${A} costs $5 and $$", env) == "${A} costs $5 and $$"
    assert substitute("${A}${A}", {"A": "${A}"}) == "${A}${A}"   # never substituted twice
    for bad, message in [("${MISSING}", "MISSING is not set"), ("${A", 'without a closing "}"'),
                         ("${1A}", "is not ${NAME} or ${NAME:-default}"),
                         ("${A-x}", "is not ${NAME} or ${NAME:-default}")]:
        with pytest.raises(ValueError, match=message.replace("$", r"\$").replace("{", r"\{")
                           .replace("}", r"\}")):
            substitute(bad, env)


def test_env_in_string_values(tmp_path, monkeypatch):
    monkeypatch.setenv("EP_BACKEND", "http://127.0.0.1:5009")
    monkeypatch.setenv("EP_HEADER", "edge")
    monkeypatch.delenv("EP_UNSET", raising=False)
    main = write(tmp_path / "main.toml", """\
        [server]
        server_header = "${EP_HEADER}-$${literal}"
        [[listen]]
        bind = "${EP_UNSET:-127.0.0.1:8089}"
        [[route]]
        pool = "web"
        [pool.web]
        backends = ["${EP_BACKEND} weight=2"]
        """)
    config = load_config(main)
    assert config.server.server_header == "edge-${literal}"
    assert config.listen[0].port == 8089
    assert (config.pools["web"].backends[0].port, config.pools["web"].backends[0].weight) == (5009, 2)


def test_an_unset_variable_names_the_key_and_the_file(tmp_path, monkeypatch):
    monkeypatch.delenv("EP_UNSET", raising=False)
    main = write(tmp_path / "main.toml", 'include = "pools.toml"\n' + BASE)
    write(tmp_path / "pools.toml", '[pool.api]\n\nbackends = ["http://a", "${EP_UNSET}"]\n')
    error = failure(main)
    assert error.errors == ["pool.api.backends[1]: the environment variable EP_UNSET is not set "
                            "and ${EP_UNSET} has no default (write ${EP_UNSET:-default} to give one)"]
    assert error.locations == [f"{tmp_path}/pools.toml:3"]


def test_a_variable_cannot_inject_toml(tmp_path, monkeypatch):
    monkeypatch.setenv("EP_EVIL", '127.0.0.1:8080"\n[server]\nworkers = 99\n#')
    error = failure(write(tmp_path / "main.toml", BASE.replace('"127.0.0.1:8080"', '"${EP_EVIL}"')))
    assert len(error.errors) == 1 and error.errors[0].startswith("listen[0].bind: ")
    monkeypatch.setenv("EP_EVIL", '"; rm -rf /')
    config = load_config(write(tmp_path / "ok.toml", BASE + '[server]\nserver_header = "${EP_EVIL}"\n'))
    assert config.server.server_header == '"; rm -rf /'
    assert config.server.workers == 1


def test_only_strings_are_substituted(tmp_path, monkeypatch):
    monkeypatch.setenv("EP_WORKERS", "4")
    error = failure(write(tmp_path / "main.toml", BASE + '[server]\nworkers = "${EP_WORKERS}"\n'))
    assert error.errors == ['server.workers: expected an integer, got "4"']


def test_env_in_include_paths(tmp_path, monkeypatch):
    monkeypatch.setenv("EP_SITE", "blue")
    main = write(tmp_path / "main.toml", 'include = "sites/${EP_SITE}.toml"\n' + BASE)
    write(tmp_path / "sites/blue.toml", '[[route]]\npath = "/blue/"\npool = "web"\n')
    assert [r.path for r in load_config(main).routes] == ["/", "/blue/"]


def test_parse_config_without_a_file_includes_from_the_current_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write(tmp_path / "extra.toml", '[[route]]\npath = "/x/"\npool = "web"\n')
    config = parse_config('include = "extra.toml"\n' + BASE)
    assert [r.path for r in config.routes] == ["/", "/x/"]


# --- key lines ---------------------------------------------------------------------------

def test_key_lines_cover_tables_arrays_inline_tables_and_strings():
    text = textwrap.dedent('''\
        [server]
        "quoted key" = 'v'  # comment [not a table]
        hooks = ["a:b",
          "c:d"]
        [[listen]]
        bind = ":80"
        tls.certs = [
          { cert = "a", key = "b" },
          { cert = """x
        [not.a.table]
        """, key = "d" },
        ]
        [[listen]]
        bind = ":81"
        [listen.tls]
        min_version = "1.3"
        [pool."my pool"]
        health = { path = "/h" }
        ''')
    tomllib.loads(text)
    lines = key_lines(text)
    assert lines[("server", "quoted key")] == 2
    assert (lines[("server", "hooks", 0)], lines[("server", "hooks", 1)]) == (3, 4)
    assert (lines[("listen", 0)], lines[("listen", 0, "bind")]) == (5, 6)
    assert lines[("listen", 0, "tls", "certs", 1, "key")] == 11
    assert ("not", "a", "table") not in lines
    assert (lines[("listen", 1)], lines[("listen", 1, "tls", "min_version")]) == (13, 16)
    assert lines[("pool", "my pool", "health", "path")] == 18


def _random_document(rng: random.Random) -> tuple[str, dict]:
    """A TOML document and the line each of its keys and array items is on."""
    lines: list[str] = []
    expected: dict = {}
    names = ["a", "b_2", "x-y", '"dotted.name"', '"with # hash"', "'literal key'", '"q\\"uote"']

    def unquote(name: str) -> str:
        return tomllib.loads(f"k = {name}")["k"] if name[0] in "\"'" else name

    def scalar() -> str:
        return rng.choice(['"plain"', '"has # and [x] and = and \\" quote"', "'C:\\path'",
                           "42", "-1.5e3", "true", "1979-05-27 07:32:00", "inf",
                           '"""one line"""'])

    def pairs(table: tuple, count: int) -> None:
        used = set()
        for _ in range(count):
            name = rng.choice(names)
            if unquote(name) in used:
                continue
            used.add(unquote(name))
            path = table + (unquote(name),)
            shape = rng.randrange(5)
            if shape == 0:        # an array over several lines, with comments
                lines.append(f"{name} = [  # starts")
                expected[path] = len(lines)
                for i in range(rng.randint(0, 3)):
                    lines.append(f"  {scalar()},  # item {i}")
                    expected[path + (i,)] = len(lines)
                lines.append("]")
            elif shape == 1:      # an inline table
                lines.append(f"{name} = {{ k = {scalar()}, \"o t\" = [1, 2] }}")
                expected[path] = expected[path + ("k",)] = len(lines)
                expected[path + ("o t",)] = expected[path + ("o t", 1)] = len(lines)
            elif shape == 2:      # a multi-line string with lines that look like TOML
                lines.append(f'{name} = """')
                expected[path] = len(lines)
                lines.extend(["[not.a.table]", "x = 1", 'still \\""" inside, "" quotes', '"""'])
            else:
                lines.append(f"{name} = {scalar()}  # comment = [x]")
                expected[path] = len(lines)

    pairs((), rng.randint(0, 3))
    for t in range(rng.randint(0, 3)):
        lines.append(f"[table{t}]  # a table")
        expected[(f"table{t}",)] = len(lines)
        pairs((f"table{t}",), rng.randint(0, 3))
    for i in range(rng.randint(0, 3)):
        lines.append("")
        lines.append("[[item]]")
        expected[("item", i)] = len(lines)
        pairs(("item", i), rng.randint(0, 3))
        if rng.random() < 0.5:
            lines.append("[item.sub]")
            expected[("item", i, "sub")] = len(lines)
            pairs(("item", i, "sub"), 2)
    return "\n".join(lines) + "\n", expected


def test_key_lines_on_generated_documents():
    rng = random.Random(15)
    for _ in range(300):
        text, expected = _random_document(rng)
        tomllib.loads(text)                    # the generator writes valid TOML
        lines = key_lines(text)
        for path, line in expected.items():
            assert lines.get(path) == line, (path, text)


def test_key_lines_never_raise_nor_hang_on_fragments():
    text, _ = _random_document(random.Random(3))
    for cut in range(0, len(text), 7):       # not TOML any more: still an answer
        assert isinstance(key_lines(text[:cut] + '"\n[x' + "{[" * 3), dict)


def test_key_path_text_round_trips():
    for path in [("route", 1, "pool"), ("pool", "my pool", "backends", 0), ("listen",)]:
        assert parse_key_path(format_key_path(path)) == path
    assert format_key_path(("pool", "my pool", "backends", 0)) == 'pool."my pool".backends[0]'
    assert parse_key_path("not a path") is None


# --- a running proxy --------------------------------------------------------------------

@pytest.fixture
def supervised(tmp_path, origin):
    """`edgeproxy run` on a main file that includes conf.d/*.toml and takes its
    backend from the environment; yields (port, admin port, tmp_path)."""
    port, admin_port = free_port(), free_port()
    write(tmp_path / "edgeproxy.toml", f"""\
        include = ["conf.d/*.toml"]
        [server]
        pid_file = "{tmp_path}/edgeproxy.pid"
        admin = "127.0.0.1:{admin_port}"
        grace = 2
        [[listen]]
        bind = "127.0.0.1:{port}"
        [pool.web]
        backends = ["${{EP_TEST_ORIGIN}}"]
        """)
    write(tmp_path / "conf.d/10-size.toml", '[[route]]\npath = "/size/"\npool = "web"\n')
    env = {**os.environ, "PYTHONPATH": str(ROOT), "EP_TEST_ORIGIN": origin.url}
    log = open(tmp_path / "proxy.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "edgeproxy", "run", "-c", "edgeproxy.toml"],
                            cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=log)
    try:
        wait_port(port, proc)
        wait_port(admin_port, proc)
        yield port, admin_port, tmp_path
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
        log.close()


def test_a_running_proxy_serves_included_routes_and_reload_rereads_them(supervised):
    port, admin_port, tmp_path = supervised
    with Client(port) as c:
        assert c.request("GET", "/size/3").body == b"xxx"      # backend from ${EP_TEST_ORIGIN}
        assert c.request("GET", "/echo/x").status == 404       # no route yet
    before = status(admin_port)
    main, first = tmp_path / "edgeproxy.toml", tmp_path / "conf.d/10-size.toml"
    assert before["config"]["checksum"] == hashlib.sha256(main.read_bytes() + first.read_bytes()).hexdigest()

    second = tmp_path / "conf.d/20-echo.toml"
    write(second, '[[route]]\npath = "/echo/"\npool = "web"\n')
    os.kill(int((tmp_path / "edgeproxy.pid").read_text()), signal.SIGHUP)
    wait_until(lambda: status(admin_port)["generation"] == 2, timeout=30, what="the reload")
    after = status(admin_port)
    assert after["config"]["checksum"] == hashlib.sha256(
        main.read_bytes() + first.read_bytes() + second.read_bytes()).hexdigest()
    with Client(port) as c:
        assert c.request("GET", "/echo/x").status == 200
        assert c.request("GET", "/size/2").body == b"xx"

    # a broken include fails the reload and names its file and line; nothing changes
    write(tmp_path / "conf.d/30-bad.toml", '[[route]]\npath = "/bad/"\npool = "nope"\n')
    env = {**os.environ, "PYTHONPATH": str(ROOT), "EP_TEST_ORIGIN": "http://127.0.0.1:1"}
    done = subprocess.run([sys.executable, "-m", "edgeproxy", "reload", "-c", "edgeproxy.toml"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 1
    assert 'conf.d/30-bad.toml:3: route[2].pool: no pool named "nope"' in done.stderr
    assert status(admin_port)["generation"] == 2
