"""Lease and Store against a real redis-server: one holder at a time, only the holder renews or releases, a
lapsed lease is anyone's, and without Redis each lease keeps the policy its use chose."""

from __future__ import annotations

import asyncio
import logging

import pytest

from skillgen.runtime.redis import Lease, RedisLink, Store, WithoutRedis


@pytest.fixture
async def stores(redis_server, namespace):
    """Two stores on the same Redis, as two replicas would have."""
    made = [Store(RedisLink(redis_server.url, decode_responses=True), namespace.redis_prefix) for _ in range(2)]
    yield made
    for store in made:
        await store.close()


async def test_a_lease_is_exclusive_and_only_its_holder_renews_or_releases_it(stores):
    a = Lease(stores[0], "job", 5, WithoutRedis.MEMORY)
    b = Lease(stores[1], "job", 5, WithoutRedis.MEMORY)
    assert await a.acquire()
    assert not await b.acquire()
    assert not await b.renew() and not await b.release()
    assert await stores[1].get("job") == a.token  # b's release left a's lease in place
    assert await a.renew()
    assert await a.release()
    assert await stores[0].get("job") is None
    assert await b.acquire()


async def test_a_lapsed_lease_is_taken_by_another_and_its_old_holder_cannot_touch_it(stores):
    old = Lease(stores[0], "job", 0.2, WithoutRedis.MEMORY)
    assert await old.acquire()
    await asyncio.sleep(0.3)
    new = Lease(stores[1], "job", 5, WithoutRedis.MEMORY)
    assert await new.acquire()
    assert not await old.renew() and not await old.release()
    assert await stores[0].get("job") == new.token
    assert 4 < await stores[0].ttl_s("job") <= 5


async def test_a_lease_kept_renewed_outlives_its_ttl_until_released(stores):
    held = Lease(stores[0], "job", 0.3, WithoutRedis.MEMORY)
    assert await held.acquire()
    held.keep_renewed()
    await asyncio.sleep(0.7)
    assert not await Lease(stores[1], "job", 5, WithoutRedis.MEMORY).acquire()
    assert await held.release()
    await asyncio.sleep(0.2)  # no renewal after release puts it back
    assert await stores[1].get("job") is None


async def test_store_keys_expire_and_delete_if_spares_another_value(stores):
    store = stores[0]
    assert await store.add("k", "one", 5)
    assert not await store.add("k", "two", 5)
    assert 4 < await store.ttl_s("k") <= 5
    assert not await store.delete_if("k", "two")
    assert await store.get("k") == "one"
    assert await store.delete_if("k", "one")
    assert await store.ttl_s("k") is None
    await store.put("p", "v", 0.1)
    await asyncio.sleep(0.2)
    assert await store.get("p") is None


async def test_redis_down_leases_keep_the_policy_each_use_chose(redis_factory, caplog):
    server = redis_factory()
    store = Store(RedisLink(server.url, timeout_s=0.5, retry_s=0.2, decode_responses=True), "t:")
    try:
        server.stop()
        granted = [Lease(store, "flight", 5, WithoutRedis.GRANTED) for _ in range(2)]
        assert [await lease.acquire() for lease in granted] == [True, True]  # work may be done twice
        first, second = (Lease(store, "marker", 5, WithoutRedis.MEMORY) for _ in range(2))
        assert await first.acquire() and not await second.acquire()  # exclusive within this process
        assert not await second.release() and await first.release()
        assert await second.acquire()
        assert caplog.text.count("is unreachable") == 1
        server.start()
        await asyncio.sleep(0.25)
        back = Lease(store, "marker", 5, WithoutRedis.MEMORY)
        assert await back.acquire()  # in Redis again, where nobody held it
        assert store.link.up and await store.link.client.get("t:marker") == back.token
    finally:
        await store.close()


async def test_redis_down_store_keeps_keys_in_memory_and_redis_takes_over_when_back(redis_factory, caplog):
    server = redis_factory()
    store = Store(RedisLink(server.url, timeout_s=0.5, retry_s=0.2, decode_responses=True), "t:")
    try:
        await store.put("before", "redis", 60)
        server.stop()
        with caplog.at_level(logging.WARNING, "skillgen.redis"):
            assert await store.get("before") is None
            assert await store.add("claim", "x", 60) and not await store.add("claim", "y", 60)
            assert await store.get("claim") == "x"
        assert caplog.text.count("Redis unavailable") == 1
        server.start()
        await asyncio.sleep(0.25)
        assert await store.get("claim") is None  # Redis answers again; memory was only for the outage
        assert await store.add("claim", "z", 60)
    finally:
        await store.close()


@pytest.mark.unit
async def test_without_redis_a_store_is_this_process_memory_bounded_in_keys():
    store = Store(None, max_local_keys=2)
    for name in ("a", "b", "c"):
        await store.put(name, name, 60)
    assert [await store.get(n) for n in ("a", "b", "c")] == [None, "b", "c"]  # the oldest written went first
    lease = Lease(store, "b", 60, WithoutRedis.MEMORY)
    assert not await lease.acquire()
    assert await store.delete_if("b", "b") and await lease.acquire()


async def test_thousands_of_concurrent_callers_queue_for_a_connection_instead_of_seeing_an_outage(stores, caplog):
    """A consumer reading ahead 2048 records has that many handlers asking Redis at once: redis-py's default
    pool raises "Too many connections" past 100, which RedisLink took for an outage (leases granted without
    Redis, cache misses). The blocking pool makes them wait for one of its MAX_CONNECTIONS instead."""
    store = stores[0]
    caplog.set_level(logging.WARNING, logger="skillgen.redis")
    results = await asyncio.gather(*(store.incr("many", 1.0, 60) for _ in range(1500)))
    assert max(results) == 1500.0 and store.link.up
    assert "unavailable" not in caplog.text.lower()
