"""The dynamic batcher: full batches leave at once, partial ones at their own deadline, keys never mix."""

from __future__ import annotations

import asyncio
import time

import pytest

from consumer.batcher import Batcher, Policy

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


# -- fair scheduling (hierarchical start-time fair queuing over lanes and teams) ----------------------------


def fair(max_batch: int = 1, **policy) -> tuple[Batcher, Clock]:
    clock = Clock()
    return Batcher(max_batch, 0, clock=clock, policy=Policy(**policy)), clock


def drain(b: Batcher) -> list:
    out = []
    while (batch := b.ready()) is not None:
        out += batch[1]
    return out


def test_a_quiet_teams_request_is_served_next_after_a_flood():
    b, _ = fair()
    for i in range(500):
        b.add("k", f"flood{i}", team="flood")
    b.ready()  # the flood is being served
    b.add("k", "quiet", team="quiet")
    order = drain(b)
    assert order.index("quiet") == 0


def test_fifo_policy_serves_the_flood_first():
    b, _ = fair(fair=False)
    for i in range(50):
        b.add("k", f"flood{i}", team="flood")
    b.add("k", "quiet", team="quiet")
    assert drain(b).index("quiet") == 50


def test_weights_share_the_gpu_two_to_one():
    b, _ = fair(team_weights={"a": 2.0, "b": 1.0})
    for i in range(300):
        b.add("k", ("a", i), team="a")
        b.add("k", ("b", i), team="b")
    first = drain(b)[:150]
    share_a = sum(1 for team, _ in first if team == "a") / len(first)
    assert abs(share_a - 2 / 3) < 0.02


def test_cost_counts_not_requests():
    b, _ = fair()
    for i in range(40):
        b.add("k", ("big", i), team="big", cost=4.0)
        b.add("k", ("small", i), team="small", cost=1.0)
    first = drain(b)[:25]
    big = sum(1 for t, _ in first if t == "big")
    assert big == 5  # 5 x 4 units beside 20 x 1 unit


def test_an_idle_team_saves_no_credit():
    b, _ = fair()
    for i in range(10):
        b.add("k", ("a", i), team="a")
    assert len(drain(b)) == 10  # "b" was idle all along
    for i in range(10):
        b.add("k", ("a", 10 + i), team="a")
        b.add("k", ("b", i), team="b")
    order = [t for t, _ in drain(b)]
    assert order[:4] in (["a", "b", "a", "b"], ["b", "a", "b", "a"])  # alternating, not ten b's first


def test_lanes_relax_and_replay_get_their_share_only():
    b, _ = fair()  # fast 1, relax 0.25, replay 0.1
    for i in range(200):
        b.add("k", ("fast", i), team="t1", lane="fast")
        b.add("k", ("relax", i), team="t1", lane="relax")
        b.add("k", ("replay", i), team="ops", lane="replay")
    first = [lane for lane, _ in drain(b)[:135]]
    assert abs(first.count("fast") / 135 - 1 / 1.35) < 0.03
    assert abs(first.count("relax") / 135 - 0.25 / 1.35) < 0.03
    assert abs(first.count("replay") / 135 - 0.1 / 1.35) < 0.03


def test_a_batch_is_formed_from_the_scheduled_head_with_compatible_requests_of_its_lane():
    b, clock = fair(max_batch=4)
    for i in range(6):
        b.add("x", ("flood", i), team="flood")
    b.add("y", ("quiet", 0), team="quiet")
    b.add("x", ("replay", 0), team="ops", lane="replay")
    clock.now += 1
    key, items = b.ready()
    assert key == "x" and items[0] == ("flood", 0)
    assert ("replay", 0) not in items  # never a rider in a live batch
    # The replay lane's tag is untouched (0) and the fast lane's is 4: the replay goes next, alone (no live riders).
    assert b.ready() == ("x", [("replay", 0)])
    key, items = b.ready()
    assert key == "y" and items == [("quiet", 0)]  # quiet's tag (0) is below flood's (4)


def test_the_head_waits_for_its_window_but_never_blocks_a_ready_batch():
    b, clock = fair(max_batch=2)
    b.__init__(2, 50, clock=clock, policy=Policy())
    b.add("slow", "s", team="quiet")  # quiet's head, window still open
    b.add("full", "f1", team="flood")
    b.add("full", "f2", team="flood")
    assert b.ready() == ("full", ["f1", "f2"])
    assert b.ready() is None
    clock.now += 0.05
    assert b.ready() == ("slow", ["s"])


def test_backlog_per_flow_and_removal_charges_nothing():
    b, _ = fair()
    first = object()
    b.add("k", first, team="a", cost=10.0)
    b.add("k", "a2", team="a", cost=1.0)
    b.add("k", "r", team="b", lane="relax")
    backlog = b.backlog()
    assert backlog["fast/a"].requests == 2 and backlog["fast/a"].units == 11.0
    assert backlog["relax/b"].requests == 1
    assert b.remove(first) and b.backlog()["fast/a"].units == 1.0
    b.add("k", "c1", team="c")
    # Had the removed request been charged (10 units), c1 would go before a2.
    assert [x for x in drain(b) if x != "r"] == ["a2", "c1"]


def test_a_light_team_is_one_asking_once_and_only_it_may_preempt():
    clock = Clock()
    b = Batcher(2, 50, clock=clock, policy=Policy())
    assert not b.any_light() and not b.light("fast", "nobody")
    for i in range(3):
        b.add("k", f"f{i}", team="flood")
    assert not b.light("fast", "flood") and not b.any_light()  # more than a batch's worth: a flood
    b.add("other", "q", team="quiet")
    assert b.light("fast", "quiet") and b.any_light()
    assert b.ready_light(exclude={("fast", "flood")}) is None  # still in its batching window
    clock.now += 0.05
    assert b.ready_light(exclude={("fast", "flood")}) == ("other", ["q"])
    assert not b.any_light()
    b.add("k", "q2", team="quiet")  # the flood's key is full: ready at once, and no flood rider taken along
    assert b.ready_light(exclude={("fast", "flood")}) == ("k", ["q2"])
    b.add("k", "big", size=3, team="big")  # one request, but more images than a batch: not light either
    assert not b.light("fast", "big")


def test_a_light_teams_turn_under_a_flood_takes_light_riders_only():
    b, _ = fair(max_batch=4)
    for i in range(10):
        b.add("k", f"f{i}", team="flood")
    assert b.ready() == ("k", ["f0", "f1", "f2", "f3"])
    b.add("k", "q", team="quiet")
    b.add("k", "r", team="other")
    assert b.ready() == ("k", ["q", "r"])  # no flood riders: the quiet batch runs as a preempting one would
    assert b.ready() == ("k", ["f4", "f5", "f6", "f7"])
    calm, _ = fair(max_batch=4)  # no flood: a light head takes every compatible request along
    for item, team in (("a1", "a"), ("a2", "a"), ("c1", "c")):
        calm.add("k", item, team=team)
    assert calm.ready() == ("k", ["a1", "a2", "c1"])
