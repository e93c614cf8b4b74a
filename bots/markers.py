"""Delivery's idempotency: one marker per request id and event kind.

The marker is first a lease (its holder's token, expiring after SKILL_LEASE_S) taken before posting, and
becomes `done` only after the post succeeded. So a redelivered event whose post is done is skipped, and a
delivery that crashed between taking the lease and finishing leaves a lease that runs out, after which the next
delivery of the event posts it: nothing is dropped, and nothing is posted twice unless the crash fell between
the platform's answer and the write of `done`.

Without Redis the markers fall back to this process's memory: a delivery still never posts an event twice
itself, and only a second delivery replica could repeat a post during the outage.
"""

from __future__ import annotations

import asyncio

from schemas.messages import TERMINAL_KINDS, EventKind
from skillgen.runtime.redis import Lease, Store, WithoutRedis

DONE = "done"


class Markers:
    def __init__(self, store: Store, lease_s: float, done_ttl_s: float):
        self.store = store
        self.lease_s = lease_s
        self.done_ttl_s = done_ttl_s

    @staticmethod
    def key(request_id: str, kind: EventKind) -> str:
        return f"delivered:{request_id}:{kind.value}"

    async def take(self, request_id: str, kind: EventKind) -> Lease | None:
        """A lease on posting this event, or None when it was posted already. Waits out another holder's lease
        (a crashed delivery's), which is bounded by lease_s."""
        key = self.key(request_id, kind)
        lease = Lease(self.store, key, self.lease_s, WithoutRedis.MEMORY)
        while True:
            if await lease.acquire():
                return lease
            value = await self.store.get(key)
            if value == DONE:
                return None
            if value is None:
                continue  # expired between the two calls
            left_s = await self.store.ttl_s(key)
            await asyncio.sleep(min(left_s if left_s is not None else 0.05, self.lease_s) + 0.05)

    async def renew(self, lease: Lease) -> bool:
        return await lease.renew()

    async def done(self, lease: Lease) -> None:
        await self.store.put(lease.name, DONE, self.done_ttl_s)

    async def release(self, lease: Lease) -> None:
        await lease.release()

    async def finished(self, request_id: str) -> bool:
        """Whether a final result for the request was posted (or is being posted) already."""
        for kind in TERMINAL_KINDS:
            if await self.store.get(self.key(request_id, kind)) is not None:
                return True
        return False
