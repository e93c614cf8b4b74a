"""L2 and the single-flight lease against a real Redis: TTLs, planted pickles, outages, lapsed leases."""

from __future__ import annotations

import asyncio
import logging
import time
from datetime import datetime, timezone

import pytest
import redis

from consumer.cache import L2, CacheEntry, RedisLink
from consumer.flight import Leases
from schemas.messages import BlobRef

pytestmark = pytest.mark.integration

ENTRY = CacheEntry(
    blobs=[BlobRef(url=f"file:///b/{'a' * 64}.png", sha256="a" * 64, bytes=10, seed=1)],
    model="m",
    created_at=datetime(2025, 1, 1, tzinfo=timezone.utc),
)
KEY = b"k" * 32  # what mac_key derives from SKILL_SIGNING_KEY
# protocol-0 pickle of os.system("touch <marker>"): unpickling it would create the marker file
PLANTED = "cposix\nsystem\n(S'touch {marker}'\ntR."


async def test_l2_round_trips_and_every_key_has_a_ttl(redis_server, namespace):
    link = RedisLink(redis_server.url)
    l2 = L2(link, namespace.redis_prefix, ttl_s=60, key=KEY)
    try:
        assert await l2.get("k") is None
        await l2.put("k", ENTRY)
        assert await l2.get("k") == ENTRY
        raw = redis.Redis.from_url(redis_server.url)
        keys = list(raw.scan_iter(match=f"{namespace.redis_prefix}*"))
        assert keys and all(0 < raw.ttl(k) <= 60 for k in keys)
        raw.close()
    finally:
        await link.close()


async def test_a_pickle_planted_under_a_cache_key_is_a_miss_and_never_runs(redis_server, namespace, tmp_path, caplog):
    marker = tmp_path / "pwned"
    raw = redis.Redis.from_url(redis_server.url)
    raw.set(f"{namespace.redis_prefix}cache:k", PLANTED.format(marker=marker).encode(), ex=60)
    link = RedisLink(redis_server.url)
    try:
        with caplog.at_level(logging.WARNING, "skillgen.consumer.cache"):
            assert await L2(link, namespace.redis_prefix, ttl_s=60, key=KEY).get("k") is None
    finally:
        await link.close()
        raw.close()
    assert not marker.exists()
    assert "not a cache entry" in caplog.text


async def test_redis_down_means_misses_one_warning_and_recovery(redis_factory, namespace, caplog):
    server = redis_factory()
    link = RedisLink(server.url, timeout_s=0.5, retry_s=0.2)
    l2 = L2(link, namespace.redis_prefix, ttl_s=60, key=KEY)
    try:
        await l2.put("k", ENTRY)
        server.stop()
        with caplog.at_level(logging.WARNING, "skillgen.consumer.cache"):
            t0 = time.monotonic()
            for _ in range(20):
                assert await l2.get("k") is None
                await l2.put("k2", ENTRY)
            assert time.monotonic() - t0 < 2
        assert caplog.text.count("unreachable") == 1
        server.start()
        await asyncio.sleep(0.25)
        await l2.put("k", ENTRY)
        assert await l2.get("k") == ENTRY and link.up
    finally:
        await link.close()


async def test_a_lease_is_exclusive_and_a_killed_holders_lease_lapses(redis_server, namespace):
    links = [RedisLink(redis_server.url) for _ in range(2)]
    a, b = (Leases(link, namespace.redis_prefix, ttl_s=0.6, poll_ms=20) for link in links)
    l2 = L2(links[1], namespace.redis_prefix, ttl_s=60, key=KEY)
    try:
        held = await a.acquire("k")
        assert held is not None and await b.acquire("k") is None
        await asyncio.sleep(0.9)  # past the TTL: the holder's renewals keep it
        assert await b.acquire("k") is None
        await held.release()
        again = await b.acquire("k")
        assert again is not None

        # the holder dies: nothing renews (its consumer's one renewer stops), nothing releases
        b.close()
        t0 = time.monotonic()
        assert await a.wait("k", l2) is None
        assert 0.3 < time.monotonic() - t0 < 2.0
        assert await a.acquire("k") is not None
    finally:
        for leases in (a, b):
            leases.close()
        for link in links:
            await link.close()


async def test_a_waiter_gets_the_holders_result_from_l2(redis_server, namespace):
    link = RedisLink(redis_server.url)
    leases = Leases(link, namespace.redis_prefix, ttl_s=5, poll_ms=20)
    l2 = L2(link, namespace.redis_prefix, ttl_s=60, key=KEY)
    try:
        held = await leases.acquire("k")

        async def finish() -> None:
            await asyncio.sleep(0.1)
            await l2.put("k", ENTRY)
            await held.release()

        task = asyncio.create_task(finish())
        assert await Leases(link, namespace.redis_prefix, ttl_s=5, poll_ms=20).wait("k", l2) == ENTRY
        await task
    finally:
        await link.close()


async def test_without_redis_every_lease_is_local():
    leases = Leases(None, "p:", ttl_s=1, poll_ms=10)
    first, second = await leases.acquire("k"), await leases.acquire("k")
    assert first is not None and second is not None
    await first.release()
