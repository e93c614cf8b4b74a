"""The GPU consumer: Kafka in, batched images through the engine, events out.

A record's life: decode (poison goes to the DLQ) -> prompt policy -> adapter resolution -> cache (L1, then
L2) -> single flight (in this process, then a Redis lease across consumers) -> the batcher -> the engine in
its own thread -> image policy -> blob store -> cache -> events for every request waiting on that picture.

At-least-once: an offset is committed only once every record before it in its partition has had its
terminal event produced (idempotent producer, acks=all). Fetching never stops: when too many records are in
hand the partitions are paused, so the group membership never lapses. On revocation, finished work is
committed and unfinished work is left to the next owner; on SIGTERM, fetching stops, the work in hand is
finished within `drain_timeout_s`, committed, and the group is left.
"""

from __future__ import annotations

import asyncio
import io
import logging
import math
import os
import signal
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from aiokafka import ConsumerRebalanceListener, ConsumerRecord, TopicPartition
from aiokafka.errors import KafkaError

from consumer.batcher import Batcher
from consumer.cache import L1, L2, CacheEntry, RedisLink, TwoLevelCache
from consumer.flight import Flight, Leases
from consumer.keys import (
    AdapterResolver,
    ResolvedAdapter,
    batch_key,
    cache_key,
    image_seeds,
    model_identity,
    no_registry,
)
from consumer.metrics import ConsumerMetrics
from consumer.settings import ConsumerSettings
from schemas.codec import CodecError, decode, encode
from schemas.messages import AdapterRef, BlobRef, EventKind, GenerateRequest, JobEvent
from schemas.topics import CONSUMER_GROUP
from skillgen.inference import AdapterError, PipelineError
from skillgen.runtime.blobstore import BlobStore
from skillgen.runtime.kafka import dead_letter, make_consumer, make_producer
from skillgen.runtime.logs import job as job_fields
from skillgen.runtime.observability import metrics_server, stop_on_signals
from skillgen.safety import Decision, ImagePolicy, PromptPolicy
from skillgen.safety.decision import CHECK_FAILED

log = logging.getLogger("skillgen.consumer")

_HEALTHY_LOOP_S = 60.0


@dataclass(eq=False)
class Job:
    """One fetched record, from fetch to its terminal event."""

    record: ConsumerRecord
    tp: TopicPartition
    received: float  # time.monotonic() at fetch
    req: GenerateRequest | None = None
    abandoned: bool = False  # its partition went to another consumer: answer nothing, commit nothing
    # Events of one job reach the producer in the order they were emitted, whichever task emits them.
    emitting: asyncio.Lock = field(default_factory=asyncio.Lock)


class Offsets:
    """Per partition, the fetched records not yet answered, and so how far the group may commit."""

    def __init__(self) -> None:
        self._open: dict[TopicPartition, dict[int, Job]] = {}
        self._next: dict[TopicPartition, int] = {}
        self._committed: dict[TopicPartition, int] = {}

    def __len__(self) -> int:
        return sum(len(o) for o in self._open.values())

    def add(self, job: Job) -> None:
        self._open.setdefault(job.tp, {})[job.record.offset] = job
        self._next[job.tp] = max(self._next.get(job.tp, 0), job.record.offset + 1)

    def finish(self, job: Job) -> None:
        self._open.get(job.tp, {}).pop(job.record.offset, None)

    def point(self, tp: TopicPartition) -> int | None:
        """The offset to commit: the first unanswered record, or the one after the last fetched."""
        open_ = self._open.get(tp)
        return min(open_) if open_ else self._next.get(tp)

    def to_commit(self, tps) -> dict[TopicPartition, int]:
        points = {tp: self.point(tp) for tp in tps}
        return {tp: p for tp, p in points.items() if p is not None and p > self._committed.get(tp, -1)}

    def committed(self, points: dict[TopicPartition, int]) -> None:
        self._committed.update(points)

    def drop(self, tp: TopicPartition) -> list[Job]:
        self._next.pop(tp, None)
        self._committed.pop(tp, None)
        return list(self._open.pop(tp, {}).values())


class _Rebalance(ConsumerRebalanceListener):
    def __init__(self, worker: Worker, consumer):
        self.worker, self.consumer = worker, consumer

    async def on_partitions_revoked(self, revoked) -> None:
        await self.worker._on_revoked(self.consumer, set(revoked))

    async def on_partitions_assigned(self, assigned) -> None:
        log.info("assigned %s", ", ".join(f"{tp.topic}[{tp.partition}]" for tp in sorted(assigned)) or "nothing")


class Worker:
    """`await Worker(settings, engine).run(ready)` until `stop()`.

    The safety policies default to SafetySettings (the image policy is loaded in `run`, and a consumer whose
    checks cannot load does not start). `resolve_adapter` maps a request's AdapterRef to a version; without
    one, requests naming an adapter fail with a clear message. `model_id` overrides the model's identity in
    cache keys (default: computed from settings.model, see keys.model_identity).
    """

    def __init__(
        self,
        settings: ConsumerSettings,
        engine,
        blobs: BlobStore | None = None,
        *,
        prompt_policy: PromptPolicy | None = None,
        image_policy: ImagePolicy | None = None,
        resolve_adapter: AdapterResolver | None = None,
        metrics: ConsumerMetrics | None = None,
        model_id: str | None = None,
    ):
        self.settings = settings
        self.engine = engine
        self.blobs = blobs or BlobStore(settings.blob_url)
        self.topics = settings.topics
        self.prompt_policy = prompt_policy or PromptPolicy.from_settings()
        self.image_policy = image_policy
        self.resolve_adapter = resolve_adapter or no_registry
        self.metrics = metrics or ConsumerMetrics()
        self.model_id = model_id
        self.batcher: Batcher[Flight[Job]] = Batcher(settings.max_batch, settings.max_wait_ms)
        self.offsets = Offsets()
        self.processed = 0  # records answered or dead-lettered
        self._flights: dict[str, Flight[Job]] = {}
        self._running: list[Flight[Job]] = []
        self._tasks: set[asyncio.Task] = set()
        self._gpu = ThreadPoolExecutor(max_workers=1, thread_name_prefix="inference")
        # Safety checks and PNG encoding of one batch overlap the next batch on the GPU.
        self._post = ThreadPoolExecutor(max_workers=1, thread_name_prefix="postprocess")
        self._stop = asyncio.Event()
        self._dirty = asyncio.Event()
        self._commit_lock = asyncio.Lock()
        self._state = "starting"
        self._loop_seen = time.monotonic()
        self._batch_s: float | None = None  # moving average of one batch's GPU time, for queue estimates
        self._terminal_events = 0

    def stop(self) -> None:
        self._stop.set()

    def health(self) -> tuple[bool, str]:
        if self._state != "running":
            return False, self._state
        silent_s = time.monotonic() - self._loop_seen
        if silent_s > _HEALTHY_LOOP_S:
            return False, f"the fetch loop has been silent for {silent_s:.0f}s"
        return True, f"ok: {len(self.offsets)} records in hand, {len(self.batcher)} requests queued for the GPU"

    # -- lifecycle ----------------------------------------------------------------------------------------
    async def run(self, ready: Callable[[], None] | None = None) -> None:
        s = self.settings
        if self.image_policy is None:
            from skillgen.safety import SafetySettings

            device = "cuda" if s.device == "cuda" else "cpu"
            self.image_policy = await asyncio.to_thread(ImagePolicy.from_settings, SafetySettings(), device)
        if self.model_id is None:
            self.model_id = await asyncio.to_thread(model_identity, s.model, s.backend, s.precision)
        link = RedisLink(s.redis_url, s.redis_timeout_s, s.redis_retry_s) if s.redis_url else None
        self.cache = TwoLevelCache(L1(s.l1_max_bytes), L2(link, s.redis_prefix, s.cache_ttl_s) if link else None)
        self.leases = Leases(link, s.redis_prefix, s.lease_ttl_s, s.lease_poll_ms)
        if link:
            log.info("cache: L1 in process (%d MiB) + L2 Redis at %s (ttl %ds); single flight across consumers",
                     s.l1_max_bytes >> 20, link.url, s.cache_ttl_s)
        else:
            log.info("cache: L1 in process only (%d MiB), single flight in this process only: SKILL_REDIS_URL is unset",
                     s.l1_max_bytes >> 20)
        consumer = make_consumer(
            s, group=self.topics.group(CONSUMER_GROUP),
            fetch_max_wait_ms=s.fetch_max_wait_ms,
            session_timeout_ms=s.kafka_session_timeout_ms,
            heartbeat_interval_ms=s.kafka_heartbeat_interval_ms,
            rebalance_timeout_ms=s.kafka_rebalance_timeout_ms,
        )
        # No linger: a terminal event is awaited before its commit, and batching happens anyway under load.
        self.producer = make_producer(s, linger_ms=0)
        try:
            async with metrics_server(s.metrics_port, self.metrics.registry, self.health):
                await self.producer.start()
                await consumer.start()
                consumer.subscribe([self.topics.generate], listener=_Rebalance(self, consumer))
                background = [asyncio.create_task(self._run_batches()), asyncio.create_task(self._committer(consumer))]
                try:
                    self._state = "running"
                    if ready:
                        ready()
                    log.info("consumer ready on %s (max_batch %d, max_wait %d ms)", self.topics.generate,
                             s.max_batch, s.max_wait_ms)
                    await self._fetch(consumer)
                    self._state = "draining"
                    await self._drain(consumer)
                finally:
                    for task in [*background, *self._tasks]:
                        task.cancel()
                    await asyncio.gather(*background, *self._tasks, return_exceptions=True)
                    await consumer.stop()  # leaves the group, so partitions move at once
        finally:
            self._state = "stopped"
            await self.producer.stop()
            if link:
                await link.close()
            self._gpu.shutdown(wait=False, cancel_futures=True)
            self._post.shutdown(wait=False, cancel_futures=True)

    async def _fetch(self, consumer) -> None:
        s = self.settings
        while not self._stop.is_set():
            self._loop_seen = time.monotonic()
            in_hand = len(self.offsets)
            if in_hand >= s.max_pending:
                if unpaused := consumer.assignment() - consumer.paused():
                    consumer.pause(*unpaused)
            elif paused := consumer.paused():
                consumer.resume(*paused)
            batches = await consumer.getmany(timeout_ms=100, max_records=max(1, s.max_pending - in_hand))
            for tp, records in batches.items():
                for record in records:
                    job = Job(record, tp, time.monotonic())
                    self.offsets.add(job)
                    self._spawn(self._admit(job))
            self._update_lag(consumer)

    async def _drain(self, consumer) -> None:
        s = self.settings
        log.info("stopping: %d records in hand, finishing them within %.0fs", len(self.offsets), s.drain_timeout_s)
        self.batcher.hurry()
        try:
            async with asyncio.timeout(s.drain_timeout_s):
                while len(self.offsets):
                    await asyncio.sleep(0.05)
        except TimeoutError:
            log.warning("drain timed out: %d records unanswered go to the next owner", len(self.offsets))
        await self._commit(consumer)

    def _spawn(self, coro) -> asyncio.Task:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._reap)
        return task

    def _reap(self, task: asyncio.Task) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("task %s failed", task.get_name(), exc_info=task.exception())

    # -- one record, up to the GPU queue ------------------------------------------------------------------
    async def _admit(self, job: Job) -> None:
        try:
            job.req = decode(job.record.value, GenerateRequest, job.record.headers)
        except CodecError as exc:
            await self._dead_letter(job.record, exc)
            self._finish(job)
            return
        try:
            await self._route(job)
        except Exception as exc:  # noqa: BLE001 - a bug here must not strand the partition
            log.exception("cannot handle the request", extra=job_fields(job.req.request_id))
            await self._dead_letter(job.record, exc)
            await self._answer(job, EventKind.failed,
                               message="the consumer could not handle this request; the team has been notified")

    async def _route(self, job: Job) -> None:
        req = job.req
        decision = self.prompt_policy.check(req.prompt)
        if not decision.allowed:
            self.metrics.blocked.labels("prompt").inc()
            log.info("prompt blocked (%s: %s)", decision.category, decision.detail, extra=job_fields(req.request_id))
            await self._answer(job, EventKind.blocked, message=decision.reason)
            return
        adapter = None
        if req.adapter is not None:
            try:
                adapter = await asyncio.to_thread(self.resolve_adapter, req.adapter, req.origin.team_id)
            except PipelineError as exc:
                await self._answer(job, EventKind.failed, message=str(exc))
                return
        key = cache_key(req, self.model_id, adapter)
        hit = await self.cache.get(key)
        if hit is not None:
            entry, level = hit
            self.metrics.cache_hits.labels(level).inc()
            await self._answer(job, EventKind.succeeded, blobs=entry.blobs, cache_level=level)
            return
        if job.abandoned:
            return
        flight = self._flights.get(key)
        if flight is not None:
            self.metrics.cache_misses.inc()
            flight.waiters.append(job)
            await self._notify(job, EventKind.queued, queue_position=flight.position)
            return
        entry = self.cache.l1.get(key)
        if entry is not None:  # a flight landed while we asked L2
            self.metrics.cache_hits.labels("l1").inc()
            await self._answer(job, EventKind.succeeded, blobs=entry.blobs, cache_level="l1")
            return
        self.metrics.cache_misses.inc()
        flight = Flight(key, batch_key(req, adapter), req, adapter, image_seeds(req), waiters=[job])
        self._flights[key] = flight
        await self._fly(flight)

    async def _fly(self, flight: Flight[Job]) -> None:
        """Take the lease on the flight's picture, or wait for the consumer that holds it."""
        waited = False
        while flight.waiters:
            flight.lease = await self.leases.acquire(flight.key)
            if flight.lease is not None:
                break
            if not waited:
                log.info("another consumer is drawing this picture: waiting for it",
                         extra=job_fields(flight.request.request_id))
                for job in flight.waiters:
                    await self._notify(job, EventKind.queued)
            waited = True
            entry = await self.leases.wait(flight.key, self.cache.l2, wanted=lambda: bool(flight.waiters))
            if entry is not None:
                await self._land(flight, entry, "flight")
                return
        if not flight.waiters:
            await self._close(flight)
            return
        if waited:  # the holder may have finished between our last look and our lease
            entry = await self.cache.l2.get(flight.key)
            if entry is not None:
                await self._land(flight, entry, "flight")
                return
        ahead = len(self.batcher)
        flight.position = ahead
        eta_s = self._eta_s(self.batcher.images + len(flight.seeds))
        for job in list(flight.waiters):
            await self._notify(job, EventKind.queued, queue_position=ahead, eta_s=eta_s)
        self.batcher.add(flight.batch, flight, size=len(flight.seeds))

    def _eta_s(self, images: int) -> float | None:
        if self._batch_s is None:
            return None
        return round(self._batch_s * (math.ceil(images / self.settings.max_batch) + bool(self._running)), 1)

    def _requeue_alone(self, flight: Flight[Job]) -> None:
        if not flight.waiters:  # everyone waiting went to another consumer meanwhile
            self._spawn(self._close(flight))
            return
        self.batcher.add(flight.batch._replace(solo=flight.key), flight, size=len(flight.seeds), wait=False)

    # -- the GPU ------------------------------------------------------------------------------------------
    async def _run_batches(self) -> None:
        from skillgen.inference.engine import BatchSpec, Sample

        loop = asyncio.get_running_loop()
        while True:
            key, flights = await self.batcher.next_batch()
            samples, spans = [], []
            for f in flights:
                spans.append(slice(len(samples), len(samples) + len(f.seeds)))
                samples += [Sample(f.request.prompt, f.request.negative_prompt, seed) for seed in f.seeds]
            now = time.monotonic()
            for f in flights:
                f.position = 0
                for job in list(f.waiters):
                    self.metrics.queue_wait.observe(now - job.received)
                    await self._notify(job, EventKind.started)
            spec = BatchSpec(key.width, key.height, key.steps, key.guidance, key.scheduler, adapter=key.adapter)
            self._running = flights
            t0 = time.perf_counter()
            try:
                images = await loop.run_in_executor(
                    self._gpu, self._generate, spec, flights[0].adapter, samples, self._progress_fn(flights, loop)
                )
            except Exception as exc:  # noqa: BLE001 - every failure is judged in _failed
                self._running = []
                self._failed(flights, exc)
                continue
            self._running = []
            gen_s = time.perf_counter() - t0
            self.metrics.generation.observe(gen_s)
            self.metrics.batch_size.observe(len(samples))
            self._batch_s = gen_s if self._batch_s is None else 0.8 * self._batch_s + 0.2 * gen_s
            log.info("batch of %d images (%d requests) in %.2fs", len(samples), len(flights), gen_s)
            for f, span in zip(flights, spans):
                self._spawn(self._deliver(f, images[span]))

    def _generate(self, spec, adapter: ResolvedAdapter | None, samples, progress):
        if adapter is not None:
            self.engine.backend.load_adapter(adapter.key, adapter.path)
        return self.engine.generate(spec, samples, progress)

    def _progress_fn(self, flights: list[Flight[Job]], loop: asyncio.AbstractEventLoop):
        last = [time.monotonic()]

        def progress(step: int, total: int) -> None:  # on the inference thread
            now = time.monotonic()
            if step < total and now - last[0] >= self.settings.progress_interval_s:
                last[0] = now
                loop.call_soon_threadsafe(self._spawn, self._send_progress(flights, step, total))

        return progress

    async def _send_progress(self, flights: list[Flight[Job]], step: int, total: int) -> None:
        for f in flights:
            for job in list(f.waiters):
                await self._notify(job, EventKind.progress, step=step, total_steps=total)

    def _failed(self, flights: list[Flight[Job]], exc: BaseException) -> None:
        """A batch (or its delivery) raised. Which request is to blame is unknown, so each is retried alone
        first; a request that fails alone is retried with backoff, then dead-lettered."""
        s = self.settings
        if len(flights) > 1:
            log.warning("batch of %d requests failed (%s: %s): retrying each alone", len(flights), type(exc).__name__, exc)
            for f in flights:
                self._requeue_alone(f)
            return
        (f,) = flights
        ctx = job_fields(f.request.request_id)
        if isinstance(exc, PipelineError):  # the request itself cannot be served: retrying changes nothing
            log.warning("failed: %s", exc, extra=ctx)
            self._spawn(self._fail(f, str(exc), None))
            return
        f.attempts += 1
        if f.attempts > s.max_retries:
            log.error("failed after %d attempts", f.attempts, exc_info=exc, extra=ctx)
            self._spawn(self._fail(f, "generation failed after retries; the team has been notified", exc))
            return
        delay_s = s.retry_backoff_ms / 1000 * 2 ** (f.attempts - 1)
        log.warning("attempt %d failed (%s: %s): retrying in %.1fs", f.attempts, type(exc).__name__, exc, delay_s, extra=ctx)
        asyncio.get_running_loop().call_later(delay_s, self._requeue_alone, f)

    # -- after the GPU ------------------------------------------------------------------------------------
    async def _deliver(self, flight: Flight[Job], images) -> None:
        loop = asyncio.get_running_loop()
        try:
            outcome = await loop.run_in_executor(self._post, self._check_and_store, flight, images)
        except Exception as exc:  # noqa: BLE001 - e.g. the blob store is unreachable: retried like a failed batch
            self._failed([flight], exc)
            return
        if isinstance(outcome, Decision):
            await self._withhold(flight, outcome)
            return
        await self._land(flight, CacheEntry(blobs=outcome, model=self.model_id), None)

    def _check_and_store(self, flight: Flight[Job], images) -> list[BlobRef] | Decision:
        """Every image is checked before anything is stored; one blocked image withholds the request."""
        decisions = self.image_policy.check(images)
        blocked = [d for d in decisions if not d.allowed]
        if blocked:
            return next((d for d in blocked if d.category == CHECK_FAILED), blocked[0])
        refs = []
        for img, seed in zip(images, flight.seeds):
            buf = io.BytesIO()
            img.save(buf, format="PNG")
            refs.append(self.blobs.put(buf.getvalue(), width=img.width, height=img.height, seed=seed))
        return refs

    async def _withhold(self, flight: Flight[Job], decision: Decision) -> None:
        log.warning("image withheld (%s: %s)", decision.category, decision.detail,
                    extra=job_fields(flight.request.request_id))
        await self._close(flight)
        if decision.category == CHECK_FAILED:  # nothing vouched for the image: not shown, and not a verdict
            kind = EventKind.failed
        else:
            kind = EventKind.blocked
            self.metrics.blocked.labels("image").inc(len(flight.waiters))
        await asyncio.gather(*(self._answer(job, kind, message=decision.reason) for job in flight.waiters))

    async def _land(self, flight: Flight[Job], entry: CacheEntry, level: str | None) -> None:
        """The picture exists: cache it (L2 before the lease goes, so a waiting consumer finds it), then answer
        everyone who waited. The first waiter of a generated flight is its owner; the others joined it."""
        self.cache.l1.put(flight.key, entry)
        if self._flights.get(flight.key) is flight:  # from here on, identical requests hit L1 instead
            del self._flights[flight.key]
        if level is None and self.cache.l2 is not None:
            await self.cache.l2.put(flight.key, entry)
        await self._close(flight)
        await asyncio.gather(*(
            self._answer(job, EventKind.succeeded, blobs=entry.blobs, cache_level=level or ("flight" if i else None))
            for i, job in enumerate(flight.waiters)
        ))

    async def _fail(self, flight: Flight[Job], message: str, error: BaseException | None) -> None:
        await self._close(flight)
        for job in flight.waiters:
            if error is not None:
                await self._dead_letter(job.record, error)
            await self._answer(job, EventKind.failed, message=message)

    async def _close(self, flight: Flight[Job]) -> None:
        if self._flights.get(flight.key) is flight:
            del self._flights[flight.key]
        if flight.lease is not None:
            lease, flight.lease = flight.lease, None
            await lease.release()

    # -- events and offsets -------------------------------------------------------------------------------
    async def _send(self, job: Job, kind: EventKind, **fields) -> asyncio.Future:
        """Hand an event to the producer (which keeps a request's events in order) and return its delivery."""
        req = job.req
        event = JobEvent(
            request_id=req.request_id, kind=kind, origin=req.origin, prompt=req.prompt,
            adapter=str(req.adapter) if req.adapter else None, **fields,
        )
        value, headers = encode(event)
        async with job.emitting:
            return await self.producer.send(self.topics.events, value, key=req.request_id.encode(), headers=headers)

    async def _notify(self, job: Job, kind: EventKind, **fields) -> None:
        if job.abandoned:
            return
        delivery = await self._send(job, kind, **fields)
        delivery.add_done_callback(_log_lost_event)

    async def _answer(self, job: Job, kind: EventKind, **fields) -> None:
        """The terminal event: produced and acknowledged before the record counts as done."""
        if job.abandoned:
            return
        await (await self._send(job, kind, **fields))
        self.metrics.request_latency.observe(max(0.0, time.time() - job.record.timestamp / 1000))
        log.info("%s", kind.value, extra=job_fields(job.req.request_id, cache=fields.get("cache_level")))
        self._terminal_events += 1
        if self._terminal_events == self.settings.test_kill_after_terminal:
            log.warning("TEST HOOK: SIGKILL after terminal event %d, before its commit", self._terminal_events)
            os.kill(os.getpid(), signal.SIGKILL)
        self._finish(job)

    def _finish(self, job: Job) -> None:
        if job.abandoned:
            return
        self.offsets.finish(job)
        self.processed += 1
        self._dirty.set()

    async def _dead_letter(self, record: ConsumerRecord, error: BaseException) -> None:
        reason = await dead_letter(self.producer, record, error)
        topic = self.topics.dlq(record.topic)
        self.metrics.dlq.labels(topic).inc()
        log.warning("record %s[%d]@%d to %s: %s", record.topic, record.partition, record.offset, topic, reason)

    async def _committer(self, consumer) -> None:
        while True:
            await self._dirty.wait()
            self._dirty.clear()
            await self._commit(consumer)

    async def _commit(self, consumer, tps=None) -> None:
        async with self._commit_lock:
            points = self.offsets.to_commit(consumer.assignment() if tps is None else tps)
            if not points:
                return
            try:
                await consumer.commit(points)
            except KafkaError as exc:  # a rebalance is under way: the next owner starts from the last commit
                log.warning("commit of %s failed: %s", points, exc)
                return
            self.offsets.committed(points)

    def _update_lag(self, consumer) -> None:
        for tp in consumer.assignment():
            end = consumer.highwater(tp)
            if end is not None:
                point = self.offsets.point(tp)
                self.metrics.lag.labels(tp.topic, str(tp.partition)).set(max(0, end - (end if point is None else point)))

    async def _on_revoked(self, consumer, revoked: set[TopicPartition]) -> None:
        """Commit what is finished; leave what is not to the partitions' next owner."""
        if not revoked:
            return
        await self._commit(consumer, revoked)
        dropped = 0
        for tp in revoked:
            for job in self.offsets.drop(tp):
                job.abandoned = True
                dropped += 1
            try:
                self.metrics.lag.remove(tp.topic, str(tp.partition))
            except KeyError:
                pass
        for flight in list(self._flights.values()):
            flight.waiters = [j for j in flight.waiters if not j.abandoned]
            if not flight.waiters and self.batcher.remove(flight):
                await self._close(flight)
        log.info("partitions revoked (%s): %d unfinished records left to their next owner",
                 ", ".join(f"{tp.topic}[{tp.partition}]" for tp in sorted(revoked)), dropped)


def _log_lost_event(delivery: asyncio.Future) -> None:
    if not delivery.cancelled() and delivery.exception() is not None:
        log.warning("an event could not be produced: %s", delivery.exception())


def load_engine_from(settings: ConsumerSettings):
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
        max_pixels=settings.max_pixels,
        trt_profile=trt_profile,
    )


def registry_resolver(adapter_url: str) -> AdapterResolver:
    """Adapters from the trainer's registry: `name` is the team's latest version, `name@vN` that one."""
    from skillgen.adapters.registry import Registry, RegistryError

    registry = Registry(adapter_url)

    def resolve(ref: AdapterRef, team_id: str) -> ResolvedAdapter:
        try:
            found = registry.resolve(team_id, ref)
        except RegistryError as exc:
            raise AdapterError(str(exc)) from None
        return ResolvedAdapter(name=ref.name, version=found.version, path=found.path, sha256=found.sha256)

    return resolve


async def serve(settings: ConsumerSettings, engine=None, ready: Callable[[], None] | None = None) -> Worker:
    """Run until SIGTERM/SIGINT (or `worker.stop()`); the engine is loaded once, before joining the group."""
    if engine is None:
        engine = await asyncio.to_thread(load_engine_from, settings)
    resolver = registry_resolver(settings.adapter_url) if settings.adapter_url else None
    worker = Worker(settings, engine, resolve_adapter=resolver)
    stop_on_signals(worker.stop)
    await worker.run(ready)
    return worker


def add_arguments(parser) -> None:
    parser.add_argument("--model", help="diffusers model directory or hub id (default: SKILL_MODEL or the embedded model)")
    parser.add_argument("--backend", choices=["torch", "onnx"], help="inference backend (default: SKILL_BACKEND or torch)")


def run(args) -> int:
    overrides = {k: v for k, v in (("model", args.model), ("backend", args.backend)) if v}
    settings = ConsumerSettings(**overrides)
    asyncio.run(serve(settings))
    return 0
