"""What `skillgen replay` does with what it selected (consumer/replay.py): republish or reprocess it, and the report.

Re-runs are new work: each gets a fresh request id (so the cache, the consumers' markers and delivery's one post per
request treat it as new) with the request it re-runs in `replay_of` (in the request, its events and the `replay-of`
header). An origin's seal is bound to the request id, so replay re-seals it for the fresh id with SKILL_SIGNING_KEY,
dropping the original's status message (a re-run posts a new message, in the original thread if there was one).

A marker per ORIGINAL request id (`replay:{id}`, with Redis) keeps a second replay of the same selection, or a replay
of a replay, from doing the work again (`--force` does): it names the attempt last sent out. A DLQ record whose
`replay-attempt` is that attempt is the copy coming back failed, and is sent once more, up to `--max-attempts`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from tqdm import tqdm

from consumer.settings import ConsumerSettings
from schemas.codec import encode, header
from schemas.messages import (
    REQUEST_ID_PATTERN,
    EventKind,
    GenerateRequest,
    JobEvent,
    Origin,
    new_request_id,
)
from skillgen.runtime.kafka import make_producer
from skillgen.runtime.paths import under
from skillgen.runtime.redis import Store
from skillgen.safety import Decision, ImagePolicy, PromptPolicy, SafetySettings
from skillgen.safety.decision import CHECK_FAILED
from skillgen.safety.postprocess import ImageChecker, release

log = logging.getLogger("skillgen.replay")
REPLAY_MARKER_TTL_S = 7 * 86400  # an original request is not re-run again for a week (--force does)
MAX_ATTEMPTS = 3  # a record republished this often and dead-lettered again stays in the DLQ
ATTEMPT = "replay-attempt"
# Outcomes of one record, and the report's counts.
WOULD, UNDECODABLE, PUBLISHED = "would replay", "undecodable", "published"
DONE_ALREADY, AT_LIMIT, ADAPTER = "skipped: already done", "skipped: attempt limit", "skipped: adapter"
SUCCEEDED, BLOCKED, FAILED = "succeeded", "blocked", "failed"
COUNTS = ("selected", "reprocessed", "succeeded", "blocked", "failed", "skipped_already_done",
          "skipped_attempt_limit", "skipped_other", "posted", "published", "would_replay", "undecodable")
KEYS = {WOULD: "would_replay", UNDECODABLE: "undecodable", PUBLISHED: "published", DONE_ALREADY: "skipped_already_done",
        AT_LIMIT: "skipped_attempt_limit", SUCCEEDED: "succeeded", BLOCKED: "blocked", FAILED: "failed", ADAPTER: None}
LABELS = {"skipped_already_done": "skipped as already done", "skipped_attempt_limit": "skipped at the attempt limit",
          "skipped_other": "skipped (undecodable, adapter)", "posted": "posted (handed to delivery)",
          "would_replay": "would replay"}


@dataclass
class Picked:
    partition: int
    offset: int
    timestamp_ms: int
    value: bytes
    key: bytes | None
    headers: list
    request: GenerateRequest | None = None
    error: str | None = None  # why it could not be decoded

    @property
    def dlq_error(self) -> str | None:
        """The error the DLQ recorded for it (the `error` header)."""
        return header(self.headers, "error")

    @property
    def attempt(self) -> int:
        """Times it was republished already (its `replay-attempt` header); a header that is not a count counts as
        the limit, so it is never sent round again."""
        raw = header(self.headers, ATTEMPT)
        if raw is None:
            return 0
        return int(raw) if raw.strip().isdigit() and len(raw) < 7 else 1_000_000

    @property
    def original(self) -> str:
        """The request id this record re-runs, or its own: a replay of a replay points at the first request."""
        assert self.request is not None
        named = header(self.headers, "replay-of")
        if self.request.replay_of:
            return self.request.replay_of
        return named if named and re.fullmatch(REQUEST_ID_PATTERN, named) else self.request.request_id


@dataclass
class Report:
    replay_id: str
    mode: str
    source: str
    reason: str | None = None
    started_at: str = field(default_factory=lambda: datetime.now(UTC).isoformat(timespec="seconds"))
    finished_at: str | None = None
    counts: Counter = field(default_factory=Counter)
    per_partition: Counter = field(default_factory=Counter)
    records: list[dict] = field(default_factory=list)

    def select(self, picked: list[Picked]) -> None:
        self.counts["selected"] = len(picked)
        for p in picked:
            self.per_partition[p.partition] += 1

    def note(self, p: Picked, outcome: str, **extra) -> None:
        row = {"partition": p.partition, "offset": p.offset,
               "request_id": p.request.request_id if p.request else header(p.headers, "request-id"),
               "outcome": outcome, **{k: v for k, v in extra.items() if v is not None}}
        if p.dlq_error:
            row["error"] = p.dlq_error
        self.records.append(row)
        if KEYS[outcome]:
            self.counts[KEYS[outcome]] += 1
        if outcome in (SUCCEEDED, BLOCKED, FAILED):
            self.counts["reprocessed"] += 1
        if outcome == ADAPTER or (outcome == UNDECODABLE and self.mode != "dry-run"):
            self.counts["skipped_other"] += 1
        if extra.get("posted"):
            self.counts["posted"] += 1

    def as_dict(self) -> dict:
        return {"replay_id": self.replay_id, "mode": self.mode, "source": self.source, "reason": self.reason,
                "started_at": self.started_at, "finished_at": self.finished_at,
                "counts": {k: self.counts[k] for k in COUNTS},
                "per_partition": {str(k): v for k, v in sorted(self.per_partition.items())}, "records": self.records}

    def write(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.as_dict(), indent=2) + "\n")

    def table(self) -> str:
        rows = [(f"partition {k}", v) for k, v in sorted(self.per_partition.items())]
        shown = [k for k in COUNTS if k not in ("would_replay", "undecodable")] if self.mode != "dry-run" \
            else ["selected", "would_replay", "undecodable"]
        rows += [("", None)] + [(LABELS.get(k, k), self.counts[k]) for k in shown]
        width = max(len(r[0]) for r in rows)
        head = f"replay {self.replay_id}: {self.mode} from {self.source}"
        lines = [head, "-" * max(len(head), width + 10)]
        lines += [f"{name:<{width}}  {n:>8}" if n is not None else "" for name, n in rows]
        return "\n".join(lines)


class Bucket:
    """A token bucket: `take` waits so that at most `rate_per_s` pass a second (one at a time, no burst)."""

    def __init__(self, rate_per_s: float):
        self.rate = rate_per_s
        self.tokens = 1.0
        self.at = time.monotonic()

    async def take(self) -> None:
        while True:
            now = time.monotonic()
            self.tokens = min(1.0, self.tokens + (now - self.at) * self.rate)
            self.at = now
            if self.tokens >= 1.0:
                self.tokens -= 1.0
                return
            await asyncio.sleep((1.0 - self.tokens) / self.rate)


def reseal(origin: Origin, request_id: str, key: bytes) -> Origin:
    """The origin for a re-run under `request_id`: sealed for it, accepted now, without the original's status
    message (whose result stays as it was)."""
    fresh = origin.model_copy(update={"status_message_id": None, "seal": None, "created_at": datetime.now(UTC)})
    return fresh.sealed(request_id, key)


async def _may_run(markers: Store, p: Picked, from_dlq: bool, replay_id: str, force: bool) -> bool:
    """Take the original request's marker for this attempt; False when it was re-run already."""
    name, value = f"replay:{p.original}", f"{p.attempt + 1}:{replay_id}"
    if force or await markers.add(name, value, REPLAY_MARKER_TTL_S):
        if force:
            await markers.put(name, value, REPLAY_MARKER_TTL_S)
        return True
    sent = (await markers.get(name) or "").partition(":")[0]
    last = int(sent) if sent.isdigit() else 1  # (a marker of the first version names no attempt)
    if from_dlq and p.attempt >= last:  # the copy sent last came back to the DLQ: once more
        await markers.put(name, value, REPLAY_MARKER_TTL_S)
        return True
    return False


async def republish(settings: ConsumerSettings, picked: list[Picked], report: Report, *, force: bool = False,
                    rate_per_s: float | None = None, max_attempts: int = MAX_ATTEMPTS) -> None:
    key = settings.signing_key.get_secret_value().encode()
    from_dlq = report.source == "dlq"
    # Without Redis the marker lives in this run's memory: a second run may republish again, and the delivery
    # markers downstream still keep anyone from seeing a result twice.
    markers = Store.from_settings(settings)
    bucket = Bucket(rate_per_s) if rate_per_s else None
    producer = make_producer(settings)
    await producer.start()
    try:
        for p in tqdm(picked, desc="republish", unit="req", disable=None):
            if p.request is None:
                report.note(p, UNDECODABLE)
                continue
            if p.attempt >= max_attempts:
                report.note(p, AT_LIMIT, attempt=p.attempt)
                continue
            if not await _may_run(markers, p, from_dlq, report.replay_id, force):
                report.note(p, DONE_ALREADY)
                continue
            fresh = new_request_id()
            # In the replay lane (consumer/batcher.py: never ahead of live work beyond its share), made now, so
            # its deadline counts from the republish and not from the original request.
            req = p.request.model_copy(update={"request_id": fresh, "replay_of": p.original,
                                               "origin": reseal(p.request.origin, fresh, key), "lane": "replay",
                                               "deadline_s": None, "created_at": datetime.now(UTC)})
            value, headers = encode(req, [
                ("replay-of", p.original.encode()), ("replay-id", report.replay_id.encode()),
                (ATTEMPT, str(p.attempt + 1).encode()),
                ("replay-source", f"{report.source}:{p.partition}:{p.offset}".encode()),
            ])
            if bucket is not None:
                await bucket.take()
            await producer.send_and_wait(settings.topics.generate, value, key=p.key, headers=headers)
            report.note(p, PUBLISHED, new_request_id=fresh, attempt=p.attempt + 1)
    finally:
        await producer.stop()
        await markers.close()


async def reprocess(
    settings: ConsumerSettings, picked: list[Picked], engine, sink: Path | None, channel: Origin | None, deliver: bool,
    image_policy: ImageChecker | None = None, *, report: Report, force: bool = False,
) -> Report:
    """Generate again with no cache. The prompt policy applies as in the consumer, and the images go through the
    consumer's own post-processing step (`release`): one blocked image withholds the whole request, so nothing
    of it is stored, written to the sink or posted. `image_policy` defaults to the one the consumer builds.
    Results posted (--channel, --deliver) go out under a fresh request id; with --deliver an original request is
    re-run once (its marker), unless `force`."""
    from consumer.init_image import InitImageError, read_init_image
    from consumer.keys import image_seeds
    from skillgen.inference.engine import BatchSpec, Sample
    from skillgen.runtime.blobstore import BlobStore

    prompt_policy = PromptPolicy.from_settings()
    if image_policy is None:
        device = "cuda" if settings.device == "cuda" else "cpu"
        image_policy = await asyncio.to_thread(ImagePolicy.from_settings, SafetySettings(), device)
    blobs = BlobStore(settings.blob_url)
    producer = markers = None
    if channel is not None or deliver:
        producer = make_producer(settings)
        await producer.start()
    if deliver:
        markers = Store.from_settings(settings)
    try:
        for p in tqdm(picked, desc="reprocess", unit="req", disable=None):
            req = p.request
            if req is None:
                report.note(p, UNDECODABLE)
                continue
            if req.adapter is not None or req.turbo:
                report.note(p, ADAPTER)  # adapters (turbo's fast LoRA too) resolve in the consumer; republish those
                continue
            if markers is not None and not await _may_run(markers, p, report.source == "dlq", report.replay_id,
                                                          force):
                report.note(p, DONE_ALREADY)
                continue
            out = _Out(producer, settings, p, channel or req.origin, report.reason, post_blocked=channel is None)
            verdict = prompt_policy.check(req.prompt, req.negative_prompt)
            if not verdict.allowed:
                report.note(p, BLOCKED, posted=await out.emit(EventKind.blocked, message=verdict.reason), **out.ids)
                continue
            init = None
            if req.init_image is not None:  # img2img: the same init image, read and checked as the consumer does
                try:
                    init = await asyncio.to_thread(read_init_image, blobs, req)
                except InitImageError as exc:
                    posted = await out.emit(EventKind.failed, message=str(exc))
                    report.note(p, FAILED, posted=posted, detail="init image", **out.ids)
                    continue
            spec = BatchSpec(req.width, req.height, req.steps, req.guidance, req.scheduler,
                             strength=req.strength if init is not None else None)
            seeds = image_seeds(req)
            samples = [Sample(req.prompt, req.negative_prompt, s, init) for s in seeds]
            images = await asyncio.to_thread(engine.generate, spec, samples)
            released = await asyncio.to_thread(release, images, seeds, image_policy, blobs)
            if isinstance(released, Decision):
                log.warning("replayed request %s withheld (%s: %s)", req.request_id, released.category, released.detail)
                if released.category == CHECK_FAILED:  # nothing vouched for the images: not a verdict, try again
                    posted = await out.emit(EventKind.failed, message=released.reason)
                    report.note(p, FAILED, posted=posted, detail="safety check failed", **out.ids)
                else:
                    posted = await out.emit(EventKind.blocked, message=released.reason)
                    report.note(p, BLOCKED, posted=posted, **out.ids)
                continue
            if sink is not None:
                sink.mkdir(parents=True, exist_ok=True)
                for i, ref in enumerate(released):
                    under(sink, f"{req.request_id}-{i}.png").write_bytes(blobs.get(ref))
            report.note(p, SUCCEEDED, posted=await out.emit(EventKind.succeeded, blobs=released), **out.ids)
    finally:
        if producer is not None:
            await producer.stop()
        if markers is not None:
            await markers.close()
    return report


class _Out:
    """Where one reprocessed request's result goes: under a fresh request id, its origin sealed for that id."""

    def __init__(self, producer, settings: ConsumerSettings, p: Picked, origin: Origin, reason: str | None,
                 post_blocked: bool):
        self.producer, self.settings, self.p, self.origin, self.reason = producer, settings, p, origin, reason
        self.post_blocked = post_blocked  # --channel: a refusal is told to the requester only, and there is none
        self.request_id = new_request_id() if producer is not None else None

    @property
    def ids(self) -> dict:
        return {"new_request_id": self.request_id}

    async def emit(self, kind: EventKind, **fields) -> bool:
        if self.producer is None or (kind == EventKind.blocked and not self.post_blocked):
            return False
        req = self.p.request
        key = self.settings.signing_key.get_secret_value().encode()
        event = JobEvent(request_id=self.request_id, kind=kind, origin=reseal(self.origin, self.request_id, key),
                         prompt=req.prompt, replay_of=self.p.original, replay_reason=self.reason, **fields)
        value, headers = encode(event, [("replay", b"1"), ("replay-of", self.p.original.encode())])
        await self.producer.send_and_wait(self.settings.topics.events, value, key=self.request_id.encode(),
                                          headers=headers)
        return True
