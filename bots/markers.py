"""Delivery's idempotency: one marker per request id and event kind.

The marker is first a lease (`lease:<owner>`, expiring after SKILL_LEASE_S) taken before posting, and becomes
`done` only after the post succeeded. So a redelivered event whose post is done is skipped, and a delivery that
crashed between taking the lease and finishing leaves a lease that runs out, after which the next delivery of
the event posts it: nothing is dropped, and nothing is posted twice unless the crash fell between the
platform's answer and the write of `done`.
"""

from __future__ import annotations

import asyncio
import uuid
from dataclasses import dataclass

from bots.kv import Store
from schemas.messages import EventKind

DONE = "done"
TERMINAL = (EventKind.succeeded, EventKind.failed, EventKind.blocked)


@dataclass(frozen=True)
class Lease:
    key: str
    token: str


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
        token = f"lease:{uuid.uuid4().hex}"
        while True:
            if await self.store.add(key, token, self.lease_s):
                return Lease(key, token)
            value = await self.store.get(key)
            if value == DONE:
                return None
            if value is None:
                continue  # expired between the two calls
            left_s = await self.store.ttl_s(key)
            await asyncio.sleep(min(left_s if left_s is not None else 0.05, self.lease_s) + 0.05)

    async def renew(self, lease: Lease) -> bool:
        return await self.store.extend_if(lease.key, lease.token, self.lease_s)

    async def done(self, lease: Lease) -> None:
        await self.store.put(lease.key, DONE, self.done_ttl_s)

    async def release(self, lease: Lease) -> None:
        await self.store.delete_if(lease.key, lease.token)

    async def finished(self, request_id: str) -> bool:
        """Whether a final result for the request was posted (or is being posted) already."""
        for kind in TERMINAL:
            if await self.store.get(self.key(request_id, kind)) is not None:
                return True
        return False
