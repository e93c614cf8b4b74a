"""Reading what the bots published: every record of a topic, decoded, without a consumer group."""

from __future__ import annotations

import asyncio
import time
from typing import TypeVar

from aiokafka import AIOKafkaConsumer, TopicPartition
from pydantic import BaseModel

from schemas.codec import decode
from skillgen.runtime.kafka import make_producer

M = TypeVar("M", bound=BaseModel)


class TopicReader:
    """`async with TopicReader(bootstrap, topic, Model) as r: await r.wait(2)` reads from the beginning."""

    def __init__(self, bootstrap: str, topic: str, model: type[M]):
        self.bootstrap = bootstrap
        self.topic = topic
        self.model = model
        self.seen: list[M] = []
        self.headers: list[list[tuple[str, bytes]]] = []  # of each seen message, in the same order
        self.keys: list[bytes | None] = []  # the record key of each seen message, in the same order

    async def __aenter__(self) -> TopicReader:
        self.consumer = AIOKafkaConsumer(bootstrap_servers=self.bootstrap, enable_auto_commit=False)
        await self.consumer.start()
        parts = self.consumer.partitions_for_topic(self.topic)
        while not parts:
            await self.consumer._client.force_metadata_update()
            parts = self.consumer.partitions_for_topic(self.topic)
        tps = [TopicPartition(self.topic, p) for p in sorted(parts)]
        self.consumer.assign(tps)
        await self.consumer.seek_to_beginning(*tps)
        return self

    async def __aexit__(self, *exc) -> None:
        await self.consumer.stop()

    async def poll(self, timeout_s: float) -> list[M]:
        batches = await self.consumer.getmany(timeout_ms=int(timeout_s * 1000))
        for records in batches.values():
            self.seen += [decode(r.value, self.model, r.headers) for r in records]
            self.headers += [list(r.headers or []) for r in records]
            self.keys += [r.key for r in records]
        return self.seen

    async def wait(self, count: int, timeout_s: float = 15) -> list[M]:
        """At least `count` messages in all, waiting up to `timeout_s`."""
        deadline = time.monotonic() + timeout_s
        while len(self.seen) < count:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"{len(self.seen)} of {count} messages on {self.topic} within {timeout_s}s")
            await self.poll(min(left, 0.5))
        return self.seen

    async def settle(self, quiet_s: float = 1.0) -> list[M]:
        """Everything published, once nothing new has come for `quiet_s`."""
        await asyncio.sleep(0)
        while True:
            before = len(self.seen)
            await self.poll(quiet_s)
            if len(self.seen) == before:
                return self.seen


class Publisher:
    """A producer for the test's requests and a reader of its events topic from the start, no group:
    `async with SubClass(settings) as k:` opens both (each test has its own topics)."""

    def __init__(self, settings):
        self.settings = settings
        self.topics = settings.topics
        self.events: list = []

    async def __aenter__(self):
        self.producer = make_producer(self.settings)
        await self.producer.start()
        self.reader = AIOKafkaConsumer(bootstrap_servers=self.settings.kafka_bootstrap, enable_auto_commit=False,
                                       fetch_max_wait_ms=20)
        await self.reader.start()
        tps = [TopicPartition(self.topics.events, p) for p in range(4)]
        self.reader.assign(tps)
        await self.reader.seek_to_beginning(*tps)
        return self

    async def __aexit__(self, *exc) -> None:
        await self.reader.stop()
        await self.producer.stop()
