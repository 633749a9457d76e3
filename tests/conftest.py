"""Fixtures shared by the end-to-end tests: origins and proxy processes."""

from __future__ import annotations

import pytest
from harness import Origin, simple_config, start_proxy


@pytest.fixture
def origin():
    o = Origin().start()
    yield o
    o.stop()


@pytest.fixture
def proxy_factory(tmp_path):
    started = []

    def make(body: str, **kw):
        p = start_proxy(tmp_path, body, **kw)
        started.append(p)
        return p

    yield make
    for p in started:
        p.stop()


@pytest.fixture(params=["uvloop", "asyncio"])
def proxy(request, origin, proxy_factory):
    """A proxy with one route to the origin and short timeouts, on uvloop
    and on the standard asyncio loop (EDGEPROXY_LOOP)."""
    return proxy_factory(simple_config(origin.url, "[timeout]\nread = 2.0\nheader = 1.0\nkeepalive = 2.0\n"),
                         env={"EDGEPROXY_LOOP": request.param})
