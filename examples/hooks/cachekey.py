"""A custom cache key: the same page for every tracking parameter (utm_*), one entry per language."""
from urllib.parse import parse_qsl, urlencode


class IgnoreTracking:
    def request(self, ctx):
        kept = [(k, v) for k, v in parse_qsl(ctx.query, keep_blank_values=True)
                if not k.startswith("utm_")]
        lang = (ctx.headers.get("Accept-Language") or "").split(",")[0].strip().lower()
        target = ctx.path + ("?" + urlencode(sorted(kept)) if kept else "")
        ctx.cache_key = f"{ctx.scheme}://{ctx.host.lower()}{target}#lang={lang}"
