"""Running the proxy: a worker's event loop, its listeners, timers and
signals (`serve` is what the CLI calls)."""

from edgeproxy.server.worker import serve

__all__ = ["serve"]
