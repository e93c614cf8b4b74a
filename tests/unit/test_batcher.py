"""The dynamic batcher: full batches leave at once, partial ones at their own deadline, keys never mix."""

from __future__ import annotations

import asyncio
import time

import pytest

from consumer.batcher import Batcher

pytestmark = pytest.mark.unit


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def make(max_batch: int = 4, max_wait_ms: int = 50) -> tuple[Batcher, Clock]:
    clock = Clock()
    return Batcher(max_batch, max_wait_ms, clock=clock), clock


def test_a_full_batch_leaves_at_once():
    b, _ = make(max_batch=4)
    for i in range(4):
        b.add("a", i)
    assert b.ready() == ("a", [0, 1, 2, 3])
    assert len(b) == 0 and b.ready() is None


def test_a_partial_batch_leaves_when_its_oldest_request_has_waited_max_wait():
    b, clock = make(max_batch=4, max_wait_ms=50)
    b.add("a", 1)
    clock.now += 0.030
    b.add("a", 2)
    assert b.ready() is None
    clock.now += 0.019
    assert b.ready() is None
    clock.now += 0.002
    assert b.ready() == ("a", [1, 2])


def test_incompatible_requests_never_wait_on_each_other():
    b, clock = make(max_batch=4, max_wait_ms=50)
    b.add("slow", "s")  # older, but alone: it waits for its own window only
    clock.now += 0.001
    for i in range(4):
        b.add("fast", i)
    assert b.ready() == ("fast", [0, 1, 2, 3])
    assert b.ready() is None
    clock.now += 0.050
    assert b.ready() == ("slow", ["s"])


def test_among_ready_batches_the_oldest_request_goes_first():
    b, clock = make(max_batch=4, max_wait_ms=50)
    b.add("x", "x1")
    clock.now += 0.010
    b.add("y", "y1")
    clock.now += 0.100
    assert [b.ready()[0], b.ready()[0]] == ["x", "y"]


def test_batches_count_images_and_never_split_a_request():
    b, clock = make(max_batch=6)
    b.add("a", "four", size=4)
    b.add("a", "four-too", size=4)
    assert b.images == 8
    assert b.ready() == ("a", ["four"])  # the second does not fit beside it
    assert b.ready() is None  # 4 of 6 images: it waits for company
    clock.now += 0.050
    assert b.ready() == ("a", ["four-too"])


def test_a_request_larger_than_max_batch_goes_alone():
    b, _ = make(max_batch=2)
    b.add("a", "big", size=4)
    b.add("a", "small", size=1)
    assert b.ready() == ("a", ["big"])


def test_remove_and_no_wait_and_hurry():
    b, clock = make(max_batch=4, max_wait_ms=50)
    first, second = object(), object()
    b.add("a", first)
    b.add("a", second)
    assert b.remove(first) and not b.remove(first)
    assert len(b) == 1
    b.add("solo", "retry", wait=False)
    assert b.ready() == ("solo", ["retry"])
    assert b.ready() is None
    b.hurry()
    assert b.ready() == ("a", [second])


def test_add_reports_how_many_requests_are_ahead():
    b, _ = make()
    assert [b.add("a", 1), b.add("b", 2), b.add("a", 3)] == [0, 1, 2]


async def test_next_batch_wakes_for_a_new_request_and_for_a_deadline():
    b = Batcher(max_batch=2, max_wait_ms=80)
    waiter = asyncio.create_task(b.next_batch())
    await asyncio.sleep(0.01)
    b.add("a", 1)
    t0 = time.monotonic()
    assert await waiter == ("a", [1])
    assert 0.06 <= time.monotonic() - t0 < 0.5
    waiter = asyncio.create_task(b.next_batch())
    await asyncio.sleep(0.01)
    b.add("a", 2)
    b.add("a", 3)
    assert await asyncio.wait_for(waiter, 0.05) == ("a", [2, 3])
