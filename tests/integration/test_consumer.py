"""The consumer service against a real broker and a real Redis: batching, dedup, single flight, safety,
poison records, retries, outages and shutdown. The worker runs in this process on a tiny model at 64x64."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition
from PIL import Image

import skillgen.tools.tiny as tiny
from bots.keys import partition_key
from consumer.cache import CacheEntry
from consumer.keys import ResolvedAdapter, cache_key
from consumer.settings import ConsumerSettings
from consumer.worker import Worker
from schemas.codec import decode, encode, header
from schemas.messages import (
    AdapterRef,
    BlobRef,
    EventKind,
    GenerateRequest,
    JobEvent,
    Origin,
)
from schemas.topics import CONSUMER_GROUP
from skillgen.safety import Decision, ImagePolicy
from skillgen.tools.embedded import free_port
from tests.fakes.records import Publisher
from tests.harness import FAST_GROUP, serving

pytestmark = pytest.mark.integration

ORIGIN = Origin(platform="console", team_id="local", channel_id="c1", user_id="u1")


# -- fixtures and helpers (test_consumer_kill.py uses them too) --------------------------------------------


@pytest.fixture(scope="session")
def tiny_model(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny random SD, built once and kept in pytest's cache until skillgen/tools/tiny.py changes."""
    version = hashlib.sha256(Path(tiny.__file__).read_bytes()).hexdigest()[:12]
    cache = getattr(request.config, "cache", None)  # None under -p no:cacheprovider
    path = Path(cache.mkdir(f"skillgen-tiny-{version}")) if cache else tmp_path_factory.mktemp("tiny")
    if not (path / "model_index.json").exists():
        tiny.build_tiny(path)
    return path


@pytest.fixture(scope="module")
def engine(tiny_model):
    from skillgen.inference import load_engine

    return load_engine(tiny_model, "torch", "cpu", "fp32")


@pytest.fixture(scope="module")
def image_policy() -> ImagePolicy:
    return ImagePolicy()


def consumer_settings(model: Path, **kw) -> ConsumerSettings:
    """Settings for a test consumer: SKILL_* from skill_env, the tiny model on the CPU, a fast group join."""
    fast = {
        "fetch_max_wait_ms": 20,
        "kafka_session_timeout_ms": FAST_GROUP["session_timeout_ms"],
        "kafka_heartbeat_interval_ms": FAST_GROUP["heartbeat_interval_ms"],
        "kafka_rebalance_timeout_ms": FAST_GROUP["rebalance_timeout_ms"],
    }
    return ConsumerSettings(model=str(model), device="cpu", precision="fp32", **{**fast, **kw})


def request(prompt: str = "a drummer's paradiddle, top view", **kw) -> GenerateRequest:
    fields = {"width": 64, "height": 64, "steps": 2, **kw}
    return GenerateRequest(origin=ORIGIN, prompt=prompt, **fields)


def running(settings: ConsumerSettings, engine, **kw):
    return serving(Worker(settings, engine, **kw), stop_timeout_s=60)


class Kafka(Publisher):
    """Publishes requests and reads the test's topics from their start (each test has its own topics)."""

    def __init__(self, settings: ConsumerSettings):
        super().__init__(settings)
        self.events: list[JobEvent] = []
        self.arrived: dict[int, float] = {}  # index in events -> time.monotonic() it was read
        self.published: dict[str, float] = {}

    async def publish(self, req: GenerateRequest, partition: int | None = None) -> GenerateRequest:
        value, headers = encode(req)
        self.published[req.request_id] = time.monotonic()
        await self.producer.send_and_wait(self.topics.generate, value, key=partition_key(req), headers=headers,
                                          partition=partition)
        return req

    async def publish_raw(self, value: bytes, partition: int = 0) -> None:
        await self.producer.send_and_wait(self.topics.generate, value, key=b"junk", partition=partition)

    async def wait_for(self, done: Callable[[Kafka], bool], timeout_s: float = 60) -> None:
        async with asyncio.timeout(timeout_s):
            while not done(self):
                for records in (await self.reader.getmany(timeout_ms=100)).values():
                    for r in records:
                        self.arrived[len(self.events)] = time.monotonic()
                        self.events.append(decode(r.value, JobEvent, r.headers))

    def of(self, rid: str) -> list[JobEvent]:
        return [e for e in self.events if e.request_id == rid]

    def final(self, rid: str) -> JobEvent | None:
        """What a deduplicating reader keeps: the first terminal event of a request."""
        return next((e for e in self.of(rid) if e.kind.terminal), None)

    def all_final(self, rids) -> bool:
        return all(self.final(r) is not None for r in rids)

    def when(self, rid: str, kind: EventKind) -> float:
        """Seconds from publishing `rid` to reading its first `kind` event."""
        i = next(i for i, e in enumerate(self.events) if e.request_id == rid and e.kind == kind)
        return self.arrived[i] - self.published[rid]

    async def read_topic(self, topic: str, count: int, timeout_s: float = 20) -> list:
        reader = AIOKafkaConsumer(bootstrap_servers=self.settings.kafka_bootstrap, enable_auto_commit=False)
        await reader.start()
        try:
            tps = [TopicPartition(topic, p) for p in range(4)]
            reader.assign(tps)
            await reader.seek_to_beginning(*tps)
            out: list = []
            async with asyncio.timeout(timeout_s):
                while len(out) < count:
                    for records in (await reader.getmany(timeout_ms=100)).values():
                        out.extend(records)
            return out
        finally:
            await reader.stop()

    async def committed(self, partition: int) -> int | None:
        group = self.topics.group(CONSUMER_GROUP)
        reader = AIOKafkaConsumer(bootstrap_servers=self.settings.kafka_bootstrap, group_id=group,
                                  enable_auto_commit=False)
        await reader.start()
        try:
            return await reader.committed(TopicPartition(self.topics.generate, partition))
        finally:
            await reader.stop()


def sample(worker: Worker, name: str, **labels) -> float:
    return worker.metrics.registry.get_sample_value(name, labels) or 0.0


class BlockEverything:
    def __init__(self) -> None:
        self.seen = 0

    def check(self, images):
        self.seen += len(images)
        return [Decision(allowed=False, category="sexual", reason="Your image was blocked: test.", detail="t")] * len(images)


class RecordingEngine:
    """The real engine, noting each batch's size and when it ran (time.monotonic())."""

    def __init__(self, engine) -> None:
        self.engine = engine
        self.backend = engine.backend
        self.batches: list[tuple[int, float, float]] = []

    def generate(self, spec, samples, progress=None, cancelled=None):
        start = time.monotonic()
        images = self.engine.generate(spec, samples, progress, cancelled=cancelled)
        self.batches.append((len(samples), start, time.monotonic()))
        return images


class FakeBackend:
    def __init__(self) -> None:
        self.loaded: list[tuple[str, str]] = []

    def load_adapter(self, key: str, path: str) -> None:
        self.loaded.append((key, path))


class FakeEngine:
    """Solid-colour images at once. Prompts starting with "explode" always raise; "flaky" ones raise once."""

    def __init__(self, delay_s: float = 0.0) -> None:
        self.backend = FakeBackend()
        self.batches: list[tuple[object, list[str]]] = []
        self.delay_s = delay_s
        self._flaked: set[str] = set()

    def generate(self, spec, samples, progress=None, cancelled=None):
        self.batches.append((spec, [s.prompt for s in samples]))
        time.sleep(self.delay_s)
        for s in samples:
            if s.prompt.startswith("explode"):
                raise RuntimeError("the GPU fell over")
            if s.prompt.startswith("flaky") and s.prompt not in self._flaked:
                self._flaked.add(s.prompt)
                raise RuntimeError("transient")
        return [Image.new("RGB", (spec.width, spec.height), (s.seed % 256, 40, 90)) for s in samples]


# -- tests ---------------------------------------------------------------------------------------------------


async def test_compatible_requests_share_one_batch_and_an_incompatible_one_is_not_delayed(
    skill_env, tiny_model, engine, image_policy
):
    settings = consumer_settings(tiny_model, max_batch=8, max_wait_ms=3000)
    recording = RecordingEngine(engine)
    async with Kafka(settings) as kafka, running(settings, recording, image_policy=image_policy) as worker:
        odd = await kafka.publish(request("a juggler's cascade", steps=3))  # first in, different steps
        same = [await kafka.publish(request(f"a violinist's bow hold #{i}", steps=1)) for i in range(8)]
        await kafka.wait_for(lambda k: k.all_final([odd.request_id, *(r.request_id for r in same)]))

    assert all(kafka.final(r.request_id).kind == EventKind.succeeded for r in [odd, *same])
    assert [n for n, _, _ in recording.batches] == [8, 1]  # the eight together, first; the odd one alone
    assert sample(worker, "skill_batch_size_count") == 2 and sample(worker, "skill_batch_size_sum") == 9
    (_, eight_start, eight_end), (_, odd_start, _) = recording.batches
    window_end = kafka.published[odd.request_id] + 3.0
    # The full batch left at once (on a busy 2-core machine, "at once" can take a while), not at the end of the
    # older odd request's window ...
    assert eight_start < window_end - 1.0
    # ... and the odd one left when its own window closed (or the GPU came free), not later.
    assert window_end - 0.05 < odd_start < max(window_end, eight_end) + 2.0
    assert [e.kind for e in kafka.of(odd.request_id)] == [EventKind.queued, EventKind.started, EventKind.succeeded]


async def test_a_hundred_identical_requests_on_a_cold_cache_generate_once(skill_env, tiny_model, engine, image_policy):
    import aiohttp

    port = free_port()
    settings = consumer_settings(tiny_model, max_pending=16, metrics_port=port)
    most_in_hand = 0
    async with Kafka(settings) as kafka, running(settings, engine, image_policy=image_policy) as worker:
        reqs = [request("a cellist's vibrato, close-up") for _ in range(100)]
        await asyncio.gather(*(kafka.publish(r) for r in reqs))

        async def watch() -> None:
            nonlocal most_in_hand
            while True:
                most_in_hand = max(most_in_hand, len(worker.offsets))
                await asyncio.sleep(0.005)

        watcher = asyncio.create_task(watch())
        await kafka.wait_for(lambda k: k.all_final([r.request_id for r in reqs]))
        watcher.cancel()
        async with aiohttp.ClientSession() as http:
            async with http.get(f"http://127.0.0.1:{port}/healthz") as resp:
                assert resp.status == 200
            async with http.get(f"http://127.0.0.1:{port}/metrics") as resp:
                exposition = await resp.text()

    finals = [kafka.final(r.request_id) for r in reqs]
    assert all(e.kind == EventKind.succeeded for e in finals)
    assert len({tuple(b.sha256 for b in e.blobs) for e in finals}) == 1
    assert sample(worker, "skill_batch_size_count") == 1  # one generation for all of them
    assert len(list(skill_env.blob_dir.rglob("*.png"))) == 1
    assert 0 < most_in_hand <= 16  # partitions were paused instead of fetching everything
    levels = [e.cache_level for e in finals]
    assert levels.count(None) == 1 and levels.count("flight") + levels.count("l1") == 99
    assert 'skill_cache_hits_total{level="l1"}' in exposition and "skill_batch_size_bucket" in exposition
    assert "skill_consumer_lag" in exposition


async def test_requests_still_complete_while_redis_is_down(skill_env, tiny_model, engine, image_policy, redis_factory, caplog):
    server = redis_factory()
    settings = consumer_settings(tiny_model, redis_url=server.url, redis_retry_s=0.2, max_wait_ms=0)
    async with Kafka(settings) as kafka, running(settings, engine, image_policy=image_policy) as worker:
        before = await kafka.publish(request("a skater's ollie"))
        await kafka.wait_for(lambda k: k.all_final([before.request_id]))
        server.stop()
        during = [await kafka.publish(request(f"a pianist's arpeggio {i}")) for i in range(3)]
        again = await kafka.publish(request("a skater's ollie"))  # L1 still answers
        await kafka.wait_for(lambda k: k.all_final([r.request_id for r in [*during, again]]))
        server.start()
        after = await kafka.publish(request("a pianist's arpeggio 0", seed=5))
        await kafka.wait_for(lambda k: k.all_final([after.request_id]))

    for r in [before, *during, again, after]:
        assert kafka.final(r.request_id).kind == EventKind.succeeded
    assert kafka.final(again.request_id).cache_level == "l1"
    assert caplog.text.count("is unreachable") == 1
    assert sample(worker, "skill_dlq_total", topic=settings.topics.dlq(settings.topics.generate)) == 0


async def test_a_poison_record_goes_to_the_dlq_and_the_next_record_is_processed(skill_env, tiny_model, engine, image_policy):
    """Every poison record goes to the DLQ; one that still names a valid request id and origin also gets a failed
    event saying why (on the old code it got none: the wait for its final event times out)."""
    import json

    settings = consumer_settings(tiny_model, max_wait_ms=0)
    async with Kafka(settings) as kafka, running(settings, engine, image_policy=image_policy):
        await kafka.publish_raw(b"\x80\x04not json at all", partition=0)
        bad_width = request().model_dump(mode="json") | {"width": 65}
        await kafka.publish_raw(json.dumps(bad_width).encode(), partition=0)
        no_id = {k: v for k, v in request().model_dump(mode="json").items() if k != "request_id"} | {"steps": 0}
        await kafka.publish_raw(json.dumps(no_id).encode(), partition=0)
        good = await kafka.publish(request("a drummer's rimshot"), partition=0)
        await kafka.wait_for(lambda k: k.all_final([good.request_id, bad_width["request_id"]]))
        dead = await kafka.read_topic(settings.topics.dlq(settings.topics.generate), 3)
        # records of a partition are handled concurrently: their DLQ copies may land in either order
        dead.sort(key=lambda r: int(header(list(r.headers), "source-offset")))
        await asyncio.sleep(0.3)  # the commit follows the event
        committed = await kafka.committed(0)
        raw_events = await kafka.read_topic(settings.topics.events, len(kafka.events))

    assert kafka.final(good.request_id).kind == EventKind.succeeded
    assert [r.value[:3] for r in dead] == [b"\x80\x04n", b'{"s', b'{"s']
    errors = [header(list(r.headers), "error") for r in dead]
    assert "CodecError" in errors[0] and "width" in errors[1] and "multiple of 8" in errors[1]
    assert "request_id" not in errors[2] and "steps" in errors[2]
    assert [header(list(r.headers), "source-offset") for r in dead] == ["0", "1", "2"]
    assert committed == 4
    # The requester of the readable one hears why, at the origin it named (sealed or not, as it came: delivery
    # checks the seal), on the event topic keyed by its request id like every other event.
    unreadable = kafka.final(bad_width["request_id"])
    assert unreadable.kind == EventKind.failed and unreadable.origin == ORIGIN
    assert unreadable.message.startswith("this request could not be read: invalid GenerateRequest: width")
    assert [e.kind for e in kafka.of(bad_width["request_id"])] == [EventKind.failed]
    [keyed] = [r for r in raw_events if r.key == bad_width["request_id"].encode()]
    assert decode(keyed.value, JobEvent, keyed.headers) == unreadable
    # The one without a request id only went to the DLQ: every event is for a request that named itself.
    assert {e.request_id for e in kafka.events} == {good.request_id, bad_width["request_id"]}
    assert {r.key for r in raw_events} == {good.request_id.encode(), bad_width["request_id"].encode()}


async def test_blocked_prompts_and_images_are_never_generated_stored_or_cached(skill_env, tiny_model, engine):
    settings = consumer_settings(tiny_model, max_wait_ms=0)
    policy = BlockEverything()
    async with Kafka(settings) as kafka, running(settings, engine, image_policy=policy) as worker:
        bad_prompt = await kafka.publish(request("n u d e figure drawing"))
        bad_image = await kafka.publish(request("a gymnast's handstand"))
        await kafka.wait_for(lambda k: k.all_final([bad_prompt.request_id, bad_image.request_id]))
        twice = await kafka.publish(request("a gymnast's handstand"))  # not cached: checked again
        await kafka.wait_for(lambda k: k.all_final([twice.request_id]))

    first = kafka.final(bad_prompt.request_id)
    assert first.kind == EventKind.blocked and "prompt was blocked" in first.message
    assert [e.kind for e in kafka.of(bad_prompt.request_id)] == [EventKind.blocked]
    for r in (bad_image, twice):
        assert kafka.final(r.request_id).kind == EventKind.blocked
        assert kafka.final(r.request_id).message == "Your image was blocked: test."
    assert policy.seen == 2 and sample(worker, "skill_batch_size_count") == 2
    assert sample(worker, "skill_blocked_total", stage="prompt") == 1
    assert sample(worker, "skill_blocked_total", stage="image") == 2
    assert list(skill_env.blob_dir.rglob("*.png")) == [] and len(worker.cache.l1) == 0
    import redis

    client = redis.Redis.from_url(settings.redis_url)
    assert list(client.scan_iter(match=f"{settings.redis_prefix}cache:*")) == []
    client.close()


async def test_adapters_need_a_resolver_and_versions_never_share_a_batch(skill_env, tiny_model, image_policy):
    settings = consumer_settings(tiny_model, max_batch=8, max_wait_ms=300)
    fake = FakeEngine()
    async with Kafka(settings) as kafka:
        async with running(settings, fake, image_policy=image_policy, model_id="fake"):
            named = await kafka.publish(request("a potter's wedging", adapter=AdapterRef.parse("clay@v2")))
            await kafka.wait_for(lambda k: k.all_final([named.request_id]))
        failed = kafka.final(named.request_id)
        assert failed.kind == EventKind.failed and "adapter registry not configured" in failed.message

        resolved: dict[int, ResolvedAdapter] = {}

        def resolve(ref: AdapterRef, team_id: str) -> ResolvedAdapter:
            version = ref.version or 3  # unpinned means the latest
            resolved[version] = ResolvedAdapter(
                name=ref.name, version=version, path=f"/registry/{team_id}/{ref.name}/v{version}",
                sha256=hashlib.sha256(f"{ref.name}@{version}".encode()).hexdigest(),
            )
            return resolved[version]

        async with running(settings, fake, image_policy=image_policy, model_id="fake", resolve_adapter=resolve):
            reqs = [
                await kafka.publish(request("a potter's wedging", adapter=AdapterRef.parse("clay@v2"))),
                await kafka.publish(request("a potter's centering", adapter=AdapterRef.parse("clay@v2"))),
                await kafka.publish(request("a potter's trimming", adapter=AdapterRef.parse("clay"))),
                await kafka.publish(request("a potter's glazing")),
            ]
            await kafka.wait_for(lambda k: k.all_final([r.request_id for r in reqs]))

    assert all(kafka.final(r.request_id).kind == EventKind.succeeded for r in reqs)
    assert kafka.final(reqs[0].request_id).adapter == "clay@v2"
    batches = sorted(((spec.adapter or ""), sorted(prompts)) for spec, prompts in fake.batches)
    assert batches == sorted([
        ("", ["a potter's glazing"]),
        (resolved[2].key, ["a potter's centering", "a potter's wedging"]),
        (resolved[3].key, ["a potter's trimming"]),
    ])
    assert sorted(set(fake.backend.loaded)) == [
        (resolved[2].key, "/registry/local/clay/v2"), (resolved[3].key, "/registry/local/clay/v3"),
    ]


async def test_a_failing_request_is_retried_alone_then_dead_lettered(skill_env, tiny_model, image_policy):
    settings = consumer_settings(tiny_model, max_batch=8, max_wait_ms=300, max_retries=2, retry_backoff_ms=20)
    fake = FakeEngine()
    async with Kafka(settings) as kafka, running(settings, fake, image_policy=image_policy, model_id="fake") as worker:
        reqs = [await kafka.publish(request(p)) for p in ("explode, please", "flaky juggling", "steady juggling")]
        await kafka.wait_for(lambda k: k.all_final([r.request_id for r in reqs]))
        dead = await kafka.read_topic(settings.topics.dlq(settings.topics.generate), 1)

    bad, flaky, steady = (kafka.final(r.request_id) for r in reqs)
    assert bad.kind == EventKind.failed and "after retries" in bad.message
    assert flaky.kind == steady.kind == EventKind.succeeded
    assert [decode(r.value, GenerateRequest).request_id for r in dead] == [reqs[0].request_id]
    assert "the GPU fell over" in header(list(dead[0].headers), "error")
    tries = [prompts for _, prompts in fake.batches if "explode, please" in prompts]
    assert len(tries[0]) == 3 and [len(t) for t in tries[1:]] == [1, 1, 1]  # together once, then alone 1 + 2 retries
    assert sample(worker, "skill_dlq_total", topic=settings.topics.dlq(settings.topics.generate)) == 1


async def test_stop_finishes_the_work_in_hand_commits_and_leaves(skill_env, tiny_model, engine, image_policy):
    settings = consumer_settings(tiny_model, max_batch=8, max_wait_ms=5000)
    async with Kafka(settings) as kafka:
        async with running(settings, engine, image_policy=image_policy) as worker:
            reqs = [await kafka.publish(request(f"a fencer's lunge {i}"), partition=i % 2) for i in range(4)]
            await kafka.wait_for(lambda k: all(any(e.kind == EventKind.queued for e in k.of(r.request_id)) for r in reqs))
            t0 = time.monotonic()
        stopped_in = time.monotonic() - t0  # running() stopped the worker and waited for it
        await kafka.wait_for(lambda k: k.all_final([r.request_id for r in reqs]), timeout_s=5)
        committed = [await kafka.committed(p) for p in (0, 1)]

    assert all(kafka.final(r.request_id).kind == EventKind.succeeded for r in reqs)
    assert stopped_in < 4  # the 5 s batching window was cut short, not waited out
    assert committed == [2, 2]
    assert worker.health() == (False, "stopped")


async def test_a_lease_held_by_another_consumer_is_waited_for_then_taken_over(skill_env, tiny_model, engine, image_policy):
    import redis

    settings = consumer_settings(tiny_model, max_wait_ms=0, lease_poll_ms=20)
    client = redis.Redis.from_url(settings.redis_url)
    async with Kafka(settings) as kafka, running(settings, engine, image_policy=image_policy) as worker:
        # Another consumer is drawing `shared` and finishes it: this one answers from its result.
        shared, dead = request("a rower's catch"), request("a rower's finish")
        shared_key, dead_key = (cache_key(r, worker.model_id, None, worker.policy_id) for r in (shared, dead))
        client.set(f"{settings.redis_prefix}lease:{shared_key}", "other", px=5000)
        # Another consumer took `dead` and was killed: its lease lapses, and this one draws it.
        client.set(f"{settings.redis_prefix}lease:{dead_key}", "killed", px=1000)
        await kafka.publish(shared)
        t0 = time.monotonic()
        await kafka.publish(dead)
        await kafka.wait_for(lambda k: any(e.kind == EventKind.queued for e in k.of(shared.request_id)))
        ref = BlobRef(url="file:///elsewhere/x.png", sha256="b" * 64, bytes=1, seed=1)
        # signed as the other consumer signs it: the same SKILL_SIGNING_KEY
        client.set(f"{settings.redis_prefix}cache:{shared_key}",
                   worker.cache.l2.seal(shared_key, CacheEntry(blobs=[ref], model=worker.model_id)), ex=60)
        client.delete(f"{settings.redis_prefix}lease:{shared_key}")
        await kafka.wait_for(lambda k: k.all_final([shared.request_id, dead.request_id]))
        took_over_after = kafka.arrived[kafka.events.index(kafka.final(dead.request_id))] - t0
    client.close()

    got = kafka.final(shared.request_id)
    assert got.kind == EventKind.succeeded and got.cache_level == "flight" and got.blobs == [ref]
    assert kafka.final(dead.request_id).kind == EventKind.succeeded
    assert took_over_after > 0.9  # it waited for the lapsed lease
    assert sample(worker, "skill_batch_size_count") == 1  # only the dead holder's picture was drawn here


async def test_a_second_consumer_takes_over_unfinished_work_and_nothing_is_lost(skill_env, tiny_model, image_policy, caplog):
    caplog.set_level(logging.INFO, "skillgen.service")  # the service skeleton logs revokes
    settings = consumer_settings(tiny_model, max_batch=1, max_wait_ms=0, redis_url=None)
    first_engine, second_engine = FakeEngine(delay_s=0.25), FakeEngine(delay_s=0.25)
    async with Kafka(settings) as kafka, running(settings, first_engine, image_policy=image_policy, model_id="fake"):
        reqs = [await kafka.publish(request(f"a rower's catch {i}"), partition=i % 4) for i in range(16)]
        await kafka.wait_for(lambda k: sum(k.final(r.request_id) is not None for r in reqs) >= 2)
        async with running(settings, second_engine, image_policy=image_policy, model_id="fake"):
            await kafka.wait_for(lambda k: k.all_final([r.request_id for r in reqs]))
            await asyncio.sleep(0.3)  # the last commits follow the last events
            committed = [await kafka.committed(p) for p in range(4)]

    assert all(kafka.final(r.request_id).kind == EventKind.succeeded for r in reqs)
    assert second_engine.batches, "the second consumer should have taken some partitions"
    revoked = [r.getMessage() for r in caplog.records if r.getMessage().startswith("consumer: partitions revoked")]
    # the first consumer had work in hand when its partitions were revoked: it left it to their next owner
    assert any(int(m.split("): ")[1].split()[0]) > 0 for m in revoked)
    assert committed == [4, 4, 4, 4]


def test_the_registry_resolver_turns_a_missing_adapter_into_a_message_for_the_requester(tmp_path):
    from consumer.worker import registry_resolver
    from skillgen.inference import AdapterError

    resolve = registry_resolver(tmp_path.as_uri())
    with pytest.raises(AdapterError, match="no adapter named 'clay'"):
        resolve(AdapterRef.parse("clay@v2"), "local")
