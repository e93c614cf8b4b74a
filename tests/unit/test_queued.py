"""The per-person cap on requests not yet finished: counted in Redis across teams, freed by delivery's `finished`,
old entries forgotten, SKILL_ADMINS exempt, and open (nobody capped) without Redis or when Redis is too slow."""

import asyncio
import time

import pytest

from bots.errors import Refusal
from bots.queued import QueuedJobs, finished
from bots.settings import BotSettings
from schemas.messages import Origin, Platform
from skillgen.runtime.redis import RedisLink, Store


def origin(user: str = "U1", team: str = "T1") -> Origin:
    return Origin(platform=Platform.slack, team_id=team, channel_id="C1", user_id=user)


@pytest.fixture
async def store(redis_server, namespace):
    store = Store(RedisLink(redis_server.url, decode_responses=True), namespace.redis_prefix)
    yield store
    keys = [k async for k in store.link.client.scan_iter(match=namespace.redis_prefix + "*")]
    if keys:
        await store.link.client.delete(*keys)
    await store.close()


async def test_at_the_cap_a_person_is_refused_until_one_request_finishes(store):
    queued = QueuedJobs(store, cap=2)
    await queued.add(origin(team="T1"), "r1")
    await queued.check(origin())
    await queued.add(origin(team="T2"), "r2")  # another workspace: the same person, the same count
    with pytest.raises(Refusal) as refused:
        await queued.check(origin(team="T3"))
    assert str(refused.value) == "you already have 2 requests waiting; wait for one to finish (or cancel one)"
    await queued.check(origin(user="U2"))  # someone else is not affected
    await finished(store, origin(team="T2"), "r1")  # delivery handled r1's terminal event
    await queued.check(origin())
    await finished(store, origin(), "r1")  # a duplicate terminal event changes nothing
    await queued.add(origin(), "r3")
    with pytest.raises(Refusal):
        await queued.check(origin())


async def test_a_request_whose_end_was_never_heard_of_stops_counting_after_forget_s(store):
    queued = QueuedJobs(store, cap=1, forget_s=1)
    await queued.add(origin(), "lost")
    with pytest.raises(Refusal):
        await queued.check(origin())
    await asyncio.sleep(1.1)
    await queued.check(origin())
    assert await store.link.client.exists(store.key("queued:slack:U1")) == 0  # the whole set expired


async def test_skill_admins_and_a_cap_of_zero_are_not_capped(store):
    admin = QueuedJobs.from_settings(BotSettings(max_queued_per_person=1, admins=["slack:U9"]), store)
    for i in range(3):
        await admin.add(origin("U9"), f"a{i}")
        await admin.check(origin("U9"))
    off = QueuedJobs.from_settings(BotSettings(max_queued_per_person=0), store)
    for i in range(3):
        await off.add(origin(), f"o{i}")
        await off.check(origin())
    assert await store.link.client.exists(store.key("queued:slack:U1"), store.key("queued:slack:U9")) == 0


@pytest.mark.unit
async def test_without_redis_nobody_is_capped():
    queued = QueuedJobs(Store(None), cap=1)
    for i in range(3):
        await queued.add(origin(), f"r{i}")
        await queued.check(origin())


@pytest.mark.unit
async def test_a_redis_that_never_answers_admits_within_the_time_box_then_is_left_alone():
    held = []
    server = await asyncio.start_server(lambda r, w: held.append(w), "127.0.0.1", 0)
    store = Store(RedisLink(f"redis://127.0.0.1:{server.sockets[0].getsockname()[1]}/0", timeout_s=5,
                            decode_responses=True))
    queued = QueuedJobs(store, cap=1, time_box_s=0.3)
    try:
        t0 = time.monotonic()
        await queued.check(origin(), within_s=1.5)  # the smaller of the two boxes
        assert 0.25 < time.monotonic() - t0 < 1.0
        t0 = time.monotonic()
        await queued.check(origin())  # the breaker is open: Redis is not asked
        assert time.monotonic() - t0 < 0.05
    finally:
        await store.close()
        for writer in held:
            writer.close()
        server.close()


class BrokenProducer:
    async def send_and_wait(self, *args, **kwargs):
        raise ConnectionError("the queue is unreachable")


async def test_a_request_that_could_not_be_published_holds_no_slot(store):
    from bots.intake import Intake
    from bots.ratelimit import RateLimiter
    from schemas.messages import GenerateRequest

    intake = Intake(BotSettings(max_queued_per_person=1), BrokenProducer(), store, RateLimiter([], store))
    with pytest.raises(ConnectionError):
        await intake.publish(GenerateRequest(origin=origin(), prompt="a cellist"))
    await intake.queued.check(origin())
    assert await store.link.client.zcard(store.key("queued:slack:U1")) == 0
