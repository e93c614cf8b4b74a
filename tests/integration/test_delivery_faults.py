"""Delivery under faults, with a real broker and a real redis-server: an outage of Redis, a restart during one,
a second terminal event of another kind, re-queue headers that are not numbers, a long 429 on one channel. Each
request's final result is posted once, and a wait holds back only the request that waits."""

import asyncio
import time
import uuid
from collections import Counter
from collections.abc import Callable

import redis
from prometheus_client import REGISTRY

from schemas.messages import EventKind, JobEvent
from tests.fakes import discord as fd
from tests.fakes.records import TopicReader
from tests.fakes.world import World, event

OK, FAIL, BLOCK = EventKind.succeeded, EventKind.failed, EventKind.blocked


def rid() -> str:
    return uuid.uuid4().hex


async def until(condition: Callable[[], bool], timeout_s: float = 20, what: str = "the condition") -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} did not hold within {timeout_s}s")
        await asyncio.sleep(0.05)


def png_name(e: JobEvent) -> str:
    return f"skill-{e.request_id[:8]}-1.png"


def uploads(world: World) -> Counter:
    """Images Slack received, by file name (one per request here)."""
    return Counter(f.filename for f in world.slack.files)


def results(world: World, n: int, seed: int = 0) -> list[JobEvent]:
    return [event(world.slack_origin(), OK, rid(), blobs=[world.image(seed + i)]) for i in range(n)]


def done_in_redis(server, prefix: str, events: list[JobEvent]) -> int:
    client = redis.Redis.from_url(server.url, decode_responses=True)
    try:
        return sum(client.get(f"{prefix}delivered:{e.request_id}") == "done:succeeded" for e in events)
    finally:
        client.close()


def original_edits(token: str, *, with_files: bool | None = None):
    def match(c) -> bool:
        return (c.method == "PATCH" and c.path.endswith(f"/{token}/messages/@original") and c.status == 200
                and (with_files is None or bool(c.files) == with_files))
    return match


def duplicates(platform: str, kind: EventKind) -> float:
    labels = {"platform": platform, "kind": kind.value, "outcome": "duplicate"}
    return REGISTRY.get_sample_value("skill_delivery_posts_total", labels) or 0.0


def bad_headers(name: str) -> float:
    return REGISTRY.get_sample_value("skill_delivery_bad_headers_total", {"header": name}) or 0.0


async def test_results_posted_during_a_redis_outage_are_not_posted_again_once_it_is_back(world, redis_factory,
                                                                                          namespace, tmp_path):
    server = redis_factory()
    events = results(world, 20)
    async with world.running(redis_url=server.url) as delivery:
        warm = results(world, 1, seed=100)[0]
        await world.send(warm)
        await until(lambda: uploads(world)[png_name(warm)] == 1, what="the first post")
        server.stop()
        await world.send(*events)
        await until(lambda: all(uploads(world)[png_name(e)] == 1 for e in events), 30, "20 posts during the outage")
        server.start()  # the same port, empty: what it had is gone
        await asyncio.sleep(2.5)  # past the link's retry pause, so the next calls do reach Redis
        await world.send(*events)  # the same 20 terminal events again
        await until(lambda: delivery.handled >= 41, 30, "the 20 repeats handled")
        counts = uploads(world)
        assert [counts[png_name(e)] for e in events] == [1] * 20, "a result was posted twice"
        # The done markers taken in memory during the outage were written back to Redis...
        await until(lambda: done_in_redis(server, namespace.redis_prefix, events) == 20, 10, "the write-back")
    # ...so another delivery, with a journal of its own that knows nothing, drops them too.
    async with world.running(redis_url=server.url, delivery_state_dir=tmp_path / "another") as another:
        await world.send(*events)
        await until(lambda: another.handled >= 20, 30, "the repeats handled by another delivery")
    counts = uploads(world)
    assert [counts[png_name(e)] for e in events] == [1] * 20
    assert duplicates("slack", OK) >= 40


async def test_a_restarted_delivery_knows_what_it_posted_while_redis_was_down(world, redis_factory, namespace):
    server = redis_factory()
    events = results(world, 20)
    async with world.running(redis_url=server.url):
        warm = results(world, 1, seed=100)[0]
        await world.send(warm)
        await until(lambda: uploads(world)[png_name(warm)] == 1, what="the first post")
        server.stop()
        await world.send(*events)
        await until(lambda: all(uploads(world)[png_name(e)] == 1 for e in events), 30, "20 posts during the outage")
    server.start()  # back, and empty, while no delivery runs
    async with world.running(redis_url=server.url) as restarted:  # a new instance, the same state dir
        await world.send(*events)
        await until(lambda: restarted.handled >= 20, 30, "the repeats handled")
        counts = uploads(world)
        assert [counts[png_name(e)] for e in events] == [1] * 20, "a result was posted twice"
        # The restarted delivery wrote what its journal held back to Redis.
        await until(lambda: done_in_redis(server, namespace.redis_prefix, events) == 20, 10, "the write-back")


async def test_one_final_post_per_request_whatever_kind_comes_second(world):
    ok_it, fail_it = world.discord.deferred(), world.discord.deferred()
    ok_o, fail_o = world.discord_origin(ok_it), world.discord_origin(fail_it)
    ok_r, fail_r = rid(), rid()
    before = duplicates("discord", FAIL), duplicates("discord", BLOCK)
    async with world.running() as delivery:
        await world.send(event(ok_o, OK, ok_r, blobs=[world.image()]), event(fail_o, FAIL, fail_r))
        await world.discord.wait_for(original_edits(ok_it.token, with_files=True))
        await world.discord.wait_for(original_edits(fail_it.token))
        # A redelivered generate record that missed the cache and failed; a blocked one after a failure.
        await world.send(event(ok_o, FAIL, ok_r), event(fail_o, BLOCK, fail_r))
        await until(lambda: delivery.handled >= 4, what="the second events handled")
        await asyncio.sleep(0.5)
    assert len(world.discord.matching(original_edits(ok_it.token))) == 1, "✅ then ❌"
    assert ok_it.original.content.startswith("✅")
    assert fail_it.original.content.startswith("❌") and not fail_it.original.deleted
    # the blocked event after the failure told nobody privately (an ephemeral follow-up); the one follow-up on that
    # webhook is the failure's own ping
    follow_ups = world.discord.matching(lambda c: c.path == f"/webhooks/{fd.APPLICATION_ID}/{fail_it.token}")
    assert [bool((c.body or {}).get("flags", 0) & 64) for c in follow_ups] == [False], follow_ups
    assert (duplicates("discord", FAIL) - before[0], duplicates("discord", BLOCK) - before[1]) == (1, 1)


async def test_a_terminal_event_arriving_while_the_first_is_requeued_does_not_overtake_it(world):
    it = world.discord.deferred()
    o, r = world.discord_origin(it), rid()
    world.discord.fail("PATCH", rf"/{it.token}/messages/@original$", 429, headers={"Retry-After": "3"},
                       body={"message": "You are being rate limited.", "retry_after": 3.0, "global": False})
    async with world.running(max_retry_after_s=1) as delivery:
        await world.send(event(o, OK, r, blobs=[world.image()]))
        await world.discord.wait_for(lambda c: c.status == 429)
        await world.send(event(o, FAIL, r))
        await world.discord.wait_for(original_edits(it.token, with_files=True))
        await until(lambda: delivery.handled >= 3, 20, "the failed event handled")
    assert len(world.discord.matching(original_edits(it.token))) == 1
    assert it.original.content.startswith("✅")


async def test_deliver_after_headers_that_are_not_believable_are_ignored_not_looped(world):
    values = {"nan": b"nan", "inf": b"inf", "-inf": b"-inf", "text": b"abc", "in ten days": b"%.3f"
              % (time.time() + 10 * 86400)}
    events = {name: results(world, 1, seed=i)[0] for i, name in enumerate(values)}
    bad_before = bad_headers("deliver-after")
    async with world.running() as delivery:
        for name, value in values.items():
            await world.send(events[name], headers=[("deliver-after", value), ("delivery-requeues", b"nan")])
        await until(lambda: all(uploads(world)[png_name(e)] == 1 for e in events.values()), 15,
                    "every event posted")
        await until(lambda: delivery.handled >= len(values), what="every event handled")
    async with TopicReader(world.env.vars["SKILL_KAFKA_BOOTSTRAP"], world.env.topics.events, JobEvent) as reader:
        await reader.settle(1.0)
    # Each was read once and answered: none went round the topic again.
    assert Counter(e.request_id for e in reader.seen) == {e.request_id: 1 for e in events.values()}
    assert bad_headers("deliver-after") - bad_before == len(values)


async def test_a_long_429_on_one_channel_does_not_hold_back_another_request_on_its_partition(world):
    slow, fast = world.discord.deferred(), world.discord.deferred()
    world.discord.fail("PATCH", rf"/{slow.token}/messages/@original$", 429, headers={"Retry-After": "20"},
                       body={"message": "You are being rate limited.", "retry_after": 20.0, "global": False})
    async with world.running() as delivery:
        await world.send(event(world.discord_origin(slow), OK, rid(), blobs=[world.image(1)]), partition=0)
        [limited] = await world.discord.wait_for(lambda c: c.status == 429)
        sent = time.monotonic()
        await world.send(event(world.discord_origin(fast), OK, rid(), blobs=[world.image(2)]), partition=0)
        [quick] = await world.discord.wait_for(original_edits(fast.token, with_files=True), timeout_s=30)
        assert quick.at - sent < 4, f"the other request waited {quick.at - sent:.1f}s behind the 429"
        [late] = await world.discord.wait_for(original_edits(slow.token, with_files=True), timeout_s=40)
        await until(lambda: delivery.parked == 0, 5, "no event left parked")
    assert late.at - limited.at >= 20
    assert len(world.discord.matching(lambda c: c.method == "PATCH" and slow.token in c.path)) == 2
