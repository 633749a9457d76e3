"""The hook of the get-1k-hook case: a request and a log phase that do nothing,
so the case shows what the phase machinery itself costs per request."""


class Noop:
    def request(self, ctx):
        return None

    def log(self, ctx):
        return None
