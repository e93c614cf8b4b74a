"""Issue 13's trust boundary against real redis-servers: whoever can write the cache's Redis cannot get an image
served (planted and foreign-signed entries are misses), the cache lives in its own Redis when
SKILL_CACHE_REDIS_URL is set, and a full Redis costs a dropped entry, never a job."""

from __future__ import annotations

import logging
from datetime import datetime, timezone

import pytest
import redis
from pydantic import SecretStr

from consumer.cache import L1, L2, CacheEntry, RedisLink, TwoLevelCache, cache_link
from consumer.keys import cache_key, no_registry
from consumer.routing import Draw, Hit, Router
from consumer.settings import ConsumerSettings
from schemas.messages import BlobRef, EventKind
from skillgen.safety import Decision, PromptPolicy
from skillgen.safety.fingerprint import policy_fingerprint
from tests.harness import SIGNING_KEY
from tests.integration.test_consumer import (  # noqa: F401 - tiny_model is a fixture
    FakeEngine,
    Kafka,
    consumer_settings,
    request,
    running,
    tiny_model,
)

pytestmark = pytest.mark.integration

MODEL = "model|sha|torch|fp32"
ENTRY = CacheEntry(
    blobs=[BlobRef(url=f"file:///b/{'a' * 64}.png", sha256="a" * 64, bytes=10, seed=1)],
    model="m",
    created_at=datetime(2025, 1, 1, tzinfo=timezone.utc),
)
EVIL_URL = "https://evil.example/planted.png"
EVIL = CacheEntry(blobs=[BlobRef(url=EVIL_URL, sha256="e" * 64, bytes=10)], model="m")
OTHER_KEY = "another-signing-key-that-is-long-enough-0123"


class AllowEverything:
    def check(self, images):
        return [Decision(allowed=True)] * len(images)


def settings_for(url: str | None, prefix: str, cache_url: str | None = None,
                 key: str = SIGNING_KEY) -> ConsumerSettings:
    return ConsumerSettings(_env_file=None, redis_url=url, cache_redis_url=cache_url, redis_prefix=prefix,
                            signing_key=SecretStr(key), cache_ttl_s=60)


class Consumer:
    """What a consumer builds for routing, from its settings: links, a signed L2, the router."""

    def __init__(self, settings: ConsumerSettings, policy: PromptPolicy):
        self.link = RedisLink(settings.redis_url) if settings.redis_url else None
        self.cache_link = cache_link(settings, self.link)
        self.cache = TwoLevelCache(L1(1 << 20), L2.from_settings(settings, self.cache_link))
        self.policy_id = policy_fingerprint()
        self.router = Router(policy, no_registry, self.cache, MODEL, self.policy_id)

    def key(self, req) -> str:
        return cache_key(req, MODEL, None, self.policy_id)

    async def close(self) -> None:
        for link in {id(x): x for x in (self.link, self.cache_link) if x is not None}.values():
            await link.close()


@pytest.fixture(scope="module")
def prompt_policy() -> PromptPolicy:
    return PromptPolicy.from_settings()


def wipe(url: str, prefix: str) -> None:
    client = redis.Redis.from_url(url)
    keys = list(client.scan_iter(match=f"{prefix}*"))
    if keys:
        client.delete(*keys)
    client.close()


@pytest.mark.security
async def test_planted_and_foreign_entries_are_misses_and_genuine_ones_are_shared(redis_server, namespace,
                                                                                  prompt_policy):
    settings = settings_for(redis_server.url, namespace.redis_prefix)
    raw = redis.Redis.from_url(redis_server.url)
    one, two = Consumer(settings, prompt_policy), Consumer(settings, prompt_policy)
    stranger = Consumer(settings_for(redis_server.url, namespace.redis_prefix, key=OTHER_KEY), prompt_policy)
    unsigned, foreign, genuine = request("a juggler's cascade"), request("a juggler's shower"), request("a mills mess")
    try:
        # someone on the network writes valid-looking entries under the exact L2 keys
        raw.set(f"{namespace.redis_prefix}cache:{one.key(unsigned)}", EVIL.model_dump_json(), ex=60)
        raw.set(f"{namespace.redis_prefix}cache:{one.key(foreign)}", stranger.cache.l2.seal(one.key(foreign), EVIL),
                ex=60)
        for req in (unsigned, foreign):
            route = await one.router.route(req)
            assert isinstance(route, Draw) and route.key == one.key(req)  # drawn and checked, nothing served
        assert len(one.cache.l1) == 0

        # a genuine entry is a hit here, and for another consumer with the same SKILL_SIGNING_KEY
        await one.cache.put(one.key(genuine), ENTRY)
        assert await one.router.route(genuine) == Hit(ENTRY, "l1")
        assert await two.router.route(genuine) == Hit(ENTRY, "l2")
        assert isinstance(await stranger.router.route(genuine), Draw)  # another key: a miss, never a wrong answer
    finally:
        for c in (one, two, stranger):
            await c.close()
        raw.close()
        wipe(redis_server.url, namespace.redis_prefix)


async def test_the_cache_lives_in_its_own_redis_when_one_is_set(redis_server, redis_factory, namespace,
                                                                prompt_policy):
    cache_server = redis_factory()
    req, prefix = request("a diabolo's sun"), namespace.redis_prefix
    apart = Consumer(settings_for(redis_server.url, prefix, cache_url=cache_server.url), prompt_policy)
    together = Consumer(settings_for(redis_server.url, prefix + "together:"), prompt_policy)
    cache_only = Consumer(settings_for(None, prefix + "alone:", cache_url=cache_server.url), prompt_policy)
    main, cache = redis.Redis.from_url(redis_server.url), redis.Redis.from_url(cache_server.url)
    try:
        assert apart.cache_link is not apart.link and together.cache_link is together.link
        await apart.cache.put(apart.key(req), ENTRY)
        assert cache.exists(f"{prefix}cache:{apart.key(req)}") and not main.exists(f"{prefix}cache:{apart.key(req)}")
        # unset: the cache uses SKILL_REDIS_URL's
        await together.cache.put(together.key(req), ENTRY)
        assert main.exists(f"{prefix}together:cache:{together.key(req)}")
        assert not cache.exists(f"{prefix}together:cache:{together.key(req)}")
        # only the cache's Redis: L2 works, nothing else has a Redis
        assert cache_only.link is None
        await cache_only.cache.put(cache_only.key(req), ENTRY)
        assert cache.exists(f"{prefix}alone:cache:{cache_only.key(req)}")
    finally:
        for c in (apart, together, cache_only):
            await c.close()
        main.close()
        cache.close()
        wipe(redis_server.url, prefix)


async def test_a_full_noeviction_redis_drops_puts_and_the_link_stays_up(redis_factory, namespace, caplog):
    server = redis_factory()
    admin = redis.Redis.from_url(server.url)
    admin.config_set("maxmemory-policy", "noeviction")
    admin.config_set("maxmemory", 1)  # every write is refused with OOM
    link = RedisLink(server.url)
    l2 = L2(link, namespace.redis_prefix, ttl_s=60, key=b"k" * 32)
    try:
        with caplog.at_level(logging.WARNING, "skillgen"):
            for i in range(3):
                await l2.put(f"k{i}", ENTRY)  # dropped, never raised
                assert await l2.get(f"k{i}") is None
        assert link.up and caplog.text.count("is full") == 1 and "unreachable" not in caplog.text
        admin.config_set("maxmemory", 0)
        await l2.put("k0", ENTRY)
        assert await l2.get("k0") == ENTRY
    finally:
        await link.close()
        admin.close()


@pytest.mark.security
async def test_a_consumer_draws_over_planted_entries_and_caches_only_in_its_cache_redis(
    skill_env, tiny_model, redis_server, redis_factory
):
    cache_server = redis_factory()
    settings = consumer_settings(tiny_model, max_wait_ms=0, cache_redis_url=cache_server.url)
    cache = redis.Redis.from_url(cache_server.url)
    fake = FakeEngine()
    planted, foreign = request("a yo-yo's walk the dog"), request("a yo-yo's rock the baby")
    stranger = L2(RedisLink(cache_server.url), settings.redis_prefix, 60, key=b"x" * 32)
    try:
        async with Kafka(settings) as kafka, running(settings, fake, image_policy=AllowEverything(),
                                                     model_id="fake") as worker:
            keys = {r.request_id: cache_key(r, "fake", None, worker.policy_id) for r in (planted, foreign)}
            name = {rid: f"{settings.redis_prefix}cache:{k}" for rid, k in keys.items()}
            cache.set(name[planted.request_id], EVIL.model_dump_json(), ex=60)
            cache.set(name[foreign.request_id], stranger.seal(keys[foreign.request_id], EVIL), ex=60)
            for r in (planted, foreign):
                await kafka.publish(r)
            await kafka.wait_for(lambda k: k.all_final([planted.request_id, foreign.request_id]))
            stored = {rid: worker.cache.l2.open(keys[rid], cache.get(n)) for rid, n in name.items()}

        for r in (planted, foreign):
            final = kafka.final(r.request_id)
            assert final.kind == EventKind.succeeded and final.cache_level is None  # drawn, not served from L2
            assert all(b.url != EVIL_URL for b in final.blobs)
            assert stored[r.request_id] is not None and stored[r.request_id].blobs == final.blobs  # replaced
        assert sorted(p for _, prompts in fake.batches for p in prompts) == sorted([planted.prompt, foreign.prompt])
        main = redis.Redis.from_url(redis_server.url)
        assert list(main.scan_iter(match=f"{settings.redis_prefix}cache:*")) == []  # not in the correctness Redis
        main.close()
    finally:
        await stranger.link.close()
        cache.close()
