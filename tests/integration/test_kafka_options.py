"""The security options reach a real broker unchanged for PLAINTEXT: make_producer, make_consumer and the admin
client (ensure_topics with min.insync.replicas, partitions_of) still work against Tansu."""

from __future__ import annotations

import pytest
from aiokafka import TopicPartition

from skillgen.runtime.kafka import (
    client_options,
    ensure_topics,
    make_consumer,
    make_producer,
    partitions_of,
)
from skillgen.runtime.settings import CommonSettings
from tests.harness import Broker, Namespace

pytestmark = pytest.mark.integration


def settings(broker: Broker, namespace: Namespace) -> CommonSettings:
    return CommonSettings(_env_file=None, kafka_bootstrap=broker.bootstrap, kafka_idempotence=False,
                          kafka_security_protocol="PLAINTEXT", topic_prefix=namespace.topic_prefix)


async def test_plaintext_options_produce_and_consume_one_record(kafka_broker: Broker, namespace: Namespace):
    s = settings(kafka_broker, namespace)
    assert client_options(s) == {"security_protocol": "PLAINTEXT"}
    created = await ensure_topics(s, partitions=1, replication=1)  # min.insync.replicas=1 in each topic's config
    assert set(created) == set(s.topics.all())
    assert await partitions_of(s, s.topics.generate) == [0]

    producer = make_producer(s)
    await producer.start()
    try:
        sent = await producer.send_and_wait(s.topics.generate, b"hello", key=b"k")
    finally:
        await producer.stop()

    consumer = make_consumer(s, group=None)
    await consumer.start()
    try:
        tp = TopicPartition(s.topics.generate, 0)
        consumer.assign([tp])
        await consumer.seek_to_beginning(tp)
        batch = await consumer.getmany(tp, timeout_ms=10_000)
    finally:
        await consumer.stop()
    [record] = batch[tp]
    assert (record.offset, record.key, record.value) == (sent.offset, b"k", b"hello")
