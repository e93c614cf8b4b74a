"""Redis work done before a chat command is acknowledged: time-boxed, with a breaker.

Discord wants an interaction acknowledged within 3 seconds and Slack a command within 3, so the Redis calls made
before the acknowledgement (rate limits, the per-person cap, the group's queue) get at most `box_s` (1.5 s) between
them. A call that overruns trips the breaker: for `breaker_s` (30 s) that check is not asked of Redis at all and
its caller falls back (local windows, nobody capped, no queue view), so a Redis that accepts and never answers
costs one slow acknowledgement, not one per command.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

log = logging.getLogger("skillgen.timebox")

TIME_BOX_S = 1.5  # of Discord's 3 s before an interaction must be acknowledged
BREAKER_S = 30.0  # how long a slow Redis is left alone

T = TypeVar("T")


class TimeBox:
    def __init__(self, what: str, meanwhile: str, box_s: float = TIME_BOX_S, breaker_s: float = BREAKER_S):
        self.what = what  # "check a rate limit": for the log line
        self.meanwhile = meanwhile  # "this process keeps its own windows": what the caller does instead
        self.box_s = box_s
        self.breaker_s = breaker_s
        self._open_until = 0.0

    @property
    def tripped(self) -> bool:
        """The breaker is open: Redis is left alone for now."""
        return time.monotonic() < self._open_until

    def reset(self) -> None:
        self._open_until = 0.0

    async def run(self, call: Callable[[], Awaitable[T]], within_s: float | None = None) -> T | None:
        """`call()`'s result, or None when it overran the box (which trips the breaker). `within_s`, what is left
        of the caller's own time, shortens the box (never below 50 ms)."""
        box_s = self.box_s if within_s is None else max(0.05, min(within_s, self.box_s))
        try:
            return await asyncio.wait_for(call(), box_s)
        except TimeoutError:
            self._open_until = time.monotonic() + self.breaker_s
            log.warning("Redis took over %.1fs to %s: %s for %.0fs", box_s, self.what, self.meanwhile, self.breaker_s)
            return None
