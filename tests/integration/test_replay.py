"""Replay against the real broker: selection by time, offsets and ids; republish is idempotent; reprocess
writes fresh images; nothing is ever committed into the live consumer group."""

from __future__ import annotations

import argparse
import asyncio
from datetime import UTC, datetime

import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition

from consumer.replay import Selection, main, reprocess, select
from consumer.settings import ConsumerSettings
from schemas.codec import decode, encode, header
from schemas.messages import EventKind, GenerateRequest, JobEvent, Origin
from schemas.topics import CONSUMER_GROUP
from skillgen.inference import load_engine
from skillgen.runtime.kafka import make_producer
from tests.fakes.checkers import NUDITY, UNCHECKED, BlockAt

ORIGIN = Origin(platform="slack", team_id="T1", channel_id="C1", user_id="U1")


def args(mode: str, **kw) -> argparse.Namespace:
    base = {"mode": mode, "sink": None, "channel": None, "deliver": False, "force": False}
    return argparse.Namespace(**{**base, **kw})


async def publish(settings, prompts: list[str], num_images: list[int] | None = None) -> list[GenerateRequest]:
    producer = make_producer(settings)
    await producer.start()
    reqs = []
    try:
        for p, n in zip(prompts, num_images or [1] * len(prompts)):
            req = GenerateRequest(origin=ORIGIN, prompt=p, width=64, height=64, steps=2, num_images=n)
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


async def test_republish_twice_copies_once_and_never_commits_the_live_group(skill_env, capsys):
    settings = ConsumerSettings()
    reqs = await publish(settings, ["one", "two", "three"])
    sel = Selection(request_ids=frozenset(r.request_id for r in reqs[:2]))
    assert await main(settings, sel, args("republish")) == 0
    assert await main(settings, sel, args("republish")) == 0
    out = capsys.readouterr().out
    assert "republished" in out and "already replayed" in out

    records = await read_all(settings, settings.topics.generate)
    copies = [r for r in records if header(r.headers, "replay-of")]
    assert sorted(header(r.headers, "request-id") for r in copies) == sorted(r.request_id for r in reqs[:2])

    group = AIOKafkaConsumer(bootstrap_servers=settings.kafka_bootstrap, group_id=settings.topics.group(CONSUMER_GROUP))
    await group.start()
    try:
        for p in range(4):
            assert await group.committed(TopicPartition(settings.topics.generate, p)) is None
    finally:
        await group.stop()


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
    outcomes = await reprocess(settings, await select(settings, Selection()), engine, sink, None, True,
                               image_policy=BlockAt(blocked=[1], failed=[2]))

    assert outcomes == {"blocked": 1, "failed (safety check)": 1, "reprocessed": 1}
    assert sorted(p.name for p in sink.iterdir()) == [f"{single.request_id}-0.png"]
    assert len([p for p in skill_env.blob_dir.rglob("*") if p.is_file()]) == 1  # only the allowed request's image
    events = {e.request_id: e for e in (decode(r.value, JobEvent, r.headers)
                                         for r in await read_all(settings, settings.topics.events))}
    assert (events[partly.request_id].kind, events[partly.request_id].message) == (EventKind.blocked, NUDITY)
    assert events[partly.request_id].blobs == []
    assert (events[unchecked.request_id].kind, events[unchecked.request_id].message) == (EventKind.failed, UNCHECKED)
    assert events[single.request_id].kind == EventKind.succeeded and len(events[single.request_id].blobs) == 1
