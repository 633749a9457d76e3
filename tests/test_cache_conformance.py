"""RFC 9111 details found by running an independent conformance suite against
the cache, each checked end to end: a scripted origin, a real proxy process."""

from __future__ import annotations

import socket
import threading
import time
from email.utils import formatdate

import pytest
from harness import Client
from test_cache_hot import counters
from test_cache_proxy import cache_config, wait_for


class ScriptedOrigin:
    """Answers GET <path> with the fields script[path] gives for that path's
    n-th request (the last one repeats), a 304 when the fields say so, and
    records each request's fields."""

    def __init__(self, script: dict[str, list[tuple[int, list[tuple[str, str]]]]]):
        self.script = script
        self.seen: dict[str, list[dict[str, str]]] = {}
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        buf = b""
        with conn:
            while True:
                while b"\r\n\r\n" not in buf:
                    data = conn.recv(65536)
                    if not data:
                        return
                    buf += data
                head, buf = buf.split(b"\r\n\r\n", 1)
                lines = head.decode("latin-1").split("\r\n")
                path = lines[0].split(" ")[1]
                fields = {k.strip().lower(): v.strip()
                          for k, v in (ln.split(":", 1) for ln in lines[1:])}
                with self.lock:
                    seen = self.seen.setdefault(path, [])
                    seen.append(fields)
                    steps = self.script[path]
                    status, extra = steps[min(len(seen), len(steps)) - 1]
                body = b"" if status == 304 else b"body of " + path.encode()
                out = [f"HTTP/1.1 {status} {'Not Modified' if status == 304 else 'OK'}",
                       "Date: " + formatdate(time.time(), usegmt=True),
                       *(f"{k}: {v}" for k, v in extra)]
                if status != 304:
                    out.append(f"Content-Length: {len(body)}")
                conn.sendall(("\r\n".join(out) + "\r\n\r\n").encode("latin-1") + body)

    def count(self, path: str) -> int:
        with self.lock:
            return len(self.seen.get(path, []))

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def scripted(proxy_factory, tmp_path):
    """make(script) -> (origin, proxy) with the cache in front of the origin."""
    made = []

    def make(script):
        origin = ScriptedOrigin(script)
        made.append(origin)
        return origin, proxy_factory(cache_config(tmp_path, origin.url))

    yield make
    for o in made:
        o.close()


def get(port: int, path: str):
    with Client(port) as c:
        return c.request("GET", path, None)


def status_of(port: int, path: str) -> str:
    return get(port, path).header("cache-status") or ""


def committed(proxy, n: int) -> None:
    """Wait until the store has committed n responses (asking the proxy
    again before that would be a miss, and use up the origin's script)."""
    assert wait_for(lambda: counters(proxy)["stores"] >= n, timeout=8.0)


def test_age_takes_the_first_member_of_a_list(scripted):
    # RFC 9111 §5.1: Age is one delta-seconds; "7200, 0" is read as 7200,
    # which makes a max-age=3600 response stale on arrival.
    origin, p = scripted({
        "/old": [(200, [("Cache-Control", "max-age=3600"), ("Age", "7200, 0"),
                        ("ETag", '"o"')])],
        "/young": [(200, [("Cache-Control", "max-age=3600"), ("Age", "0, 7200")])],
    })
    assert get(p.port, "/old").status == 200
    assert wait_for(lambda: "fwd=stale" in status_of(p.port, "/old"))
    assert origin.seen["/old"][-1].get("if-none-match") == '"o"'
    get(p.port, "/young")
    assert wait_for(lambda: status_of(p.port, "/young").startswith("edgeproxy; hit"))
    assert origin.count("/young") >= 1


@pytest.mark.parametrize("expires", [
    "Thu, 18  Aug  2050 02:01:18 GMT",   # doubled spaces
    "Thu, 18 Aug 2050 2:01:18 GMT",      # one-digit hour
    "Thu, 8 Aug 2050 02:01:18 GMT",      # one-digit day
    "Thu, 18 Aug 2050 02:01:18 UTC",     # not GMT
])
def test_an_expires_that_is_not_an_http_date_means_expired(scripted, expires):
    origin, p = scripted({"/e": [(200, [("Expires", expires), ("ETag", '"e"')])]})
    get(p.port, "/e")
    assert wait_for(lambda: "fwd=stale" in status_of(p.port, "/e"))
    assert not status_of(p.port, "/e").startswith("edgeproxy; hit")


@pytest.mark.parametrize("expires", [
    "Thu, 18 Aug 2050 02:01:18 gMT",     # RFC 9111 §4.2: match names without case
    "THU, 18 AUG 2050 02:01:18 GMT",
    "Thursday, 18-Aug-50 02:01:18 GMT",  # RFC 850
    "Thu Aug  8 02:01:18 2050",          # asctime, one-digit day after two spaces
])
def test_an_expires_in_any_http_date_form_is_fresh(scripted, expires):
    origin, p = scripted({"/f": [(200, [("Expires", expires)])]})
    get(p.port, "/f")
    assert wait_for(lambda: status_of(p.port, "/f").startswith("edgeproxy; hit"))
    before = origin.count("/f")
    assert status_of(p.port, "/f").startswith("edgeproxy; hit")
    assert origin.count("/f") == before


def test_the_request_after_a_304_sees_the_freshened_entry(scripted):
    # The 304 updates the stored entry off the loop; the very next request
    # must already see it fresh (and with the 304's fields), not revalidate again.
    origin, p = scripted({"/r": [
        (200, [("Cache-Control", "max-age=1"), ("ETag", '"r"'), ("X-Version", "a")]),
        (304, [("Cache-Control", "max-age=3600"), ("ETag", '"r"'), ("X-Version", "b")]),
        (200, [("Cache-Control", "max-age=3600"), ("ETag", '"r2"'), ("X-Version", "c")]),
    ]})
    get(p.port, "/r")
    committed(p, 1)
    assert wait_for(lambda: "fwd=stale" in status_of(p.port, "/r"), timeout=5.0)
    assert origin.count("/r") == 2 and origin.seen["/r"][1].get("if-none-match") == '"r"'
    after = get(p.port, "/r")
    assert after.header("cache-status").startswith("edgeproxy; hit")
    assert after.header("x-version") == "b" and after.body == b"body of /r"
    assert origin.count("/r") == 2


def test_stale_at_once_is_stored_when_it_may_be_served_stale(scripted):
    # max-age=0 without a validator is useless to store, unless stale-if-error
    # or stale-while-revalidate (RFC 5861) let the cache serve it stale.
    origin, p = scripted({
        "/sie": [(200, [("Cache-Control", "max-age=0, stale-if-error=60"), ("X-V", "a")]),
                 (500, [("X-V", "error")])],
        "/swr": [(200, [("Cache-Control", "max-age=0, stale-while-revalidate=60"),
                        ("X-V", "a")]),
                 (200, [("Cache-Control", "max-age=0, stale-while-revalidate=60"),
                        ("X-V", "b")])],
        "/none": [(200, [("Cache-Control", "max-age=0"), ("X-V", "a")]),
                  (500, [("X-V", "error")])],
    })
    first = get(p.port, "/sie")
    assert first.header("cache-status").endswith("stored")
    assert wait_for(lambda: get(p.port, "/sie").header("x-v") == "a")   # the 500 is hidden
    assert origin.count("/sie") >= 2
    assert get(p.port, "/swr").header("cache-status").endswith("stored")
    answers = []

    def stale_answer() -> bool:
        answers.append(get(p.port, "/swr"))
        # a stale hit (RFC 9211: a negative ttl), refreshed in the background
        return answers[-1].header("cache-status").startswith("edgeproxy; hit; ttl=-")
    assert wait_for(stale_answer)      # once the store has committed it
    assert answers[-1].status == 200 and answers[-1].body == b"body of /swr"
    assert "detail=no-freshness" in get(p.port, "/none").header("cache-status")
    assert get(p.port, "/none").status == 500


def test_a_304_that_selects_nothing_is_repeated_without_conditions(scripted):
    # RFC 9111 §4.3.4: a 304 whose validator matches no stored response must
    # not be used; the request is sent again without its conditions, and
    # the client (which asked for no 304) gets the full response.
    origin, p = scripted({"/m": [
        (200, [("Cache-Control", "max-age=1"), ("ETag", '"a"'), ("X-V", "a")]),
        (304, [("Cache-Control", "max-age=3600"), ("ETag", '"other"')]),
        (200, [("Cache-Control", "max-age=3600"), ("ETag", '"b"'), ("X-V", "b")]),
    ]})
    get(p.port, "/m")
    committed(p, 1)
    time.sleep(1.2)                  # the entry goes stale
    r = get(p.port, "/m")
    assert r.status == 200 and r.header("x-v") == "b" and r.body == b"body of /m"
    assert origin.count("/m") == 3
    assert origin.seen["/m"][1].get("if-none-match") == '"a"'
    assert "if-none-match" not in origin.seen["/m"][2]
    committed(p, 2)                  # the full response replaced the entry
    r = get(p.port, "/m")
    assert r.header("cache-status").startswith("edgeproxy; hit") and r.header("x-v") == "b"
    assert origin.count("/m") == 3
