"""A bearer-token check: no valid token, no request reaches the backend."""
import hmac
import os

from edgeproxy.phases import Response


class RequireToken:
    def __init__(self):
        # one token from the environment; a real deployment would check a signature
        self.token = os.environ.get("EDGE_TOKEN", "s3cret")

    def request(self, ctx):
        auth = ctx.headers.get("Authorization", "")
        scheme, _, token = auth.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip(), self.token):
            return Response(401, "a bearer token is required\n",
                            {"WWW-Authenticate": 'Bearer realm="api"',
                             "Content-Type": "text/plain"})
        ctx.headers.remove("Authorization")    # the backend trusts the edge, not the token
        return None
