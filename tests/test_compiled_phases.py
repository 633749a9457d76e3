"""The seam for compiled phases: a route's phases in order (edgeproxy.proxy.compiled)."""

import pytest

from edgeproxy._ext import CacheRoutePhase, PhaseSeq
from edgeproxy.proxy import compiled


def test_phase_seq_takes_only_compiled_phases():
    with pytest.raises(TypeError, match="not a compiled Phase"):
        PhaseSeq([object()])
    seq = PhaseSeq([CacheRoutePhase()])
    assert len(seq.items) == 1


def test_route_phase_is_nothing_for_a_route_that_uses_nothing(monkeypatch):
    env = compiled.BuildEnv(config=None, pools={})
    monkeypatch.setattr(compiled, "MAKERS", [("none", lambda env, r, i: None)])
    assert compiled.route_phase(env, None, 0, None) is None
    cache = CacheRoutePhase()
    # a lone phase is the route's phase itself, with no sequence around it
    assert compiled.route_phase(env, None, 0, cache) is cache


def test_route_phase_puts_the_cache_last(monkeypatch):
    first = CacheRoutePhase()      # any compiled Phase stands in for a feature's
    monkeypatch.setattr(compiled, "MAKERS", [("a", lambda env, r, i: first)])
    cache = CacheRoutePhase()
    seq = compiled.route_phase(compiled.BuildEnv(config=None, pools={}), None, 0, cache)
    assert isinstance(seq, PhaseSeq)
    assert seq.items == (first, cache)
