"""The GPU consumer: Kafka in, batched images through the engine, events out.

A record's life: decode (poison goes to the DLQ) -> routing (prompt policy, adapter, cache: consumer/routing.py)
-> single flight (in this process, then a Redis lease across consumers: consumer/flight.py) -> the GPU loop
(batcher, engine, retry and split: consumer/gpu.py) -> the one post-processing step (image policy, PNG, blob
store: skillgen/safety/postprocess.py) -> cache -> events for every request waiting on that picture.

Kafka itself (fetch, pause, commit only after a record's terminal event, revoke, drain on SIGTERM, health, DLQ)
is the shared service skeleton, skillgen/runtime/service.py: this module only says what a record means.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Callable

from pydantic import TypeAdapter, ValidationError

from consumer.cache import L1, L2, CacheEntry, RedisLink, TwoLevelCache, cache_link
from consumer.engine import load_engine_from
from consumer.flight import Flight, Leases
from consumer.gpu import GpuLoop
from consumer.keys import (
    AdapterResolver,
    fast_adapter,
    model_identity,
    no_registry,
    registry_resolver,
)
from consumer.metrics import ConsumerMetrics
from consumer.routing import Draw, Hit, Refuse, Router
from consumer.schedule import CANCELLED, Scheduling
from consumer.settings import ConsumerSettings
from schemas.codec import CodecError, decode, encode
from schemas.messages import EventKind, GenerateRequest, JobEvent, Origin, RequestId
from schemas.topics import CONSUMER_GROUP
from skillgen.runtime import groupview
from skillgen.runtime.blobstore import BlobStore
from skillgen.runtime.broadcast import Broadcast
from skillgen.runtime.logs import job as job_fields
from skillgen.runtime.observability import stop_on_signals
from skillgen.runtime.redis import Store
from skillgen.runtime.service import Job, KafkaService
from skillgen.safety import Decision, ImagePolicy, PromptPolicy, SafetySettings
from skillgen.safety.decision import CHECK_FAILED
from skillgen.safety.fingerprint import policy_fingerprint
from skillgen.safety.postprocess import release

log = logging.getLogger("skillgen.consumer")

UNHANDLED = "the consumer could not handle this request; the team has been notified"
CRASHED = ("this request stopped the image service each time it was tried, so it was set aside; "
           "the team has been notified")


class Worker:
    """`await Worker(settings, engine).run(ready)` until `stop()`.

    The safety policies default to SafetySettings (the image policy is loaded in `run`, and a consumer whose
    checks cannot load does not start). `resolve_adapter` maps a request's AdapterRef to a version; without
    one, requests naming an adapter fail with a clear message. `model_id` overrides the model's identity in
    cache keys (default: computed from settings.model, see keys.model_identity); the safety policy's
    fingerprint (`policy_id`, from SafetySettings) is computed in `run` and is in every cache key too.
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
        warm_up: bool = False,
    ):
        self.settings = settings
        self.blobs = blobs or BlobStore(settings.blob_url)
        self.topics = settings.topics
        self.prompt_policy = prompt_policy or PromptPolicy.from_settings()
        self.image_policy = image_policy
        self.resolve_adapter = resolve_adapter or no_registry
        self.metrics = metrics or ConsumerMetrics()
        self.model_id = model_id
        self.warm_up = warm_up  # time the cost model's first batches before joining (consumer/speed.py)
        self.gpu = GpuLoop(engine, settings, self.metrics, self)
        self.service = KafkaService(
            settings, name="consumer", topic=self.topics.generate, group=self.topics.group(CONSUMER_GROUP),
            handle=self._admit, max_in_hand=settings.max_pending, drain_timeout_s=settings.drain_timeout_s,
            registry=self.metrics.registry, health=self._health, on_revoked=self._on_revoked,
            on_drain=self.gpu.batcher.hurry, count_attempts=True, on_poison=self._poisoned,
            max_record_age_s=settings.max_record_age_s,
            # No linger: a terminal event is awaited before its commit, and batching happens anyway under load.
            producer_options={"linger_ms": 0},
        )
        self._flights: dict[str, Flight[Job]] = {}
        self.sched = Scheduling(self)  # lanes, deadlines, cancels and the group view (consumer/schedule.py)

    @property
    def offsets(self):
        return self.service.offsets

    @property
    def processed(self) -> int:
        """Records answered or dead-lettered."""
        return self.service.finished

    def stop(self) -> None:
        self.service.stop()

    def health(self) -> tuple[bool, str]:
        return self.service.health()

    def _health(self) -> tuple[bool, str]:
        if stall := self.gpu.stall():
            return False, stall
        return True, f"ok: {len(self.offsets)} records in hand, {len(self.gpu.batcher)} requests queued for the GPU"

    def spawn(self, coro) -> asyncio.Task:
        return self.service.spawn(coro)

    # -- lifecycle ----------------------------------------------------------------------------------------
    async def run(self, ready: Callable[[], None] | None = None) -> None:
        s = self.settings
        if self.image_policy is None:
            device = "cuda" if s.device == "cuda" else "cpu"
            self.image_policy = await asyncio.to_thread(ImagePolicy.from_settings, SafetySettings(), device)
        if self.model_id is None:
            self.model_id = await asyncio.to_thread(model_identity, s.model, s.backend, s.precision)
        self.policy_id = await asyncio.to_thread(policy_fingerprint, SafetySettings())
        fast = await asyncio.to_thread(fast_adapter, s.fast_lora) if s.fast_lora else None  # turbo's LoRA
        if self.warm_up:
            await self.gpu.warm_up(s.model, self.image_policy, fast)
        # Leases are correctness keys (the noeviction Redis); the cache has its own (allkeys-lru) when set.
        link = RedisLink(s.redis_url, s.redis_timeout_s, s.redis_retry_s) if s.redis_url else None
        self.sched.link = link
        l2_link = cache_link(s, link)
        self.cache = TwoLevelCache(L1(s.l1_max_bytes), L2.from_settings(s, l2_link) if l2_link else None)
        self.leases = Leases(link, s.redis_prefix, s.lease_ttl_s, s.lease_poll_ms, self.gpu.progressing)
        if link is not None:  # crash-loop counts are correctness keys too: on the same link
            self.service.attempts_store = Store(link, s.redis_prefix)
        self.router = Router(self.prompt_policy, self.resolve_adapter, self.cache, self.model_id, self.policy_id,
                             s.team_allowed, blobs=self.blobs, fast_adapter=fast)
        if l2_link:
            log.info("cache: L1 in process (%d MiB) + L2 Redis at %s (ttl %ds, safety policy %s); single flight "
                     "%s", s.l1_max_bytes >> 20, l2_link.url, s.cache_ttl_s, self.policy_id,
                     f"across consumers (leases at {link.url})" if link else "in this process only")
        else:
            log.info("cache: L1 in process only (%d MiB), single flight in this process only: SKILL_REDIS_URL is unset",
                     s.l1_max_bytes >> 20)

        cancels = Broadcast(s, self.topics.generate_cancel, s.cancel_lookback_s, self.sched.read_cancel)

        def started() -> None:
            self.spawn(self.gpu.run())
            self.spawn(self._watch_lag())
            self.spawn(self.sched.publish_view())
            log.info("consumer ready on %s (max_batch %d, max_wait %d ms)", self.topics.generate, s.max_batch,
                     s.max_wait_ms)
            if ready:
                ready()

        try:
            await cancels.start()  # the recent cancels are known before the first record is taken
            await self.service.run(started)
        finally:
            await cancels.stop()
            for flight in list(self._flights.values()):  # left to the next owner: its peers need not wait
                await self.close(flight)
            self.leases.close()
            for opened in {id(x): x for x in (link, l2_link) if x is not None}.values():
                await opened.close()
            self.gpu.shutdown()  # the inference and post-processing threads

    async def _watch_lag(self) -> None:
        while True:
            for tp, lag in self.service.lag().items():
                self.metrics.lag.labels(tp.topic, str(tp.partition)).set(lag)
            await asyncio.sleep(1.0)

    # -- one record, up to the GPU queue ------------------------------------------------------------------
    async def _admit(self, job: Job) -> None:
        try:
            job.message = decode(job.record.value, GenerateRequest, job.record.headers)
        except CodecError as exc:
            await self._dead_letter(job, exc)
            await self._unreadable(job, exc)
            self.service.finish(job)
            return
        if self.sched.cancelled(job.message):  # cancelled before it was read
            self.metrics.cancelled.labels("unread").inc()
            await self._answer(job, EventKind.cancelled, message=CANCELLED)
            return
        try:
            await self._route(job)
        except Exception as exc:  # noqa: BLE001 - a bug here must not strand the partition
            log.exception("cannot handle the request", extra=job_fields(job.message.request_id))
            await self._dead_letter(job, exc)
            await self._answer(job, EventKind.failed, message=UNHANDLED)

    async def _route(self, job: Job) -> None:
        route = await self.router.route(job.message)
        if isinstance(route, Refuse):
            if route.kind == EventKind.blocked:
                self.metrics.blocked.labels(route.stage).inc()
            await self._answer(job, route.kind, message=route.message)
            return
        if isinstance(route, Hit):
            self.metrics.cache_hits.labels(route.level).inc()
            await self._answer(job, EventKind.succeeded, blobs=route.entry.blobs, cache_level=route.level)
            return
        await self._join_or_fly(job, route)

    async def _join_or_fly(self, job: Job, draw: Draw) -> None:
        if job.abandoned:
            return
        if self.sched.cancelled(job.message):  # cancelled while it was being routed
            self.metrics.cancelled.labels("unread").inc()
            await self._answer(job, EventKind.cancelled, message=CANCELLED)
            return
        flight = self._flights.get(draw.key)
        if flight is not None:
            self.metrics.cache_misses.inc()
            flight.waiters.append(job)
            await self._notify(job, EventKind.queued, queue_position=flight.position)
            return
        entry = self.cache.l1.get(draw.key)
        if entry is not None:  # a flight landed while we asked L2
            self.metrics.cache_hits.labels("l1").inc()
            await self._answer(job, EventKind.succeeded, blobs=entry.blobs, cache_level="l1")
            return
        self.metrics.cache_misses.inc()
        req: GenerateRequest = job.message
        steps = req.steps_to_run
        flight = Flight(draw.key, draw.batch, req, draw.adapter, draw.seeds, waiters=[job], team=req.origin.team_id,
                        cost=groupview.units(len(draw.seeds), req.width, req.height, steps, req.guidance),
                        init_image=draw.init_image)
        self._flights[draw.key] = flight
        flight.lane = await self.sched.lane(req, flight.cost)
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
            await self.close(flight)
            return
        if waited:  # the holder may have finished between our last look and our lease
            entry = await self.cache.l2.get(flight.key)
            if entry is not None:
                await self._land(flight, entry, "flight")
                return
        est = self.gpu.estimate(flight)
        if est.eta_s is not None and (refusal := self.sched.late(flight, est.eta_s)):
            await self.close(flight)
            self.metrics.sched_refused.labels(flight.lane).inc(len(flight.waiters))
            log.info("refused: %s", refusal, extra=job_fields(flight.request.request_id))
            await asyncio.gather(*(self._answer(job, EventKind.failed, message=refusal) for job in flight.waiters))
            return
        est = self.gpu.queue(flight, est)
        for job in list(flight.waiters):
            await self._notify(job, EventKind.queued, queue_position=est.position, eta_s=est.eta_s,
                               lane=flight.lane)

    # -- what the GPU loop reports (consumer/gpu.py's Outlet) -----------------------------------------------
    async def started(self, flights: list[Flight[Job]]) -> None:
        now = time.monotonic()
        for f in flights:
            for job in list(f.waiters):
                self.metrics.queue_wait.observe(now - job.received)
                await self._notify(job, EventKind.started)

    async def progress(self, flights: list[Flight[Job]], step: int, total: int) -> None:
        for f in flights:
            for job in list(f.waiters):
                await self._notify(job, EventKind.progress, step=step, total_steps=total)

    async def drawn(self, flight: Flight[Job], images) -> None:
        """The one post-processing step, then the answer: stored and cached, or withheld as a whole."""
        try:  # on the post-processing thread (consumer/post.py), overlapping the next batch on the GPU
            outcome = await asyncio.wrap_future(self.gpu.post.submit(release, images, flight.seeds, self.image_policy,
                                                                     self.blobs, urgent=flight.urgent))
        except Exception as exc:  # noqa: BLE001 - e.g. the blob store is unreachable: retried like a failed batch
            self.gpu.failed([flight], exc)
            return
        self.gpu.completed(flight)  # the pace the consumer delivers at: part of every ETA
        if isinstance(outcome, Decision):
            await self._withhold(flight, outcome)
            return
        await self._land(flight, CacheEntry(blobs=outcome, model=self.model_id), None)

    async def give_up(self, flight: Flight[Job], message: str, error: BaseException | None) -> None:
        await self.close(flight)
        for job in flight.waiters:
            if error is not None:
                await self._dead_letter(job, error)
            await self._answer(job, EventKind.failed, message=message)

    async def close(self, flight: Flight[Job]) -> None:
        if self._flights.get(flight.key) is flight:
            del self._flights[flight.key]
        if flight.lease is not None:
            lease, flight.lease = flight.lease, None
            await lease.release()

    # -- after the GPU ------------------------------------------------------------------------------------
    async def _withhold(self, flight: Flight[Job], decision: Decision) -> None:
        log.warning("image withheld (%s: %s)", decision.category, decision.detail,
                    extra=job_fields(flight.request.request_id))
        await self.close(flight)
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
        await self.close(flight)
        await asyncio.gather(*(
            self._answer(job, EventKind.succeeded, blobs=entry.blobs, cache_level=level or ("flight" if i else None))
            for i, job in enumerate(flight.waiters)
        ))

    # -- events ---------------------------------------------------------------------------------------------
    def _event(self, job: Job, kind: EventKind, **fields) -> tuple[bytes, list, bytes]:
        req: GenerateRequest = job.message
        event = JobEvent(
            request_id=req.request_id, kind=kind, origin=req.origin, prompt=req.prompt,
            adapter=str(req.adapter) if req.adapter else None, replay_of=req.replay_of, **fields,
        )
        value, headers = encode(event)
        return value, headers, req.request_id.encode()

    async def _notify(self, job: Job, kind: EventKind, **fields) -> None:
        """A progress event: handed to the producer in order, not waited for."""
        if job.abandoned:
            return
        value, headers, key = self._event(job, kind, **fields)
        delivery = await self.service.send(self.topics.events, value, key=key, headers=headers, job=job)
        delivery.add_done_callback(_log_lost_event)

    async def _answer(self, job: Job, kind: EventKind, **fields) -> None:
        """The terminal event: produced and acknowledged (retried until it is) before the record counts as done."""
        if job.abandoned:
            return
        value, headers, key = self._event(job, kind, **fields)
        await self.service.emit(self.topics.events, value, key=key, headers=headers, job=job)
        self.metrics.request_latency.observe(max(0.0, time.time() - job.record.timestamp / 1000))
        log.info("%s", kind.value, extra=job_fields(job.message.request_id, cache=fields.get("cache_level")))
        self.service.finish(job)

    async def _poisoned(self, job: Job, reason: str) -> None:
        """A record set aside for killing its process again and again (skillgen/runtime/attempts.py): the person
        who asked hears why; the service has dead-lettered and finishes it."""
        self.metrics.dlq.labels(self.topics.dlq(job.record.topic)).inc()
        try:
            job.message = decode(job.record.value, GenerateRequest, job.record.headers)
        except CodecError:
            return  # nobody to tell
        log.error("request set aside: %s", reason, extra=job_fields(job.message.request_id))
        value, headers, key = self._event(job, EventKind.failed, message=CRASHED)
        await self.service.emit(self.topics.events, value, key=key, headers=headers, job=job)

    async def _unreadable(self, job: Job, error: CodecError) -> None:
        """A record that is not a valid request but names its request id and origin: whoever asked hears why.
        The origin's seal is copied as it came: delivery verifies it and drops what is unsealed or forged."""
        try:
            data = json.loads(job.record.value)
            rid = _REQUEST_ID.validate_python(data["request_id"])
            origin = Origin.model_validate(data["origin"])
        except (ValueError, TypeError, KeyError, RecursionError, ValidationError):  # (JSON errors: ValueError)
            return
        reason = f"this request could not be read: {error}"
        event = JobEvent(request_id=rid, kind=EventKind.failed, origin=origin, message=reason[:2000])
        value, headers = encode(event)
        await self.service.emit(self.topics.events, value, key=rid.encode(), headers=headers, job=job)

    async def _dead_letter(self, job: Job, error: BaseException) -> None:
        await self.service.dead_letter(job.record, error)
        self.metrics.dlq.labels(self.topics.dlq(job.record.topic)).inc()

    async def _on_revoked(self, dropped: list[Job]) -> None:
        """Forget the revoked partitions' jobs: a flight nobody here waits for any more leaves the queue."""
        for tp in {j.tp for j in dropped}:
            with contextlib.suppress(KeyError):
                self.metrics.lag.remove(tp.topic, str(tp.partition))
        for flight in list(self._flights.values()):
            flight.waiters = [j for j in flight.waiters if not j.abandoned]
            if not flight.waiters and self.gpu.batcher.remove(flight):
                await self.close(flight)


_REQUEST_ID = TypeAdapter(RequestId)


def _log_lost_event(delivery: asyncio.Future) -> None:
    if not delivery.cancelled() and delivery.exception() is not None:
        log.warning("an event could not be produced: %s", delivery.exception())


async def serve(settings: ConsumerSettings, engine=None, ready: Callable[[], None] | None = None) -> Worker:
    """Run until SIGTERM/SIGINT (or `worker.stop()`); the engine is loaded once, before joining the group."""
    if engine is None:
        engine = await asyncio.to_thread(load_engine_from, settings)
    resolver = registry_resolver(settings.adapter_url) if settings.adapter_url else None
    worker = Worker(settings, engine, resolve_adapter=resolver, warm_up=settings.warm_up)
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
