"""The service skeleton against a real broker, through real rebalances: a job whose partition is revoked while its
handler runs still holds its place in hand (a trainer never trains two jobs at once), and every record is
answered and committed once the group settles."""

from __future__ import annotations

import asyncio

from aiokafka import TopicPartition

from skillgen.runtime.kafka import make_producer
from skillgen.runtime.service import Job, KafkaService
from skillgen.runtime.settings import CommonSettings
from tests.harness import FAST_GROUP, serving

GROUP = "service-test"


class Handler:
    """Holds every job until `release` is set; counts how many it holds at once."""

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.holding: set[Job] = set()
        self.most_at_once = 0
        self.answered: list[tuple[int, int]] = []  # (partition, offset)
        self.service: KafkaService | None = None

    async def __call__(self, job: Job) -> None:
        self.holding.add(job)
        self.most_at_once = max(self.most_at_once, len(self.holding))
        try:
            await self.release.wait()
        finally:
            self.holding.discard(job)
        self.answered.append((job.tp.partition, job.record.offset))
        self.service.finish(job)


def service(settings: CommonSettings, topic: str, handler: Handler) -> KafkaService:
    handler.service = KafkaService(settings, name="test", topic=topic, group=settings.topics.group(GROUP),
                                   handle=handler, max_in_hand=1, drain_timeout_s=10, consumer_options=FAST_GROUP)
    return handler.service


async def until(condition, timeout_s: float = 20) -> None:
    async with asyncio.timeout(timeout_s):
        while not condition():
            await asyncio.sleep(0.05)


async def test_a_revoked_job_still_running_keeps_its_place_until_its_handler_returns(skill_env):
    settings = CommonSettings()
    topic = skill_env.topics.finetune
    producer = make_producer(settings)
    await producer.start()
    try:
        for partition in range(4):  # two records on every partition: whichever this member keeps has work waiting
            for i in range(2):
                await producer.send_and_wait(topic, f"{partition}-{i}".encode(), partition=partition)
    finally:
        await producer.stop()

    first, second = Handler(), Handler()
    async with serving(service(settings, topic, first)) as one:
        await until(lambda: first.holding)
        [held] = first.holding
        async with serving(service(settings, topic, second)) as two:
            await until(lambda: two.consumer.assignment() and len(one.consumer.assignment()) < 4)
            assert held.abandoned  # every partition was revoked in the rebalance
            await asyncio.sleep(1.5)  # time enough to fetch and start another job, were it allowed
            assert first.most_at_once == 1 and one.in_hand() == 1
            first.release.set()
            second.release.set()
            await until(lambda: one.finished + two.finished == 8)
            assert first.most_at_once == 1 and second.most_at_once == 1
            # The abandoned job's handler returned, but its answer was neither counted nor committed here: its
            # record went to its partition's next owner, who answered it again.
            assert first.answered.count((held.tp.partition, held.record.offset)) + \
                second.answered.count((held.tp.partition, held.record.offset)) == 2
        tps = [TopicPartition(topic, p) for p in range(4)]
        async with asyncio.timeout(20):
            while [await one.consumer.committed(tp) for tp in tps] != [2, 2, 2, 2]:
                await asyncio.sleep(0.1)


async def test_health_fails_while_a_record_stays_unanswered_past_the_age_limit(skill_env):
    """A handler that never finishes (as when a terminal event cannot be produced) holds its record open: after
    `max_record_age_s` /healthz answers 503 naming it, so the orchestrator restarts the service. On the old code
    there is no such limit (KafkaService refuses the option) and /healthz answers 200 forever."""
    import aiohttp

    from skillgen.tools.embedded import free_port

    port = free_port()
    settings = CommonSettings(metrics_port=port)
    topic = skill_env.topics.finetune
    never = Handler()  # its release is never set
    never.service = KafkaService(settings, name="test", topic=topic, group=settings.topics.group(GROUP),
                                 handle=never, max_in_hand=4, drain_timeout_s=0.5, consumer_options=FAST_GROUP,
                                 max_record_age_s=1.0)
    producer = make_producer(settings)
    await producer.start()
    try:
        await producer.send_and_wait(topic, b"stuck", partition=0)
    finally:
        await producer.stop()

    async def healthz() -> tuple[int, str]:
        async with aiohttp.ClientSession() as http, http.get(f"http://127.0.0.1:{port}/healthz") as resp:
            return resp.status, await resp.text()

    async with serving(never.service) as service:
        await until(lambda: never.holding)
        assert (await healthz())[0] == 200  # young: being worked on
        await asyncio.sleep(1.2)
        status, detail = await healthz()
        assert service.oldest_s() > 1.0
    assert status == 503 and "unanswered" in detail and "limit 1s" in detail, detail
