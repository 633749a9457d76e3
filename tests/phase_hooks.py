"""Hooks that tests/test_phases.py loads into a real proxy ("tests.phase_hooks:Name")."""
import asyncio

from edgeproxy.phases import Response


class First:
    def request(self, ctx):
        ctx.vars["order"] = ["first"]
        ctx.headers.add("X-Order", "first")

    def response(self, ctx):
        ctx.response_headers.add("X-Resp-Order", "first")


class Second:
    def request(self, ctx):
        ctx.vars["order"].append("second")
        ctx.headers.add("X-Order", "second")

    def response(self, ctx):
        ctx.response_headers.add("X-Resp-Order", "second")


class AsyncThenSync:
    """An async hook between two plain ones: the chain resumes where it left off."""

    async def request(self, ctx):
        await asyncio.sleep(0.05)
        ctx.headers.set("X-Async", "done")


class TooSlow:
    async def request(self, ctx):
        await asyncio.sleep(30)


class Raises:
    def request(self, ctx):
        raise RuntimeError("secret internal detail")


class AsyncRaises:
    async def request(self, ctx):
        await asyncio.sleep(0)
        raise KeyError("secret async detail")


class BadField:
    def request(self, ctx):
        ctx.headers.set("X-Evil", "a\r\nInjected: yes")


class BadName:
    def request(self, ctx):
        ctx.headers.set("Bad Name", "x")


class BadReturn:
    def request(self, ctx):
        return 42


class BadStatus:
    def request(self, ctx):
        return Response(99)


class InspectBody:
    def request_body(self, ctx, body):
        if b"attack" in body:
            return Response(403, "refused\n")
        ctx.headers.set("X-Body-Len", str(len(body)))


class ErrorPage:
    def error(self, ctx):
        return Response(ctx.status, f"<h1>sorry ({ctx.status})</h1>\n",
                        {"Content-Type": "text/html"})


class AsyncErrorPage:
    async def error(self, ctx):
        await asyncio.sleep(0.01)
        return Response(503, "maintenance\n", {"Retry-After": "120"})


class UpstreamHost:
    def upstream_request(self, ctx):
        ctx.upstream_headers.set("Host", "backend.internal")
        ctx.upstream_headers.remove("X-Forwarded-Host")


class ReplaceResponse:
    def response(self, ctx):
        if ctx.status == 404:
            return Response(404, "custom not found\n")
        ctx.status = 299 if ctx.headers.get("X-Status") == "299" else ctx.status


class Rewrite:
    def request(self, ctx):
        if ctx.path == "/old":
            ctx.target = "/echo?moved=1"
        if ctx.headers.get("X-Method"):
            ctx.method = ctx.headers.get("X-Method")


class Noop:
    def request(self, ctx):
        pass

    def log(self, ctx):
        pass


class DenyConnect:
    """Refuses every connection whose vars say so (one from 127.0.0.2)."""

    def connect(self, ctx):
        if ctx.client_ip == "127.0.0.2":
            return False


class AsyncConnect:
    async def connect(self, ctx):
        await asyncio.sleep(0.01)
        ctx.vars["checked"] = "yes"

    def request(self, ctx):
        ctx.headers.set("X-Conn-Checked", ctx.connection.vars.get("checked", "no"))


class Backend:
    def request(self, ctx):
        want = ctx.headers.get("X-Backend")
        if want:
            ctx.backend = want


class NoPhase:
    pass


class StampEveryAnswer:
    """A response hook that marks every answer: backend, cache, error or hook."""

    def response(self, ctx):
        ctx.response_headers.set("X-Stamp", str(ctx.status))


class BodyWatch:
    """response_body: counts what streams and notes its end in a field of the access log."""

    def response_body(self, ctx, chunk, last):
        seen = ctx.vars.setdefault("body", [])
        seen.append(len(chunk))
        if last:
            ctx.vars["ended"] = True

    def log(self, ctx):
        seen = ctx.vars.get("body", [])
        ctx.log["body_bytes"] = sum(seen)
        ctx.log["body_calls"] = len(seen)
        ctx.log["ended"] = "yes" if ctx.vars.get("ended") else "no"
