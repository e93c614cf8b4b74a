"""`skillgen replay`: select old requests and do them again.

Selection: a time range (offsets_for_times), explicit partition offsets, or request ids, from `skill.generate` or its
DLQ. Modes:
  --dry-run     (default) list what would be replayed, with counts per partition (and, from the DLQ, each record's
                error and how often it was republished);
  --reprocess   generate again here, bypassing the cache (e.g. after a model upgrade); images go to --sink DIR,
                or to --channel PLATFORM:TEAM:CHANNEL (posted as the operator, naming no one), and back to the
                original channels (a new message, in the original thread if there was one) only with --deliver; the
                images pass the consumer's post-processing step, so a partly blocked request is withheld whole;
  --republish   copy the records to the request topic so the fleet does the work (at most --rate N/s).
Whatever is posted or republished is new work under a fresh request id, linked to the original by `replay_of` and
the `replay-of` header, its origin re-sealed for that id with SKILL_SIGNING_KEY (consumer/replay_work.py); a marker
per original request id keeps a second replay from doing it again (--force does), and a record republished
--max-attempts times that is dead-lettered again stays in the DLQ. Replay reads with no consumer group, so it never
commits into (or moves) the live group. Every run ends with a report: a table, and JSON in --report PATH
(default ./out/replay-<replay id>.json), printed alone with --json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import re
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from aiokafka import AIOKafkaConsumer, TopicPartition

from consumer.replay_work import (
    MAX_ATTEMPTS,
    UNDECODABLE,
    WOULD,
    Picked,
    Report,
    reprocess,
    republish,
)
from consumer.settings import ConsumerSettings
from schemas.codec import CodecError, decode, header
from schemas.messages import GenerateRequest, Origin, Platform
from skillgen.runtime.kafka import make_consumer, partitions_of

log = logging.getLogger("skillgen.replay")
# Whom a --channel post names: no person (an id of the right shape that no account has).
NOBODY = {"discord": "0", "slack": "USLACKBOT", "console": "replay"}


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


def _when(text: str) -> datetime:
    try:
        dt = datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an ISO time: {text!r} (e.g. 2026-11-29T14:00 or 2026-11-29T14:00+01:00)")
    return dt if dt.tzinfo else dt.replace(tzinfo=UTC)


def _rate(text: str) -> float:
    m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*(?:/\s*(s|sec|m|min))?\s*", text)
    if not m or float(m.group(1)) <= 0:
        raise argparse.ArgumentTypeError(f"not a rate: {text!r} (e.g. 20/s or 300/min)")
    return float(m.group(1)) / (60 if (m.group(2) or "s").startswith("m") else 1)


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
    parser.add_argument("--reason", help="why this re-run: shown in what --deliver and --channel post")
    parser.add_argument("--force", action="store_true", help="re-run even what was re-run before")
    parser.add_argument("--rate", type=_rate, help="with --republish: at most this many records, e.g. 20/s")
    parser.add_argument("--max-attempts", type=int, default=MAX_ATTEMPTS,
                        help=f"with --republish: leave a record republished this often in the DLQ (default {MAX_ATTEMPTS})")
    parser.add_argument("--report", type=Path, help="write the JSON report here (default ./out/replay-<id>.json)")
    parser.add_argument("--json", action="store_true", help="print the JSON report only (for scripts)")
    parser.set_defaults(mode="dry-run")


def run(args) -> int:
    if (args.start_offset is not None or args.end_offset is not None) and args.partition is None:
        raise ReplayError("--start-offset/--end-offset need --partition")
    if args.mode != "reprocess" and (args.sink or args.channel or args.deliver):
        raise ReplayError("--sink, --channel and --deliver go with --reprocess")
    if args.mode == "reprocess" and not (args.sink or args.channel or args.deliver):
        raise ReplayError("--reprocess needs somewhere to put results: --sink DIR, --channel, or --deliver")
    if args.reason is not None and len(args.reason) > 300:
        raise ReplayError("--reason is at most 300 characters")
    sel = Selection(
        args.source, args.since, args.until, args.partition, args.start_offset, args.end_offset, frozenset(args.request_id)
    )
    return asyncio.run(main(ConsumerSettings(), sel, args))


def _line(p: Picked) -> str:
    what = repr(p.request.prompt[:60]) if p.request else f"undecodable: {p.error}"
    rid = p.request.request_id if p.request else "-"
    ts = datetime.fromtimestamp(p.timestamp_ms / 1000, UTC).isoformat(timespec="seconds")
    extra = [f"replay-of {p.original}" if p.request and p.original != rid else "",
             f"attempt {p.attempt}" if p.attempt else "", f"error: {p.dlq_error}" if p.dlq_error else ""]
    return "\t".join([f"{p.partition}:{p.offset}", ts, rid, what, *filter(None, extra)])


async def main(settings: ConsumerSettings, sel: Selection, args, *, engine=None, image_policy=None) -> int:
    """One replay; `engine` and `image_policy` default to the consumer's (tests pass their own)."""
    opt = lambda name, default=None: getattr(args, name, default)
    if (args.mode == "republish" or opt("channel") or opt("deliver")) and settings.signing_key is None:
        raise ReplayError("--republish, --deliver and --channel send work out under a fresh request id whose origin "
                          "replay must seal: set SKILL_SIGNING_KEY, the key the bots and delivery use")
    report = Report(uuid.uuid4().hex[:12], args.mode, sel.source, opt("reason"))
    picked = await select(settings, sel)
    report.select(picked)
    if args.mode == "dry-run":
        for p in picked:
            report.note(p, WOULD if p.request else UNDECODABLE, attempt=p.attempt or None,
                        replay_of=p.original if p.request and p.original != p.request.request_id else None)
            if not opt("json"):
                print(_line(p))
    elif args.mode == "republish":
        await republish(settings, picked, report, force=opt("force", False), rate_per_s=opt("rate"),
                        max_attempts=opt("max_attempts", MAX_ATTEMPTS))
    else:
        if engine is None:
            from consumer.worker import load_engine_from

            engine = await asyncio.to_thread(load_engine_from, settings)
        channel = parse_channel(args.channel) if opt("channel") else None
        await reprocess(settings, picked, engine, opt("sink"), channel, opt("deliver", False), image_policy,
                        report=report, force=opt("force", False))
    report.finished_at = datetime.now(UTC).isoformat(timespec="seconds")
    path = opt("report") or Path("out") / f"replay-{report.replay_id}.json"
    report.write(path)
    if opt("json"):
        print(json.dumps(report.as_dict(), indent=2))
    else:
        print(f"\nselected {report.counts['selected']} record(s)\n{report.table()}\nreport: {path}")
    return 0
