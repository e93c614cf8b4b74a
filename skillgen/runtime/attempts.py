"""How many processes a record has been handed to, kept in Redis so the count survives the process dying.

A record whose handling kills its process (a decoder bomb, a driver crash, an out-of-memory kill) is redelivered
to the next owner, which dies the same way: without a count that outlives the process, one record takes down
every replica in turn, forever. So each time a service takes up a record it increments
`attempts:<group>:<topic>:<partition>:<offset>`, and decrements it again when it gives the record up on purpose
(shutdown, a partition revoked). A count above one therefore means a process died holding the record: the
consumer runs such a record alone (its batch-mates are not taken down with it), and past
SKILL_RECORD_MAX_ATTEMPTS the record goes to the dead-letter topic with a failed event to whoever asked.

A process that dies takes every record it holds down with it, and each of those counts one attempt. So a record
on its last permitted attempt (a suspect) runs alone (`Turns`): it waits until nothing else runs, nothing else
starts until it is answered, and a job is counted only while it runs, never while it waits for its turn. A record
that merely sat next to the culprit reaches its last attempt only by having been through the same crashes, then
runs alone and is answered; the culprit dies alone on its last attempt and is set aside on the next. Earlier
retries run together with everything else, so recovering from one crash stays as fast as normal service.

Without Redis (unset or down) nothing is counted (every attempt reads as the first): the guard needs a memory
that survives the process, and this process's own would not.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from aiokafka import ConsumerRecord

from skillgen.runtime.redis import Store

ATTEMPTS_TTL_S = 7 * 86400  # as long as a record can stay in a topic under the default retention

# KEYS[1]: the counter. ARGV: its TTL in seconds. Returns the count after this attempt.
_BEGIN = "local n = redis.call('INCR', KEYS[1]); redis.call('EXPIRE', KEYS[1], ARGV[1]); return n"
# Gives one attempt back, never below zero, and removes the key at zero.
_UNDO = """
local n = tonumber(redis.call('GET', KEYS[1]) or '0')
if n <= 1 then redis.call('DEL', KEYS[1]) return 0 end
return redis.call('DECR', KEYS[1])
"""


class Attempts:
    def __init__(self, store: Store, group: str, max_attempts: int, ttl_s: int = ATTEMPTS_TTL_S):
        self.store = store
        self.group = group
        self.max_attempts = max_attempts
        self.ttl_s = ttl_s

    def key(self, record: ConsumerRecord) -> str:
        return f"attempts:{self.group}:{record.topic}:{record.partition}:{record.offset}"

    async def begin(self, record: ConsumerRecord) -> int:
        """Count this process taking the record up; returns which attempt this is (1 without Redis)."""
        name = self.store.key(self.key(record))
        n = await self.store.call(lambda r: r.eval(_BEGIN, 1, name, self.ttl_s), lambda: 1)
        return int(n)

    async def end(self, record: ConsumerRecord) -> None:
        """The record is answered: its count is of no use any more."""
        name = self.store.key(self.key(record))
        await self.store.call(lambda r: r.delete(name), lambda: 0)

    async def undo(self, record: ConsumerRecord) -> None:
        """The record was given up on purpose (shutdown, revoke): that attempt did not die with its process."""
        name = self.store.key(self.key(record))
        await self.store.call(lambda r: r.eval(_UNDO, 1, name), lambda: 0)


class Turns:
    """Who may run now: any number of ordinary jobs together, or one suspect alone."""

    def __init__(self) -> None:
        self._running: set[Any] = set()
        self._alone: Any = None
        self._suspects = 0  # waiting to run alone
        self._changed = asyncio.Condition()

    async def take(self, job: Any, alone: bool, gone: Callable[[], bool]) -> bool:
        """Wait for the job's turn; False when `gone()` turned true first (revoked, stopping)."""
        async with self._changed:
            # A waiting suspect goes before ordinary jobs that arrive after it, or a busy service never gets to it.
            self._suspects += alone
            try:
                await self._changed.wait_for(lambda: gone() or (
                    self._alone is None and (not self._running if alone else not self._suspects)))
            finally:
                self._suspects -= alone
            if gone():
                self._changed.notify_all()  # ordinary jobs may have been waiting behind this one
                return False
            self._running.add(job)
            if alone:
                self._alone = job
            return True

    def free(self) -> bool:
        """Whether an ordinary job would start at once (no suspect running or waiting)."""
        return self._alone is None and not self._suspects

    def release(self, job: Any) -> bool:
        """The job is answered or given up; True when a waiter may now go (then call `wake`)."""
        if job not in self._running:
            return False
        self._running.discard(job)
        if self._alone is job:
            self._alone = None
        return True

    async def wake(self) -> None:
        async with self._changed:
            self._changed.notify_all()
