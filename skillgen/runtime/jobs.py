"""A fetched record's life in a service (`Job`) and, per partition, how far the group may commit (`Offsets`).

Used by skillgen/runtime/service.py; re-exported there, so services import both from the service module.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

from aiokafka import ConsumerRecord, TopicPartition


@dataclass(eq=False)
class Job:
    """One fetched record, from fetch to its answer."""

    record: ConsumerRecord
    tp: TopicPartition
    received: float  # time.monotonic() at fetch
    message: Any = None  # the decoded record, once the handler has decoded it
    abandoned: bool = False  # its partition went to another member: answer nothing, commit nothing
    left: bool = False  # given up here on purpose: not committed, not waited for
    attempt: int = 1  # which process this is to take the record up (count_attempts); above 1, one died with it
    counted: bool = False  # this attempt is counted in Redis
    # Held in a scheduler's queue on purpose (the consumer's fair queue): not "stuck", so the service's age check
    # skips it (the scheduler has its own health); `woke` is when it left the queue, its age counts from there.
    waiting: bool = False
    woke: float | None = None
    # Events of one job reach the producer in the order they were emitted, whichever task emits them.
    emitting: asyncio.Lock = field(default_factory=asyncio.Lock)


class Offsets:
    """Per partition, the fetched records not yet answered, and so how far the group may commit."""

    def __init__(self) -> None:
        self._open: dict[TopicPartition, dict[int, Job]] = {}
        self._next: dict[TopicPartition, int] = {}
        self._committed: dict[TopicPartition, int] = {}

    def __len__(self) -> int:
        """Open jobs that are still being worked on here (left ones only hold the commit point back)."""
        return sum(1 for o in self._open.values() for j in o.values() if not j.left)

    def add(self, job: Job) -> None:
        self._open.setdefault(job.tp, {})[job.record.offset] = job
        self._next[job.tp] = max(self._next.get(job.tp, 0), job.record.offset + 1)

    def finish(self, job: Job) -> None:
        self._open.get(job.tp, {}).pop(job.record.offset, None)

    def jobs(self) -> list[Job]:
        """Every open job, left ones included."""
        return [j for o in self._open.values() for j in o.values()]

    def point(self, tp: TopicPartition) -> int | None:
        """The offset to commit: the first unanswered record, or the one after the last fetched."""
        open_ = self._open.get(tp)
        return min(open_) if open_ else self._next.get(tp)

    def to_commit(self, tps) -> dict[TopicPartition, int]:
        points = {tp: self.point(tp) for tp in tps}
        return {tp: p for tp, p in points.items() if p is not None and p > self._committed.get(tp, -1)}

    def committed(self, points: dict[TopicPartition, int]) -> None:
        self._committed.update(points)

    def oldest_s(self, now: float) -> float:
        """Age of the oldest job still being worked on (0 when none); a job waiting in a scheduler's queue is not
        being worked on, and one that left the queue counts from then."""
        ages = [now - (j.woke or j.received) for o in self._open.values() for j in o.values()
                if not j.left and not j.waiting]
        return max(ages, default=0.0)

    def drop(self, tp: TopicPartition) -> list[Job]:
        self._next.pop(tp, None)
        self._committed.pop(tp, None)
        return list(self._open.pop(tp, {}).values())
