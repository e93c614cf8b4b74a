"""The one home of Redis access: the client, the link that survives an outage, keys with an expiry, and Lease.

Redis is a cache, not a dependency for correctness. Every service reaches it through `RedisLink`, which notices
an outage once (one warning, one timeout) and then leaves Redis alone for `retry_s` at a time; what a call
answers meanwhile is chosen by its caller, where the caller is written: the result cache misses, `Store` keeps
its keys in this process's memory, and each `Lease` names its own `WithoutRedis` policy.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from enum import Enum
from typing import TYPE_CHECKING, TypeVar
from urllib.parse import urlsplit, urlunsplit

from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

if TYPE_CHECKING:
    from skillgen.runtime.settings import CommonSettings

log = logging.getLogger("skillgen.redis")

T = TypeVar("T")

# Compare-and-set on a lease's token: only the holder renews or releases it; a lapsed lease may be another's now.
_EXTEND_IF = "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('pexpire', KEYS[1], ARGV[2]) end return 0"
_DELETE_IF = "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) end return 0"


# Connections one client opens at most. Callers past it wait for a free one (a blocking pool) instead of failing:
# a consumer reading ahead thousands of records has thousands of handlers asking Redis at once, and redis-py's
# default pool raises "Too many connections" past 100, which would look like an outage to RedisLink.
MAX_CONNECTIONS = 64
POOL_WAIT_S = 10.0


def connect(url: str, timeout_s: float = 0.5, decode_responses: bool = False) -> Redis:
    """The Redis client every service uses. Short timeouts and no retries: each caller has an answer for an
    unreachable Redis, so a retry would only make a request wait longer for the same answer. At most
    MAX_CONNECTIONS connections; past that, callers queue for one (up to POOL_WAIT_S)."""
    pool = BlockingConnectionPool.from_url(url, max_connections=MAX_CONNECTIONS, timeout=POOL_WAIT_S,
                                           socket_timeout=timeout_s, socket_connect_timeout=timeout_s,
                                           retry=Retry(NoBackoff(), 0), decode_responses=decode_responses)
    return Redis.from_pool(pool)  # the client owns the pool: closing it closes the connections


def redact(url: str) -> str:
    """The URL without its password, fit for a log line."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = f"{parts.username or ''}:***@{parts.hostname}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


def _ms(seconds: float) -> int:
    return max(1, int(seconds * 1000))


class RedisLink:
    """A Redis client whose failures never reach a job: `call` answers `default` instead, warns once per
    outage, and skips Redis for `retry_s` after an error, so an outage costs one timeout, not one per call."""

    def __init__(self, url: str, timeout_s: float = 0.5, retry_s: float = 2.0, *, decode_responses: bool = False):
        self.url = redact(url)
        self.retry_s = retry_s
        self.client = connect(url, timeout_s, decode_responses)
        self._skip_until = 0.0
        self._down = False

    @property
    def up(self) -> bool:
        return not self._down

    async def call(self, fn: Callable[[Redis], Awaitable[T]], default: T) -> T:
        if time.monotonic() < self._skip_until:
            return default
        try:
            result = await fn(self.client)
        except (RedisError, OSError) as exc:
            self._skip_until = time.monotonic() + self.retry_s
            if not self._down:
                self._down = True
                log.warning("Redis unavailable: %s is unreachable (%s); every call takes its caller's fallback "
                            "until it is back (tried again every %.1fs)", self.url, exc, self.retry_s)
            return default
        if self._down:
            self._down = False
            log.info("Redis at %s is back", self.url)
        return result

    async def close(self) -> None:
        await self.client.aclose()


class Memory:
    """Keys with an expiry in this process, bounded in number (the oldest written go first): where `Store`
    keeps its keys while Redis is unset or down."""

    def __init__(self, max_keys: int):
        self.max_keys = max_keys
        self._data: OrderedDict[str, tuple[str, float]] = OrderedDict()

    def get(self, name: str) -> str | None:
        entry = self._data.get(name)
        if entry is None:
            return None
        if entry[1] <= time.monotonic():
            del self._data[name]
            return None
        return entry[0]

    def put(self, name: str, value: str, ttl_s: float) -> None:
        self._data[name] = (value, time.monotonic() + ttl_s)
        self._data.move_to_end(name)
        while len(self._data) > self.max_keys:
            self._data.popitem(last=False)

    def add(self, name: str, value: str, ttl_s: float) -> bool:
        if self.get(name) is not None:
            return False
        self.put(name, value, ttl_s)
        return True

    def ttl_s(self, name: str) -> float | None:
        return None if self.get(name) is None else self._data[name][1] - time.monotonic()

    def extend_if(self, name: str, value: str, ttl_s: float) -> bool:
        if self.get(name) != value:
            return False
        self.put(name, value, ttl_s)
        return True

    def delete_if(self, name: str, value: str) -> bool:
        if self.get(name) != value:
            return False
        del self._data[name]
        return True

    def incr(self, name: str, amount: float, ttl_s: float) -> float:
        ttl = self.ttl_s(name)
        total = float(self.get(name) or 0.0) + amount
        self.put(name, repr(total), ttl_s if ttl is None else ttl)
        return total


_UNAVAILABLE = object()


class Store:
    """Keys with an expiry, under `prefix` in Redis, and in this process's memory while Redis is unset or down:
    an outage weakens deduplication across replicas instead of stopping a bot or delivery."""

    def __init__(self, link: RedisLink | None, prefix: str = "skill:", max_local_keys: int = 100_000):
        self.link = link
        self.prefix = prefix
        self.memory = Memory(max_local_keys)

    @classmethod
    def from_settings(cls, settings: CommonSettings) -> Store:
        # Short timeouts: a slash command has 3 seconds to be answered, Redis or not.
        link = RedisLink(settings.redis_url, timeout_s=1.0, decode_responses=True) if settings.redis_url else None
        return cls(link, settings.redis_prefix)

    async def close(self) -> None:
        if self.link is not None:
            await self.link.close()

    def key(self, name: str) -> str:
        return self.prefix + name

    async def call(self, fn: Callable[[Redis], Awaitable[T]], local: Callable[[], T]) -> T:
        """`fn` on Redis; `local()` instead while Redis is unset or unreachable, so each caller states its
        fallback where it makes the call."""
        if self.link is not None:
            result = await self.link.call(fn, _UNAVAILABLE)
            if result is not _UNAVAILABLE:
                return result
        return local()

    async def add(self, name: str, value: str, ttl_s: float) -> bool:
        """Set `name` only if it is absent; True when this call set it."""
        key, ms = self.key(name), _ms(ttl_s)
        return bool(await self.call(lambda r: r.set(key, value, nx=True, px=ms),
                                    lambda: self.memory.add(name, value, ttl_s)))

    async def get(self, name: str) -> str | None:
        return await self.call(lambda r: r.get(self.key(name)), lambda: self.memory.get(name))

    async def put(self, name: str, value: str, ttl_s: float) -> None:
        key, ms = self.key(name), _ms(ttl_s)
        await self.call(lambda r: r.set(key, value, px=ms), lambda: self.memory.put(name, value, ttl_s))

    async def ttl_s(self, name: str) -> float | None:
        """Seconds until `name` expires; None when it does not exist."""
        ms = await self.call(lambda r: r.pttl(self.key(name)), lambda: None)
        if ms is None:  # Redis was not asked
            return self.memory.ttl_s(name)
        if ms == -2:  # no such key
            return None
        return ms / 1000 if ms >= 0 else float("inf")

    async def incr(self, name: str, amount: float, ttl_s: float) -> float:
        """Add `amount` to the number at `name` (made with a `ttl_s` expiry when new); the new total."""
        key, ms = self.key(name), _ms(ttl_s)

        async def add(r):
            async with r.pipeline(transaction=True) as p:
                p.incrbyfloat(key, amount)
                p.pexpire(key, ms, nx=True)
                total, _ = await p.execute()
            return float(total)

        return await self.call(add, lambda: self.memory.incr(name, amount, ttl_s))

    async def delete_if(self, name: str, value: str) -> bool:
        """Delete `name` only while it still holds `value` (a claim dropped by whoever made it, never another's)."""
        return bool(await self.call(lambda r: r.eval(_DELETE_IF, 1, self.key(name), value),
                                    lambda: self.memory.delete_if(name, value)))


class WithoutRedis(Enum):
    """What a `Lease` answers while Redis is unset or unreachable. There is no safe choice for every use, so
    each use picks one where it makes its leases, and says why."""

    GRANTED = "granted"  # every acquire succeeds: the work may be done twice, it is never left undone
    MEMORY = "memory"  # held in this process's memory: exclusive among this process's holders only


class Lease:
    """`name` held by one holder at a time, across processes, for `ttl_s` unless renewed. Taken with SET NX PX;
    renewed and released only by its holder (compare-and-set on a token of its own), so a holder that lost it
    to a lapse cannot renew or release the next holder's. A holder that dies lets go within `ttl_s`."""

    def __init__(self, store: Store, name: str, ttl_s: float, without_redis: WithoutRedis):
        self.store = store
        self.name = name
        self.ttl_s = ttl_s
        self.without_redis = without_redis
        self.token = uuid.uuid4().hex
        self._renewer: asyncio.Task | None = None
        self.released = False

    def _fallback(self, memory: Callable[[Memory], bool]) -> Callable[[], bool]:
        return lambda: True if self.without_redis is WithoutRedis.GRANTED else memory(self.store.memory)

    async def acquire(self) -> bool:
        """True when this call took the lease; False while another holder has it."""
        key, ms = self.store.key(self.name), _ms(self.ttl_s)
        return bool(await self.store.call(lambda r: r.set(key, self.token, nx=True, px=ms),
                                          self._fallback(lambda m: m.add(self.name, self.token, self.ttl_s))))

    async def renew(self) -> bool:
        """Another `ttl_s` for a lease still ours; False when it lapsed (and may be another's now)."""
        key, ms = self.store.key(self.name), _ms(self.ttl_s)
        return bool(await self.store.call(lambda r: r.eval(_EXTEND_IF, 1, key, self.token, ms),
                                          self._fallback(lambda m: m.extend_if(self.name, self.token, self.ttl_s))))

    def keep_renewed(self, progressing: Callable[[], bool] | None = None) -> None:
        """Renew every third of `ttl_s` until `release`, so work longer than `ttl_s` keeps the lease. With
        `progressing`, a renewal is skipped while it answers False (the work is stuck): the lease then lapses
        within `ttl_s` and another holder may take the work over, as if this one had died."""
        self._renewer = asyncio.create_task(self._renew_forever(progressing), name=f"renew {self.name}")

    async def _renew_forever(self, progressing: Callable[[], bool] | None = None) -> None:
        stuck = False
        while True:
            await asyncio.sleep(self.ttl_s / 3)
            if progressing is None or progressing():
                stuck = False
                await self.renew()
            elif not stuck:
                stuck = True
                log.warning("lease %s not renewed: its work makes no progress, so it lapses within %.1fs",
                            self.name[:40], self.ttl_s)

    async def release(self) -> bool:
        """Stop renewing and let go, if the lease is still ours; True when it was."""
        self.released = True
        if self._renewer is not None:
            self._renewer.cancel()
            self._renewer = None
        key = self.store.key(self.name)
        return bool(await self.store.call(lambda r: r.eval(_DELETE_IF, 1, key, self.token),
                                          self._fallback(lambda m: m.delete_if(self.name, self.token))))


async def renew_all(store: Store, leases: list[Lease], ttl_s: float) -> None:
    """Renew many leases of one store in one pipelined round trip (each still only if it is ours): what a
    consumer holding thousands of queued pictures' leases does instead of one task and one call per lease."""
    if not leases:
        return
    ms = _ms(ttl_s)

    async def renew(r):
        async with r.pipeline(transaction=False) as p:
            for lease in leases:
                p.eval(_EXTEND_IF, 1, store.key(lease.name), lease.token, ms)
            return await p.execute()

    def local() -> None:
        for lease in leases:
            if lease.without_redis is not WithoutRedis.GRANTED:
                store.memory.extend_if(lease.name, lease.token, ttl_s)

    await store.call(renew, local)
