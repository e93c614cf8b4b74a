"""The time box and breaker around Redis work done before an acknowledgement (bots/timebox.py)."""

import asyncio
import time

import pytest

from bots.timebox import TimeBox

pytestmark = pytest.mark.unit


async def test_an_answer_in_time_is_returned_and_the_breaker_stays_closed():
    box = TimeBox("count", "nobody is capped", box_s=0.5, breaker_s=30)

    async def answer():
        await asyncio.sleep(0.01)
        return 7

    assert await box.run(answer) == 7 and not box.tripped


async def test_an_overrun_gives_none_within_the_callers_time_and_trips_the_breaker_until_reset(caplog):
    box = TimeBox("count a person's queued requests", "nobody is capped", box_s=1.5, breaker_s=30)
    started = time.monotonic()
    assert await box.run(lambda: asyncio.sleep(10), within_s=0.2) is None
    assert time.monotonic() - started < 1.0  # the caller's 0.2 s, not the box's 1.5 s
    assert box.tripped and "nobody is capped for 30s" in caplog.text
    box.reset()
    assert not box.tripped


async def test_the_breaker_closes_by_itself_after_its_time():
    box = TimeBox("count", "nobody is capped", box_s=0.05, breaker_s=0.2)
    assert await box.run(lambda: asyncio.sleep(1)) is None and box.tripped
    await asyncio.sleep(0.25)
    assert not box.tripped
