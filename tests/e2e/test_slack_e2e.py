"""Slack end to end: a signed /skill request (or an @skillgen mention in a thread) to the real Bolt app -> real
broker -> real consumer (tiny model) -> delivery -> the fake Slack receives the PNG in the right channel and
thread, exactly once, in a new message that mentions the requester."""

import asyncio
import re
import time

import aiohttp
import pytest

from bots import slack_bot
from bots.settings import SlackSettings
from schemas.messages import GenerateRequest, JobEvent
from skillgen.inference import load_engine
from skillgen.tools.embedded import free_port
from tests.fakes.records import TopicReader
from tests.fakes.slack import CHANNEL_ID, USER_ID, FakeSlack, sign
from tests.fakes.system import TINY_DEFAULTS, consumer_running
from tests.fakes.world import World

pytestmark = pytest.mark.e2e
THREAD = "1700000000.000500"


@pytest.fixture(scope="module")
def engine(tiny_model):
    return load_engine(tiny_model, "torch", "cpu", "fp32")


@pytest.fixture
async def slack(skill_env, tiny_model, engine):
    """Fake Slack, the Slack bot in HTTP mode, and the consumer; `slack.command(text)` sends a signed command."""
    fake = await FakeSlack().start()
    port = free_port()
    settings = SlackSettings(**{k.removeprefix("SKILL_").lower(): v for k, v in fake.settings().items()},
                             slack_mode="http", slack_port=port, **TINY_DEFAULTS)
    stop, ready = asyncio.Event(), asyncio.Event()
    bot = asyncio.create_task(slack_bot.serve(settings, stop, ready.set))
    await asyncio.wait_for(ready.wait(), 15)

    async def command(text: str) -> dict:
        body = fake.command_body(text)
        url = f"http://127.0.0.1:{port}/slack/events"
        async with aiohttp.ClientSession() as http, http.post(url, data=body, headers=sign(body)) as resp:
            assert resp.status == 200
            return await resp.json()

    async def mention(text: str) -> None:
        assert await fake.post_event(f"http://127.0.0.1:{port}/slack/events", fake.mention_event(text, thread_ts=THREAD)) == 200

    fake.command, fake.mention = command, mention
    fake.world = World(skill_env, slack=fake)
    try:
        async with consumer_running(tiny_model, engine):
            yield fake
    finally:
        stop.set()
        await bot
        await fake.stop()


async def events_of(env, request_id: str) -> list[JobEvent]:
    async with TopicReader(env.vars["SKILL_KAFKA_BOOTSTRAP"], env.topics.events, JobEvent) as reader:
        await reader.settle(0.5)
    return [e for e in reader.seen if e.request_id == request_id]


async def published(env) -> GenerateRequest:
    async with TopicReader(env.vars["SKILL_KAFKA_BOOTSTRAP"], env.topics.generate, GenerateRequest) as reader:
        [req] = await reader.wait(1)
    return req


async def test_slack_e2e_png_in_the_thread_exactly_once_across_a_delivery_restart(slack, skill_env):
    async with slack.world.running(crash_before_commit=True) as first:
        await slack.mention("a drummer's paradiddle, top view")
        await slack.wait_for(lambda c: c.path == "files.completeUploadExternal", timeout_s=120)
    req = await published(skill_env)
    events = await events_of(skill_env, req.request_id)
    assert events[-1].kind == "succeeded" and first.handled >= len(events)
    # The first delivery posted but committed nothing: the second reads every event again and posts nothing.
    async with slack.world.running() as second:
        deadline = time.monotonic() + 30
        while second.handled < len(events) and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
        assert second.handled >= len(events)
    [png] = slack.pngs(CHANNEL_ID, THREAD)
    assert png.is_png and slack.pngs(CHANNEL_ID) == []
    assert png.initial_comment.startswith(f"✅ <@{USER_ID}> ")  # the result is a new message that pings
    status = slack.messages[req.origin.status_message_id]
    assert status.thread_ts == THREAD and status.text.startswith("✅") and status.text.endswith("done: see below")
    assert status.blocks[-1]["type"] == "actions"


async def test_slack_e2e_a_429_with_retry_after_2_gives_one_post_at_least_2_seconds_later(slack):
    slack.fail("POST", r"^files\.getUploadURLExternal$", 429, headers={"Retry-After": "2"},
               body={"ok": False, "error": "ratelimited"})
    async with slack.world.running():
        await slack.command("a violinist's bow hold")
        [limited] = await slack.wait_for(lambda c: c.status == 429, timeout_s=120)
        [done] = await slack.wait_for(lambda c: c.path == "files.completeUploadExternal", timeout_s=30)
    assert done.at - limited.at >= 2
    assert len(slack.pngs(CHANNEL_ID)) == 1  # a slash command's result goes to the channel


async def test_slack_e2e_a_chinese_speaking_user_gets_the_status_and_the_result_in_chinese(slack):
    slack.locales[USER_ID] = "zh-CN"  # what users.info tells, with include_locale
    async with slack.world.running():
        answer = await slack.command("a cellist's vibrato")
        [done] = await slack.wait_for(lambda c: c.path == "files.completeUploadExternal", timeout_s=120)
        await slack.wait_for(lambda c: c.path == "chat.update" and "已完成" in c.body.get("text", ""), timeout_s=30)
    assert answer["text"] == f"⏳ <@{USER_ID}> queued: _a cellist's vibrato_"  # the ack: not known yet
    [posted] = slack.matching(lambda c: c.path == "chat.postMessage")
    assert posted.body["text"] == f"⏳ <@{USER_ID}> 已排队：_a cellist's vibrato_"
    assert re.fullmatch(rf"✅ <@{USER_ID}> _a cellist's vibrato_（种子 \d+）", done.body["initial_comment"])
    [status] = slack.visible(CHANNEL_ID)
    assert status.text == done.body["initial_comment"] + " · 已完成：见下方"
    for edit in status.edits:  # the consumer's queued and progress lines, as delivery wrote them
        assert re.match(rf"(⏳ <@{USER_ID}> 已排队|🎨 <@{USER_ID}> (正在绘制|.* 第 \d+/\d+ 步)|✅)", edit), edit
