"""A/B routing by cookie: `ab=b` goes to the pool "web_b", everyone else to the route's pool."""
from http.cookies import CookieError, SimpleCookie


class CookieSplit:
    pool_b = "web_b"

    def request(self, ctx):
        raw = ctx.headers.get("Cookie")
        if not raw:
            return
        try:
            cookie = SimpleCookie(raw)
        except CookieError:
            return
        if "ab" in cookie and cookie["ab"].value == "b":
            ctx.pool = self.pool_b
