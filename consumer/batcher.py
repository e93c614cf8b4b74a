"""The dynamic batcher: one queue per batch key; a batch leaves when it holds `max_batch` images or when its
oldest request has waited `max_wait_ms`, whichever comes first.

Requests with different keys never wait on each other: each key has its own window, and among the batches
that are ready the one whose oldest request came first goes next. A request is never split across batches.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

T = TypeVar("T")


@dataclass(eq=False)
class _Entry(Generic[T]):
    item: T
    size: int
    deadline: float
    seq: int = field(default=0)


class Batcher(Generic[T]):
    def __init__(self, max_batch: int, max_wait_ms: int, clock: Callable[[], float] = time.monotonic):
        if max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, got {max_batch}")
        self.max_batch = max_batch
        self.max_wait_s = max_wait_ms / 1000
        self._clock = clock
        self._queues: dict[Hashable, deque[_Entry[T]]] = {}
        self._changed = asyncio.Event()
        self._seq = 0
        self._hurry = False

    def add(self, key: Hashable, item: T, size: int = 1, wait: bool = True) -> int:
        """Queue `item` (`size` images) under `key`; `wait=False` skips the window (a retry that runs alone).
        Returns how many requests are queued ahead of it, all keys together."""
        ahead = len(self)
        self._seq += 1
        deadline = self._clock() + (self.max_wait_s if wait else 0.0)
        self._queues.setdefault(key, deque()).append(_Entry(item, size, deadline, self._seq))
        self._changed.set()
        return ahead

    def remove(self, item: T) -> bool:
        """Take a queued item out (its partition was revoked); False when it is not queued."""
        for key, q in self._queues.items():
            for entry in q:
                if entry.item is item:
                    q.remove(entry)
                    if not q:
                        del self._queues[key]
                    self._changed.set()
                    return True
        return False

    def hurry(self) -> None:
        """From now on every queued request is ready at once: the worker is draining."""
        self._hurry = True
        self._changed.set()

    def __len__(self) -> int:
        return sum(len(q) for q in self._queues.values())

    @property
    def images(self) -> int:
        return sum(e.size for q in self._queues.values() for e in q)

    def ready(self) -> tuple[Hashable, list[T]] | None:
        """The next batch, if one is ready now."""
        now = self._clock()
        best: tuple[int, Hashable] | None = None
        for key, q in self._queues.items():
            if self._hurry or sum(e.size for e in q) >= self.max_batch or min(e.deadline for e in q) <= now:
                if best is None or q[0].seq < best[0]:
                    best = (q[0].seq, key)
        if best is None:
            return None
        key = best[1]
        q = self._queues[key]
        items, size = [], 0
        while q and (not items or size + q[0].size <= self.max_batch):
            entry = q.popleft()
            items.append(entry.item)
            size += entry.size
        if not q:
            del self._queues[key]
        return key, items

    async def next_batch(self) -> tuple[Hashable, list[T]]:
        while True:
            batch = self.ready()
            if batch is not None:
                return batch
            self._changed.clear()
            deadlines = [e.deadline for q in self._queues.values() for e in q]
            timeout = max(0.0, min(deadlines) - self._clock()) if deadlines else None
            try:
                await asyncio.wait_for(self._changed.wait(), timeout)
            except TimeoutError:
                pass
