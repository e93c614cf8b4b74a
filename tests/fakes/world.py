"""A delivery under test: fake Discord and Slack, the test's broker and Redis, and events to feed it."""

from __future__ import annotations

import asyncio
import io
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import datetime, timedelta, timezone

from PIL import Image

from bots.credentials import Interactions
from bots.delivery import Delivery, open_delivery
from bots.settings import DeliverySettings
from schemas.codec import encode
from schemas.messages import BlobRef, EventKind, JobEvent, Origin, Platform
from skillgen.runtime.blobstore import BlobStore
from skillgen.runtime.kafka import make_producer
from skillgen.runtime.redis import Store
from tests.fakes import discord as fd
from tests.fakes import slack as fs
from tests.fakes.discord import FakeDiscord, Interaction
from tests.fakes.slack import FakeSlack
from tests.harness import FAST_GROUP, SIGNING_KEY, SkillEnv


def png_bytes(seed: int, size_px: int = 16) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size_px, size_px), (seed % 256, 80, 160)).save(buf, format="PNG")
    return buf.getvalue()


async def _no_commit(*_args) -> None:
    """A delivery that dies after posting and before committing leaves its offsets like this."""


class World:
    def __init__(self, env: SkillEnv, discord: FakeDiscord | None = None, slack: FakeSlack | None = None):
        self.env = env
        self.discord = discord
        self.slack = slack
        self.blobs = BlobStore(env.vars["SKILL_BLOB_URL"])
        self._interactions: dict[Origin, Interaction] = {}  # the Discord bot keeps these in Redis, by request id

    def settings(self, **overrides) -> DeliverySettings:
        # Each test journals delivery's done markers in a directory of its own.
        fields: dict = {"backoff_s": 0.2, "delivery_state_dir": self.env.blob_dir.parent / "delivery-state"}
        if self.discord is not None:
            fields.update(discord_token=self.discord.bot_token, discord_api_base=self.discord.api_base)
        if self.slack is not None:
            fields.update(slack_bot_token=self.slack.bot_token, slack_api_base=self.slack.api_base)
        return DeliverySettings(**{**fields, **overrides})

    @asynccontextmanager
    async def running(self, *, crash_before_commit: bool = False, **overrides) -> AsyncIterator[Delivery]:
        async with open_delivery(self.settings(**overrides), FAST_GROUP) as delivery:
            ready = asyncio.Event()

            def started() -> None:  # the consumer exists now, and nothing was fetched yet
                if crash_before_commit:
                    delivery.service.consumer.commit = _no_commit
                ready.set()

            task = asyncio.create_task(delivery.run(started))
            await asyncio.wait_for(ready.wait(), 20)
            try:
                yield delivery
            finally:
                delivery.stop()
                await task

    async def send(self, *events: JobEvent, headers: list | None = None, seal: bool = True,
                   partition: int | None = None) -> None:
        """Publish events as the consumer would, for requests the bots accepted: each origin sealed for its request
        id (unless `seal=False` or it carries a seal already) and a Discord interaction's token remembered.
        `partition` puts them all on one partition (by default the request id's key chooses)."""
        producer = make_producer(self.settings())
        store = Store.from_settings(self.settings())
        await producer.start()
        try:
            for event in events:
                it = self._interactions.get(event.origin)
                if it is not None:
                    await Interactions(store).remember(event.request_id, fd.APPLICATION_ID, it.token,
                                                       event.origin.created_at)
                if seal and event.origin.seal is None:
                    event = event.model_copy(
                        update={"origin": event.origin.sealed(event.request_id, SIGNING_KEY.encode())})
                value, hdrs = encode(event)
                await producer.send_and_wait(self.env.topics.events, value, key=event.request_id.encode(),
                                             headers=hdrs + (headers or []), partition=partition)
        finally:
            await producer.stop()
            await store.close()

    async def send_raw(self, value: bytes, key: bytes = b"garbage") -> None:
        producer = make_producer(self.settings())
        await producer.start()
        try:
            await producer.send_and_wait(self.env.topics.events, value, key=key)
        finally:
            await producer.stop()

    def image(self, seed: int = 1) -> BlobRef:
        return self.blobs.put(png_bytes(seed), width=16, height=16, seed=seed)

    def discord_origin(self, interaction: Interaction, age_s: float = 0) -> Origin:
        """The origin of a deferred interaction `age_s` old; its token reaches Redis when an event for it is sent."""
        origin = Origin(platform=Platform.discord, team_id=fd.GUILD_ID, channel_id=interaction.channel_id,
                        user_id=fd.USER_ID, created_at=datetime.now(timezone.utc) - timedelta(seconds=age_s))
        self._interactions[origin] = interaction
        return origin

    def slack_origin(self, thread_ts: str | None = None) -> Origin:
        """An origin with a status message already posted, as the Slack bot leaves it."""
        status = fs.SlackMessage(fs.next_ts(), fs.CHANNEL_ID, thread_ts, "queued")
        self.slack.messages[status.ts] = status
        return Origin(platform=Platform.slack, team_id=fs.TEAM_ID, channel_id=fs.CHANNEL_ID, user_id=fs.USER_ID,
                      thread_id=thread_ts, status_message_id=status.ts)


def event(origin: Origin, kind: EventKind, request_id: str, **fields) -> JobEvent:
    defaults = {"prompt": "a drummer's paradiddle"}
    if kind in (EventKind.failed, EventKind.blocked):
        defaults["message"] = "Your prompt was blocked: it asks for graphic violence or gore." \
            if kind == EventKind.blocked else "the adapter team-style@v9 does not exist"
    return JobEvent(request_id=request_id, kind=kind, origin=origin, **{**defaults, **fields})
