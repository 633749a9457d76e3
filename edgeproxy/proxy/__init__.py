"""The proxy's building blocks as the control layer sees them: settings,
routes, pools and listeners of the compiled core, built from a Config."""

from __future__ import annotations

from edgeproxy.proxy.build import build_listener_factory, build_pools, build_router, build_settings

__all__ = ["build_listener_factory", "build_pools", "build_router", "build_settings"]
