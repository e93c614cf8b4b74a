"""`/skill-train` and `/skill-adapters` in Slack: the real Bolt app (HTTP mode, and Socket Mode once) with the
trainer's extension loaded, against the fake Slack, publishing to a real broker, sessions in a real Redis.

A training is a thread: the command posts a status message, the person shares images in its thread, `go`
fetches them with the bot's token into the blob store and publishes one FineTuneRequest whose Origin points at
that message and whose `images` are blob references: no Slack URL leaves the bot, and the trainer holds no token."""

from __future__ import annotations

import asyncio
import json
import re
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from urllib.parse import parse_qsl

import aiohttp
import numpy as np
import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition
from safetensors.numpy import save

from bots import slack_bot, training_slack
from bots.settings import SlackSettings
from schemas.limits import IngestLimits
from schemas.messages import FineTuneCancel, FineTuneRequest
from skillgen.adapters.recipe import LoraRecipe
from skillgen.adapters.registry import Registry, TrainedBy, TrainingRecord
from skillgen.runtime.blobstore import BlobStore
from skillgen.runtime.fetch import IngestError, download_all
from skillgen.tools.embedded import free_port
from tests.fakes.records import TopicReader
from tests.fakes.slack import (
    CHANNEL_ID,
    TEAM_ID,
    USER_ID,
    FakeSlack,
    SlackMessage,
    sign,
    user,
)
from tests.fakes.world import png_bytes
from trainer.settings import TrainerSettings

OTHER_USER = "U0OTHER"
GROUP = "S0TRAINERS"
BY_USER_ID = {TEAM_ID: {"slack_user_ids": [USER_ID]}}


@pytest.fixture
async def fake_slack() -> AsyncIterator[FakeSlack]:
    fake = await FakeSlack().start()
    yield fake
    await fake.stop()


def bot_env(monkeypatch: pytest.MonkeyPatch, fake: FakeSlack, permissions: dict, adapter_url: str,
            max_images: int = 50) -> None:
    """The extension's settings, as an operator sets them; the fake's file host stands in for files.slack.com."""
    limits = IngestLimits(allowed_hosts=(fake.file_host,), slack_file_hosts=(fake.file_host,), require_https=False,
                          allow_private_addresses=True, max_images=max_images)
    monkeypatch.setenv("SKILL_BOT_EXTENSIONS", "bots.training")
    monkeypatch.setenv("SKILL_TRAIN_PERMISSIONS", json.dumps(permissions))
    monkeypatch.setenv("SKILL_ADAPTER_URL", adapter_url)
    monkeypatch.setenv("SKILL_INGEST", limits.model_dump_json())


class Bot:
    """A running Slack bot in HTTP mode; what Slack would send it, and what it published."""

    def __init__(self, fake: FakeSlack, url: str, http: aiohttp.ClientSession, requests: TopicReader,
                 cancels: TopicReader):
        self.fake, self.url, self.http, self.requests, self.cancels = fake, url, http, requests, cancels

    async def command(self, text: str, command: str = "/skill-train", **kw) -> dict:
        return await self.post(self.fake.command_body(text, command=command, **kw))

    async def post(self, body: str, headers: dict | None = None) -> dict:
        t0 = time.monotonic()
        async with self.http.post(self.url, data=body, headers=headers or sign(body)) as resp:
            assert resp.status == 200 and time.monotonic() - t0 < 3  # Slack's deadline for the ack
            return await resp.json()

    async def event(self, envelope: dict, retry_num: int | None = None) -> None:
        assert await self.fake.post_event(self.url, envelope, retry_num=retry_num) == 200

    async def share(self, thread_ts: str, files: list[tuple[str, bytes]], **kw) -> dict:
        envelope = self.fake.share_files(thread_ts, files, **kw)
        await self.event(envelope)
        return envelope

    async def say(self, thread_ts: str, text: str, **kw) -> None:
        await self.event(self.fake.message_event(thread_ts, text, **kw))

    async def start_thread(self, text: str = "team-style --trigger zq --steps 20", **kw) -> SlackMessage:
        """Run the command and return the status message it posts."""
        posts = len(self.fake.matching(lambda c: c.path == "chat.postMessage"))
        answer = await self.command(text, **kw)
        assert answer["response_type"] == "ephemeral" and "Started a training thread" in answer["text"], answer
        calls = await self.fake.wait_for(lambda c: c.path == "chat.postMessage", count=posts + 1)
        return [m for m in self.fake.messages.values() if m.text == calls[-1].body["text"]][-1]

    async def status_says(self, status: SlackMessage, text: str) -> None:
        """Wait until the status message has been edited to contain `text`."""
        await self.fake.wait_for(lambda c: c.path == "chat.update" and c.body.get("ts") == status.ts
                                 and text in c.body.get("text", ""), timeout_s=10)

    async def replies(self, thread_ts: str, count: int = 1) -> list[str]:
        """The bot's first `count` replies in the thread (the status message itself excluded)."""
        calls = await self.fake.wait_for(
            lambda c: c.path == "chat.postMessage" and c.body.get("thread_ts") == thread_ts, timeout_s=10, count=count)
        return [c.body["text"] for c in calls]

    def thread_posts(self, thread_ts: str) -> list[str]:
        return [m.text for m in self.fake.visible(CHANNEL_ID, thread_ts)]


@asynccontextmanager
async def running_bot(env, fake: FakeSlack, monkeypatch, tmp_path, permissions: dict | None = None,
                      **limits) -> AsyncIterator[Bot]:
    bot_env(monkeypatch, fake, BY_USER_ID if permissions is None else permissions,
            (tmp_path / "adapters").as_uri(), **limits)
    port = free_port()
    settings = SlackSettings(**{k.removeprefix("SKILL_").lower(): v for k, v in fake.settings().items()},
                             slack_mode="http", slack_port=port)
    assert settings.bot_extensions == ["bots.training"]
    stop, ready = asyncio.Event(), asyncio.Event()
    task = asyncio.create_task(slack_bot.serve(settings, stop, ready.set))
    try:
        await asyncio.wait_for(ready.wait(), 15)
        bootstrap = env.vars["SKILL_KAFKA_BOOTSTRAP"]
        async with aiohttp.ClientSession() as http, \
                TopicReader(bootstrap, env.topics.finetune, FineTuneRequest) as requests, \
                TopicReader(bootstrap, env.topics.finetune_cancel, FineTuneCancel) as cancels:
            yield Bot(fake, f"http://127.0.0.1:{port}{settings.slack_path}", http, requests, cancels)
    finally:
        stop.set()
        await task


async def keys_of(env, topic: str, count: int) -> list[bytes]:
    """The Kafka keys of the first `count` records of `topic` (TopicReader keeps values only)."""
    consumer = AIOKafkaConsumer(bootstrap_servers=env.vars["SKILL_KAFKA_BOOTSTRAP"], enable_auto_commit=False)
    await consumer.start()
    try:
        tps = [TopicPartition(topic, p) for p in range(4)]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        keys: list[bytes] = []
        async with asyncio.timeout(10):
            while len(keys) < count:
                keys += [r.key for batch in (await consumer.getmany(timeout_ms=200)).values() for r in batch]
        return keys
    finally:
        await consumer.stop()


def contents(env, req: FineTuneRequest) -> list[bytes]:
    """What the request's blobs hold, read back as the trainer reads them (the store checks each sha256); and the
    request names no Slack URL: the trainer never needs the token to fetch one."""
    assert req.image_urls == [] and "files-pri" not in req.model_dump_json()
    store = BlobStore(env.vars["SKILL_BLOB_URL"])
    return [store.get(ref) for ref in req.images]


@pytest.fixture
async def bot(skill_env, fake_slack, monkeypatch, tmp_path) -> AsyncIterator[Bot]:
    """The bot with U0FAKE allowed to train by user id, so no Slack lookup is needed."""
    async with running_bot(skill_env, fake_slack, monkeypatch, tmp_path) as b:
        yield b


# --------------------------------------------------------------------------------------------- commands


async def test_help_explains_the_thread_flow(bot):
    answer = await bot.command("help")
    assert answer["response_type"] == "ephemeral" and answer["text"] == training_slack.SLACK_HELP
    assert answer["text"].startswith("*/skill-train*") and "reply `go` there" in answer["text"]
    assert bot.fake.messages == {}


async def test_a_bad_option_gets_the_exact_message_and_nothing_else(bot):
    answer = await bot.command("team-style --colour red")
    assert answer["text"] == "unknown option --colour; options are --trigger, --steps, --caption"
    two_words = await bot.command("Team Style")
    assert two_words["text"] == "give one adapter name first, e.g. /skill-train team-style --trigger zq"
    assert bot.fake.messages == {} and await bot.requests.settle(0.5) == []


@pytest.mark.parametrize(
    ("permissions", "says", "asked"),
    [
        ({}, "training is not enabled for this team yet", set()),
        ({TEAM_ID: {"slack_admins": True}}, "training is limited to this workspace's trainers", {"users.info"}),
        ({TEAM_ID: {"slack_usergroup_ids": [GROUP]}}, "training is limited to this workspace's trainers",
         {"usergroups.users.list"}),
    ],
    ids=["no-policy", "not-an-admin", "not-in-the-group"],
)
async def test_who_may_not_train_is_told_why_and_nothing_is_published(
    skill_env, fake_slack, monkeypatch, tmp_path, permissions, says, asked
):
    fake_slack.usergroups[GROUP] = [OTHER_USER]
    async with running_bot(skill_env, fake_slack, monkeypatch, tmp_path, permissions) as b:
        train = await b.command("team-style")
        cancel = await b.command("cancel team-style")
        assert says in train["text"] and says in cancel["text"]
        assert {c.path for c in fake_slack.calls} - {"auth.test"} == asked  # only what the policy needs
        assert fake_slack.messages == {}
        assert await b.requests.settle(0.5) == [] and await b.cancels.settle(0.1) == []


@pytest.mark.parametrize(
    ("flags", "policy", "asked"),
    [({"is_admin": True}, {"slack_admins": True, "slack_usergroup_ids": [GROUP]}, {"users.info"}),
     ({"is_owner": True}, {"slack_admins": True}, {"users.info"}),
     ({}, {"slack_usergroup_ids": [GROUP, "S0OTHERS"]}, {"usergroups.users.list"})],
    ids=["admin", "owner", "usergroup"],
)
async def test_workspace_admins_and_usergroup_members_may_train(skill_env, fake_slack, monkeypatch, tmp_path,
                                                                flags, policy, asked):
    fake_slack.users[USER_ID] = user(USER_ID, **flags)
    fake_slack.usergroups.update({GROUP: [OTHER_USER, USER_ID], "S0OTHERS": [OTHER_USER]})
    async with running_bot(skill_env, fake_slack, monkeypatch, tmp_path, {TEAM_ID: policy}) as b:
        status = await b.start_thread()
        assert status.text.startswith(f"📎 <@{USER_ID}> training `team-style`: reply in this thread")
        assert {c.path for c in fake_slack.calls} - {"auth.test", "chat.postMessage"} == asked


@pytest.mark.security
async def test_a_caption_the_prompt_policy_blocks_is_refused_when_the_command_is_parsed(bot):
    answer = await bot.command("team-style --caption a nude figure, zq style")
    assert re.fullmatch(r"--caption refused\. Your prompt was blocked: it asks for sexual content or nudity\. "
                        r"\(ref [0-9a-f]{8}\)", answer["text"]), answer["text"]
    assert bot.fake.messages == {} and await bot.requests.settle(0.5) == []


async def test_a_missing_scope_is_named_for_the_admin(skill_env, fake_slack, monkeypatch, tmp_path):
    fake_slack.fail("GET", r"^usergroups\.users\.list$", 200, times=5,
                    body={"ok": False, "error": "missing_scope", "needed": "usergroups:read"})
    policy = {TEAM_ID: {"slack_usergroup_ids": [GROUP]}}
    async with running_bot(skill_env, fake_slack, monkeypatch, tmp_path, policy) as b:
        answer = await b.command("team-style")
    assert answer["text"] == ("I cannot check who may train here: Slack answered `missing_scope` "
                              "(this app needs the `usergroups:read` scope: ask a workspace admin)")


async def test_who_may_train_is_asked_again_at_go(skill_env, fake_slack, monkeypatch, tmp_path):
    fake_slack.usergroups[GROUP] = [USER_ID]
    policy = {TEAM_ID: {"slack_usergroup_ids": [GROUP]}}
    async with running_bot(skill_env, fake_slack, monkeypatch, tmp_path, policy) as b:
        status = await b.start_thread()
        fake_slack.usergroups[GROUP] = [OTHER_USER]  # taken out of the trainers' group meanwhile
        await b.share(status.ts, [("a.png", png_bytes(1))], text="go")
        [reply] = await b.replies(status.ts)
        assert reply.startswith("❌ training is limited to this workspace's trainers") and "Nothing was sent" in reply
        assert await b.requests.settle(0.5) == []


async def test_a_retried_command_starts_one_thread(bot):
    body = bot.fake.command_body("team-style", command="/skill-train")
    first = await bot.post(body)
    retry = await bot.post(body, {**sign(body), "X-Slack-Retry-Num": "1", "X-Slack-Retry-Reason": "http_timeout"})
    assert retry["text"] == first["text"] and "Started a training thread for `team-style`" in first["text"]
    await asyncio.sleep(0.5)
    assert len(bot.fake.visible(CHANNEL_ID)) == 1


async def test_one_pending_thread_per_adapter_name(bot):
    await bot.start_thread("team-style")
    again = await bot.command("team-style --steps 30")
    assert again["text"] == ("A training of `team-style` is already waiting for its images in a thread: reply `go` "
                             "or `cancel` there, or run `/skill-train cancel team-style`.")
    assert len(bot.fake.visible(CHANNEL_ID)) == 1


# ----------------------------------------------------------------------------------------------- thread


async def test_images_in_the_thread_then_go_publish_one_request_pointing_at_the_status_message(bot, skill_env):
    status = await bot.start_thread("team-style --trigger zq --steps 20 --caption a flat icon")
    assert status.thread_ts is None  # a new message in the channel: its thread is the training's
    first = await bot.share(status.ts, [("a.png", png_bytes(1)), ("b.jpg", png_bytes(2))])
    await bot.status_says(status, "Received so far: 2 images.")
    await bot.event(first, retry_num=1)  # Slack delivers the same event again: nothing is counted twice
    await bot.share(status.ts, [("c.webp", png_bytes(3))], stubs=True)  # completed with files.info
    await bot.status_says(status, "Received so far: 3 images.")
    await bot.say(status.ts, "Go!")

    [req] = await bot.requests.wait(1)
    # The bot fetched each file with its own token, in the order shared, into the blob store.
    assert contents(skill_env, req) == [f.data for f in bot.fake.user_files.values()]
    fetched = bot.fake.matching(lambda c: c.path.startswith("files-pri/"))
    assert [c.status for c in fetched] == [200] * 3
    assert {c.headers.get("Authorization") for c in fetched} == {f"Bearer {bot.fake.bot_token}"}
    assert (req.adapter, req.trigger, req.steps, req.caption) == ("team-style", "zq", 20, "a flat icon")
    o = req.origin
    assert (o.platform, o.team_id, o.channel_id, o.user_id) == ("slack", TEAM_ID, CHANNEL_ID, USER_ID)
    assert o.thread_id == o.status_message_id == status.ts
    assert await keys_of(skill_env, skill_env.topics.finetune, 1) == [f"{TEAM_ID}/team-style".encode()]
    assert bot.fake.matching(lambda c: c.path == "files.info")
    await bot.status_says(status, f"⏳ <@{USER_ID}> training `team-style` queued: 3 images")

    # The thread is spent: `go` again publishes nothing and says why; the name is free for a new thread.
    await bot.say(status.ts, "go")
    [reply] = await bot.replies(status.ts)
    assert reply.startswith("`team-style` was already sent to the trainer")
    assert len(await bot.requests.settle(0.5)) == 1
    assert "Started a training thread" in (await bot.command("team-style"))["text"]


async def test_a_command_carries_no_thread_so_training_starts_a_thread_on_its_status_message(bot):
    # Slack never runs a slash command in a thread: the status message is always the thread's root.
    assert "thread_ts" not in bot.fake.command_body("team-style")
    status = await bot.start_thread("team-style")
    assert status.thread_ts is None
    await bot.share(status.ts, [("a.png", png_bytes(1))], text="go")
    [req] = await bot.requests.wait(1)
    assert (req.origin.thread_id, req.origin.status_message_id) == (status.ts, status.ts)


async def test_a_mention_in_a_training_thread_is_left_to_the_training(bot):
    # Slack sends an app_mention as well as the message: the /skill listener leaves a training thread alone.
    status = await bot.start_thread("team-style")
    await bot.event(bot.fake.mention_event("a drummer's paradiddle", thread_ts=status.ts))
    await asyncio.sleep(1)
    assert not bot.fake.matching(lambda c: c.path in ("chat.postMessage", "chat.postEphemeral")
                                 and "paradiddle" in c.body.get("text", ""))


async def test_files_and_words_from_someone_else_are_ignored(bot, skill_env):
    status = await bot.start_thread("team-style")
    await bot.share(status.ts, [("theirs.png", png_bytes(5))], user_id=OTHER_USER)
    await bot.say(status.ts, "go", user_id=OTHER_USER)
    await bot.say(status.ts, "cancel", user_id=OTHER_USER)
    await asyncio.sleep(0.5)
    assert not bot.fake.matching(lambda c: c.path == "chat.update") and bot.thread_posts(status.ts) == []
    await bot.share(status.ts, [("mine.png", png_bytes(6))], text="go")
    [req] = await bot.requests.wait(1)
    assert contents(skill_env, req) == [png_bytes(6)]


@pytest.mark.parametrize(
    ("first", "then", "says"),
    [
        ([], [("notes.txt", b"hello")],
         "File 1 is text/plain: share PNG, JPEG or WebP images, or one zip of them.\nNothing was sent"),
        ([], [("loop.gif", b"GIF89a")],
         "File 1 is image/gif: share PNG, JPEG or WebP images, or one zip of them.\nNothing was sent"),
        ([("a.png", png_bytes(1))], [("more.zip", b"PK\x03\x04")],
         ("File 2 not added: send one zip or images, not both; this thread already has 1 image (reply `cancel` "
         "and start again to send a zip instead).\nNot started: reply `go` again to train on the 1 image received.")),
        ([("set.zip", b"PK\x03\x04")], [("a.png", png_bytes(1))],
         ("File 2 not added: this thread already has 1 zip, and a zip comes alone.\n"
         "Not started: reply `go` again to train on the 1 zip received.")),
        ([("a.png", png_bytes(1)), ("b.png", png_bytes(2))], [("c.png", png_bytes(3))],
         ("File 3 not added: at most 2 images per training.\n"
         "Not started: reply `go` again to train on the 2 images received.")),
    ],
    ids=["text", "gif", "zip-after-images", "image-after-zip", "too-many"],
)
async def test_a_file_that_cannot_train_is_refused_by_position(skill_env, fake_slack, monkeypatch, tmp_path, first,
                                                               then, says):
    async with running_bot(skill_env, fake_slack, monkeypatch, tmp_path, max_images=2) as b:
        status = await b.start_thread("team-style")
        if first:
            await b.share(status.ts, first)
            await b.status_says(status, "Received so far")
        await b.share(status.ts, then, text="go")
        [reply] = await b.replies(status.ts)
        assert reply.startswith(f"❌ {says}")
        assert not [name for name, _ in then if name in reply]  # the sender's file names stay out of the channel
        assert await b.requests.settle(0.5) == []


async def test_go_before_any_file_asks_for_the_images(bot):
    status = await bot.start_thread("team-style")
    await bot.say(status.ts, "go")
    [reply] = await bot.replies(status.ts)
    assert reply == "Share the training images (PNG, JPEG or WebP) or one zip in this thread first, then reply `go`."
    assert await bot.requests.settle(0.5) == []


async def test_two_uploads_at_once_are_both_counted(bot, skill_env):
    status = await bot.start_thread("team-style")
    await asyncio.gather(*(bot.share(status.ts, [(f"{i}.png", png_bytes(i))]) for i in range(4)))
    await bot.status_says(status, "Received so far: 4 images.")
    await bot.say(status.ts, "go")
    [req] = await bot.requests.wait(1)
    assert sorted(contents(skill_env, req)) == sorted(png_bytes(i) for i in range(4))


async def test_go_is_acked_at_once_and_the_files_are_fetched_after(bot, skill_env):
    status = await bot.start_thread("team-style")
    bot.fake.file_delay_s = 3.5  # past Slack's 3 seconds: the event must be answered before the download
    t0 = time.monotonic()
    await bot.share(status.ts, [("a.png", png_bytes(1))], text="go")
    assert time.monotonic() - t0 < 3
    [req] = await bot.requests.wait(1)
    assert time.monotonic() - t0 >= 3.5 and contents(skill_env, req) == [png_bytes(1)]


@pytest.mark.security
async def test_a_file_slack_will_not_serve_at_go_is_named_by_position_and_the_thread_kept(bot, skill_env):
    status = await bot.start_thread("team-style")
    await bot.share(status.ts, [("a.png", png_bytes(1)), ("<!here>.png", png_bytes(2))])
    await bot.status_says(status, "Received so far: 2 images.")
    second = list(bot.fake.user_files)[1]
    bot.fake.fail("GET", rf"^files-pri/{TEAM_ID}-{second}/", 500)
    await bot.say(status.ts, "go")
    [reply] = await bot.replies(status.ts)
    assert reply == "❌ file 2: 127.0.0.1: the server answered HTTP 500. Nothing was sent to the trainer."
    assert await bot.requests.settle(0.5) == []
    await bot.say(status.ts, "go")  # the files are kept: the next `go` sends them
    [req] = await bot.requests.wait(1)
    assert contents(skill_env, req) == [png_bytes(1), png_bytes(2)]


async def test_cancel_in_the_thread_drops_it(bot):
    status = await bot.start_thread("team-style")
    await bot.share(status.ts, [("a.png", png_bytes(1))])
    await bot.status_says(status, "1 image")
    await bot.say(status.ts, "cancel")
    await bot.status_says(status, f"🗑️ <@{USER_ID}> training `team-style` dropped: nothing was sent to the trainer.")
    await bot.say(status.ts, "go")
    await asyncio.sleep(0.5)
    assert await bot.requests.settle(0.1) == [] and bot.thread_posts(status.ts) == []


async def test_skill_train_cancel_publishes_a_cancel_and_drops_a_pending_thread(bot, skill_env):
    status = await bot.start_thread("team-style")
    answer = await bot.command("cancel team-style")
    assert answer["text"] == "Asked the trainer to stop `team-style`."
    [cancel] = await bot.cancels.wait(1)
    assert cancel.adapter == "team-style" and cancel.origin.team_id == TEAM_ID and cancel.origin.user_id == USER_ID
    assert await keys_of(skill_env, skill_env.topics.finetune_cancel, 1) == [f"{TEAM_ID}/team-style".encode()]
    await bot.status_says(status, "dropped: nothing was sent to the trainer")
    await bot.share(status.ts, [("late.png", png_bytes(1))], text="go")
    assert await bot.requests.settle(0.5) == []


# ------------------------------------------------------------------------------------------ adapters


def publish_adapter(registry: Registry, team_id: str, name: str) -> None:
    rng = np.random.default_rng(0)
    weights = save({"unet.to_q.lora.down.weight": rng.standard_normal((4, 8), dtype=np.float32),
                    "unet.to_q.lora.up.weight": rng.standard_normal((8, 4), dtype=np.float32)})
    registry.publish(team_id, name, weights, TrainingRecord(
        request_id=uuid.uuid4().hex, trained_by=TrainedBy(platform="slack", user_id=USER_ID, channel_id=CHANNEL_ID),
        trigger="zq", base_model="tiny", base_model_sha256="ab" * 32, recipe=LoraRecipe(), steps=20,
        resolution_px=64, dataset_sha256="cd" * 32, images=3, loss_curve=[(10, 0.2)], seconds=1.0,
    ))


async def test_skill_adapters_lists_this_teams_adapters_only(bot, tmp_path):
    registry = Registry((tmp_path / "adapters").as_uri())
    for _ in range(2):
        publish_adapter(registry, TEAM_ID, "team-style")
    publish_adapter(registry, "T0ELSEWHERE", "their-secret")
    ours = await bot.command("", command="/skill-adapters")
    assert ours["response_type"] == "ephemeral"
    assert ours["text"].startswith("Your team's adapters:\n• `team-style`: v1, v2 (latest v2: trigger `zq`, 20 steps")
    assert "their-secret" not in ours["text"]
    theirs = await bot.command("", command="/skill-adapters", team_id="T0NOBODY")
    assert theirs["text"].startswith("Your team has no adapters yet")


# ------------------------------------------------------------------------------------ Socket Mode and files


async def test_socket_mode_carries_the_thread_events_too(skill_env, fake_slack, monkeypatch, tmp_path):
    bot_env(monkeypatch, fake_slack, BY_USER_ID, (tmp_path / "adapters").as_uri())
    settings = SlackSettings(**{k.removeprefix("SKILL_").lower(): v for k, v in fake_slack.settings().items()},
                             slack_mode="socket")
    stop, ready = asyncio.Event(), asyncio.Event()
    task = asyncio.create_task(slack_bot.serve(settings, stop, ready.set))
    try:
        await asyncio.wait_for(ready.wait(), 15)
        ack = await fake_slack.send_socket("slash_commands", dict(parse_qsl(
            fake_slack.command_body("team-style", command="/skill-train"))))
        assert "Started a training thread" in ack["payload"]["text"]
        [post] = await fake_slack.wait_for(lambda c: c.path == "chat.postMessage")
        status_ts = next(iter(fake_slack.messages))
        await fake_slack.send_socket("events_api", fake_slack.share_files(status_ts, [("a.png", png_bytes(1))],
                                                                          text="go"))
        async with TopicReader(skill_env.vars["SKILL_KAFKA_BOOTSTRAP"], skill_env.topics.finetune,
                               FineTuneRequest) as reader:
            [req] = await reader.wait(1)
        assert req.origin.status_message_id == status_ts and len(req.images) == 1 and req.image_urls == []
        assert post.body["text"].startswith("📎")
    finally:
        stop.set()
        await task


@pytest.mark.security
async def test_only_the_bot_fetches_a_shared_file_with_its_token_and_the_trainer_holds_none(fake_slack):
    url = fake_slack.share_files("1.2", [("a.png", png_bytes(1))])["event"]["files"][0]["url_private_download"]
    limits = IngestLimits(allowed_hosts=(fake_slack.file_host,), require_https=False, allow_private_addresses=True)
    with pytest.raises(IngestError, match=r"^file 1: 127\.0\.0\.1: the server answered HTTP 403$"):  # not a Slack host
        await download_all([url], limits, slack_token=fake_slack.bot_token)
    with_host = limits.model_copy(update={"slack_file_hosts": (fake_slack.file_host,)})
    [(name, data)] = await download_all([url], with_host, slack_token=fake_slack.bot_token)
    assert (name, data) == ("a.png", png_bytes(1))
    seen = [c.headers.get("Authorization") for c in fake_slack.calls if c.path.startswith("files-pri/")]
    assert seen == [None, f"Bearer {fake_slack.bot_token}"]
    assert not [f for f in TrainerSettings.model_fields if "token" in f or "slack" in f]  # nothing to send it with
