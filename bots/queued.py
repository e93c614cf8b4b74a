"""The per-person cap on requests not yet finished (SKILL_MAX_QUEUED_PER_PERSON, 0 for none).

Each person has one Redis sorted set, `queued:<platform>:<user id>`, across every team they use the bot from (as
their rate limits do): the ids of their published requests, scored by the time they were published. Intake adds
an id when it publishes; delivery removes it when it handles the request's terminal event (succeeded, failed,
blocked, cancelled). Before a new request is published intake counts the set, and at the cap it is refused: "you
already have 5 requests waiting; wait for one to finish (or cancel one)". Entries older than FORGET_S are trimmed
at every count, so a terminal event that never arrives (or a publish that failed after the add) holds a slot for
a few hours at most, never for good. The people in SKILL_ADMINS are not capped.

The count runs before the acknowledgement, in the same 1.5 s as the rest of intake's Redis work, and fails open:
without Redis (unset or down) nobody is capped, since only Redis hears about finished requests; a Redis slower
than its share is left alone for BREAKER_S and nobody is capped meanwhile. Two requests of one person admitted at
the same instant (two bot replicas) can both pass the count: the cap is a bound on what a person piles up, not a
lock.
"""

from __future__ import annotations

import logging
import time

from bots.errors import Refusal
from bots.timebox import BREAKER_S, TIME_BOX_S, TimeBox
from schemas.messages import Origin
from skillgen.runtime.redis import Store

log = logging.getLogger("skillgen.queued")

FORGET_S = 6 * 3600  # an unfinished request stops counting after this long (its terminal event was lost)


def key(origin: Origin) -> str:
    """A person's set: no team in it, so it is the same set in every server and workspace."""
    return f"queued:{origin.platform.value}:{origin.user_id}"


class QueuedJobs:
    def __init__(self, store: Store, cap: int, admins: set[str] = frozenset(), forget_s: float = FORGET_S,
                 time_box_s: float = TIME_BOX_S, breaker_s: float = BREAKER_S):
        self.store = store
        self.cap = cap
        self.admins = set(admins)
        self.forget_s = forget_s
        self.box = TimeBox("count a person's queued requests", "nobody is capped", time_box_s, breaker_s)

    @classmethod
    def from_settings(cls, settings, store: Store) -> QueuedJobs:
        return cls(store, settings.max_queued_per_person, set(settings.admins))

    def exempt(self, origin: Origin) -> bool:
        return not self.cap or f"{origin.platform.value}:{origin.user_id}" in self.admins

    async def check(self, origin: Origin, within_s: float | None = None) -> None:
        """Refuse (Refusal) a person who has `cap` requests not yet finished; admit when that cannot be known in
        time."""
        if self.exempt(origin) or self.store is None or self.store.link is None:
            return
        if self.box.tripped:
            return
        name = self.store.key(key(origin))
        oldest_ms = int((time.time() - self.forget_s) * 1000)

        async def count(r) -> int:
            async with r.pipeline(transaction=True) as p:
                p.zremrangebyscore(name, "-inf", oldest_ms)
                p.zcard(name)
                _, n = await p.execute()
            return int(n)

        waiting = await self.box.run(lambda: self.store.call(count, lambda: None), within_s)
        if waiting is not None and waiting >= self.cap:
            log.info("refused: %d requests waiting (SKILL_MAX_QUEUED_PER_PERSON=%d)", waiting, self.cap)
            raise Refusal.of("at_cap", count=waiting)

    async def add(self, origin: Origin, request_id: str) -> None:
        """Count a published request against its owner until `finished` (or FORGET_S)."""
        if self.exempt(origin):
            return
        name = self.store.key(key(origin))

        async def add(r) -> None:
            async with r.pipeline(transaction=True) as p:
                p.zadd(name, {request_id: int(time.time() * 1000)})
                p.pexpire(name, int(self.forget_s * 1000))
                await p.execute()

        await self.store.call(add, lambda: None)


async def finished(store: Store, origin: Origin, request_id: str) -> None:
    """Delivery's half: the request's terminal event was handled, so it no longer counts against its owner."""
    name = store.key(key(origin))
    await store.call(lambda r: r.zrem(name, request_id), lambda: None)
