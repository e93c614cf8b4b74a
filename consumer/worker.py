"""The GPU consumer: Kafka in, images through the engine, events out.

At-least-once: an offset is committed only after the request's terminal event is produced (idempotent
producer, acks=all). Inference runs in one worker thread so the event loop keeps heartbeating and producing.
"""

from __future__ import annotations

import asyncio
import io
import logging
import signal
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from aiokafka import ConsumerRecord

from consumer.keys import image_seeds
from consumer.pipeline import PipelineError
from consumer.settings import ConsumerSettings
from schemas.blobstore import BlobStore
from schemas.codec import CodecError, decode, encode
from schemas.kafka import make_consumer, make_producer
from schemas.logs import job
from schemas.messages import BlobRef, EventKind, GenerateRequest, JobEvent
from schemas.topics import CONSUMER_GROUP

log = logging.getLogger("skillgen.consumer")


class ConsumerError(RuntimeError):
    pass


class Worker:
    def __init__(self, settings: ConsumerSettings, engine, blobs: BlobStore | None = None):
        self.settings = settings
        self.engine = engine
        self.blobs = blobs or BlobStore(settings.blob_url)
        self.topics = settings.topics
        self._gpu = ThreadPoolExecutor(max_workers=1, thread_name_prefix="inference")
        self._stop = asyncio.Event()
        self.processed = 0

    def stop(self) -> None:
        self._stop.set()

    async def run(self, ready: Callable[[], None] | None = None) -> None:
        consumer = make_consumer(
            self.settings, self.topics.generate, group=self.topics.group(CONSUMER_GROUP), max_poll_records=1
        )
        self.producer = make_producer(self.settings)
        await self.producer.start()
        try:
            await consumer.start()
            try:
                if ready:
                    ready()
                log.info("consumer ready on %s", self.topics.generate)
                while not self._stop.is_set():
                    batches = await consumer.getmany(timeout_ms=200, max_records=1)
                    for tp, records in batches.items():
                        for record in records:
                            await self.handle(record)
                            await consumer.commit({tp: record.offset + 1})
                            self.processed += 1
            finally:
                await consumer.stop()  # leaves the group so partitions move at once
        finally:
            await self.producer.stop()
            self._gpu.shutdown(wait=True)

    # -- one record ---------------------------------------------------------------------------------------
    async def handle(self, record: ConsumerRecord) -> None:
        try:
            req = decode(record.value, GenerateRequest, record.headers)
        except CodecError as exc:
            await self.dead_letter(record, exc)
            return
        ctx = job(req.request_id)
        log.info("started %r %dx%d steps=%d", req.prompt[:60], req.width, req.height, req.steps, extra=ctx)
        await self.emit(req, EventKind.started)
        t0 = time.perf_counter()
        last_error: Exception | None = None
        for attempt in range(self.settings.max_retries + 1):
            try:
                refs = await self.generate(req)
                break
            except PipelineError as exc:  # the request itself cannot be served: retrying changes nothing
                log.warning("failed: %s", exc, extra=ctx)
                await self.emit(req, EventKind.failed, message=str(exc))
                return
            except Exception as exc:  # noqa: BLE001 - anything else may be transient
                last_error = exc
                log.exception("attempt %d failed", attempt + 1, extra=ctx)
                await asyncio.sleep(self.settings.retry_backoff_ms / 1000 * 2**attempt)
        else:
            await self.emit(req, EventKind.failed, message="generation failed after retries; the team has been notified")
            await self.dead_letter(record, last_error)
            return
        log.info("succeeded in %.2fs", time.perf_counter() - t0, extra=ctx)
        await self.emit(req, EventKind.succeeded, blobs=refs)

    async def generate(self, req: GenerateRequest) -> list[BlobRef]:
        from consumer.pipeline.engine import BatchSpec, Sample

        loop = asyncio.get_running_loop()
        spec = BatchSpec(req.width, req.height, req.steps, req.guidance, req.scheduler)
        seeds = image_seeds(req)
        samples = [Sample(req.prompt, req.negative_prompt, s) for s in seeds]
        last_sent = [0.0]

        def progress(step: int, total: int) -> None:
            now = time.monotonic()
            if step < total and now - last_sent[0] >= self.settings.progress_interval_s:
                last_sent[0] = now
                asyncio.run_coroutine_threadsafe(self.emit(req, EventKind.progress, step=step, total_steps=total), loop)

        images = await loop.run_in_executor(self._gpu, lambda: self.engine.generate(spec, samples, progress))
        refs = []
        for img, seed in zip(images, seeds):
            buf = io.BytesIO()
            img.save(buf, format="PNG")
            refs.append(self.blobs.put(buf.getvalue(), width=img.width, height=img.height, seed=seed))
        return refs

    async def emit(self, req: GenerateRequest, kind: EventKind, **fields) -> None:
        event = JobEvent(request_id=req.request_id, kind=kind, origin=req.origin, prompt=req.prompt, **fields)
        value, headers = encode(event)
        await self.producer.send_and_wait(self.topics.events, value, key=req.request_id.encode(), headers=headers)

    async def dead_letter(self, record: ConsumerRecord, error: BaseException | None) -> None:
        reason = f"{type(error).__name__}: {error}"[:1000]
        headers = list(record.headers or []) + [
            ("error", reason.encode()),
            ("source-topic", record.topic.encode()),
            ("source-partition", str(record.partition).encode()),
            ("source-offset", str(record.offset).encode()),
        ]
        await self.producer.send_and_wait(self.topics.dlq(record.topic), record.value, key=record.key, headers=headers)
        log.warning("record %s[%d]@%d to DLQ: %s", record.topic, record.partition, record.offset, reason)


def load_engine_from(settings: ConsumerSettings):
    from consumer.pipeline import load_engine

    return load_engine(settings.model, settings.backend, settings.device, settings.precision)


async def serve(settings: ConsumerSettings, engine=None, ready: Callable[[], None] | None = None) -> Worker:
    """Run until SIGTERM/SIGINT (or `worker.stop()`); the engine is loaded once, before joining the group."""
    if engine is None:
        engine = await asyncio.to_thread(load_engine_from, settings)
    worker = Worker(settings, engine)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        try:
            loop.add_signal_handler(sig, worker.stop)
        except (NotImplementedError, RuntimeError):  # not the main thread
            pass
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

