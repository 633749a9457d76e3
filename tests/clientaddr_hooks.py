"""A hook that tests/test_clientaddr.py loads: it shows the client address
the proxy settled on (ctx.client_ip) in a response field."""


class ShowClient:
    def response(self, ctx):
        ctx.response_headers.set("X-Client-IP", ctx.client_ip)
