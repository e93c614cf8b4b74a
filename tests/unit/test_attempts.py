"""Turns: ordinary jobs run together; a suspect (a record a process died holding) waits until nothing else runs,
and nothing starts while it runs. And Attempts without Redis counts nothing (every attempt reads as the first)."""

from __future__ import annotations

import asyncio

import pytest
from aiokafka import ConsumerRecord

from skillgen.runtime.attempts import Attempts, Turns
from skillgen.runtime.redis import Store

pytestmark = pytest.mark.unit


async def test_a_suspect_waits_for_the_running_jobs_and_runs_alone():
    turns, order = Turns(), []

    async def job(name: str, alone: bool, hold_s: float) -> None:
        assert await turns.take(name, alone, gone=lambda: False)
        order.append(f"+{name}")
        await asyncio.sleep(hold_s)
        order.append(f"-{name}")
        if turns.release(name):
            await turns.wake()

    a = asyncio.create_task(job("a", False, 0.05))
    await asyncio.sleep(0)
    s = asyncio.create_task(job("suspect", True, 0.05))
    await asyncio.sleep(0)
    b = asyncio.create_task(job("b", False, 0.01))
    await asyncio.gather(a, s, b)
    assert order == ["+a", "-a", "+suspect", "-suspect", "+b", "-b"]


async def test_ordinary_jobs_run_together_and_a_waiter_that_is_gone_gives_up():
    turns = Turns()
    assert await turns.take("a", False, gone=lambda: False)
    assert await asyncio.wait_for(turns.take("b", False, gone=lambda: False), 1)  # no wait for a
    gone = asyncio.Event()
    waiter = asyncio.create_task(turns.take("s", True, gone=gone.is_set))
    await asyncio.sleep(0.01)
    assert not waiter.done()
    gone.set()
    await turns.wake()
    assert await waiter is False
    assert turns.release("a") and not turns.release("s")


async def test_without_redis_every_attempt_is_the_first():
    attempts = Attempts(Store(None), "g", max_attempts=2)
    record = ConsumerRecord("t", 0, 7, 0, 0, b"k", b"v", None, 1, 1, [])
    assert attempts.key(record) == "attempts:g:t:0:7"
    for _ in range(3):
        assert await attempts.begin(record) == 1
