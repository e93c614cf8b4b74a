"""Step-level preemption in the GPU loop (consumer/gpu.py), with an engine that only counts steps: a light team's
batch runs between two steps of a flood's batch, even when that batch carries the light team's previous request
(it went first when the other team had not yet queued more than a batch's worth)."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from consumer.flight import Flight
from consumer.gpu import GpuLoop
from consumer.keys import BatchKey
from consumer.metrics import ConsumerMetrics
from consumer.settings import ConsumerSettings
from schemas.messages import GenerateRequest, Origin

pytestmark = pytest.mark.unit

KEY = BatchKey(64, 64, 8, 2.5, "dpmpp")


class StepEngine:
    """Eight steps of `step_s` each, reporting progress; notes (images, start, end) of every call."""

    class backend:  # noqa: N801 - what GpuLoop reads of a backend: nothing here
        pass

    def __init__(self, step_s: float = 0.02) -> None:
        self.step_s = step_s
        self.calls: list[tuple[int, float, float]] = []
        self.stepping = threading.Event()

    def generate(self, spec, samples, progress=None, cancelled=None):
        start = time.monotonic()
        for step in range(1, spec.steps + 1):
            time.sleep(self.step_s)
            self.stepping.set()
            if progress:
                progress(step, spec.steps)
        self.calls.append((len(samples), start, time.monotonic()))
        return [None] * len(samples)


class Outlet:
    def __init__(self) -> None:
        self.began: list[list[str]] = []  # each batch's flights, as `started` was told
        self.answered: list[str] = []  # flights handed to post-processing (`drawn`)
        self._tasks: set[asyncio.Task] = set()

    def spawn(self, coro) -> asyncio.Task:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        return task

    async def started(self, flights) -> None:
        self.began.append([f.key for f in flights])

    async def progress(self, flights, step, total) -> None:
        pass

    async def drawn(self, flight, images) -> None:
        self.answered.append(flight.key)

    async def give_up(self, flight, message, error) -> None:
        pass

    async def close(self, flight) -> None:
        pass


def flight(team: str, i: int) -> Flight:
    req = GenerateRequest(origin=Origin(platform="console", team_id=team, channel_id="c", user_id="u"),
                          prompt=f"{team} skill {i}", width=64, height=64, steps=8)
    return Flight(f"{team}-{i}", KEY, req, None, [i], team=team, cost=1.0)


async def test_a_quiet_request_preempts_a_flood_batch_that_carries_its_previous_one():
    engine, outlet = StepEngine(), Outlet()
    gpu = GpuLoop(engine, ConsumerSettings(_env_file=None, model="unused", max_batch=8), ConsumerMetrics(), outlet)
    started = outlet.began
    gpu.queue(flight("quiet", 0))
    for i in range(7):  # not a flood yet (no more than a batch's worth): quiet-0 goes first, and they ride along
        gpu.queue(flight("flood", i))
    running = asyncio.create_task(gpu.run())
    try:
        await asyncio.wait_for(asyncio.to_thread(engine.stepping.wait, 5), 6)
        assert "quiet-0" in started[0] and len(started[0]) == 8
        for i in range(7, 30):  # now it floods
            gpu.queue(flight("flood", i))
        quiet = flight("quiet", 1)
        gpu.queue(quiet)
        for _ in range(1000):
            await asyncio.sleep(0.01)
            if len(engine.calls) >= 2:
                break
        (n_inner, inner_start, inner_end), (n_outer, outer_start, outer_end) = engine.calls[:2]
        assert (n_inner, n_outer) == (1, 8)
        assert outer_start < inner_start and inner_end < outer_end  # between two of the flood batch's steps
        assert started[1] == ["quiet-1"]
        assert gpu.metrics.preempted._value.get() == 1
        assert quiet.urgent  # its post-processing goes first (consumer/post.py)
    finally:
        running.cancel()
        gpu.shutdown()


async def test_at_a_batch_boundary_a_light_teams_turn_runs_without_flood_riders_and_goes_first_after():
    engine, outlet = StepEngine(step_s=0.005), Outlet()
    settings = ConsumerSettings(_env_file=None, model="unused", max_batch=8, preempt=False)
    gpu = GpuLoop(engine, settings, ConsumerMetrics(), outlet)
    for i in range(20):
        gpu.queue(flight("flood", i))
    quiet = flight("quiet", 0)
    gpu.queue(quiet)
    running = asyncio.create_task(gpu.run())
    try:
        for _ in range(3000):  # (the first batch imports torch: seconds)
            await asyncio.sleep(0.01)
            if len(engine.calls) >= 3 and len(outlet.answered) >= 9:
                break
        assert [n for n, _, _ in engine.calls[:3]] == [8, 1, 8]  # the flood's first batch, then quiet's alone
        assert outlet.began[1] == ["quiet-0"] and quiet.urgent
        assert gpu.post._held == 0  # post-processing resumed after the light batch's work was queued
    finally:
        running.cancel()
        gpu.shutdown()


def test_the_eta_is_bounded_by_the_post_processing_thread_when_it_is_the_slower_stage():
    gpu = GpuLoop(StepEngine(), ConsumerSettings(_env_file=None, model="unused", max_batch=8), ConsumerMetrics(),
                  Outlet())
    try:
        for _ in range(3):  # 20 steps: a lone image 0.3 s, a batch of 8 1.0 s
            gpu.speed.observe(1.0, 20, 0.3)
            gpu.speed.observe(8.0, 20, 1.0)
        for i in range(16):
            gpu.queue(flight("flood", i))
        quiet = gpu.estimate(flight("quiet", 0))  # (these flights weigh 1 unit each, and run 8 steps)
        # its share: one flood request ahead, 2 units in one batch: 2 x 0.1 s + 0.2 s x 8 / 20
        assert quiet.position == 1 and quiet.eta_s == pytest.approx(0.3)
        heavy = gpu.estimate(flight("flood", 99))
        assert heavy.position == 16
        assert heavy.eta_s == pytest.approx(17 * 0.1 + 3 * 0.08, abs=0.06)  # 17 units in 3 batches
        gpu.post.run_s = 0.5  # post-processing is the slower stage: every flight ahead passes there too
        assert gpu.estimate(flight("flood", 99)).eta_s == pytest.approx(17 * 0.5)
    finally:
        gpu.shutdown()
