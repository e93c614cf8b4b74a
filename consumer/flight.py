"""Single flight: identical requests in flight are generated once.

In one process, requests with the same cache key join one `Flight` and are all answered from it. Across
consumers, the flight that generates holds a Redis lease on the key (SET NX with a TTL, renewed while it
works); a consumer that finds the lease taken waits for the result to appear in L2, and takes the work over
when the lease lapses without one (its holder was killed, or failed). Without Redis every flight is local.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from consumer.cache import L2, CacheEntry, RedisLink
from consumer.keys import BatchKey, ResolvedAdapter
from schemas.messages import GenerateRequest

log = logging.getLogger("skillgen.consumer.flight")

J = TypeVar("J")

# Renew only a lease we still hold; release only our own (a lapsed lease may be someone else's by now).
_RENEW = "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('pexpire', KEYS[1], ARGV[2]) end return 0"
_RELEASE = "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) end return 0"


@dataclass(eq=False)
class Flight(Generic[J]):
    """One picture to make (a cache key) and every job waiting for it."""

    key: str
    batch: BatchKey
    request: GenerateRequest  # the first requester's; every waiter's request has the same pixels
    adapter: ResolvedAdapter | None
    seeds: list[int]
    waiters: list[J] = field(default_factory=list)
    attempts: int = 0
    position: int | None = None  # requests ahead of it when it was queued for the GPU
    lease: Lease | None = None


class Lease:
    """A held lease; renewed in the background until `release`."""

    def __init__(self, leases: Leases, name: str):
        self._leases = leases
        self.name = name
        self._renewer = asyncio.create_task(self._renew()) if leases.link else None

    async def _renew(self) -> None:
        link, ttl_ms = self._leases.link, int(self._leases.ttl_s * 1000)
        while True:
            await asyncio.sleep(self._leases.ttl_s / 3)
            await link.call(lambda r: r.eval(_RENEW, 1, self.name, self._leases.owner, ttl_ms), 0)

    async def release(self) -> None:
        if self._renewer is None:
            return
        self._renewer.cancel()
        self._renewer = None
        await self._leases.link.call(lambda r: r.eval(_RELEASE, 1, self.name, self._leases.owner), 0)


class Leases:
    def __init__(self, link: RedisLink | None, prefix: str, ttl_s: float, poll_ms: int):
        self.link = link
        self.prefix = prefix + "lease:"
        self.ttl_s = ttl_s
        self.poll_s = poll_ms / 1000
        self.owner = uuid.uuid4().hex

    async def acquire(self, key: str) -> Lease | None:
        """The lease on `key`, or None while another consumer holds it. Without Redis (unset or down) the
        lease is local: duplicate work is possible, a lost job is not."""
        name = self.prefix + key
        if self.link is None:
            return Lease(self, name)
        got = await self.link.call(
            lambda r: r.set(name, self.owner, nx=True, px=int(self.ttl_s * 1000)), True
        )
        return Lease(self, name) if got else None

    async def wait(self, key: str, l2: L2, wanted: Callable[[], bool] = lambda: True) -> CacheEntry | None:
        """Wait while another consumer holds the lease on `key`: its result once it is in L2, or None when
        the lease is gone without one (or Redis failed, or nobody here `wanted` it any more)."""
        name = self.prefix + key
        started = time.monotonic()
        while wanted():
            await asyncio.sleep(self.poll_s)
            entry = await l2.get(key)
            if entry is not None:
                return entry
            held = await self.link.call(lambda r: r.exists(name), 0)
            if not held:
                entry = await l2.get(key)  # the holder writes L2 before it releases
                if entry is None:
                    log.info("lease on %s lapsed after %.1fs without a result: taking the work over",
                             key[:16], time.monotonic() - started)
                return entry
        return None
