"""`skillgen replay`: select old requests and do them again.

Selection: a time range (offsets_for_times), explicit partition offsets, or request ids, from `skill.generate` or its
DLQ. Modes:
  --dry-run     (default) list what would be replayed, with counts per partition;
  --reprocess   generate again here, bypassing the cache (e.g. after a model upgrade); images go to --sink DIR,
                or to --channel PLATFORM:TEAM:CHANNEL, and back to the original channels only with --deliver; the
                images pass the consumer's post-processing step, so a partly blocked request is withheld whole;
  --republish   copy the records to the request topic with a `replay-of` header so the fleet does the work.
Replay reads with no consumer group, so it never commits into (or moves) the live group. Republished records keep
their request id: the consumers' cache and the delivery markers (per request id and event kind) make a second
replay post nothing twice; with Redis configured, a marker per request id also skips the redundant work.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import uuid
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from aiokafka import AIOKafkaConsumer, TopicPartition
from tqdm import tqdm

from consumer.settings import ConsumerSettings
from schemas.codec import CodecError, decode, encode, header
from schemas.messages import EventKind, GenerateRequest, JobEvent, Origin, Platform
from skillgen.runtime.kafka import make_consumer, make_producer, partitions_of
from skillgen.runtime.paths import under
from skillgen.runtime.redis import Store
from skillgen.safety import Decision, ImagePolicy, PromptPolicy, SafetySettings
from skillgen.safety.decision import CHECK_FAILED
from skillgen.safety.postprocess import ImageChecker, release

log = logging.getLogger("skillgen.replay")
# Whom a --channel post names: no person (an id of the right shape that no account has).
NOBODY = {"discord": "0", "slack": "USLACKBOT", "console": "replay"}
REPLAY_MARKER_TTL_S = 7 * 86400  # a republished request is not republished again for a week (--force does)


class ReplayError(ValueError):
    pass


@dataclass(frozen=True)
class Selection:
    source: str = "generate"  # or "dlq"
    since: datetime | None = None
    until: datetime | None = None
    partition: int | None = None
    start_offset: int | None = None
    end_offset: int | None = None  # exclusive
    request_ids: frozenset[str] = frozenset()


@dataclass
class Picked:
    partition: int
    offset: int
    timestamp_ms: int
    value: bytes
    key: bytes | None
    headers: list
    request: GenerateRequest | None = None
    error: str | None = None


@dataclass
class Summary:
    selected: int = 0
    per_partition: Counter = field(default_factory=Counter)
    outcomes: Counter = field(default_factory=Counter)


def _ms(dt: datetime) -> int:
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    return int(dt.timestamp() * 1000)


async def _offsets_at(consumer: AIOKafkaConsumer, tps: list[TopicPartition], when: datetime, end: dict) -> dict:
    """The first offset at or after `when` per partition; the end offset where no record is that recent.
    (Kafka answers None there; some compatible brokers answer a timestamp of -1.)"""
    found = await consumer.offsets_for_times({tp: _ms(when) for tp in tps})
    return {tp: (found[tp].offset if found[tp] is not None and found[tp].timestamp >= 0 else end[tp]) for tp in tps}


async def select(settings: ConsumerSettings, sel: Selection) -> list[Picked]:
    topic = settings.topics.generate if sel.source == "generate" else settings.topics.dlq(settings.topics.generate)
    consumer = make_consumer(settings, group=None)
    await consumer.start()
    try:
        parts = await partitions_of(settings, topic)
        if not parts:
            raise ReplayError(f"topic {topic} does not exist or has no partitions")
        if sel.partition is not None:
            if sel.partition not in parts:
                raise ReplayError(f"partition {sel.partition} does not exist in {topic} (it has {len(parts)})")
            parts = [sel.partition]
        tps = [TopicPartition(topic, p) for p in parts]
        consumer.assign(tps)
        begin = await consumer.beginning_offsets(tps)
        end = await consumer.end_offsets(tps)
        start = dict(begin)
        stop = dict(end)
        if sel.since is not None:
            start = await _offsets_at(consumer, tps, sel.since, end)
        if sel.until is not None:
            stop = await _offsets_at(consumer, tps, sel.until, end)
        if sel.start_offset is not None:
            start = {tp: max(begin[tp], sel.start_offset) for tp in tps}
        if sel.end_offset is not None:
            stop = {tp: min(end[tp], sel.end_offset) for tp in tps}
        picked: list[Picked] = []
        for tp in tps:
            if start[tp] >= stop[tp]:
                continue
            consumer.seek(tp, start[tp])
            done = False
            while not done:
                batch = await consumer.getmany(tp, timeout_ms=1000, max_records=500)
                records = batch.get(tp, [])
                if not records:
                    break
                for r in records:
                    if r.offset >= stop[tp]:
                        done = True
                        break
                    p = Picked(tp.partition, r.offset, r.timestamp, r.value, r.key, list(r.headers or []))
                    try:
                        p.request = decode(r.value, GenerateRequest, p.headers)
                    except CodecError as exc:
                        p.error = str(exc)
                    rid = p.request.request_id if p.request else header(p.headers, "request-id")
                    if sel.request_ids and rid not in sel.request_ids:
                        continue
                    picked.append(p)
                    if r.offset + 1 >= stop[tp]:
                        done = True
                        break
        return picked
    finally:
        await consumer.stop()


async def republish(settings: ConsumerSettings, picked: list[Picked], replay_id: str, force: bool = False) -> Counter:
    outcomes: Counter = Counter()
    # Without Redis the marker lives in this run's memory: a second run may republish again, and the delivery
    # markers downstream still keep anyone from seeing a result twice.
    markers = Store.from_settings(settings)
    producer = make_producer(settings)
    await producer.start()
    try:
        for p in tqdm(picked, desc="republish", unit="req", disable=None):
            if p.request is None:
                outcomes["undecodable (left in place)"] += 1
                continue
            if not force and not await markers.add(f"replay:{p.request.request_id}", replay_id, REPLAY_MARKER_TTL_S):
                outcomes["already replayed"] += 1
                continue
            value, headers = encode(
                p.request,
                [("replay-of", f"{p.partition}:{p.offset}".encode()), ("replay-id", replay_id.encode())],
            )
            await producer.send_and_wait(settings.topics.generate, value, key=p.key, headers=headers)
            outcomes["republished"] += 1
    finally:
        await producer.stop()
        await markers.close()
    return outcomes


def parse_channel(text: str) -> Origin:
    parts = text.split(":")
    if len(parts) < 3 or parts[0] not in {p.value for p in Platform}:
        raise ReplayError("--channel must look like slack:T0123:C0456 or discord:GUILD:CHANNEL[:THREAD]")
    try:
        return Origin(
            platform=Platform(parts[0]), team_id=parts[1], channel_id=parts[2], user_id=NOBODY[parts[0]],
            thread_id=parts[3] if len(parts) > 3 else None,
        )
    except ValueError as exc:
        raise ReplayError(f"--channel {text!r}: {exc}") from None


async def reprocess(
    settings: ConsumerSettings, picked: list[Picked], engine, sink: Path | None, channel: Origin | None, deliver: bool,
    image_policy: ImageChecker | None = None,
) -> Counter:
    """Generate again with no cache. The prompt policy applies as in the consumer, and the images go through the
    consumer's own post-processing step (`release`): one blocked image withholds the whole request, so nothing
    of it is stored, written to the sink or posted. `image_policy` defaults to the one the consumer builds."""
    from consumer.keys import image_seeds
    from skillgen.inference.engine import BatchSpec, Sample
    from skillgen.runtime.blobstore import BlobStore

    prompt_policy = PromptPolicy.from_settings()
    if image_policy is None:
        device = "cuda" if settings.device == "cuda" else "cpu"
        image_policy = await asyncio.to_thread(ImagePolicy.from_settings, SafetySettings(), device)
    blobs = BlobStore(settings.blob_url)
    outcomes: Counter = Counter()
    producer = None
    if channel is not None or deliver:
        producer = make_producer(settings)
        await producer.start()
    try:
        for p in tqdm(picked, desc="reprocess", unit="req", disable=None):
            req = p.request
            if req is None:
                outcomes["undecodable (skipped)"] += 1
                continue
            origin = channel or req.origin
            verdict = prompt_policy.check(req.prompt, req.negative_prompt)
            if not verdict.allowed:
                outcomes["blocked"] += 1
                await _emit(producer, settings, req, origin, EventKind.blocked, message=verdict.reason)
                continue
            if req.adapter is not None:
                outcomes["skipped (adapter)"] += 1  # adapters resolve per team in the consumer; republish those
                continue
            spec = BatchSpec(req.width, req.height, req.steps, req.guidance, req.scheduler)
            seeds = image_seeds(req)
            images = await asyncio.to_thread(engine.generate, spec, [Sample(req.prompt, req.negative_prompt, s) for s in seeds])
            released = await asyncio.to_thread(release, images, seeds, image_policy, blobs)
            if isinstance(released, Decision):
                log.warning("replayed request %s withheld (%s: %s)", req.request_id, released.category, released.detail)
                if released.category == CHECK_FAILED:  # nothing vouched for the images: not a verdict, try again
                    outcomes["failed (safety check)"] += 1
                    await _emit(producer, settings, req, origin, EventKind.failed, message=released.reason)
                else:
                    outcomes["blocked"] += 1
                    await _emit(producer, settings, req, origin, EventKind.blocked, message=released.reason)
                continue
            if sink is not None:
                sink.mkdir(parents=True, exist_ok=True)
                for i, ref in enumerate(released):
                    under(sink, f"{req.request_id}-{i}.png").write_bytes(blobs.get(ref))
            await _emit(producer, settings, req, origin, EventKind.succeeded, blobs=released)
            outcomes["reprocessed"] += 1
    finally:
        if producer is not None:
            await producer.stop()
    return outcomes


async def _emit(producer, settings, req: GenerateRequest, origin: Origin, kind: EventKind, **fields) -> None:
    if producer is None:
        return
    if origin.seal is None and settings.signing_key is not None:
        # --channel: the operator chose this channel, so replay seals it as the bots seal what they accept.
        origin = origin.sealed(req.request_id, settings.signing_key.get_secret_value().encode())
    event = JobEvent(request_id=req.request_id, kind=kind, origin=origin, prompt=req.prompt, **fields)
    value, headers = encode(event, [("replay", b"1")])
    await producer.send_and_wait(settings.topics.events, value, key=req.request_id.encode(), headers=headers)


def print_table(title: str, rows: list[tuple[str, int]]) -> None:
    width = max([len(r[0]) for r in rows] + [len(title)])
    print(f"\n{title}")
    print("-" * (width + 10))
    for name, n in rows:
        print(f"{name:<{width}}  {n:>8}")


def _when(text: str) -> datetime:
    try:
        dt = datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an ISO time: {text!r} (e.g. 2026-11-29T14:00 or 2026-11-29T14:00+01:00)")
    return dt if dt.tzinfo else dt.replace(tzinfo=UTC)


def add_arguments(parser) -> None:
    parser.add_argument("--source", choices=["generate", "dlq"], default="generate", help="skill.generate (default) or its DLQ")
    parser.add_argument("--since", type=_when, help="start time, ISO 8601 (UTC unless an offset is given)")
    parser.add_argument("--until", type=_when, help="end time (exclusive), ISO 8601")
    parser.add_argument("--partition", type=int, help="only this partition")
    parser.add_argument("--start-offset", type=int, help="first offset (inclusive), with --partition")
    parser.add_argument("--end-offset", type=int, help="last offset (exclusive), with --partition")
    parser.add_argument("--request-id", action="append", default=[], help="only these request ids (repeatable)")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--dry-run", action="store_const", dest="mode", const="dry-run", help="list only (default)")
    mode.add_argument("--reprocess", action="store_const", dest="mode", const="reprocess", help="generate again here, no cache")
    mode.add_argument("--republish", action="store_const", dest="mode", const="republish", help="copy to the request topic")
    parser.add_argument("--sink", type=Path, help="with --reprocess: write PNGs here")
    parser.add_argument("--channel", help="with --reprocess: post to this channel instead, e.g. slack:T01:C02")
    parser.add_argument("--deliver", action="store_true", help="with --reprocess: post back to the original channels")
    parser.add_argument("--force", action="store_true", help="with --republish: replay even what was replayed before")
    parser.set_defaults(mode="dry-run")


def run(args) -> int:
    if (args.start_offset is not None or args.end_offset is not None) and args.partition is None:
        raise ReplayError("--start-offset/--end-offset need --partition")
    if args.mode != "reprocess" and (args.sink or args.channel or args.deliver):
        raise ReplayError("--sink, --channel and --deliver go with --reprocess")
    if args.mode == "reprocess" and not (args.sink or args.channel or args.deliver):
        raise ReplayError("--reprocess needs somewhere to put results: --sink DIR, --channel, or --deliver")
    sel = Selection(
        args.source, args.since, args.until, args.partition, args.start_offset, args.end_offset, frozenset(args.request_id)
    )
    return asyncio.run(main(ConsumerSettings(), sel, args))


async def main(settings: ConsumerSettings, sel: Selection, args) -> int:
    picked = await select(settings, sel)
    summary = Summary(selected=len(picked))
    for p in picked:
        summary.per_partition[p.partition] += 1
    if args.mode == "dry-run":
        for p in picked:
            what = repr(p.request.prompt[:60]) if p.request else f"undecodable: {p.error}"
            rid = p.request.request_id if p.request else "-"
            ts = datetime.fromtimestamp(p.timestamp_ms / 1000, UTC).isoformat(timespec="seconds")
            print(f"{p.partition}:{p.offset}\t{ts}\t{rid}\t{what}")
        summary.outcomes["would replay"] = sum(p.request is not None for p in picked)
        summary.outcomes["undecodable"] = sum(p.request is None for p in picked)
    elif args.mode == "republish":
        summary.outcomes = await republish(settings, picked, uuid.uuid4().hex[:12], args.force)
    else:
        from consumer.worker import load_engine_from

        engine = await asyncio.to_thread(load_engine_from, settings)
        channel = parse_channel(args.channel) if args.channel else None
        summary.outcomes = await reprocess(settings, picked, engine, args.sink, channel, args.deliver)
    print_table(f"selected {summary.selected} record(s)", [(f"partition {k}", v) for k, v in sorted(summary.per_partition.items())])
    print_table(args.mode, sorted(summary.outcomes.items()))
    return 0
