"""`skillgen bot delivery`: consume `skill.events` (consumer group "delivery") and post to the originating chat.

Per event:
- Not final (queued, started, progress): edit the status message, at most once per SKILL_EDIT_INTERVAL_S per
  message; one that arrives after the result was posted, or whose edit fails, is dropped, since the next one
  says more anyway.
- Final (succeeded, failed, blocked): take the marker's lease (bots/markers.py), read the images from the blob
  store, post, mark done. A 429 is waited out when its Retry-After is at most SKILL_MAX_RETRY_AFTER_S; a longer
  one re-queues the event (produced again to `skill.events` with a `deliver-after` header) rather than holding
  the partition or dropping the post. A 5xx or a broken connection is retried SKILL_MAX_ATTEMPTS times with
  doubling backoff, then re-queued. After SKILL_MAX_REQUEUES passes, or when the platform refuses for good,
  the event goes to the dead-letter topic with the reason.
Events run on the one Kafka service skeleton (skillgen.runtime.service), `ordered`: the events of one partition
are handled one after another (a request's events keep their order), partitions in parallel, so a channel that is
rate limited holds back only its own partition. An event's offset is committed once it is handled, and a commit
refused in a rebalance is left to the next one. One bad event is dead-lettered and never stops the service.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Protocol

import aiohttp
from aiokafka import ConsumerRecord
from prometheus_client import REGISTRY
from slack_sdk.web.async_client import AsyncWebClient

from bots import metrics
from bots.discord_post import DiscordPoster
from bots.errors import BotError, RetryAfter, Transient, Undeliverable
from bots.markers import Markers
from bots.settings import DeliverySettings
from bots.slack_post import SlackPoster
from schemas.codec import CodecError, decode, header
from schemas.messages import EventKind, JobEvent, Platform
from schemas.topics import DELIVERY_GROUP
from skillgen.runtime.blobstore import BlobStore
from skillgen.runtime.logs import job
from skillgen.runtime.observability import stop_on_signals
from skillgen.runtime.redis import Lease, Store
from skillgen.runtime.service import Job, KafkaService

log = logging.getLogger("skillgen.delivery")

DELIVER_AFTER = "deliver-after"  # epoch seconds, on a re-queued event
REQUEUES = "delivery-requeues"
MAX_IN_HAND = 50  # events fetched and not yet handled, over all partitions


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
        self._key = settings.signing_key.get_secret_value().encode()
        self.markers = Markers(store, settings.lease_s, settings.marker_ttl_s)
        self.blobs = blobs or BlobStore(settings.blob_url)
        self.topics = settings.topics
        self._last_edit_s: OrderedDict[str, float] = OrderedDict()
        self._stop = asyncio.Event()  # ends the wait for a re-queued event's time
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
        return True, f"ok: posting to {platforms}, {self.service.in_hand()} events in hand"

    async def run(self, ready: Callable[[], None] | None = None) -> None:
        def started() -> None:
            log.info("delivery ready on %s for %s", self.topics.events, ", ".join(p.value for p in self.posters))
            if ready:
                ready()

        await self.service.run(started)

    async def _answer(self, job: Job) -> None:
        await self.handle(job.record)
        self.service.finish(job)

    async def handle(self, record: ConsumerRecord) -> None:
        try:
            event = decode(record.value, JobEvent, record.headers)
        except CodecError as exc:
            await self.service.dead_letter(record, exc)
            return
        try:
            await self._handle(record, event)
        except Exception as exc:  # one bad event never stops the service
            log.exception("delivery failed", extra=job(event.request_id))
            await self.service.dead_letter(record, exc)

    async def _handle(self, record: ConsumerRecord, event: JobEvent) -> None:
        poster = self.posters.get(event.origin.platform)
        if poster is None:
            return  # the console's events, or a platform this delivery has no token for
        if not event.origin.verify(event.request_id, self._key):
            # Not a request the bots accepted (or one altered on the way): whoever wrote it cannot choose a channel.
            metrics.POSTS.labels(poster.platform.value, event.kind.value, "forged").inc()
            await self.service.dead_letter(record, "the event's origin seal does not verify: not a request the bots "
                                                   "accepted")
            return
        age_s = time.time() - event.origin.created_at.timestamp()
        if age_s > self.settings.marker_ttl_s:
            # Its "posted" marker may be gone by now: a replayed old event must not post a second time.
            await self.service.dead_letter(record, f"the request is {age_s / 86400:.1f} days old, older than the "
                                                   "delivery markers live (SKILL_MARKER_TTL_S): not posted")
            return
        due = header(record.headers, DELIVER_AFTER)
        if due is not None and not await self._wait_until(float(due)):
            await self.requeue(record, float(due), count=False)
            return
        if not event.kind.terminal:
            await self._status(poster, event)
            return
        lease = await self.markers.take(event.request_id, event.kind)
        if lease is None:
            log.info("%s already posted", event.kind.value, extra=job(event.request_id))
            return
        try:
            await self._final(poster, event, lease)
        except RetryAfter as exc:
            await self.markers.release(lease)
            metrics.RETRIES.labels(poster.platform.value, "requeue_429").inc()
            log.warning("%s; re-queued for %.0fs from now", exc, exc.after_s, extra=job(event.request_id))
            await self.requeue(record, time.time() + exc.after_s)
        except Transient as exc:
            await self.markers.release(lease)
            metrics.RETRIES.labels(poster.platform.value, "requeue_5xx").inc()
            log.warning("%s; re-queued", exc, extra=job(event.request_id))
            await self.requeue(record, time.time() + self.settings.backoff_s * 2 ** self.settings.max_attempts)
        except Undeliverable as exc:
            # Retrying cannot help (no access, unknown channel): say so once, for operators.
            await self.markers.done(lease)
            metrics.POSTS.labels(poster.platform.value, event.kind.value, "refused").inc()
            await self.service.dead_letter(record, exc)
        except BaseException:
            await self.markers.release(lease)
            raise
        else:
            await self.markers.done(lease)
            metrics.POSTS.labels(poster.platform.value, event.kind.value, "ok").inc()
            log.info("posted %s", event.kind.value, extra=job(event.request_id))

    async def _status(self, poster: Poster, event: JobEvent) -> None:
        if await self.markers.finished(event.request_id):
            return  # late: the result is posted (or being posted) and must not be overwritten
        key = poster.message_key(event)
        if key is None or not self._edit_allowed(key):
            return
        try:
            await poster.status(event)
        except (RetryAfter, Transient, Undeliverable) as exc:
            log.info("status edit dropped: %s", exc, extra=job(event.request_id))

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

    async def _final(self, poster: Poster, event: JobEvent, lease: Lease) -> None:
        images = []
        if event.kind == EventKind.succeeded:
            # Pictures only: a fine-tune's blobs also include its adapter weights.
            pictures = [ref for ref in event.blobs if ref.content_type == "image/png"]
            for i, ref in enumerate(pictures):
                data = await asyncio.to_thread(self.blobs.get, ref)
                images.append((f"skill-{event.request_id[:8]}-{i + 1}.png", data))
        s = self.settings
        for attempt in range(s.max_attempts):
            await self.markers.renew(lease)
            try:
                await poster.final(event, images)
                return
            except RetryAfter as exc:
                if exc.after_s > s.max_retry_after_s or attempt == s.max_attempts - 1:
                    raise
                metrics.RETRIES.labels(poster.platform.value, "429").inc()
                log.info("%s; waiting %.1fs", exc, exc.after_s, extra=job(event.request_id))
                await asyncio.sleep(exc.after_s)
            except Transient as exc:
                if attempt == s.max_attempts - 1:
                    raise
                metrics.RETRIES.labels(poster.platform.value, "5xx").inc()
                log.info("%s; retry %d", exc, attempt + 1, extra=job(event.request_id))
                await asyncio.sleep(s.backoff_s * 2**attempt)

    async def _wait_until(self, due_s: float) -> bool:
        """Wait for a re-queued event's time, at most max_retry_after_s; True when it has come."""
        left_s = due_s - time.time()
        if left_s > 0:
            try:
                await asyncio.wait_for(self._stop.wait(), min(left_s, self.settings.max_retry_after_s))
            except TimeoutError:
                pass
        return time.time() >= due_s

    async def requeue(self, record: ConsumerRecord, due_s: float, count: bool = True) -> None:
        passes = int(header(record.headers, REQUEUES) or 0) + (1 if count else 0)
        if passes > self.settings.max_requeues:
            await self.service.dead_letter(record, Transient(f"still undelivered after {passes - 1} re-queues"))
            return
        headers = [(k, v) for k, v in record.headers or () if k not in (DELIVER_AFTER, REQUEUES)]
        headers += [(DELIVER_AFTER, f"{due_s:.3f}".encode()), (REQUEUES, str(passes).encode())]
        await self.service.emit(self.topics.events, record.value, key=record.key, headers=headers)


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
                    settings.webhook_max_age_s,
                )
            if settings.slack_bot_token is not None:
                client = AsyncWebClient(token=settings.slack_bot_token.get_secret_value(), base_url=settings.slack_api_base)
                posters[Platform.slack] = SlackPoster(client)
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
