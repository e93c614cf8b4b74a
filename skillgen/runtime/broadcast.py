"""A topic that every instance reads whole, without a consumer group: cancels (`skill.finetune.cancel` for the
trainers, `skill.generate.cancel` for the consumers).

    follower = Broadcast(settings, topic, lookback_s, on_record)
    await follower.start()   # assigns every partition and reads the last `lookback_s` before returning
    ...                      # then follows new records in the background, calling on_record(record) for each
    await follower.stop()

Catching up before the service takes any work means a cancel sent while no instance ran (or just before a
restart) still reaches the work it names. Nothing is committed: each instance reads from the time it needs.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from aiokafka import ConsumerRecord, TopicPartition

from skillgen.runtime.kafka import make_consumer
from skillgen.runtime.settings import CommonSettings

log = logging.getLogger("skillgen.broadcast")


class MissingTopic(RuntimeError):
    pass


class Broadcast:
    def __init__(self, settings: CommonSettings, topic: str, lookback_s: float,
                 on_record: Callable[[ConsumerRecord], None], *, wait_for_topic_s: float = 30.0):
        self.settings = settings
        self.topic = topic
        self.lookback_s = lookback_s
        self.on_record = on_record
        self.wait_for_topic_s = wait_for_topic_s
        self._consumer = None
        self._follower: asyncio.Task | None = None

    async def start(self) -> None:
        s = self.settings
        self._consumer = make_consumer(s, group=None, auto_offset_reset="latest",
                                       fetch_max_wait_ms=getattr(s, "fetch_max_wait_ms", 100))
        await self._consumer.start()
        await self._catch_up()
        self._follower = asyncio.create_task(self._follow())

    async def stop(self) -> None:
        if self._follower is not None:
            self._follower.cancel()
            await asyncio.gather(self._follower, return_exceptions=True)
            self._follower = None
        if self._consumer is not None:
            await self._consumer.stop()
            self._consumer = None

    async def _catch_up(self) -> None:
        consumer, topic = self._consumer, self.topic
        parts: set[int] = set()
        deadline = time.monotonic() + self.wait_for_topic_s
        while not parts:
            await consumer._client.force_metadata_update()  # the topic may have been created a moment ago
            parts = consumer.partitions_for_topic(topic) or set()
            if not parts:
                if time.monotonic() > deadline:
                    raise MissingTopic(f"topic {topic} does not exist: create the topics with `skillgen topics ensure`")
                await asyncio.sleep(0.2)
        tps = [TopicPartition(topic, p) for p in sorted(parts)]
        consumer.assign(tps)
        end = await consumer.end_offsets(tps)
        since_ms = int((time.time() - self.lookback_s) * 1000)
        found = await consumer.offsets_for_times({tp: since_ms for tp in tps})
        for tp in tps:
            # Kafka answers None where no record is that recent; some compatible brokers a timestamp of -1.
            at = found.get(tp)
            consumer.seek(tp, at.offset if at is not None and at.timestamp >= 0 else end[tp])
        async with asyncio.timeout(60):
            while [tp for tp in tps if await consumer.position(tp) < end[tp]]:
                for records in (await consumer.getmany(*tps, timeout_ms=200)).values():
                    for record in records:
                        self.on_record(record)

    async def _follow(self) -> None:
        async for record in self._consumer:
            try:
                self.on_record(record)
            except Exception:  # noqa: BLE001 - one bad record must not stop the follower
                log.exception("a record on %s could not be handled", self.topic)
