"""L1: an LRU bounded by the bytes its entries take; cache entries are JSON and nothing else."""

from __future__ import annotations

from datetime import datetime, timezone

import pytest
from pydantic import ValidationError

from consumer.cache import L1, CacheEntry
from schemas.messages import BlobRef
from skillgen.runtime.redis import redact

pytestmark = pytest.mark.unit

WHEN = datetime(2025, 1, 2, 3, 4, 5, tzinfo=timezone.utc)


def entry(n: int) -> CacheEntry:
    ref = BlobRef(url=f"file:///b/{n:064x}.png", sha256=f"{n:064x}", bytes=10, width=64, height=64, seed=n)
    return CacheEntry(blobs=[ref], model="m", created_at=WHEN)


def size(key: str, e: CacheEntry) -> int:
    return len(key) + len(e.model_dump_json().encode())


def test_l1_evicts_the_least_recently_used_to_stay_within_its_bytes():
    one = size("k0", entry(0))
    cache = L1(max_bytes=3 * one)
    for n in range(3):
        cache.put(f"k{n}", entry(n))
    assert cache.get("k0") == entry(0)  # k0 is now the most recently used
    cache.put("k3", entry(3))
    assert cache.get("k1") is None
    assert [cache.get(k) is not None for k in ("k0", "k2", "k3")] == [True, True, True]
    assert cache.bytes == 3 * one <= cache.max_bytes


def test_l1_replaces_an_entry_without_counting_it_twice_and_skips_one_too_big():
    cache = L1(max_bytes=10_000)
    cache.put("k", entry(1))
    cache.put("k", entry(1))
    assert cache.bytes == size("k", entry(1)) and len(cache) == 1
    tiny = L1(max_bytes=10)
    tiny.put("k", entry(1))
    assert len(tiny) == 0 and tiny.bytes == 0


def test_entries_round_trip_as_json_and_reject_anything_else():
    e = entry(5)
    assert CacheEntry.model_validate_json(e.model_dump_json()) == e
    with pytest.raises(ValidationError):
        CacheEntry.model_validate_json(b"cos\nsystem\n(S'true'\ntR.")
    with pytest.raises(ValidationError):
        CacheEntry.model_validate_json(b'{"blobs": [], "model": "m"}')


def test_redis_urls_lose_their_password_in_logs():
    assert redact("redis://:s3cret@redis:6379/0") == "redis://:***@redis:6379/0"
    assert redact("redis://redis:6379/0") == "redis://redis:6379/0"
