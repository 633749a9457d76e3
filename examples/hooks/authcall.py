"""Ask an auth service before forwarding (an async hook: the loop serves others meanwhile).

The service (AUTH_URL, e.g. http://127.0.0.1:9000/check) answers 200 with an
`X-User` field for a good session cookie and anything else for a bad one.
"""
import asyncio
import os
from urllib.parse import urlsplit

from edgeproxy.phases import Response


class AskAuthService:
    def __init__(self):
        url = urlsplit(os.environ.get("AUTH_URL", "http://127.0.0.1:9000/check"))
        self.host, self.port, self.path = url.hostname, url.port or 80, url.path or "/"

    async def request(self, ctx):
        cookie = ctx.headers.get("Cookie", "")
        reader, writer = await asyncio.open_connection(self.host, self.port)
        try:
            writer.write(f"GET {self.path} HTTP/1.1\r\nHost: {self.host}\r\n"
                         f"Cookie: {cookie}\r\nConnection: close\r\n\r\n".encode("latin-1"))
            head = await reader.readuntil(b"\r\n\r\n")
        finally:
            writer.close()
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        if status != 200:
            return Response(403, "forbidden\n", {"Content-Type": "text/plain"})
        for line in lines[1:]:
            name, _, value = line.partition(":")
            if name.strip().lower() == "x-user":
                ctx.headers.set("X-User", value.strip())
        return None
