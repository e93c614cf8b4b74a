"""The two-level result cache: L1 an in-process LRU bounded in bytes, L2 Redis with a TTL on every key.

Values are JSON (blob references plus metadata), validated on the way out: whatever else sits under a cache
key, a pickle included, is a miss and is never executed. Redis is a cache, not a dependency: without it L2
answers a miss to every get and drops every put (the link, skillgen/runtime/redis.py, warns once per outage
and leaves Redis alone for `retry_s` between tries). A full Redis (maxmemory reached under noeviction) drops
the put and leaves the link up.

L2 is outside the trust boundary: whoever reaches its Redis can write any key. So L2 keeps signed envelopes,
`{"entry": "<CacheEntry JSON>", "mac": "<hex HMAC-SHA256>"}`, the MAC over the cache key and the entry's exact
JSON, with a key derived from SKILL_SIGNING_KEY (shared by every consumer, so their entries are each other's
hits). A value whose MAC does not verify (planted, unsigned from before, or signed with another key) is a miss.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import secrets
from collections import OrderedDict
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError
from redis.exceptions import OutOfMemoryError

from schemas.messages import BlobRef
from skillgen.runtime.redis import RedisLink

if TYPE_CHECKING:
    from consumer.settings import ConsumerSettings

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


# The MAC key is derived from SKILL_SIGNING_KEY, which also seals origins: a MAC made for one use is never
# valid for the other.
_MAC_CONTEXT = b"skillgen consumer cache entry v1"
_MAX_WARNED = 1024


def mac_key(signing_key: SecretStr | None) -> bytes | None:
    """The key L2 signs its entries with, from SKILL_SIGNING_KEY; None when it is unset (see `L2`)."""
    if signing_key is None:
        return None
    return hmac.new(signing_key.get_secret_value().encode(), _MAC_CONTEXT, hashlib.sha256).digest()


def cache_link(settings: ConsumerSettings, link: RedisLink | None) -> RedisLink | None:
    """The link to the cache's Redis: SKILL_CACHE_REDIS_URL, the cache's own instance (allkeys-lru), when it is
    set; else `link`, the one to SKILL_REDIS_URL (None when that is unset too: no L2)."""
    url = settings.cache_redis_url
    if not url or url == settings.redis_url:
        return link
    return RedisLink(url, settings.redis_timeout_s, settings.redis_retry_s)


class L2:
    """Signed cache entries in Redis under `prefix`cache:, each with a TTL. Without Redis: a miss, and a put
    dropped. `key` signs and verifies them (`mac_key(settings.signing_key)`); None makes a random key for this
    instance, so its entries are private to this process: correct and safe, only not shared with peers."""

    def __init__(self, link: RedisLink, prefix: str, ttl_s: int, key: bytes | None):
        self.link = link
        self.prefix = prefix + "cache:"
        self.ttl_s = ttl_s
        if key is None:
            log.warning("SKILL_SIGNING_KEY is unset: L2 cache entries are signed with a random key of this "
                        "process, so they are private to it (a peer consumer's entries are misses here, and ours "
                        "there); set the same SKILL_SIGNING_KEY on every consumer to share them")
            key = secrets.token_bytes(32)
        self._key = key
        self._warned: OrderedDict[str, None] = OrderedDict()
        self._full = False

    @classmethod
    def from_settings(cls, settings: ConsumerSettings, link: RedisLink) -> L2:
        """L2 on `link` (see `cache_link`), signed with the key derived from SKILL_SIGNING_KEY."""
        return cls(link, settings.redis_prefix, settings.cache_ttl_s, mac_key(settings.signing_key))

    def _mac(self, key: str, entry_json: str) -> str:
        message = json.dumps([key, entry_json], separators=(",", ":"))  # unambiguous, whatever either holds
        return hmac.new(self._key, message.encode(), hashlib.sha256).hexdigest()

    def seal(self, key: str, entry: CacheEntry) -> str:
        """The envelope stored under `key`."""
        entry_json = entry.model_dump_json()
        return json.dumps({"entry": entry_json, "mac": self._mac(key, entry_json)}, separators=(",", ":"))

    def open(self, key: str, raw: bytes | str) -> CacheEntry | None:
        """The entry in an envelope sealed under `key` with our key; None for anything else."""
        try:
            envelope = json.loads(raw)
        except ValueError:  # not JSON (a pickle, say), or not UTF-8
            envelope = None
        if isinstance(envelope, dict) and envelope.keys() == {"entry", "mac"}:
            entry_json, mac = envelope["entry"], envelope["mac"]
            if isinstance(entry_json, str) and isinstance(mac, str) and hmac.compare_digest(
                mac.encode(), self._mac(key, entry_json).encode()
            ):
                try:
                    return CacheEntry.model_validate_json(entry_json)
                except ValidationError:
                    pass
        self._warn_once(key, len(raw))
        return None

    def _warn_once(self, key: str, size: int) -> None:
        if key in self._warned:
            log.debug("ignoring the value under cache key %s again (%d bytes)", key, size)
            return
        self._warned[key] = None
        if len(self._warned) > _MAX_WARNED:
            self._warned.popitem(last=False)
        # The key, never the value: whoever planted it chose its bytes.
        log.warning("ignoring the value under cache key %s: not a cache entry signed with this consumer's key "
                    "(planted, left from before signing, or signed with another key; %d bytes): a miss", key, size)

    async def get(self, key: str) -> CacheEntry | None:
        raw = await self.link.call(lambda r: r.get(self.prefix + key), None)
        if raw is None:
            return None
        return self.open(key, raw)

    async def put(self, key: str, entry: CacheEntry) -> None:
        value = self.seal(key, entry)

        async def store(r) -> None:
            try:
                await r.set(self.prefix + key, value, ex=self.ttl_s)
            except OutOfMemoryError as exc:  # a full Redis under noeviction: not an outage, the link stays up
                if not self._full:
                    log.warning("cache Redis at %s is full (%s): cache entries are dropped until it has room; "
                                "run the cache's own Redis with maxmemory-policy allkeys-lru (SKILL_CACHE_REDIS_URL)",
                                self.link.url, exc)
                self._full = True
                return
            if self._full:
                self._full = False
                log.info("cache Redis at %s takes entries again", self.link.url)

        await self.link.call(store, None)


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
