"""Keys with an expiry: in Redis when SKILL_REDIS_URL is set, in this process otherwise.

Redis is a cache, not a dependency for correctness: when a Redis call fails, that call falls back to the
in-process table and says so in the log (once a minute), so an outage weakens deduplication across replicas
instead of stopping a bot or delivery.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict

from redis.asyncio import Redis
from redis.exceptions import RedisError

from skillgen.runtime.settings import CommonSettings

log = logging.getLogger("skillgen.kv")

_COMPARE_AND_DELETE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""
_COMPARE_AND_EXPIRE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 0
"""


class Store:
    def __init__(self, redis: Redis | None, prefix: str = "skill:", max_local_keys: int = 100_000):
        self.redis = redis
        self.prefix = prefix
        self.max_local_keys = max_local_keys
        self._local: OrderedDict[str, tuple[str, float]] = OrderedDict()
        self._warned_at = 0.0

    @classmethod
    def from_settings(cls, settings: CommonSettings) -> Store:
        redis = None
        if settings.redis_url:
            # Short timeouts: a slash command has 3 seconds to be answered, Redis or not.
            redis = Redis.from_url(
                settings.redis_url, socket_timeout=1.0, socket_connect_timeout=1.0, decode_responses=True
            )
        return cls(redis, settings.redis_prefix)

    async def close(self) -> None:
        if self.redis is not None:
            await self.redis.aclose()

    def key(self, name: str) -> str:
        return self.prefix + name

    def degraded(self, exc: BaseException) -> None:
        now = time.monotonic()
        if now - self._warned_at > 60:
            self._warned_at = now
            log.warning("Redis unavailable (%s): using this process's memory until it is back", exc)

    # -- operations -----------------------------------------------------------------------------------------
    async def add(self, name: str, value: str, ttl_s: float) -> bool:
        """Set `name` only if it is absent; True when this call set it."""
        if self.redis is not None:
            try:
                return bool(await self.redis.set(self.key(name), value, nx=True, px=max(1, int(ttl_s * 1000))))
            except (RedisError, OSError) as exc:
                self.degraded(exc)
        if self._local_get(name) is not None:
            return False
        self._local_put(name, value, ttl_s)
        return True

    async def get(self, name: str) -> str | None:
        if self.redis is not None:
            try:
                return await self.redis.get(self.key(name))
            except (RedisError, OSError) as exc:
                self.degraded(exc)
        return self._local_get(name)

    async def put(self, name: str, value: str, ttl_s: float) -> None:
        if self.redis is not None:
            try:
                await self.redis.set(self.key(name), value, px=max(1, int(ttl_s * 1000)))
                return
            except (RedisError, OSError) as exc:
                self.degraded(exc)
        self._local_put(name, value, ttl_s)

    async def ttl_s(self, name: str) -> float | None:
        """Seconds until `name` expires; None when it does not exist."""
        if self.redis is not None:
            try:
                ms = await self.redis.pttl(self.key(name))
                if ms == -2:  # no such key
                    return None
                return ms / 1000 if ms >= 0 else float("inf")
            except (RedisError, OSError) as exc:
                self.degraded(exc)
        entry = self._local.get(name)
        if entry is None or entry[1] <= time.monotonic():
            return None
        return entry[1] - time.monotonic()

    async def delete_if(self, name: str, value: str) -> bool:
        """Delete `name` only while it still holds `value` (a lease released by its owner, never another's)."""
        if self.redis is not None:
            try:
                return bool(await self.redis.eval(_COMPARE_AND_DELETE, 1, self.key(name), value))
            except (RedisError, OSError) as exc:
                self.degraded(exc)
        if self._local_get(name) == value:
            del self._local[name]
            return True
        return False

    async def extend_if(self, name: str, value: str, ttl_s: float) -> bool:
        """Give `name` a new expiry only while it still holds `value` (a lease renewed by its owner)."""
        if self.redis is not None:
            try:
                ms = max(1, int(ttl_s * 1000))
                return bool(await self.redis.eval(_COMPARE_AND_EXPIRE, 1, self.key(name), value, ms))
            except (RedisError, OSError) as exc:
                self.degraded(exc)
        if self._local_get(name) == value:
            self._local_put(name, value, ttl_s)
            return True
        return False

    # -- in-process table -------------------------------------------------------------------------------------
    def _local_get(self, name: str) -> str | None:
        entry = self._local.get(name)
        if entry is None:
            return None
        if entry[1] <= time.monotonic():
            del self._local[name]
            return None
        return entry[0]

    def _local_put(self, name: str, value: str, ttl_s: float) -> None:
        self._local[name] = (value, time.monotonic() + ttl_s)
        self._local.move_to_end(name)
        while len(self._local) > self.max_local_keys:
            self._local.popitem(last=False)
