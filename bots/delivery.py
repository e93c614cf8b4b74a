"""`skillgen bot delivery`: consume `skill.events` (consumer group "delivery") and post to the originating chat.

Per event:
- Not final (queued, started, progress): edit the status message, at most once per SKILL_EDIT_INTERVAL_S per
  message; one that arrives after the result was posted (or while it is being posted), or whose edit fails, is
  dropped, since the next one says more anyway.
- Final (succeeded, failed, blocked, cancelled): one post per request, whatever kind comes first
  (bots/markers.py): take the request's claim, read the images from the blob store, post, mark done. A succeeded
  result's image references are kept first (SKILL_REMEMBER_S), for its Upscale and Vary buttons. A later
  terminal event of the request, of any kind, is dropped and counted
  (`skill_delivery_posts_total{outcome="duplicate"}`): a result that finishes after its cancel is never shown,
  and a cancel that comes after the result changes nothing. A cancelled request's status becomes a short
  "cancelled" line that pings nobody. A terminal event also takes the request off its owner's count of
  requests not yet finished (bots/queued.py, SKILL_MAX_QUEUED_PER_PERSON).
Waiting never holds a partition long. A handler waits in line at most SKILL_MAX_RETRY_AFTER_S (2 s) per pass,
all its waits together: a 429 or a 5xx backoff that would go past it re-queues the event (produced again to
`skill.events` with a `deliver-after` header, its claim kept), and so does another holder's claim that lapses
later. A re-queued event read before its time is parked in memory until then (at most PARK_MAX_S at a time, and
MAX_PARKED events: past that it waits in line for at most the same bound and is re-queued once more), so the
partition goes on with other requests. Every pass through the topic is counted (`delivery-requeues`); past
SKILL_MAX_REQUEUES, or when the platform refuses for good, the event goes to the dead-letter topic with the
reason. A `deliver-after` or `delivery-requeues` header that is not a finite number, or a due time more than a day
ahead, counts as absent (counted in `skill_delivery_bad_headers_total`).
Events run on the one Kafka service skeleton (skillgen.runtime.service), `ordered`: the events of one partition
are handled one after another (a request's events keep their order), partitions in parallel; a parked event keeps
its offset uncommitted until it is answered, so a crash redelivers it. An event's offset is committed once it is
handled, and a commit refused in a rebalance is left to the next one. One bad event is dead-lettered and never
stops the service.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager, suppress
from typing import Protocol

import aiohttp
from aiokafka import ConsumerRecord
from prometheus_client import REGISTRY
from slack_sdk.web.async_client import AsyncWebClient

from bots import image_actions, metrics
from bots.discord_post import DiscordPoster
from bots.errors import BotError, RetryAfter, Transient, Undeliverable
from bots.markers import Busy, Claim, Markers, Posted
from bots.queued import finished
from bots.settings import DeliverySettings
from bots.slack_post import SlackPoster
from schemas.codec import CodecError, decode, header
from schemas.messages import EventKind, JobEvent, Platform
from schemas.topics import DELIVERY_GROUP
from skillgen.runtime.blobstore import BlobStore
from skillgen.runtime.logs import job as job_log
from skillgen.runtime.observability import stop_on_signals
from skillgen.runtime.redis import Store
from skillgen.runtime.service import Job, KafkaService

log = logging.getLogger("skillgen.delivery")

DELIVER_AFTER = "deliver-after"  # epoch seconds, on a re-queued event
REQUEUES = "delivery-requeues"  # passes through the topic so far
CLAIM = "delivery-claim"  # the claim a re-queued final event holds on its request (bots/markers.py)
MAX_IN_HAND = 50  # events fetched and not yet handled, over all partitions
MAX_PARKED = 20  # re-queued events waiting in memory for their time, at most
PARK_MAX_S = 60.0  # the longest one waits in memory before it is re-queued once more
MAX_AHEAD_S = 86400.0  # a due time further ahead than this is not believed
BUSY_RECHECK_S = 5.0  # a final event whose request another holder claims looks again this often
NOW, PARKED, SENT_ON = "now", "parked", "sent on"  # what became of an event that is not due yet


def due_time(raw: str | None, now_s: float) -> float | None:
    """The `deliver-after` header's epoch seconds; None when absent or not believable (not a finite number,
    or more than MAX_AHEAD_S ahead)."""
    if raw is None:
        return None
    try:
        due_s = float(raw)
    except ValueError:
        return None
    return due_s if math.isfinite(due_s) and due_s <= now_s + MAX_AHEAD_S else None


def passes_of(raw: str | None) -> int | None:
    """The `delivery-requeues` header; None when it is not a whole number of passes (absent counts as 0)."""
    if raw is None:
        return 0
    try:
        passes = int(raw.strip())
    except ValueError:
        return None
    return passes if 0 <= passes <= 1_000_000 else None


def wait_s(after_s: float) -> float:
    """A platform's Retry-After, made a usable wait."""
    return min(after_s, MAX_AHEAD_S) if math.isfinite(after_s) and after_s >= 0 else 1.0


class Waits:
    """What one pass of an event may still wait in line, holding its partition: SKILL_MAX_RETRY_AFTER_S for all
    its waits together (its due time, another holder's claim, 429s and 5xx backoffs)."""

    def __init__(self, left_s: float):
        self.left_s = left_s

    def allow(self, seconds: float) -> bool:
        return seconds <= self.left_s

    def spend(self, seconds: float) -> None:
        self.left_s = max(0.0, self.left_s - seconds)


class Poster(Protocol):
    platform: Platform

    def message_key(self, event: JobEvent) -> str | None: ...
    async def status(self, event: JobEvent) -> None: ...
    async def final(self, event: JobEvent, images: list[tuple[str, bytes]]) -> None: ...


class Delivery:
    def __init__(self, settings: DeliverySettings, posters: dict[Platform, Poster], store: Store,
                 blobs: BlobStore | None = None, consumer_options: dict | None = None):
        if settings.signing_key is None:
            raise BotError("delivery posts only where a sealed request points: set SKILL_SIGNING_KEY, the same "
                           "key the bots use (docs/security.md)")
        self.settings = settings
        self.posters = posters
        self.store = store
        self._key = settings.signing_key.get_secret_value().encode()
        self.markers = Markers(store, settings.lease_s, settings.marker_ttl_s, settings.delivery_state_dir)
        self.blobs = blobs or BlobStore(settings.blob_url)
        self.topics = settings.topics
        self._last_edit_s: OrderedDict[str, float] = OrderedDict()
        self._stop = asyncio.Event()  # ends every wait for a re-queued event's time
        self.parked = 0
        # bots.metrics counts on the default registry, so /metrics serves it.
        self.service = KafkaService(
            settings, name="delivery", topic=self.topics.events, group=self.topics.group(DELIVERY_GROUP),
            handle=self._answer, max_in_hand=MAX_IN_HAND, ordered=True, registry=REGISTRY, health=self.health,
            consumer_options=consumer_options,
        )

    @property
    def handled(self) -> int:
        """Events handled (posted, skipped, re-queued or dead-lettered) since start."""
        return self.service.finished

    def stop(self) -> None:
        self._stop.set()
        self.service.stop()

    def health(self) -> tuple[bool, str]:
        platforms = ", ".join(p.value for p in self.posters)
        return True, (f"ok: posting to {platforms}, {self.service.in_hand()} events in hand ({self.parked} waiting "
                      f"for their time), {self.markers.journal.unsynced_count} done markers not yet in Redis")

    async def run(self, ready: Callable[[], None] | None = None) -> None:
        def started() -> None:
            log.info("delivery ready on %s for %s", self.topics.events, ", ".join(p.value for p in self.posters))
            if ready:
                ready()

        flusher = asyncio.create_task(self.markers.keep_flushing())
        try:
            await self.service.run(started)
        finally:
            flusher.cancel()
            with suppress(asyncio.CancelledError):
                await flusher
            await self.markers.flush()

    async def _answer(self, job: Job) -> None:
        if not await self.handle(job.record, job):
            self.service.finish(job)

    async def handle(self, record: ConsumerRecord, job: Job | None = None) -> bool:
        """Handle one event; True when it was parked (its job is finished later, by the parked task)."""
        try:
            event = decode(record.value, JobEvent, record.headers)
        except CodecError as exc:
            await self.service.dead_letter(record, exc)
            return False
        try:
            return await self._handle(record, event, job)
        except Exception as exc:  # one bad event never stops the service
            log.exception("delivery failed", extra=job_log(event.request_id))
            await self.service.dead_letter(record, exc)
            return False

    async def _handle(self, record: ConsumerRecord, event: JobEvent, job: Job | None) -> bool:
        poster = self.posters.get(event.origin.platform)
        if poster is None:
            return False  # the console's events, or a platform this delivery has no token for
        if not event.origin.verify(event.request_id, self._key):
            # Not a request the bots accepted (or one altered on the way): whoever wrote it cannot choose a channel.
            metrics.POSTS.labels(poster.platform.value, event.kind.value, "forged").inc()
            await self.service.dead_letter(record, "the event's origin seal does not verify: not a request the bots "
                                                   "accepted")
            return False
        age_s = time.time() - event.origin.created_at.timestamp()
        if age_s > self.settings.marker_ttl_s:
            # Its "posted" marker may be gone by now: a replayed old event must not post a second time.
            await self.service.dead_letter(record, f"the request is {age_s / 86400:.1f} days old, older than the "
                                                   "delivery markers live (SKILL_MARKER_TTL_S): not posted")
            return False
        if event.kind.terminal and event.job == "generate":
            await finished(self.store, event.origin, event.request_id)  # its owner may queue another (bots/queued.py)
        waits = Waits(self.settings.max_retry_after_s)
        raw = header(record.headers, DELIVER_AFTER)
        due = due_time(raw, time.time())
        if raw is not None and due is None:
            self._bad_header(DELIVER_AFTER, raw, event)
        if due is not None and (what := await self._until(record, job, due, waits)) != NOW:
            return what == PARKED
        if not event.kind.terminal:
            await self._status(poster, event)
            return False
        while True:
            taken = await self.markers.take(event.request_id, event.kind, header(record.headers, CLAIM))
            if not isinstance(taken, Busy):
                break
            # Another holder posts it (or waits to), or died doing so and its claim lapses: look again then, or
            # within BUSY_RECHECK_S, waiting in line only briefly.
            again_s = time.time() + min(taken.left_s, BUSY_RECHECK_S) + 0.05
            if (what := await self._until(record, job, again_s, waits)) != NOW:
                return what == PARKED
        if isinstance(taken, Posted):
            metrics.POSTS.labels(poster.platform.value, event.kind.value, "duplicate").inc()
            log.info("%s dropped: the request's final result (%s) was posted already", event.kind.value,
                     taken.kind or "unknown", extra=job_log(event.request_id))
            return False
        await self._post(record, poster, event, taken, waits)
        return False

    async def _post(self, record: ConsumerRecord, poster: Poster, event: JobEvent, claim: Claim,
                    waits: Waits) -> None:
        try:
            await self._final(poster, event, claim, waits)
        except RetryAfter as exc:
            metrics.RETRIES.labels(poster.platform.value, "requeue_429").inc()
            log.warning("%s; re-queued for %.0fs from now", exc, wait_s(exc.after_s), extra=job_log(event.request_id))
            await self._requeue_claimed(record, claim, time.time() + wait_s(exc.after_s))
        except Transient as exc:
            metrics.RETRIES.labels(poster.platform.value, "requeue_5xx").inc()
            log.warning("%s; re-queued", exc, extra=job_log(event.request_id))
            s = self.settings
            await self._requeue_claimed(record, claim, time.time() + s.backoff_s * 2 ** s.max_attempts)
        except Undeliverable as exc:
            # Retrying cannot help (no access, unknown channel): say so once, for operators.
            await self.markers.done(claim)
            metrics.POSTS.labels(poster.platform.value, event.kind.value, "refused").inc()
            await self.service.dead_letter(record, exc)
        except BaseException:
            await self.markers.release(claim)
            raise
        else:
            await self.markers.done(claim)
            metrics.POSTS.labels(poster.platform.value, event.kind.value, "ok").inc()
            log.info("posted %s", event.kind.value, extra=job_log(event.request_id))

    async def _status(self, poster: Poster, event: JobEvent) -> None:
        if await self.markers.finished(event.request_id):
            return  # late: the result is posted (or being posted) and must not be overwritten
        key = poster.message_key(event)
        if key is None or not self._edit_allowed(key):
            return
        try:
            await poster.status(event)
        except (RetryAfter, Transient, Undeliverable) as exc:
            log.info("status edit dropped: %s", exc, extra=job_log(event.request_id))

    def _edit_allowed(self, key: str) -> bool:
        now = time.monotonic()
        last = self._last_edit_s.get(key)
        if last is not None and now - last < self.settings.edit_interval_s:
            return False
        self._last_edit_s[key] = now
        self._last_edit_s.move_to_end(key)
        while len(self._last_edit_s) > 10_000:
            self._last_edit_s.popitem(last=False)
        return True

    async def _final(self, poster: Poster, event: JobEvent, claim: Claim, waits: Waits) -> None:
        """Post, retrying a 429 or a 5xx in line while the pass's waits allow; past that (or after max_attempts
        tries) the error is raised and the event re-queued."""
        images = []
        if event.kind == EventKind.succeeded:
            # Before the result's Upscale and Vary buttons appear, what their clicks redraw (bots/image_actions.py).
            await image_actions.remember(self.store, event, self.settings.remember_s)
            # Pictures only: a fine-tune's blobs also include its adapter weights.
            pictures = [ref for ref in event.blobs if ref.content_type == "image/png"]
            for i, ref in enumerate(pictures):
                data = await asyncio.to_thread(self.blobs.get, ref)
                images.append((f"skill-{event.request_id[:8]}-{i + 1}.png", data))
        s = self.settings
        for attempt in range(s.max_attempts):
            await self.markers.renew(claim)
            try:
                await poster.final(event, images)
                return
            except RetryAfter as exc:
                error, delay_s, reason = exc, wait_s(exc.after_s), "429"
                if not waits.allow(delay_s) or attempt == s.max_attempts - 1:
                    raise
            except Transient as exc:
                error, delay_s, reason = exc, s.backoff_s * 2**attempt, "5xx"
                if not waits.allow(delay_s) or attempt == s.max_attempts - 1:
                    raise
            metrics.RETRIES.labels(poster.platform.value, reason).inc()
            log.info("%s; waiting %.1fs (try %d)", error, delay_s, attempt + 1, extra=job_log(event.request_id))
            await asyncio.sleep(delay_s)
            waits.spend(delay_s)

    async def _until(self, record: ConsumerRecord, job: Job | None, due_s: float, waits: Waits) -> str:
        """Wait for `due_s`: NOW when it has come (after waiting in line what `waits` allows); PARKED when the job
        waits in memory (its own task takes it up then); SENT_ON when the event was re-queued (or dead-lettered)."""
        left_s = due_s - time.time()
        if left_s <= 0:
            return NOW
        if not waits.allow(left_s) and job is not None and self.parked < MAX_PARKED and not self._stop.is_set():
            self.parked += 1
            self.service.spawn(self._unpark(job, due_s))
            return PARKED
        pause_s = min(left_s, waits.left_s)
        await self._pause(pause_s)
        waits.spend(pause_s)
        if time.time() >= due_s:
            return NOW
        await self.requeue(record, due_s)
        return SENT_ON

    async def _unpark(self, job: Job, due_s: float) -> None:
        try:
            await self._pause(min(due_s - time.time(), PARK_MAX_S))
            if job.abandoned:
                return  # its partition moved: the next owner reads it again
            if time.time() < due_s:  # stopping, or due later than one park lasts
                await self.requeue(job.record, due_s)
            elif await self.handle(job.record, job):
                return  # parked again
            self.service.finish(job)
        except Exception as exc:  # a parked job is always answered
            log.exception("delivery: a parked event failed")
            await self.service.dead_letter(job.record, exc)
            self.service.finish(job)
        finally:
            self.parked -= 1

    async def _pause(self, seconds: float) -> None:
        if seconds > 0:
            with suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), seconds)

    async def _requeue_claimed(self, record: ConsumerRecord, claim: Claim, due_s: float) -> None:
        """Re-queue a final event, keeping its claim until its time (and lease_s more) so no other terminal event
        of the request overtakes it; a claim lost meanwhile travels no further."""
        held = await self.markers.hold(claim, due_s - time.time())
        if not await self.requeue(record, due_s, claim.token if held else None):
            await self.markers.release(claim)

    async def requeue(self, record: ConsumerRecord, due_s: float, claim: str | None = None) -> bool:
        """Produce the event again, due at `due_s`, one more pass counted; False when it went to the DLQ instead."""
        raw = header(record.headers, REQUEUES)
        passes = passes_of(raw)
        if passes is None:
            self._bad_header(REQUEUES, raw, None)
            passes = 0
        passes += 1
        if passes > self.settings.max_requeues:
            await self.service.dead_letter(record, Transient(f"still undelivered after {passes - 1} re-queues "
                                                             "(SKILL_MAX_REQUEUES)"))
            return False
        dropped = (DELIVER_AFTER, REQUEUES, CLAIM) if claim is not None else (DELIVER_AFTER, REQUEUES)
        headers = [(k, v) for k, v in record.headers or () if k not in dropped]
        headers += [(DELIVER_AFTER, f"{due_s:.3f}".encode()), (REQUEUES, str(passes).encode())]
        if claim is not None:
            headers.append((CLAIM, claim.encode()))
        await self.service.emit(self.topics.events, record.value, key=record.key, headers=headers)
        return True

    def _bad_header(self, name: str, raw: str | None, event: JobEvent | None) -> None:
        metrics.BAD_HEADERS.labels(name).inc()
        extra = job_log(event.request_id) if event is not None else None
        log.warning("the %s header %r is not believable: taken as absent", name, (raw or "")[:40], extra=extra)


@asynccontextmanager
async def open_delivery(settings: DeliverySettings, consumer_options: dict | None = None) -> AsyncIterator[Delivery]:
    """A Delivery with a poster for each platform that has a token, and everything it opened closed after."""
    store = Store.from_settings(settings)
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session:
            posters: dict[Platform, Poster] = {}
            if settings.discord_token is not None:
                posters[Platform.discord] = DiscordPoster(
                    session, settings.discord_api_base, settings.discord_token.get_secret_value(), store,
                    settings.webhook_max_age_s, settings.max_retry_after_s,
                )
            if settings.slack_bot_token is not None:
                client = AsyncWebClient(token=settings.slack_bot_token.get_secret_value(), base_url=settings.slack_api_base)
                posters[Platform.slack] = SlackPoster(client, store=store)
            if not posters:
                raise BotError("delivery has nowhere to post: set SKILL_DISCORD_TOKEN and/or SKILL_SLACK_BOT_TOKEN")
            yield Delivery(settings, posters, store, consumer_options=consumer_options)
    finally:
        await store.close()


async def serve(settings: DeliverySettings) -> None:
    async with open_delivery(settings) as delivery:
        stop_on_signals(delivery.stop)
        await delivery.run()


def add_arguments(parser) -> None:
    parser.description = (
        "Post results from skill.events back to Discord (SKILL_DISCORD_TOKEN) and Slack (SKILL_SLACK_BOT_TOKEN)."
    )


def run(args) -> int:
    asyncio.run(serve(DeliverySettings()))
    return 0
