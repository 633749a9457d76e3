"""Add fields to the access log line: who the user was and how long the backend took."""


class LogUser:
    def request(self, ctx):
        ctx.vars["user"] = ctx.headers.get("X-User", "-")

    def log(self, ctx):
        ctx.log["user"] = ctx.vars.get("user", "-")
        ctx.log["upstream"] = ctx.upstream or "-"
