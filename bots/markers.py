"""Delivery's idempotency: one marker per request id (`delivered:{request_id}`), so one final post per request.

The first terminal event (succeeded, failed, blocked or cancelled) to take the marker wins; every later terminal event of the
request, of whatever kind, is dropped. The marker is first a claim (`claim:{kind}:{token}`, expiring after
SKILL_LEASE_S unless renewed) taken before posting, and becomes `done:{kind}` only after the platform answered.
A delivery that crashed holding a claim leaves it to lapse, and the next delivery of the event posts it. An event
re-queued after a 429 or a 5xx keeps its claim past its due time (the token travels in the re-queued record's
`delivery-claim` header and only the same kind may adopt it), so a terminal event arriving meanwhile does not
overtake it.

Done markers are local first. Each is written to this process's journal (memory, plus a line appended to a file
in SKILL_DELIVERY_STATE_DIR) before Redis, and the journal is consulted before Redis on every take: a done marker
there means done, whatever Redis says (one that restarted empty, or was unreachable when the post was made). Those
that did not reach Redis are written back by the first call that does, and by `keep_flushing` every second; a
delivery that restarts reads the file and writes back what it holds. While Redis is unreachable, claims live in
this process's memory (Store's fallback) and are set in Redis again by the next renew.

So a final post is repeated only if
- the process dies after the platform accepted the post and before the journal line is written (`done` writes it
  before its first await, as soon as the poster returns; a machine crash can also lose the journal's last lines,
  which are written but not fsynced); a post of several calls (Slack's update, then the upload) that dies between
  them is retaken from its first call, an edit that repeats harmlessly;
- a claim lapses while its holder still works and another delivery takes it: one try (reading the images, or one
  platform call) slower than SKILL_LEASE_S, since the claim is renewed before each try;
- two delivery processes handle terminal events of one request without seeing each other's marker: both during a
  Redis outage (claims and journals are per process; it takes a rebalance that moves the partition, or the
  request's events published again), or after the one that posted lost its state dir before its done marker
  reached Redis, or after a done marker left the journal (it keeps the newest 100,000 that reached Redis, and
  every one that did not) and Redis lost it too.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hashlib
import json
import logging
import math
import os
import re
import time
import uuid
from collections import OrderedDict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from schemas.messages import TERMINAL_KINDS, EventKind
from skillgen.runtime.redis import Store

log = logging.getLogger("skillgen.delivery")

DONE = "done"
CLAIM = "claim"
LOCAL_MAX = 100_000  # done markers the journal keeps once they are in Redis
FLUSH_BATCH = 500
_TOKEN = re.compile(r"claim:([a-z]+):[0-9a-f]{32}")
_KINDS = {k.value for k in TERMINAL_KINDS}

# Take a claim that is ours or free: extend it while it holds our token, set it while absent.
_ADOPT = ("local v = redis.call('get', KEYS[1]) "
          "if v == ARGV[1] then return redis.call('pexpire', KEYS[1], ARGV[2]) end "
          "if not v then redis.call('set', KEYS[1], ARGV[1], 'PX', ARGV[2]) return 1 end return 0")
_DELETE_IF = "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) end return 0"


@dataclass(frozen=True)
class Claim:
    """Ours to post: then `done`, or `release`, or `hold` it over a re-queue."""

    request_id: str
    kind: EventKind
    token: str


@dataclass(frozen=True)
class Posted:
    """A final result of the request was posted already: `kind` won ("" for a marker that does not say)."""

    kind: str


@dataclass(frozen=True)
class Busy:
    """Another holder claims the request; the claim lapses within `left_s` unless it is done or renewed first."""

    left_s: float


def _ms(seconds: float) -> int:
    return max(1, int(seconds * 1000))


class Journal:
    """Done markers known here, oldest first: in memory and, with a path, in an append-only file a restarted
    delivery reads back. Those not yet written to Redis (`unsynced`) are kept whatever the bound."""

    def __init__(self, path: Path | None, *, track_unsynced: bool = True, max_entries: int = LOCAL_MAX):
        self.path = path
        self.track_unsynced = track_unsynced
        self.max_entries = max_entries
        self._done: OrderedDict[str, tuple[str, float]] = OrderedDict()  # request id -> (kind, expires at, epoch)
        self._unsynced: dict[str, None] = {}
        self._appended = 0
        self._broken = False
        if path is not None:
            for request_id, kind, expires_at in self._compact():
                self._remember(request_id, kind, expires_at)

    def __len__(self) -> int:
        return len(self._done)

    @property
    def unsynced_count(self) -> int:
        return len(self._unsynced)

    def get(self, request_id: str) -> str | None:
        entry = self._done.get(request_id)
        if entry is None:
            return None
        if entry[1] <= time.time():
            del self._done[request_id]
            self._unsynced.pop(request_id, None)
            return None
        return entry[0]

    def add(self, request_id: str, kind: str, expires_at: float) -> None:
        self._remember(request_id, kind, expires_at)
        self._append({"r": request_id, "k": kind, "x": round(expires_at, 3)})

    def unsynced(self, limit: int) -> list[tuple[str, str, float]]:
        out = []
        for request_id in list(self._unsynced):
            kind = self.get(request_id)
            if kind is None:
                continue
            out.append((request_id, kind, self._done[request_id][1]))
            if len(out) >= limit:
                break
        return out

    def synced(self, request_ids: Iterable[str]) -> None:
        for request_id in request_ids:
            self._unsynced.pop(request_id, None)
        self._evict()

    def _remember(self, request_id: str, kind: str, expires_at: float) -> None:
        self._done[request_id] = (kind, expires_at)
        self._done.move_to_end(request_id)
        if self.track_unsynced:
            self._unsynced[request_id] = None
        self._evict()

    def _evict(self) -> None:
        while len(self._done) > self.max_entries:
            oldest = next((r for r in self._done if r not in self._unsynced), None)
            if oldest is None:
                return
            del self._done[oldest]

    # -- the file ---------------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _locked(self, how: int) -> Iterator[None]:
        """Appends share the lock; a compaction (which replaces the file) holds it alone."""
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(self.path.with_suffix(".lock"), os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, how)
            yield
        finally:
            os.close(fd)

    def _append(self, line: dict) -> None:
        if self.path is None or self._broken:
            return
        data = (json.dumps(line, separators=(",", ":")) + "\n").encode()
        try:
            with self._locked(fcntl.LOCK_SH):
                fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
                try:
                    os.write(fd, data)
                finally:
                    os.close(fd)
        except OSError as exc:
            self._broken = True
            log.warning("delivery markers: cannot write %s (%s): done markers are kept in memory only, so a "
                        "restarted delivery will not know those Redis did not get", self.path, exc)
            return
        self._appended += 1
        if self._appended >= self.max_entries:
            self._compact()

    def _compact(self) -> list[tuple[str, str, float]]:
        """The file's live entries (the newest max_entries), written back without the rest."""
        self._appended = 0
        if not self.path.exists():
            return []  # nothing journalled yet: the directory and file are made by the first append
        try:
            with self._locked(fcntl.LOCK_EX):
                try:
                    text = self.path.read_text(encoding="utf-8", errors="replace")
                except FileNotFoundError:
                    return []
                live: OrderedDict[str, tuple[str, float]] = OrderedDict()
                now = time.time()
                for line in text.splitlines():
                    entry = _parse(line)
                    if entry is not None and entry[2] > now:
                        live[entry[0]] = (entry[1], entry[2])
                        live.move_to_end(entry[0])
                while len(live) > self.max_entries:
                    live.popitem(last=False)
                tmp = self.path.with_suffix(".tmp")
                tmp.write_text("".join(json.dumps({"r": r, "k": k, "x": x}, separators=(",", ":")) + "\n"
                                       for r, (k, x) in live.items()), encoding="utf-8")
                os.replace(tmp, self.path)
                return [(r, k, x) for r, (k, x) in live.items()]
        except OSError as exc:
            self._broken = True
            log.warning("delivery markers: cannot use %s (%s): done markers are kept in memory only", self.path, exc)
            return []


def _parse(line: str) -> tuple[str, str, float] | None:
    try:
        entry = json.loads(line)
        request_id, kind, expires_at = entry["r"], entry["k"], float(entry["x"])
    except (ValueError, KeyError, TypeError):
        return None  # a torn last line, or not ours
    if not isinstance(request_id, str) or len(request_id) > 64 or kind not in _KINDS or not math.isfinite(expires_at):
        return None
    return request_id, kind, expires_at


class Markers:
    def __init__(self, store: Store, lease_s: float, done_ttl_s: float, state_dir: Path | None = None):
        self.store = store
        self.lease_s = lease_s
        self.done_ttl_s = done_ttl_s
        path = None
        if state_dir is not None:  # one file per Redis key prefix: deployments sharing a directory stay apart
            path = Path(state_dir) / f"delivered-{hashlib.sha256(store.prefix.encode()).hexdigest()[:12]}.jsonl"
        # Without Redis there is nothing to write back to: the journal alone is the memory.
        self.journal = Journal(path, track_unsynced=store.link is not None)
        self._flushing = asyncio.Lock()

    @staticmethod
    def key(request_id: str) -> str:
        return f"delivered:{request_id}"

    async def take(self, request_id: str, kind: EventKind, token: str | None = None) -> Claim | Posted | Busy:
        """A claim on posting the request's final result (adopting `token`, a claim this event held before it
        was re-queued, when it is still or again free); Posted when a final result went out already; Busy while
        another holder claims it."""
        if (won := self.journal.get(request_id)) is not None:
            return Posted(won)
        await self.flush()
        name = self.key(request_id)
        match = _TOKEN.fullmatch(token or "")
        if match is None or match[1] != kind.value:
            token = f"{CLAIM}:{kind.value}:{uuid.uuid4().hex}"
        while True:
            if await self._adopt(name, token, self.lease_s):
                if legacy := await self._legacy(request_id):
                    await self.store.put(name, f"{DONE}:{legacy}", self.done_ttl_s)
                    return Posted(legacy)
                return Claim(request_id, kind, token)
            value = await self.store.get(name)
            if value is None:
                continue  # lapsed between the two calls
            if value == DONE or value.startswith(DONE + ":"):
                return Posted(value.partition(":")[2])
            left_s = await self.store.ttl_s(name)
            return Busy(left_s if left_s is not None else 0.05)

    async def renew(self, claim: Claim) -> bool:
        """Another lease_s for a claim still ours (set again if Redis lost it); False when another holds it."""
        return await self._adopt(self.key(claim.request_id), claim.token, self.lease_s)

    async def hold(self, claim: Claim, for_s: float) -> bool:
        """Keep the claim `for_s` more seconds (plus lease_s): its event is re-queued until then."""
        return await self._adopt(self.key(claim.request_id), claim.token, max(0.0, for_s) + self.lease_s)

    async def done(self, claim: Claim) -> None:
        """Posted: in the journal first (memory and file, before any await), then in Redis."""
        self.journal.add(claim.request_id, claim.kind.value, time.time() + self.done_ttl_s)
        self.store.memory.delete_if(self.key(claim.request_id), claim.token)
        await self.flush()

    async def release(self, claim: Claim) -> None:
        key = self.store.key(self.key(claim.request_id))
        self.store.memory.delete_if(self.key(claim.request_id), claim.token)
        await self.store.call(lambda r: r.eval(_DELETE_IF, 1, key, claim.token), lambda: 0)

    async def finished(self, request_id: str) -> bool:
        """Whether a final result for the request was posted (or is being posted, or waits to be) already."""
        if self.journal.get(request_id) is not None:
            return True
        return await self.store.get(self.key(request_id)) is not None

    async def flush(self) -> int:
        """Write the done markers Redis has not got yet; how many it took. Skipped while another flush runs."""
        if self.store.link is None or not self.journal.unsynced_count or self._flushing.locked():
            return 0
        written = 0
        async with self._flushing:
            while batch := self.journal.unsynced(FLUSH_BATCH):
                now = time.time()

                async def write(r, batch=batch, now=now) -> bool:
                    async with r.pipeline(transaction=False) as pipe:
                        for request_id, kind, expires_at in batch:
                            pipe.set(self.store.key(self.key(request_id)), f"{DONE}:{kind}", px=_ms(expires_at - now))
                        await pipe.execute()
                    return True

                if not await self.store.call(write, lambda: False):
                    break
                self.journal.synced(request_id for request_id, _, _ in batch)
                written += len(batch)
        if written:
            log.info("delivery markers: %d done markers written back to Redis (%d still waiting)", written,
                     self.journal.unsynced_count)
        return written

    async def keep_flushing(self, every_s: float = 1.0) -> None:
        while True:
            await asyncio.sleep(every_s)
            await self.flush()

    async def _adopt(self, name: str, token: str, ttl_s: float) -> bool:
        key, ms = self.store.key(name), _ms(ttl_s)

        def local() -> bool:
            held = self.store.memory.get(name)
            if held is not None and held != token:
                return False
            self.store.memory.put(name, token, ttl_s)
            return True

        return bool(await self.store.call(lambda r: r.eval(_ADOPT, 1, key, token, ms), local))

    async def _legacy(self, request_id: str) -> str:
        """The kind an earlier version's per-kind marker (`delivered:{id}:{kind}`) says was posted, or "".
        Needed for SKILL_MARKER_TTL_S after the upgrade, then removable."""
        kinds = [k.value for k in TERMINAL_KINDS]
        keys = [self.store.key(f"delivered:{request_id}:{k}") for k in kinds]
        values = await self.store.call(lambda r: r.mget(keys), list)
        return next((k for k, v in zip(kinds, values or []) if v == DONE), "")
