"""The two-level result cache: L1 an in-process LRU bounded in bytes, L2 Redis with a TTL on every key.

Values are JSON (blob references plus metadata), validated on the way out: whatever else sits under a cache
key, a pickle included, is a miss and is never executed. Redis is a cache, not a dependency: without it L2
answers a miss to every get and drops every put (the link, skillgen/runtime/redis.py, warns once per outage
and leaves Redis alone for `retry_s` between tries).
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from datetime import datetime, timezone
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from schemas.messages import BlobRef
from skillgen.runtime.redis import RedisLink

log = logging.getLogger("skillgen.consumer.cache")

Level = Literal["l1", "l2"]


class CacheEntry(BaseModel):
    """A finished request's images, as blob references, and what made them."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    blobs: list[BlobRef] = Field(min_length=1, max_length=16)
    model: str = Field(max_length=2000)
    created_at: datetime = Field(default_factory=lambda: datetime.now(timezone.utc))


class L1:
    """LRU over encoded entries, bounded by the bytes they take (0 turns it off)."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self.bytes = 0
        self._data: OrderedDict[str, bytes] = OrderedDict()

    def __len__(self) -> int:
        return len(self._data)

    def get(self, key: str) -> CacheEntry | None:
        raw = self._data.get(key)
        if raw is None:
            return None
        self._data.move_to_end(key)
        return CacheEntry.model_validate_json(raw)

    def put(self, key: str, entry: CacheEntry) -> None:
        raw = entry.model_dump_json().encode()
        size = len(key) + len(raw)
        if size > self.max_bytes:
            return
        old = self._data.pop(key, None)
        if old is not None:
            self.bytes -= len(key) + len(old)
        self._data[key] = raw
        self.bytes += size
        while self.bytes > self.max_bytes:
            k, v = self._data.popitem(last=False)
            self.bytes -= len(k) + len(v)


class L2:
    """Cache entries in Redis under `prefix`cache:, each with a TTL. Without Redis: a miss, and a put dropped."""

    def __init__(self, link: RedisLink, prefix: str, ttl_s: int):
        self.link = link
        self.prefix = prefix + "cache:"
        self.ttl_s = ttl_s

    async def get(self, key: str) -> CacheEntry | None:
        raw = await self.link.call(lambda r: r.get(self.prefix + key), None)
        if raw is None:
            return None
        try:
            return CacheEntry.model_validate_json(raw)
        except ValidationError:
            log.warning("ignoring a value under cache key %s that is not a cache entry (%d bytes)", key, len(raw))
            return None

    async def put(self, key: str, entry: CacheEntry) -> None:
        await self.link.call(lambda r: r.set(self.prefix + key, entry.model_dump_json(), ex=self.ttl_s), None)


class TwoLevelCache:
    def __init__(self, l1: L1, l2: L2 | None = None):
        self.l1 = l1
        self.l2 = l2

    async def get(self, key: str) -> tuple[CacheEntry, Level] | None:
        entry = self.l1.get(key)
        if entry is not None:
            return entry, "l1"
        if self.l2 is not None:
            entry = await self.l2.get(key)
            if entry is not None:
                self.l1.put(key, entry)
                return entry, "l2"
        return None

    async def put(self, key: str, entry: CacheEntry) -> None:
        self.l1.put(key, entry)
        if self.l2 is not None:
            await self.l2.put(key, entry)
