"""A [[limit]] with store = "redis://...": one GCRA arrival time per key in
Redis, updated by a Lua script (atomic in Redis, on Redis's clock), so that
several edges enforce one limit.  The request is held while the script
runs (one round trip; the loop never blocks).  When Redis does not answer
within STORE_TIMEOUT the check fails and the core lets the host's local
limit decide (or refuses, with on_store_error = "deny"); the store is then
left alone for a backoff that doubles up to BACKOFF_MAX, and tried again."""

from __future__ import annotations

import asyncio
import hashlib
import logging

from edgeproxy.limits.rules import redis_address

log = logging.getLogger("edgeproxy.limits")

STORE_TIMEOUT = 0.25       # seconds a check may take before the local limit decides
BACKOFF_MIN = 0.5
BACKOFF_MAX = 30.0
POOL_MAX = 32              # connections to Redis per worker (requests wait for one)

# KEYS[1]: the key; ARGV: T, tau, delay (microseconds).  Returns
# {verdict, wait, used}: 0 pass, 1 pass after wait, 2 refused (passes in wait).
GCRA_LUA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local T = tonumber(ARGV[1])
local tau = tonumber(ARGV[2])
local delay = tonumber(ARGV[3])
local tat = tonumber(redis.call('GET', KEYS[1]) or '0')
if tat < now then tat = now end
local new_tat = tat + T
if new_tat - now > tau + T then
  return {2, new_tat - tau - T - now, tat - now}
end
redis.call('SET', KEYS[1], string.format('%d', new_tat), 'PX', math.ceil((new_tat - now) / 1000) + 1)
if delay > 0 and tat - now > delay then
  return {1, tat - now - delay, new_tat - now}
end
return {0, 0, new_tat - now}
"""


class RedisLimiter:
    """One limit's Redis side in one worker."""

    def __init__(self, lim, loop: asyncio.AbstractEventLoop):
        import redis.asyncio as aioredis

        self.name = lim.name
        self.url = lim.store
        self.loop = loop
        host, port, db, user, password = redis_address(lim.store)
        self.pool = aioredis.BlockingConnectionPool(
            host=host, port=port, db=db, username=user, password=password,
            max_connections=POOL_MAX, timeout=STORE_TIMEOUT,
            socket_timeout=STORE_TIMEOUT, socket_connect_timeout=STORE_TIMEOUT)
        self.client = aioredis.Redis(connection_pool=self.pool)
        self.script = self.client.register_script(GCRA_LUA)
        t_us = max(1, round(1e6 / lim.rate))
        self.args = (t_us, t_us * lim.burst, t_us * lim.delay)
        self.prefix = f"edgeproxy:limit:{lim.name}:".encode()
        self.down_until = 0.0
        self.backoff = 0.0
        self.failures = 0

    def check(self, key: bytes):
        """A task that ends with (verdict, wait ns, used ns), or None when
        Redis failed; None at once while the store is backing off."""
        if self.backoff and self.loop.time() < self.down_until:
            return None
        return self.loop.create_task(self._check(key))

    async def _check(self, key: bytes):
        k = self.prefix + hashlib.blake2b(key, digest_size=16).hexdigest().encode()
        try:
            r = await asyncio.wait_for(self.script(keys=[k], args=self.args), STORE_TIMEOUT)
            out = (int(r[0]), int(r[1]) * 1000, int(r[2]) * 1000)
        except Exception as exc:   # connection refused, timeout, a script error...
            self._failed(exc)
            return None
        if self.backoff:
            log.warning("limit %s: Redis store %s answers again; enforcing across the fleet",
                        self.name, self._where())
            self.backoff = 0.0
            self.failures = 0
        return out

    def _failed(self, exc: BaseException) -> None:
        self.failures += 1
        now = self.loop.time()
        if self.backoff and now < self.down_until:
            return               # a check that was under way when another one failed
        first = not self.backoff
        self.backoff = BACKOFF_MIN if first else min(BACKOFF_MAX, self.backoff * 2)
        self.down_until = now + self.backoff
        if first:
            log.warning("limit %s: Redis store %s failed (%s: %s); this host's local limit "
                        "decides until it is back (retrying in %.1fs, backing off)", self.name,
                        self._where(), type(exc).__name__, exc or "timeout", self.backoff)

    def _where(self) -> str:
        host, port, db, _, _ = redis_address(self.url)
        return f"redis://{host}:{port}/{db}"     # (never the password)

    async def close(self) -> None:
        await self.client.aclose()
