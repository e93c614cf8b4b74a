"""Follow `skill.events` for the requests a front-end itself sent (the console, tests, the demo)."""

from __future__ import annotations

import asyncio
import logging

from aiokafka import TopicPartition

from schemas.codec import CodecError, decode
from schemas.messages import JobEvent
from skillgen.runtime.kafka import make_consumer, partitions_of
from skillgen.runtime.settings import CommonSettings

log = logging.getLogger("skillgen.events")


class EventFollower:
    """Reads every partition of the events topic from its end (no consumer group: nothing to commit) and
    routes each event to the queue of the request id that is waiting for it."""

    def __init__(self, settings: CommonSettings):
        self.settings = settings
        self._queues: dict[str, asyncio.Queue[JobEvent]] = {}
        self._task: asyncio.Task | None = None

    async def start(self) -> None:
        # fetch_max_wait_ms: some brokers answer a fetch only when this runs out: it bounds event latency
        self._consumer = make_consumer(self.settings, group=None, auto_offset_reset="latest", fetch_max_wait_ms=50)
        await self._consumer.start()
        topic = self.settings.topics.events
        parts = await partitions_of(self.settings, topic)
        if not parts:
            await self._consumer.stop()
            raise RuntimeError(f"topic {topic} does not exist: run `skillgen topics ensure`")
        tps = [TopicPartition(topic, p) for p in sorted(parts)]
        self._consumer.assign(tps)
        await self._consumer.seek_to_end(*tps)
        for tp in tps:  # resolve the end positions now, so nothing produced after start() is missed
            await self._consumer.position(tp)
        self._task = asyncio.create_task(self._pump())

    def watch(self, request_id: str) -> asyncio.Queue[JobEvent]:
        return self._queues.setdefault(request_id, asyncio.Queue())

    async def _pump(self) -> None:
        async for record in self._consumer:
            try:
                event = decode(record.value, JobEvent, record.headers)
            except CodecError as exc:
                log.warning("skipping undecodable event at %s@%d: %s", record.partition, record.offset, exc)
                continue
            q = self._queues.get(event.request_id)
            if q is not None:
                q.put_nowait(event)

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        await self._consumer.stop()
