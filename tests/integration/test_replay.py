"""Replay against the real broker: selection by time, offsets and ids; re-runs are new work under fresh request ids
(linked by `replay-of`), posted once through a real delivery; republish is idempotent, rate-capped and bounded on a
DLQ round trip; every run writes a report whose counts match what happened; nothing is ever committed into the live
consumer group."""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition
from PIL import Image

from consumer.replay import ReplayError, Selection, main, select
from consumer.replay_work import Report, reprocess
from consumer.settings import ConsumerSettings
from schemas.codec import decode, encode, header
from schemas.messages import EventKind, GenerateRequest, JobEvent, Origin
from schemas.topics import CONSUMER_GROUP
from skillgen.inference import load_engine
from skillgen.runtime.kafka import dead_letter, make_producer
from tests.fakes import discord as fd
from tests.fakes import slack as fs
from tests.fakes.checkers import NUDITY, UNCHECKED, BlockAt
from tests.fakes.world import event
from tests.harness import SIGNING_KEY

ORIGIN = Origin(platform="slack", team_id="T1", channel_id="C1", user_id="U1")
REPORTS = Path(tempfile.mkdtemp(prefix="replay-reports-"))


def args(mode: str, **kw) -> argparse.Namespace:
    base = {"mode": mode, "sink": None, "channel": None, "deliver": False, "force": False, "reason": None,
            "rate": None, "max_attempts": 3, "json": False, "report": REPORTS / f"{uuid.uuid4().hex}.json"}
    return argparse.Namespace(**{**base, **kw})


class FlatEngine:
    """Pictures without a model: one flat image per sample, of the batch's size."""

    def generate(self, spec, samples, progress=None, cancelled=None):
        return [Image.new("RGB", (spec.width, spec.height), (s.seed % 256, 90, 120)) for s in samples]


def sealed(origin: Origin, request_id: str) -> Origin:
    return origin.sealed(request_id, SIGNING_KEY.encode())


async def publish(settings, prompts: list[str], num_images: list[int] | None = None,
                  origin: Origin = ORIGIN) -> list[GenerateRequest]:
    producer = make_producer(settings)
    await producer.start()
    reqs = []
    try:
        for p, n in zip(prompts, num_images or [1] * len(prompts)):
            rid = uuid.uuid4().hex
            req = GenerateRequest(request_id=rid, origin=sealed(origin, rid), prompt=p, width=64, height=64, steps=2,
                                  num_images=n)
            value, headers = encode(req)
            await producer.send_and_wait(settings.topics.generate, value, key=req.request_id.encode(), headers=headers)
            reqs.append(req)
    finally:
        await producer.stop()
    return reqs


async def read_all(settings, topic: str) -> list:
    consumer = AIOKafkaConsumer(bootstrap_servers=settings.kafka_bootstrap, enable_auto_commit=False)
    await consumer.start()
    try:
        tps = [TopicPartition(topic, p) for p in range(4)]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        out = []
        while batch := await consumer.getmany(timeout_ms=500):
            for records in batch.values():
                out.extend(records)
        return out
    finally:
        await consumer.stop()


async def test_selection_by_time_offsets_and_ids(skill_env):
    settings = ConsumerSettings()
    early = await publish(settings, ["early one", "early two", "early three"])
    await asyncio.sleep(1.2)
    cut = datetime.now(UTC)
    await asyncio.sleep(0.2)
    late = await publish(settings, ["late one", "late two"])

    by_time = await select(settings, Selection(since=cut))
    assert sorted(p.request.request_id for p in by_time) == sorted(r.request_id for r in late)
    before = await select(settings, Selection(until=cut))
    assert sorted(p.request.request_id for p in before) == sorted(r.request_id for r in early)

    wanted = {early[1].request_id, late[0].request_id}
    assert {p.request.request_id for p in await select(settings, Selection(request_ids=frozenset(wanted)))} == wanted

    everything = await select(settings, Selection())
    part = everything[0].partition
    in_part = sorted(p.offset for p in everything if p.partition == part)
    window = await select(settings, Selection(partition=part, start_offset=in_part[0], end_offset=in_part[0] + 1))
    assert [(p.partition, p.offset) for p in window] == [(part, in_part[0])]


async def test_dry_run_lists_and_counts(skill_env, capsys):
    settings = ConsumerSettings()
    await publish(settings, ["a drummer's paradiddle", "a violinist's bow hold"])
    assert await main(settings, Selection(), args("dry-run")) == 0
    out = capsys.readouterr().out
    assert "a drummer's paradiddle" in out and "a violinist's bow hold" in out
    assert "would replay" in out and "selected 2 record(s)" in out


def report_of(capsys) -> dict:
    return json.loads(capsys.readouterr().out)


async def test_republish_twice_copies_once_under_fresh_ids_and_never_commits_the_live_group(skill_env, capsys):
    settings = ConsumerSettings()
    reqs = await publish(settings, ["one", "two", "three"])
    sel = Selection(request_ids=frozenset(r.request_id for r in reqs[:2]))
    first_path = REPORTS / "first.json"
    assert await main(settings, sel, args("republish", json=True, report=first_path)) == 0
    first = report_of(capsys)
    assert json.loads(first_path.read_text()) == first
    assert [first["counts"][k] for k in ("selected", "published", "skipped_already_done")] == [2, 2, 0]
    # Again, and then everything, the first run's copies included: a replay of a replay is the same re-run.
    assert await main(settings, sel, args("republish", json=True)) == 0
    again = report_of(capsys)
    assert await main(settings, Selection(), args("republish", json=True)) == 0
    everything = report_of(capsys)
    assert (again["counts"]["published"], again["counts"]["skipped_already_done"]) == (0, 2)
    assert (everything["counts"]["selected"], everything["counts"]["published"]) == (5, 1)  # "three" only
    assert everything["counts"]["skipped_already_done"] == 4

    records = await read_all(settings, settings.topics.generate)
    copies = [r for r in records if header(r.headers, "replay-of")]
    assert sorted(header(r.headers, "replay-of") for r in copies) == sorted(r.request_id for r in reqs)
    for r in copies:
        copy = decode(r.value, GenerateRequest, r.headers)
        assert copy.request_id not in {q.request_id for q in reqs} and copy.replay_of == header(r.headers, "replay-of")
        assert copy.origin.verify(copy.request_id, SIGNING_KEY.encode()) and header(r.headers, "replay-attempt") == "1"
    assert {row["new_request_id"] for row in first["records"]} <= {header(r.headers, "request-id") for r in copies}

    group = AIOKafkaConsumer(bootstrap_servers=settings.kafka_bootstrap, group_id=settings.topics.group(CONSUMER_GROUP))
    await group.start()
    try:
        for p in range(4):
            assert await group.committed(TopicPartition(settings.topics.generate, p)) is None
    finally:
        await group.stop()


async def test_sending_work_out_needs_the_signing_key(skill_env, monkeypatch):
    monkeypatch.delenv("SKILL_SIGNING_KEY")
    settings = ConsumerSettings()
    await publish(settings, ["one"])
    for kw in ({"mode": "republish"}, {"mode": "reprocess", "deliver": True}, {"mode": "reprocess", "channel": "slack:T1:C1"}):
        with pytest.raises(ReplayError, match="SKILL_SIGNING_KEY"):
            await main(settings, Selection(), args(**kw), engine=FlatEngine(), image_policy=BlockAt())
    assert [r for r in await read_all(settings, settings.topics.generate) if header(r.headers, "replay-of")] == []


async def test_rate_caps_what_a_republish_adds(skill_env, capsys):
    settings = ConsumerSettings()
    await publish(settings, [f"prompt {i}" for i in range(6)])
    began = time.monotonic()
    assert await main(settings, Selection(), args("republish", rate=5.0, json=True)) == 0
    took_s = time.monotonic() - began
    assert report_of(capsys)["counts"]["published"] == 6
    assert took_s >= 5 / 5.0 * 0.95  # six sends at 5/s: five gaps of 0.2 s


async def dead_letter_all(settings, records, error: str) -> None:
    """What a consumer does with a record it gives up on (skillgen.runtime.kafka.dead_letter)."""
    producer = make_producer(settings)
    await producer.start()
    try:
        for r in records:
            await dead_letter(producer, r, error)
    finally:
        await producer.stop()


async def test_dlq_round_trip_shows_errors_and_stops_at_the_attempt_limit(skill_env, capsys):
    settings = ConsumerSettings()
    [req] = await publish(settings, ["a cellist's thumb position"])
    generate = settings.topics.generate
    await dead_letter_all(settings, await read_all(settings, generate), "RuntimeError: CUDA out of memory")

    dlq = Selection(source="dlq")
    assert await main(settings, dlq, args("dry-run")) == 0
    listing = capsys.readouterr().out
    assert req.request_id in listing and "error: RuntimeError: CUDA out of memory" in listing
    assert await main(settings, dlq, args("republish", json=True, max_attempts=2)) == 0
    assert report_of(capsys)["counts"]["published"] == 1

    for attempt in (1, 2):  # the copy fails again, is dead-lettered, and the DLQ is replayed once more
        copies = [r for r in await read_all(settings, generate) if header(r.headers, "replay-attempt") == str(attempt)]
        assert len(copies) == 1 and header(copies[0].headers, "replay-of") == req.request_id
        await dead_letter_all(settings, copies, f"RuntimeError: still broken ({attempt})")
        assert await main(settings, dlq, args("dry-run", json=True)) == 0
        rows = report_of(capsys)["records"]
        assert [(row.get("attempt"), row["error"]) for row in rows][-1] == (attempt, f"RuntimeError: still broken ({attempt})")
        assert await main(settings, dlq, args("republish", json=True, max_attempts=2)) == 0
        counts = report_of(capsys)["counts"]
        if attempt == 1:
            assert (counts["published"], counts["skipped_already_done"]) == (1, 1)
        else:  # at the limit: it stays in the DLQ
            assert (counts["published"], counts["skipped_already_done"], counts["skipped_attempt_limit"]) == (0, 2, 1)
    copies = [r for r in await read_all(settings, generate) if header(r.headers, "replay-of")]
    assert sorted(header(r.headers, "replay-attempt") for r in copies) == ["1", "2"]


async def test_reprocess_deliver_posts_once_in_the_original_thread_though_it_was_posted_before(world, capsys):
    settings = ConsumerSettings()
    thread = "1700000000.000300"
    origin = world.slack_origin(thread_ts=thread)
    [req] = await publish(settings, ["a drummer's paradiddle"], origin=origin)
    deliver = args("reprocess", deliver=True, reason="model upgrade to v2", json=True)
    async with world.running():
        await world.send(event(req.origin, EventKind.succeeded, req.request_id, blobs=[world.image()]))
        await world.slack.wait_for(lambda c: c.path == "files.completeUploadExternal")
        assert await main(settings, Selection(), deliver, engine=FlatEngine(), image_policy=BlockAt()) == 0
        first = report_of(capsys)
        await world.slack.wait_for(lambda c: c.path == "files.completeUploadExternal", count=2)
        # The same selection again: the original request was re-run already.
        assert await main(settings, Selection(), args("reprocess", deliver=True, json=True), engine=FlatEngine(),
                          image_policy=BlockAt()) == 0
        second = report_of(capsys)
        await asyncio.sleep(2)
    # The re-run is one more result in the thread: its images once, its text (a message, or the upload's comment)
    # saying it is a re-run and why, naming no one.
    assert len(world.slack.pngs(fs.CHANNEL_ID, thread)) == 2
    said = [m.text for m in world.slack.visible(fs.CHANNEL_ID, thread)]
    said += [getattr(f, "initial_comment", None) or "" for f in world.slack.pngs(fs.CHANNEL_ID, thread)]
    reruns = [text for text in said if "re-run" in text]
    assert reruns and all("re-run of an earlier request: model upgrade to v2" in t and "<@" not in t for t in reruns)
    assert "re-run" not in world.slack.messages[origin.status_message_id].text  # the original result stays
    assert {k: first["counts"][k] for k in ("selected", "reprocessed", "succeeded", "posted")} == dict.fromkeys(
        ("selected", "reprocessed", "succeeded", "posted"), 1)
    [row] = first["records"]
    assert row["request_id"] == req.request_id and row["new_request_id"] != req.request_id
    assert (second["counts"]["skipped_already_done"], second["counts"]["posted"]) == (1, 0)


async def test_reprocess_to_a_channel_posts_as_the_operator_naming_no_one(world, capsys):
    settings = ConsumerSettings()
    await publish(settings, ["a potter's wheel"], origin=world.slack_origin())
    channel = f"discord:{fd.GUILD_ID}:{fd.CHANNEL_ID}"
    async with world.running():
        assert await main(settings, Selection(), args("reprocess", channel=channel, reason="@everyone <@1> check",
                                                      json=True), engine=FlatEngine(), image_policy=BlockAt()) == 0
        [post] = await world.discord.wait_for(lambda c: c.method == "POST" and c.path.endswith("/messages"))
        await asyncio.sleep(1)
    assert report_of(capsys)["counts"]["posted"] == 1
    content = post.body["content"]
    assert "re-run of an earlier request" in content and "*a potter's wheel*" in content
    assert "<@" not in content and "@everyone" not in content  # the reason is escaped as sender text
    mentions = post.body["allowed_mentions"]
    assert mentions == {"parse": [], "users": []}  # a re-run pings nobody
    assert len(post.files) == 1 and world.slack.files == []


@pytest.mark.slow
async def test_reprocess_writes_fresh_images_to_the_sink(skill_env, tiny_model, tmp_path, monkeypatch):
    monkeypatch.setenv("SKILL_MODEL", str(tiny_model))
    monkeypatch.setenv("SKILL_DEVICE", "cpu")
    settings = ConsumerSettings()
    reqs = await publish(settings, ["a chef's knife skill icon", "nude figure"])
    sink = tmp_path / "sink"
    assert await main(settings, Selection(), args("reprocess", sink=sink)) == 0
    assert sorted(p.name for p in sink.iterdir()) == [f"{reqs[0].request_id}-0.png"]


@pytest.mark.slow
async def test_reprocess_withholds_a_partly_blocked_request_whole_as_the_consumer_does(skill_env, tiny_model, tmp_path):
    settings = ConsumerSettings(model=str(tiny_model), device="cpu")
    partly, single, unchecked = await publish(
        settings, ["a potter's wheel, two views", "a potter's wheel", "a potter's wheel, three views"], [2, 1, 3]
    )
    engine = await asyncio.to_thread(load_engine, tiny_model, "torch", "cpu", "fp32")
    sink = tmp_path / "sink"
    # The second image of every request is blocked; the third one's check could not run.
    report = Report("test", "reprocess", "generate")
    await reprocess(settings, await select(settings, Selection()), engine, sink, None, True,
                    image_policy=BlockAt(blocked=[1], failed=[2]), report=report)

    assert {k: report.counts[k] for k in ("reprocessed", "blocked", "failed", "succeeded", "posted")} == {
        "reprocessed": 3, "blocked": 1, "failed": 1, "succeeded": 1, "posted": 3}
    assert sorted(p.name for p in sink.iterdir()) == [f"{single.request_id}-0.png"]
    assert len([p for p in skill_env.blob_dir.rglob("*") if p.is_file()]) == 1  # only the allowed request's image
    events = {e.replay_of: e for e in (decode(r.value, JobEvent, r.headers)
                                         for r in await read_all(settings, settings.topics.events))}
    assert (events[partly.request_id].kind, events[partly.request_id].message) == (EventKind.blocked, NUDITY)
    assert events[partly.request_id].blobs == []
    assert (events[unchecked.request_id].kind, events[unchecked.request_id].message) == (EventKind.failed, UNCHECKED)
    assert events[single.request_id].kind == EventKind.succeeded and len(events[single.request_id].blobs) == 1
