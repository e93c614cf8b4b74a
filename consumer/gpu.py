"""The GPU loop: the batcher's next batch through the engine in a thread of its own, and the retry and split rules.

One batch at a time: the engine runs in a single worker thread, so the event loop (heartbeats, fetches, events)
never waits on the GPU. Each sample has its own seed and generator, so an image never depends on its batch-mates.
When a batch raises, which request is to blame is unknown: `after_failure` decides (a pure function, unit-tested):
a batch of several is split and each request retried alone at once; a request that fails alone is retried with
doubling backoff up to `max_retries`, then given up; an error that names the request itself (PipelineError) is
given up at once, since retrying changes nothing.

A stuck GPU call is noticed, not waited on forever: each denoising step and each finished batch marks progress,
and a batch with none for SKILL_GPU_STALL_S is stalled (`stall`): the consumer's leases stop being renewed
(`progressing`), so peers take its pictures over, and its /healthz fails, so the orchestrator restarts it.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Protocol

from consumer.batcher import Batcher
from consumer.flight import Flight
from consumer.keys import ResolvedAdapter
from consumer.metrics import ConsumerMetrics
from consumer.settings import ConsumerSettings
from skillgen.inference.errors import PipelineError
from skillgen.runtime.logs import job as job_fields

log = logging.getLogger("skillgen.consumer")

RETRIES_SPENT = "generation failed after retries; the team has been notified"


@dataclass(frozen=True)
class Requeue:
    """Run the flight again in a batch of its own after `delay_s`."""

    flight: Flight
    delay_s: float
    attempts: int


@dataclass(frozen=True)
class GiveUp:
    """Answer the flight's requesters with `message`; `error` goes to the DLQ with their records (None: the
    request itself cannot be served, which is an answer, not an incident)."""

    flight: Flight
    message: str
    error: BaseException | None


def after_failure(flights: list[Flight], exc: BaseException, max_retries: int,
                  retry_backoff_ms: int) -> list[Requeue | GiveUp]:
    if len(flights) > 1:
        return [Requeue(f, 0.0, f.attempts) for f in flights]
    (f,) = flights
    if isinstance(exc, PipelineError):
        return [GiveUp(f, str(exc), None)]
    attempts = f.attempts + 1
    if attempts > max_retries:
        return [GiveUp(f, RETRIES_SPENT, exc)]
    return [Requeue(f, retry_backoff_ms / 1000 * 2 ** (attempts - 1), attempts)]


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
        self.batcher: Batcher[Flight] = Batcher(settings.max_batch, settings.max_wait_ms)
        self.running: list[Flight] = []
        self.batch_s: float | None = None  # moving average of one batch's GPU time, for queue estimates
        self.progressed = time.monotonic()  # the running batch's last sign of life (a step, its start or end)
        self._gpu = ThreadPoolExecutor(max_workers=1, thread_name_prefix="inference")

    def shutdown(self) -> None:
        self._gpu.shutdown(wait=False, cancel_futures=True)

    def queue(self, flight: Flight) -> tuple[int, float | None]:
        """Queue the flight for the GPU; returns (requests ahead of it, estimated seconds until it is done)."""
        ahead = len(self.batcher)
        eta_s = self.eta_s(self.batcher.images + len(flight.seeds))
        flight.position = ahead
        self.batcher.add(flight.batch, flight, size=len(flight.seeds))
        return ahead, eta_s

    def progressing(self) -> bool:
        """False while the running batch has shown no progress for SKILL_GPU_STALL_S (idle is not stuck)."""
        return self.stall() is None

    def stall(self) -> str | None:
        """Why the GPU loop is stuck, or None while it is idle or making progress."""
        quiet_s = time.monotonic() - self.progressed
        if not self.running or quiet_s <= self.settings.gpu_stall_s:
            return None
        return (f"GPU stalled: a batch of {len(self.running)} requests has made no progress for {quiet_s:.0f}s "
                f"(SKILL_GPU_STALL_S={self.settings.gpu_stall_s:g})")

    def eta_s(self, images: int) -> float | None:
        if self.batch_s is None:
            return None
        return round(self.batch_s * (math.ceil(images / self.settings.max_batch) + bool(self.running)), 1)

    def requeue_alone(self, flight: Flight) -> None:
        if not flight.waiters:  # everyone waiting went to another consumer meanwhile
            self.outlet.spawn(self.outlet.close(flight))
            return
        self.batcher.add(flight.batch._replace(solo=flight.key), flight, size=len(flight.seeds), wait=False)

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
        from skillgen.inference.engine import (  # torch: only once the loop runs
            BatchSpec,
            Sample,
        )

        loop = asyncio.get_running_loop()
        while True:
            key, flights = await self.batcher.next_batch()
            samples, spans = [], []
            for f in flights:
                spans.append(slice(len(samples), len(samples) + len(f.seeds)))
                samples += [Sample(f.request.prompt, f.request.negative_prompt, seed) for seed in f.seeds]
            for f in flights:
                f.position = 0
            await self.outlet.started(flights)
            spec = BatchSpec(key.width, key.height, key.steps, key.guidance, key.scheduler, adapter=key.adapter)
            self.running = flights
            self.progressed = time.monotonic()
            t0 = time.perf_counter()
            try:
                images = await loop.run_in_executor(
                    self._gpu, self._generate, spec, flights[0].adapter, samples, self._progress_fn(flights, loop)
                )
            except Exception as exc:  # noqa: BLE001 - every failure is judged by after_failure
                self.failed(flights, exc)
                continue
            finally:
                self.running = []
                self.progressed = time.monotonic()
            gen_s = time.perf_counter() - t0
            self.metrics.generation.observe(gen_s)
            self.metrics.batch_size.observe(len(samples))
            self.batch_s = gen_s if self.batch_s is None else 0.8 * self.batch_s + 0.2 * gen_s
            log.info("batch of %d images (%d requests) in %.2fs", len(samples), len(flights), gen_s)
            for f, span in zip(flights, spans):
                self.outlet.spawn(self.outlet.drawn(f, images[span]))

    def _generate(self, spec, adapter: ResolvedAdapter | None, samples, progress):
        if adapter is not None:
            self.engine.backend.load_adapter(adapter.key, adapter.path)
        return self.engine.generate(spec, samples, progress)

    def _progress_fn(self, flights: list[Flight], loop: asyncio.AbstractEventLoop) -> Callable[[int, int], None]:
        last = [time.monotonic()]

        def progress(step: int, total: int) -> None:  # on the inference thread
            now = self.progressed = time.monotonic()
            if step < total and now - last[0] >= self.settings.progress_interval_s:
                last[0] = now
                loop.call_soon_threadsafe(self.outlet.spawn, self.outlet.progress(flights, step, total))

        return progress


def load_engine_from(settings: ConsumerSettings):
    """The engine these settings name (what replay and the demo load too; consumer.worker re-exports it)."""
    from schemas.messages import MAX_IMAGES
    from skillgen.inference import load_engine

    trt_profile = None
    if settings.backend == "onnx":
        from skillgen.inference.onnx_backend import TrtProfile

        # A batch holds max_batch images, or one request's images when that is more.
        trt_profile = TrtProfile(max_batch=max(settings.max_batch, MAX_IMAGES))
    return load_engine(
        settings.model,
        settings.backend,
        settings.device,
        settings.precision,
        cache_dir=settings.onnx_cache_dir,
        provider=settings.onnx_provider,
        max_cached_adapters=settings.max_cached_adapters,
        max_loaded_adapters=settings.max_loaded_adapters,
        max_pixels=settings.max_pixels,
        trt_profile=trt_profile,
    )
