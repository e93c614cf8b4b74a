"""The trainer service (`skillgen trainer`): `skill.finetune` in, adapters into the registry, events out.

One job at a time per process (one process per GPU), on the one Kafka service skeleton
(skillgen.runtime.service) with `max_in_hand=1`. A job can run for an hour, so the worker never leaves its
consumer group meanwhile: every assigned partition stays paused while polling goes on (heartbeats and the poll
interval stay alive), and the record's offset is committed only after the job's terminal event is produced.
A job whose partition is revoked mid-training stops at its next step boundary, checkpointed, and answers nothing;
a job trains only under its Redis lease, so the partition's new owner waits for the old one to let go, then resumes
from the checkpoint (trainer/guard.py). Training runs in a worker thread. A record that cannot be decoded goes to
the DLQ; a refused input, a cancel or a failure each end in a `failed` event that says why. On SIGTERM the
running job checkpoints and stops without committing: the record comes back and training resumes from that
checkpoint.

Behind the same trust boundary as the other services: a team SKILL_ALLOWED_TEAMS does not list is refused (its
cancels ignored), every caption and training image is checked (trainer/screening.py) before training, paths built
from message data stay under their root (skillgen.runtime.paths), and no chat token is held here (Slack's files
arrive as blobs that the Slack bot fetched).

Cancels arrive on `<prefix>skill.finetune.cancel` (Topics.finetune_cancel), which every trainer reads without a
group, starting SKILL_CANCEL_LOOKBACK_S back: the trainer running that team's adapter stops it, and each trainer
remembers the cancel for that adapter's jobs asked before it and not started yet.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from pathlib import Path

from aiokafka import ConsumerRecord
from prometheus_client import CollectorRegistry, Counter, Gauge

from schemas.codec import CodecError, decode, encode
from schemas.messages import (
    EventKind,
    FineTuneCancel,
    FineTuneRequest,
    JobEvent,
    mention,
)
from schemas.topics import TRAINER_GROUP
from skillgen.adapters.registry import (
    AdapterMeta,
    Registry,
    RegistryError,
    TrainedBy,
    TrainingRecord,
)
from skillgen.runtime.blobstore import BlobStore
from skillgen.runtime.broadcast import Broadcast, MissingTopic
from skillgen.runtime.fetch import IngestError
from skillgen.runtime.logs import job
from skillgen.runtime.observability import stop_on_signals
from skillgen.runtime.paths import under
from skillgen.runtime.redis import Store
from skillgen.runtime.service import Job, KafkaService
from skillgen.safety.postprocess import ImageChecker, png_bytes
from skillgen.safety.prompt import PromptPolicy
from trainer import screening
from trainer.errors import TrainerError
from trainer.guard import LEASE_LOST, JobLease, Running
from trainer.ingest import Example, dataset_sha256, ingest
from trainer.settings import TrainerSettings

log = logging.getLogger("skillgen.trainer")

SHUTDOWN = "the trainer is shutting down"
TEAM_REFUSED = "this team may not use skillgen"
CANCEL_MEMORY = 10_000
HEALTHY_LOOP_S = 30.0


class TrainerMetrics:
    def __init__(self):
        r = self.registry = CollectorRegistry()
        self.jobs = Counter("skill_trainer_jobs", "Fine-tune records answered, by outcome", ["outcome"], registry=r)
        self.steps = Counter("skill_trainer_steps", "Training steps run", registry=r)
        self.running = Gauge("skill_trainer_running", "1 while a job is training", registry=r)


class TrainerWorker:
    """`await TrainerWorker(settings).run(ready)` until `stop()`."""

    def __init__(self, settings: TrainerSettings, blobs: BlobStore | None = None, registry: Registry | None = None,
                 image_policy: ImageChecker | None = None, prompt_policy: PromptPolicy | None = None):
        self.settings = settings
        # Checks every training image and every cell of the sample grid; None builds the consumer's policy in
        # the training thread, once. The prompt policy checks every caption and the sample prompt.
        self.image_policy = image_policy
        self.prompt_policy = prompt_policy or PromptPolicy.from_settings()
        self.topics = settings.topics
        self.blobs = blobs or BlobStore(settings.blob_url)
        self.registry = registry or Registry(settings.adapter_url)
        self._gpu = ThreadPoolExecutor(max_workers=1, thread_name_prefix="training")
        self._running: Running | None = None
        self._cancels: dict[tuple[str, str], datetime] = {}
        self._base_sha256: str | None = None
        self.leases = Store(None, settings.redis_prefix)  # the jobs' leases; in Redis from run() when it is set
        self.metrics = TrainerMetrics()
        self.service = KafkaService(
            settings, name="trainer", topic=self.topics.finetune, group=self.topics.group(TRAINER_GROUP),
            handle=self._answer, max_in_hand=1, registry=self.metrics.registry, health=self._activity,
            healthy_loop_s=HEALTHY_LOOP_S,
        )

    @property
    def finished(self) -> int:
        """Records answered or dead-lettered here (committed as soon as the service gets to it)."""
        return self.service.finished

    def stop(self) -> None:
        self.service.stop()
        if self._running is not None:
            self._running.stop_reason = SHUTDOWN

    def health(self) -> tuple[bool, str]:
        return self.service.health()

    def _activity(self) -> tuple[bool, str]:
        running = self._running
        return True, f"ok: training {running.req.adapter}" if running else "ok: idle"

    # -- lifecycle ----------------------------------------------------------------------------------------
    async def run(self, ready: Callable[[], None] | None = None) -> None:
        from trainer.lora import base_model_sha256

        s = self.settings
        self._base_sha256 = await asyncio.to_thread(base_model_sha256, s.model)
        # Cancels of the last SKILL_CANCEL_LOOKBACK_S are read before any job and before `ready`, so a cancel sent
        # while no trainer ran (or just before a restart) still stops the job it names; then new ones are followed.
        cancels = Broadcast(s, self.topics.finetune_cancel, s.cancel_lookback_s, self._read_cancel)

        def started() -> None:
            log.info("trainer ready on %s (base %s)", self.topics.finetune, s.model)
            if ready:
                ready()

        self.leases = Store.from_settings(s)
        try:
            try:
                await cancels.start()
            except MissingTopic as exc:
                raise TrainerError(str(exc)) from None
            await self.service.run(started)
        finally:
            await cancels.stop()
            self._gpu.shutdown(wait=True)
            await self.leases.close()

    async def _answer(self, work: Job) -> None:
        # A job whose partition moved meanwhile answers nothing (the service commits nothing): its new owner gets
        # the record and resumes from the checkpoint, or finds the published version by request id.
        if await self.handle(work.record, work):
            self.service.finish(work)
        else:  # stopped for shutdown or moved: the record comes back and training resumes from the checkpoint
            self.service.leave(work)

    def _read_cancel(self, record: ConsumerRecord) -> None:
        try:
            msg = decode(record.value, FineTuneCancel, record.headers)
        except CodecError as exc:
            log.warning("ignoring an undecodable cancel at %d: %s", record.offset, exc)
            return
        self.cancel(msg)

    def cancel(self, msg: FineTuneCancel) -> None:
        """Stop the running job of that team's adapter, and refuse its queued ones asked before the cancel."""
        team, name = msg.origin.team_id, msg.adapter
        if not self.settings.team_allowed(msg.origin.platform.value, team):
            log.warning("ignoring a cancel of %s from %s:%s, which SKILL_ALLOWED_TEAMS does not list", name,
                        msg.origin.platform.value, team)
            return
        if len(self._cancels) >= CANCEL_MEMORY:
            self._cancels.pop(next(iter(self._cancels)))
        self._cancels[(team, name)] = msg.created_at
        running = self._running
        if running is not None and (running.req.origin.team_id, running.req.adapter) == (team, name):
            running.stop_reason = f"cancelled by {mention(msg.origin.platform, msg.origin.user_id)}"
            log.info("cancel requested", extra=job(running.req.request_id, by=msg.origin.user_id))

    # -- one record ---------------------------------------------------------------------------------------
    async def handle(self, record: ConsumerRecord, work: Job | None = None) -> bool:
        """Answer one record; True when its offset may be committed. `work`: the service's job, if any."""
        try:
            req = decode(record.value, FineTuneRequest, record.headers)
        except CodecError as exc:
            await self.service.dead_letter(record, exc)
            self.metrics.jobs.labels("dead-lettered").inc()
            return True
        ctx = job(req.request_id, adapter=req.adapter, team=req.origin.team_id)
        if not self.settings.team_allowed(req.origin.platform.value, req.origin.team_id):
            log.warning("refused: %s:%s is not in SKILL_ALLOWED_TEAMS", req.origin.platform.value, req.origin.team_id,
                        extra=ctx)
            await self.emit(req, EventKind.failed, message=f"Training of `{req.adapter}` refused: {TEAM_REFUSED}.")
            self.metrics.jobs.labels("refused").inc()
            return True
        lease = JobLease(self.leases, req.request_id, self.settings.train_lease_s)
        while await lease.take(lambda: (work is not None and work.abandoned) or self.service.stopping):
            running = self._running = Running(req, work, SHUTDOWN if self.service.stopping else None)
            try:
                async with lease.held(running):
                    answer = await self._leased(record, req, running)
            finally:
                self._running = None
                self.metrics.running.set(0)
            if answer is not None:  # None: the lease was lost mid-run: wait for it, then resume from the checkpoint
                return answer
        return False  # moved or stopping while waiting: the record's next owner takes it up

    async def _leased(self, record: ConsumerRecord, req: FineTuneRequest, running: Running) -> bool | None:
        ctx = job(req.request_id, adapter=req.adapter, team=req.origin.team_id)
        cancelled_at = self._cancels.get((req.origin.team_id, req.adapter))
        if cancelled_at is not None and req.created_at <= cancelled_at:
            await self.emit(req, EventKind.failed, message=f"Training of `{req.adapter}` was cancelled before it started.")
            self.metrics.jobs.labels("cancelled").inc()
            return True
        done = await asyncio.to_thread(self.registry.find_request, req.origin.team_id, req.adapter, req.request_id)
        if done is not None:  # a redelivery of a job that already published (here, or by its previous owner)
            await self.succeeded(req, done)
            self.metrics.jobs.labels("succeeded").inc()
            return True
        try:  # (the contract already refuses such ids, so this is defence in depth: a poison record)
            workdir = under(self.settings.work_dir, req.request_id)
        except ValueError as exc:
            await self.service.dead_letter(record, exc)
            self.metrics.jobs.labels("dead-lettered").inc()
            return True
        files = len(req.image_urls) + len(req.images)
        await self.emit(req, EventKind.started, message=f"Training `{req.adapter}`: fetching {files} files")
        self.metrics.running.set(1)
        try:
            screening.check_captions(self.prompt_policy, req.caption)  # before anything is fetched
            examples = await ingest(req, self.settings.ingest, self.blobs)
            screening.check_captions(self.prompt_policy, None, examples)
            log.info("ingested %d images", len(examples), extra=ctx)
            running.beats += 1
            meta = await asyncio.get_running_loop().run_in_executor(
                self._gpu, self._train_and_publish, req, examples, workdir, self._progress_fn(running)
            )
        except Exception as exc:  # noqa: BLE001 - every outcome is answered; only a shutdown or a move is not
            await running.settle()
            if getattr(exc, "reason", None) == LEASE_LOST and not running.moved:
                return None
            return await self._failed(record, req, exc, workdir, running.job)
        await running.settle()
        shutil.rmtree(workdir, ignore_errors=True)
        log.info("published %s", meta.key, extra=ctx)
        if running.moved:  # published as the partition moved: its new owner finds this version and answers
            return False
        await self.succeeded(req, meta)
        self.metrics.jobs.labels("succeeded").inc()
        return True

    async def _failed(self, record: ConsumerRecord, req: FineTuneRequest, exc: Exception, workdir: Path,
                      work: Job | None) -> bool:
        from trainer.lora import Stopped

        ctx = job(req.request_id, adapter=req.adapter)
        if work is not None and work.abandoned:  # revoked (or any end of a job that moved): its new owner answers
            log.info("the partition moved (%s): the checkpoint stays for its new owner", exc, extra=ctx)
            return False
        if isinstance(exc, Stopped) and exc.reason == SHUTDOWN:
            log.info("stopped at step %d for shutdown; the checkpoint stays for the next owner", exc.step, extra=ctx)
            await self.emit(req, EventKind.progress, step=exc.step, total_steps=req.steps,
                            message=f"Training `{req.adapter}` paused at step {exc.step}: the trainer is restarting")
            return False
        shutil.rmtree(workdir, ignore_errors=True)
        if isinstance(exc, Stopped):
            outcome, message = "cancelled", f"Training of `{req.adapter}` was {exc.reason} at step {exc.step}/{req.steps}."
        elif isinstance(exc, (TrainerError, IngestError, RegistryError)):  # refused input or a run that cannot work: the message says why
            outcome, message = "refused", f"Training of `{req.adapter}` failed: {exc}"
        else:
            log.exception("training failed", extra=ctx)
            await self.service.dead_letter(record, exc)
            outcome, message = "failed", f"Training of `{req.adapter}` failed unexpectedly; the team has been notified."
        self.metrics.jobs.labels(outcome).inc()
        log.info("%s", message, extra=ctx)
        await self.emit(req, EventKind.failed, message=message)
        return True

    def _progress_fn(self, running: Running) -> Callable[[int, int, float], None]:
        loop, req = asyncio.get_running_loop(), running.req
        first: list[tuple[float, int]] = []  # (time, step) of the first step this process ran: a resumed
        last_sent = [0.0]                    # run's speed is measured from where it resumed

        def progress(step: int, total: int, loss: float) -> None:
            self.metrics.steps.inc()
            now = time.monotonic()
            if not first:
                first.append((now, step))
            if step < total and now - last_sent[0] >= self.settings.progress_interval_s and not running.moved:
                last_sent[0] = now
                t0, s0 = first[0]
                eta = (now - t0) / (step - s0) * (total - step) if step > s0 else None
                running.send(loop, lambda: self.emit(req, EventKind.progress, order=running.job, step=step,
                                                     total_steps=total, loss=loss, eta_s=eta))

        return progress

    def _should_stop(self) -> str | None:
        running = self._running
        return running.should_stop() if running is not None else None

    # -- the GPU thread -----------------------------------------------------------------------------------
    def _train_and_publish(self, req: FineTuneRequest, examples: list[Example], workdir: Path,
                           progress: Callable[[int, int, float], None]) -> AdapterMeta:
        import torch

        from skillgen.inference.engine import Engine
        from skillgen.inference.torch_backend import TorchBackend
        from trainer.lora import (
            Stopped,
            fingerprint,
            load_components,
            pick_device,
            sample_grid,
            train_lora,
            weight_dtype,
        )

        s, recipe = self.settings, self.settings.lora
        device = pick_device(s.device)
        if self.image_policy is None:  # before training: a trainer that cannot check its grid fails in seconds
            from skillgen.safety import ImagePolicy, SafetySettings

            self.image_policy = ImagePolicy.from_settings(SafetySettings(), device.type)
        screening.check_images(self.image_policy, examples)  # one blocked training image: nothing is trained
        data_sha = dataset_sha256(examples)
        parts = load_components(s.model, device, weight_dtype(recipe, device))
        result = train_lora(
            parts, examples, recipe, req.steps, under(workdir, "checkpoint"),
            fingerprint(recipe, req.steps, data_sha, self._base_sha256), progress, self._should_stop,
        )
        del parts
        if device.type == "cuda":
            torch.cuda.empty_cache()
        workdir.mkdir(parents=True, exist_ok=True)
        weights = workdir / "adapter.safetensors"
        weights.write_bytes(result.weights)

        # Drawn from a fixed neutral prompt and the trigger word, never a sender's caption; the prompt is checked,
        # then every cell goes through the one image check before the grid exists. Anything blocked withholds the
        # grid (the adapter itself is still published: its weights are not an image).
        prompt = screening.sample_prompt(req.trigger)
        withheld = screening.prompt_refused(self.prompt_policy, prompt)
        if withheld is None:
            # A fresh engine per job: the sample adapter is dropped with it instead of piling up in a long-lived one.
            engine = Engine(TorchBackend(s.model, device=str(device), precision="fp16" if device.type == "cuda" else "fp32"))
            cells = sample_grid(engine, f"sample/{req.request_id}", weights, prompt,
                                list(range(s.sample_images)), result.resolution_px, s.sample_steps, s.sample_guidance)
            del engine
            withheld = screening.screen_cells(cells.cells, self.image_policy)
        grid = None
        if withheld is None:
            image = cells.compose()
            grid = self.blobs.put(png_bytes(image), "image/png", width=image.width, height=image.height)
        else:
            log.warning("sample grid withheld (%s: %s)", withheld.category, withheld.detail,
                        extra=job(req.request_id, adapter=req.adapter))
        record = TrainingRecord(
            request_id=req.request_id, trigger=req.trigger, recipe=recipe, steps=req.steps,
            trained_by=TrainedBy(platform=req.origin.platform, user_id=req.origin.user_id,
                                 channel_id=req.origin.channel_id),
            base_model=s.model, base_model_sha256=self._base_sha256, dataset_sha256=data_sha, images=len(examples),
            resolution_px=result.resolution_px, loss_curve=result.loss_curve, seconds=result.seconds,
            sample_grid=grid, sample_grid_withheld=withheld.reason if withheld else None,
        )
        if self._should_stop() == LEASE_LOST:  # another trainer holds the job now: it publishes, not this one
            raise Stopped(LEASE_LOST, req.steps)
        return self.registry.publish(req.origin.team_id, req.adapter, result.weights, record)

    # -- events -------------------------------------------------------------------------------------------
    async def succeeded(self, req: FineTuneRequest, meta: AdapterMeta) -> None:
        grid = meta.training.sample_grid
        version = f"{meta.name}@v{meta.version}"
        if grid is not None:
            ready = f"Adapter `{version}` is ready (top row: base model, bottom row: with the adapter)."
        else:
            ready = (f"Adapter `{version}` is ready. Its sample grid was withheld by the safety checks: "
                     f"{meta.training.sample_grid_withheld}")
        await self.emit(
            req, EventKind.succeeded, adapter=version, blobs=[grid] if grid else [],
            message=f"{ready} Use it with `/skill <prompt with {meta.training.trigger}> --adapter {meta.name}`.",
        )

    async def emit(self, req: FineTuneRequest, kind: EventKind, order: Job | None = None, **fields) -> None:
        """Produce one event (acknowledged); with `order`, in order with that job's other events."""
        fields.setdefault("adapter", req.adapter)
        event = JobEvent(request_id=req.request_id, kind=kind, origin=req.origin, job="finetune", **fields)
        value, headers = encode(event)
        await self.service.emit(self.topics.events, value, key=req.request_id.encode(), headers=headers, job=order)


async def serve(settings: TrainerSettings, ready: Callable[[], None] | None = None) -> TrainerWorker:
    """Run until SIGTERM/SIGINT (or `worker.stop()`)."""
    worker = TrainerWorker(settings)
    stop_on_signals(worker.stop)
    await worker.run(ready)
    return worker


def add_arguments(parser) -> None:
    parser.add_argument("--model", help="base model directory (default: SKILL_MODEL or the embedded model)")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], help="training device (default: SKILL_DEVICE or auto)")


def run(args) -> int:
    overrides = {k: v for k, v in (("model", args.model), ("device", args.device)) if v}
    asyncio.run(serve(TrainerSettings(**overrides)))
    return 0
