"""The GPU loop: the batcher's next batch through the engine in a thread of its own, and the retry and split rules.

One batch at a time: the engine runs in a single worker thread, so the event loop (heartbeats, fetches, events)
never waits on the GPU. Each sample has its own seed and generator, so an image never depends on its batch-mates.
When a batch raises, consumer/retry.py `after_failure` decides what happens to its requests.

A stuck GPU call is noticed, not waited on forever: each denoising step and each finished batch marks progress,
and a batch with none for SKILL_GPU_STALL_S is stalled (`stall`): the consumer's leases stop being renewed
(`progressing`), so peers take its pictures over, and its /healthz fails, so the orchestrator restarts it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Protocol

from consumer.batcher import Batcher, Policy
from consumer.engine import warm_up
from consumer.flight import Flight
from consumer.keys import ResolvedAdapter
from consumer.metrics import ConsumerMetrics
from consumer.post import PostQueue
from consumer.retry import RETRIES_SPENT, GiveUp, Requeue, after_failure  # noqa: F401 - re-exported
from consumer.settings import ConsumerSettings
from consumer.speed import (
    Pace,
    ServiceRatio,
    Slowdown,
    Speed,
    SpeedMemory,
    batch_steps,
    live_ratio,
)
from skillgen.runtime.groupview import Estimate, estimate
from skillgen.runtime.logs import job as job_fields

log = logging.getLogger("skillgen.consumer")

@dataclass(eq=False)
class _Batch:
    """One batch on its way through the engine."""

    key: object
    flights: list[Flight]
    spec: object
    samples: list
    spans: list[slice]
    progress: Callable[[int, int], None]
    cancelled: Callable[[], list[int]]
    gen_s: float = 0.0
    preempted: bool = False  # another batch ran between two of its steps

    def __post_init__(self) -> None:
        self.progress.holder.append(self)  # type: ignore[attr-defined]


class Outlet(Protocol):
    """What the GPU loop tells the service around it."""

    def spawn(self, coro) -> asyncio.Task: ...
    async def started(self, flights: list[Flight]) -> None: ...
    async def progress(self, flights: list[Flight], step: int, total: int) -> None: ...
    async def drawn(self, flight: Flight, images) -> None: ...
    async def give_up(self, flight: Flight, message: str, error: BaseException | None) -> None: ...
    async def close(self, flight: Flight) -> None: ...


class GpuLoop:
    def __init__(self, engine, settings: ConsumerSettings, metrics: ConsumerMetrics, outlet: Outlet):
        self.engine = engine
        self.settings = settings
        self.metrics = metrics
        self.outlet = outlet
        self.policy = Policy(fair=settings.scheduling == "fair", team_weights=dict(settings.team_weights),
                             lane_weights=dict(settings.lane_weights))
        self.batcher: Batcher[Flight] = Batcher(settings.max_batch, settings.max_wait_ms, policy=self.policy)
        self.running: list[Flight] = []
        self.speed = Speed()  # the cost model behind every ETA (consumer/speed.py), seeded by `warm_up`
        self.slowdown = Slowdown()  # how far from the model the GPU runs now (a CPU shared with a burst's intake)
        self.service_ratio: ServiceRatio | None = None  # in service against the warm-up's model, kept in `memory`
        self.memory = SpeedMemory(settings.speed_memory)
        s = settings
        self.memory_key = f"{s.model}|{s.backend}|{s.device}|{s.precision}|max_batch={s.max_batch}"
        self.full_batch: tuple[float, int] | None = None  # (units, steps) of the last full batch timed
        # Post-processing (image check, PNG, blob store) on one thread, a preempting batch's first (consumer/post.py).
        self.post = PostQueue()
        # Set on the loop when a light team queues (one that may preempt): until then the inference thread does not
        # ask the loop at each step whether a batch may preempt, so a busy loop does not slow every step.
        self._light_hint = False
        self.pace = Pace()  # the pace flights leave post-processing at while work waits
        self.flights_per_batch = 1.0  # moving average
        self.running_units, self.running_steps, self.running_since = 0.0, 0, 0.0
        self.running_pred: float | None = None  # the model's seconds for the running batch, when it started
        self._nested = False  # a preempting batch is running inside another's step (on the inference thread)
        self.progressed = time.monotonic()  # the running batch's last sign of life (a step, its start or end)
        self.dispatched = time.monotonic()  # when the last batch left the queue (or the queue was empty)
        self._gpu = ThreadPoolExecutor(max_workers=1, thread_name_prefix="inference")

    def shutdown(self) -> None:
        self._gpu.shutdown(wait=False, cancel_futures=True)
        self.post.shutdown()
        self.remember()

    def remember(self) -> None:
        if self.service_ratio is not None and (ratio := self.service_ratio.value()) is not None:
            self.memory.save(self.memory_key, ratio)

    def factor(self) -> float:
        """consumer/speed.py Slowdown, with the running batch's own ratio."""
        step = self.running[0].steps_done if self.running else 0
        return self.slowdown.factor(self.speed.fit, live_ratio(time.monotonic() - self.running_since,
                                                               self.running_pred, step, self.running_steps))

    def running_left_s(self, factor: float = 1.0) -> float:
        if not self.running or self.running_pred is None:
            return 0.0
        return max(0.0, self.running_pred * factor - (time.monotonic() - self.running_since))

    def s_per_unit(self) -> float | None:
        """Seconds per work unit of a deep queue (served in full batches): the speed the group view shows."""
        if self.speed.fit is None:
            return None
        return self.speed.fit.s_per_unit(*(self.full_batch or (1.0, 20))) * self.slowdown.factor(self.speed.fit)

    def estimate(self, flight: Flight) -> Estimate:
        """Where the flight would stand if queued now: requests ahead under the schedule, and the seconds until
        it is done (None before the first batch is timed). Two stages, each a bound: the GPU (the work before it,
        served in batches of max_batch images like its own, each costing the cost model's a x steps / 20 +
        b x units) and the one post-processing thread, which every flight ahead of it passes through too (when
        the CPU is short it is the slower stage, and its backlog is what the flight waits for)."""
        # After its batch, a flight waits for the post-processing of its batch-mates ahead of it (one thread):
        # on average half the batch's.
        k = self.factor()  # the model's seconds, as fast as the GPU runs now
        ahead_s = self.running_left_s(k) + self.post.run_s * (self.flights_per_batch + 1) / 2
        fit = self.speed.fit
        timing = {"s_per_unit": fit and fit.b * k, "running_s": ahead_s,
                  "s_per_batch": k * fit.batch_s(0.0, batch_steps(flight.batch)) if fit else 0.0,
                  "units_per_batch": flight.cost / max(1, len(flight.seeds)) * self.settings.max_batch}
        if self.policy.fair:
            est = estimate(self.batcher.backlog(), flight.lane, flight.team, flight.cost,
                           team_weights=self.policy.team_weights, lane_weights=self.policy.lane_weights, **timing)
        else:
            work = sum(q.units for q in self.batcher.backlog().values()) + flight.cost
            est = estimate({}, flight.lane, flight.team, work, **timing)  # first in, first out: all of it ahead
            est = Estimate(position=len(self.batcher), units_ahead=work, eta_s=est.eta_s)
        if est.eta_s is not None:
            post_s = (len(self.post) + len(self.running) + est.position + 1) * self.post.run_s
            delivered = self.pace.s_per_unit()
            done_s = 0.0 if delivered is None else (est.units_ahead + self.running_units) * delivered
            est.eta_s = max(est.eta_s, round(post_s, 1), round(done_s, 1))
        return est

    def completed(self, flight: Flight) -> None:
        """A flight left post-processing: the pace the whole pipeline delivers at while work waits (the GPU,
        post-processing and the event loop's own share of the CPU together) bounds every ETA too."""
        self.pace.done(flight.cost, backlogged=bool(self.batcher))

    async def warm_up(self, model: str, image_policy=None, fast: ResolvedAdapter | None = None) -> None:
        """Before the consumer takes requests: turbo's LoRA loaded (`fast`: on ONNX an LCM-LoRA is a merged export,
        minutes for SD 1.5, never to be built under a first turbo request), then the cost model's first batches,
        timed (consumer/speed.py)."""
        if fast is not None:
            await asyncio.get_running_loop().run_in_executor(self._gpu, self.engine.backend.load_adapter, fast.key,
                                                             fast.path)
        self.full_batch = (await warm_up(self.engine, self.speed, model, self.settings.max_batch,
                                         self.settings.max_pixels, self._gpu, self.post, image_policy), 20)
        self.service_ratio = ServiceRatio(self.speed.fit) if self.speed.fit else None
        self.slowdown.prior = await asyncio.to_thread(self.memory.load, self.memory_key)
        log.info("warm-up done; in service this host last ran %s its warm-up's speed",
                 "at an unknown ratio to" if self.slowdown.prior is None else f"{self.slowdown.prior:.2f}x slower than")

    def queue(self, flight: Flight, est: Estimate | None = None) -> Estimate:
        """Queue the flight for the GPU; returns its estimate (position and ETA)."""
        est = est or self.estimate(flight)
        flight.position = est.position
        flight.queued_at = time.monotonic()
        if not self.batcher:
            self.dispatched = time.monotonic()
        for job in flight.waiters:
            job.waiting = True
        self.batcher.add(flight.batch, flight, size=len(flight.seeds), team=flight.team, lane=flight.lane,
                         cost=flight.cost)
        self._light_hint = self._light_hint or self.batcher.light(flight.lane, flight.team)
        return est

    def progressing(self) -> bool:
        """False while the running batch has shown no progress for SKILL_GPU_STALL_S (idle is not stuck)."""
        return self.stall() is None

    def stall(self) -> str | None:
        """Why the GPU loop is stuck, or None while it is idle or making progress. Requests waiting in the queue
        are not stuck while batches keep leaving it; a queue that nothing leaves while the GPU is idle is."""
        now = time.monotonic()
        quiet_s = now - self.progressed
        if self.running and quiet_s > self.settings.gpu_stall_s:
            return (f"GPU stalled: a batch of {len(self.running)} requests has made no progress for {quiet_s:.0f}s "
                    f"(SKILL_GPU_STALL_S={self.settings.gpu_stall_s:g})")
        idle_s = now - max(self.dispatched, self.progressed)
        if not self.running and self.batcher and idle_s > self.settings.gpu_stall_s:
            return (f"scheduler stalled: {len(self.batcher)} requests queued and no batch has left the queue for "
                    f"{idle_s:.0f}s (SKILL_GPU_STALL_S={self.settings.gpu_stall_s:g})")
        return None

    def requeue_alone(self, flight: Flight) -> None:
        if not flight.waiters:  # everyone waiting went to another consumer meanwhile
            self.outlet.spawn(self.outlet.close(flight))
            return
        for job in flight.waiters:
            job.waiting = True
        self.batcher.add(flight.batch._replace(solo=flight.key), flight, size=len(flight.seeds), wait=False,
                         team=flight.team, lane=flight.lane, cost=flight.cost)
        self._light_hint = self._light_hint or self.batcher.light(flight.lane, flight.team)

    def failed(self, flights: list[Flight], exc: BaseException) -> None:
        """A batch (or its post-processing) raised: split, retry or give up, as `after_failure` rules."""
        if len(flights) > 1:
            log.warning("batch of %d requests failed (%s: %s): retrying each alone", len(flights),
                        type(exc).__name__, exc)
        loop = asyncio.get_running_loop()
        for action in after_failure(flights, exc, self.settings.max_retries, self.settings.retry_backoff_ms):
            f = action.flight
            ctx = job_fields(f.request.request_id)
            if isinstance(action, GiveUp):
                if action.error is None:
                    log.warning("failed: %s", exc, extra=ctx)
                else:
                    log.error("failed after %d attempts", f.attempts + 1, exc_info=exc, extra=ctx)
                self.outlet.spawn(self.outlet.give_up(f, action.message, action.error))
            elif action.delay_s == 0:
                self.requeue_alone(f)
            else:
                f.attempts = action.attempts
                log.warning("attempt %d failed (%s: %s): retrying in %.1fs", f.attempts, type(exc).__name__, exc,
                            action.delay_s, extra=ctx)
                loop.call_later(action.delay_s, self.requeue_alone, f)

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            key, flights = await self.batcher.next_batch()
            light = self.batcher.light_first  # a light team's turn while a flood waits: treated as a preempting one
            if light:
                for f in flights:
                    f.urgent = True
                self.post.pause()
            await self.outlet.started(flights)
            batch = self._begin(key, flights, loop)
            self.running = flights
            try:
                images = await loop.run_in_executor(self._gpu, self._generate, batch)
            except Exception as exc:  # noqa: BLE001 - every failure is judged by after_failure
                self.failed(flights, exc)
                continue
            finally:
                self.running = []
                self.progressed = time.monotonic()
                if light:  # after the drawn tasks (spawned by _end) have queued their urgent work
                    loop.call_soon(self.post.resume)
            self._end(batch, images)

    def _begin(self, key, flights: list[Flight], loop: asyncio.AbstractEventLoop) -> _Batch:
        """A batch leaves the queue: its waiters stop waiting, the schedule's metrics, and what the engine needs."""
        from skillgen.inference.engine import (  # torch: only once the loop runs
            BatchSpec,
            Sample,
        )

        now = time.monotonic()
        self.dispatched = now
        samples, spans = [], []
        for f in flights:
            spans.append(slice(len(samples), len(samples) + len(f.seeds)))
            samples += [Sample(f.request.prompt, f.request.negative_prompt, seed, f.init_image) for seed in f.seeds]
        for f in flights:
            f.position = 0
            for job in f.waiters:
                job.waiting, job.woke = False, now
            if f.queued_at is not None:
                self.metrics.sched_wait.labels(f.team, f.lane).observe(now - f.queued_at)
            self.metrics.sched_served.labels(f.team, f.lane).inc(f.cost)
        spec = BatchSpec(key.width, key.height, key.steps, key.guidance, key.scheduler, adapter=key.adapter,
                         strength=key.strength)
        self.running_units, self.running_steps = sum(f.cost for f in flights), batch_steps(key)
        self.running_pred = self.speed.batch_s(self.running_units, self.running_steps)
        self.running_since = self.progressed = time.monotonic()
        return _Batch(key, flights, spec, samples, spans, self._progress_fn(key, flights, loop),
                      self._cancelled_fn(flights, spans))

    def _end(self, batch: _Batch, images) -> None:
        """On the event loop: the batch's timing, then each flight to post-processing (or closed, if cancelled)."""
        flights, gen_s = batch.flights, batch.gen_s
        self.metrics.generation.observe(gen_s)
        self.metrics.batch_size.observe(len(batch.samples))
        self.flights_per_batch = 0.8 * self.flights_per_batch + 0.2 * len(flights)
        # A batch cut short by a cancel, or stretched by a batch that preempted it, says nothing about speed.
        if not any(f.cancelled for f in flights) and not batch.preempted and gen_s > 0:
            work = sum(f.cost for f in flights)
            self.slowdown.observe(work, batch_steps(batch.key), gen_s)
            if self.service_ratio is not None:
                self.service_ratio.observe(work, batch_steps(batch.key), gen_s)
                if self.service_ratio.seen % 20 == 0:
                    self.remember()
            self.speed.observe(work, batch_steps(batch.key), gen_s)
            if len(batch.samples) >= self.settings.max_batch:
                self.full_batch = (work, batch_steps(batch.key))
        log.info("batch of %d images (%d requests) in %.2fs", len(batch.samples), len(flights), gen_s)
        for f, span in zip(flights, batch.spans):
            if f.cancelled:
                self.outlet.spawn(self.outlet.close(f))
            else:
                self.outlet.spawn(self.outlet.drawn(f, images[span]))

    # -- preemption: a light team's batch runs between two denoising steps of a heavy team's --------------
    def _preempt(self, outer: _Batch, loop: asyncio.AbstractEventLoop) -> None:
        """On the inference thread, between two steps of `outer`: when the fair schedule's next batch belongs to
        a light team (a batch's worth queued at most: someone asking, not a flood) while `outer` serves a team
        with more than that queued, that batch runs now, to the end, and `outer` resumes where it stopped (its state is its
        own: latents, scheduler, generators; nothing it holds changes). One level deep: a preempting batch is
        never preempted. Dispatch order stays the fair schedule's; only who waits for the GPU in between moves.
        The loop is asked only while a light team has something queued (`_light_hint`), and the preempting batch
        runs with the post-processing thread held (consumer/post.py): its flights' post-processing goes first."""
        if (self._nested or not self._light_hint or not self.policy.fair or not self.settings.preempt
                or not len(self.batcher)):
            return
        asking = asyncio.run_coroutine_threadsafe(self._take_light(outer), loop)
        try:
            taken = asking.result(timeout=5)
        except Exception:  # noqa: BLE001 - the loop is shutting down, or slow: no preemption this step
            asking.add_done_callback(lambda done: loop.call_soon_threadsafe(self._put_back, done))
            return
        if taken is None:
            return
        key, flights = taken
        be = self.engine.backend
        saved_level = getattr(be, "_savings", None)  # the memory savings the outer batch runs with (both backends)
        self._nested = True
        outer.preempted = True
        self.metrics.preempted.inc()
        self.post.pause()
        paused = True
        try:
            inner = self._begin(key, flights, loop)
            self.running = outer.flights + flights
            try:
                images = self._generate(inner)
            except Exception as exc:  # noqa: BLE001 - judged by after_failure, on the loop
                loop.call_soon_threadsafe(self.failed, flights, exc)
            else:
                loop.call_soon_threadsafe(self._end_nested, inner, images)
                paused = False  # _end_nested resumes it
        finally:
            if paused:
                self.post.resume()
            self.running = outer.flights
            self._nested = False
            if saved_level is not None:
                be.set_memory_savings(saved_level)

    def _end_nested(self, batch: _Batch, images) -> None:
        """On the loop: a preempting batch's end; the post-processing thread resumes once its flights' work is
        queued (the drawn tasks' first steps run before this callback), so that work goes next."""
        try:
            self._end(batch, images)
        finally:
            asyncio.get_running_loop().call_soon(self.post.resume)

    def _put_back(self, done) -> None:
        """On the loop: a preempting batch taken after the inference thread stopped waiting goes back in the queue."""
        if done.cancelled() or done.exception() is not None or done.result() is None:
            return
        for f in done.result()[1]:
            self.batcher.add(f.batch, f, size=len(f.seeds), team=f.team, lane=f.lane, cost=f.cost)
        self._light_hint = True

    async def _take_light(self, outer: _Batch):
        """On the loop: the batch that preempts `outer` now, its started events sent; None when there is none."""
        # The running batch must serve a flood: a team with more than a batch's worth still queued. A light team
        # in it (the quiet team's last request, served at its turn with flood riders) may preempt it again.
        heavy = {(f.lane, f.team) for f in outer.flights if self.batcher.queued(f.lane, f.team)
                 and not self.batcher.light(f.lane, f.team)}
        if not heavy:
            return None
        taken = self.batcher.ready_light(exclude=heavy, adapter=outer.key.adapter)
        self._light_hint = self.batcher.any_light()  # e.g. one still in its batching window
        if taken is not None:
            for f in taken[1]:
                f.urgent = True
            try:
                await self.outlet.started(taken[1])
            except Exception:  # noqa: BLE001 - events are best effort; the batch runs anyway
                log.warning("started events for a preempting batch could not be sent", exc_info=True)
        return taken

    def cancel_running(self, flight: Flight) -> bool:
        """Everyone waiting for a running flight cancelled: its samples leave the batch at the next step."""
        if flight not in self.running:
            return False
        flight.cancelled = True
        flight.cancel_step = flight.steps_done
        return True

    def _cancelled_fn(self, flights: list[Flight], spans: list[slice]) -> Callable[[], list[int]]:
        seen: set[int] = set()

        def cancelled() -> list[int]:  # on the inference thread, after every denoising step
            out = []
            for i, (f, span) in enumerate(zip(flights, spans)):
                if f.cancelled:
                    if i not in seen:
                        seen.add(i)
                        self.metrics.cancel_late_steps.observe(max(0, f.steps_done - (f.cancel_step or 0)))
                    out.extend(range(span.start, span.stop))
            return out

        return cancelled

    def _generate(self, batch: _Batch):
        """On the inference thread."""
        adapter: ResolvedAdapter | None = batch.flights[0].adapter
        if adapter is not None:
            self.engine.backend.load_adapter(adapter.key, adapter.path)
        t0 = time.perf_counter()
        images = self.engine.generate(batch.spec, batch.samples, batch.progress, cancelled=batch.cancelled)
        batch.gen_s = time.perf_counter() - t0
        return images

    def _progress_fn(self, key, flights: list[Flight], loop: asyncio.AbstractEventLoop) -> Callable[[int, int], None]:
        last = [time.monotonic()]
        holder: list[_Batch] = []

        def progress(step: int, total: int) -> None:  # on the inference thread
            now = self.progressed = time.monotonic()
            for f in flights:
                f.steps_done = step
            if step < total and now - last[0] >= self.settings.progress_interval_s:
                last[0] = now
                loop.call_soon_threadsafe(self.outlet.spawn, self.outlet.progress(flights, step, total))
            if step < total - 1 and holder:
                self._preempt(holder[0], loop)

        progress.holder = holder  # type: ignore[attr-defined] - set once the batch exists (_Batch.__post_init__)
        return progress
