"""The admin listener: a small HTTP/1.1 server on the supervisor's event
loop for operators (metrics, status, reload, taking backends in and out).
It answers one request per connection and is never on a public bind."""

from edgeproxy.admin.server import bind_admin, start_admin

__all__ = ["bind_admin", "start_admin"]
