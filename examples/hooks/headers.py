"""Rewrite fields both ways: tell the backend who asked, hide what it says about itself."""


class RewriteHeaders:
    def request(self, ctx):
        ctx.headers.set("X-Real-IP", ctx.client_ip)
        ctx.headers.remove("X-Debug")          # never let clients switch debugging on

    def response(self, ctx):
        ctx.response_headers.set("X-Frame-Options", "DENY")
        ctx.response_headers.remove("X-Internal")
