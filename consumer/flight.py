"""Single flight: identical requests in flight are generated once.

In one process, requests with the same cache key join one `Flight` and are all answered from it. Across
consumers, the flight that generates holds a Redis lease on the key (SET NX with a TTL, renewed every ttl/3
while its GPU loop makes progress); a consumer that finds the lease taken waits for the result to appear in L2,
and takes the work over when the lease is gone without one: released (the holder gave the flight up, or lost
its partitions), or lapsed (the holder was killed, or its GPU call hung). A waiter looks every `poll_ms`, so it
takes over at most ttl + poll after its holder died or stalled. Without Redis every flight is local: the same
picture may be made on two consumers, but no request waits on a lease nobody holds.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from consumer.cache import L2, CacheEntry
from consumer.keys import BatchKey, ResolvedAdapter
from schemas.messages import GenerateRequest
from skillgen.runtime.redis import Lease, RedisLink, Store, WithoutRedis, renew_all

log = logging.getLogger("skillgen.consumer.flight")

J = TypeVar("J")


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
    # Scheduling (consumer/batcher.py): whose share it counts against, in which lane, at what cost (work units).
    team: str = ""
    lane: str = "fast"
    cost: float = 1.0
    queued_at: float | None = None  # time.monotonic() when it joined the GPU queue
    # Everyone waiting cancelled while it ran: its samples leave the batch at the next denoising step.
    cancelled: bool = False
    cancel_step: int | None = None  # the running batch's step when the cancel arrived
    steps_done: int = 0  # denoising steps its running batch has finished
    urgent: bool = False  # it preempted a running batch: its post-processing goes first (consumer/post.py)
    init_image: object | None = None  # img2img: the init image (PIL), read before the GPU (consumer/routing.py)


class Leases:
    """Single flight across consumers: one `Lease` per cache key, renewed in the background while `progressing()`
    (the GPU loop is not stuck) answers True. Without Redis (unset or down) a lease is granted: duplicate work is
    possible, a lost job is not."""

    def __init__(self, link: RedisLink | None, prefix: str, ttl_s: float, poll_ms: int,
                 progressing: Callable[[], bool] | None = None):
        self.link = link
        self.store = Store(link, prefix + "lease:")
        self.ttl_s = ttl_s
        self.poll_s = poll_ms / 1000
        self.progressing = progressing
        self._held: set[Lease] = set()
        self._renewer: asyncio.Task | None = None

    async def acquire(self, key: str) -> Lease | None:
        """The lease on `key`, or None while another consumer holds it."""
        lease = Lease(self.store, key, self.ttl_s, WithoutRedis.GRANTED)
        if not await lease.acquire():
            return None
        if self.link is not None:  # without Redis there is nothing to renew
            self._held.add(lease)
            if self._renewer is None or self._renewer.done():
                self._renewer = asyncio.create_task(self._renew_held(), name="renew leases")
        return lease

    async def _renew_held(self) -> None:
        """Every third of the TTL, every lease still held, in one pipelined round trip (thousands of queued
        flights would otherwise mean thousands of tasks and calls); none while the GPU loop is stuck, so they
        lapse and peers take the pictures over."""
        stuck = False
        while True:
            await asyncio.sleep(self.ttl_s / 3)
            self._held = {lease for lease in self._held if not lease.released}
            if self.progressing is not None and not self.progressing():
                if not stuck:
                    stuck = True
                    log.warning("%d leases not renewed: the GPU loop makes no progress, so they lapse within "
                                "%.1fs", len(self._held), self.ttl_s)
                continue
            stuck = False
            await renew_all(self.store, list(self._held), self.ttl_s)

    def close(self) -> None:
        if self._renewer is not None:
            self._renewer.cancel()
            self._renewer = None

    async def wait(self, key: str, l2: L2, wanted: Callable[[], bool] = lambda: True) -> CacheEntry | None:
        """Wait while another consumer holds the lease on `key`: its result once it is in L2, or None when
        the lease is gone without one (or Redis failed, or nobody here `wanted` it any more)."""
        started = time.monotonic()
        while wanted():
            await asyncio.sleep(self.poll_s)
            entry = await l2.get(key)
            if entry is not None:
                return entry
            if await self.store.ttl_s(key) is None:  # released, lapsed, or Redis is down
                entry = await l2.get(key)  # the holder writes L2 before it releases
                if entry is None:
                    log.info("lease on %s lapsed after %.1fs without a result: taking the work over",
                             key[:16], time.monotonic() - started)
                return entry
        return None
