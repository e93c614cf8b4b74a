"""The Slack front-end: the real Bolt app (HTTP mode and Socket Mode) against a fake Slack, publishing to a
real broker. Signed requests, retries and refusals behave as Slack and the person expect."""

import asyncio
import json
import time
from urllib.parse import parse_qsl, quote

import aiohttp
import pytest
from slack_sdk.web.async_client import AsyncWebClient

from bots import locales, render, slack_bot
from bots.intake import CANCELLING, FORGOTTEN, NOT_ALLOWED, NOT_OWNER
from bots.settings import SlackSettings
from bots.slack_locale import SlackLocales
from schemas.messages import (
    EventKind,
    GenerateCancel,
    GenerateRequest,
    Origin,
    Platform,
)
from skillgen.runtime import groupview
from skillgen.runtime.groupview import ConsumerView, Queued
from skillgen.runtime.redis import Store
from skillgen.runtime.settings import CommonSettings
from skillgen.tools.embedded import free_port
from tests.fakes.records import TopicReader
from tests.fakes.slack import (
    BOT_TOKEN,
    CHANNEL_ID,
    SIGNING_SECRET,
    TEAM_ID,
    USER_ID,
    FakeSlack,
    sign,
)
from tests.fakes.world import World, event, png_bytes
from tests.harness import SIGNING_KEY


@pytest.fixture
async def fake_slack():
    fake = await FakeSlack().start()
    yield fake
    await fake.stop()


@pytest.fixture
async def bot(skill_env, fake_slack, request):
    """A running bot in HTTP mode; `bot.url` takes Slack's requests, `bot.requests` reads skill.generate. A test
    changes its settings with parametrize("bot", [{...}], indirect=True)."""
    port = free_port()
    overrides = {"rate_user_per_min": 3, **getattr(request, "param", {})}
    settings = SlackSettings(**{k.removeprefix("SKILL_").lower(): v for k, v in fake_slack.settings().items()},
                             slack_mode="http", slack_port=port, **overrides)
    stop, ready = asyncio.Event(), asyncio.Event()
    task = asyncio.create_task(slack_bot.serve(settings, stop, ready.set))
    await asyncio.wait_for(ready.wait(), 15)

    class Bot:
        url = f"http://127.0.0.1:{port}{settings.slack_path}"
        fake = fake_slack

        async def post(self, body: str, headers: dict | None = None) -> tuple[int, dict | str, float]:
            t0 = time.monotonic()
            async with self.http.post(self.url, data=body, headers=headers or sign(body)) as resp:
                text = await resp.text()
                try:
                    answer = json.loads(text) if text else ""
                except ValueError:
                    answer = text
                return resp.status, answer, time.monotonic() - t0

        async def command(self, text: str, **kw) -> tuple[int, dict | str, float]:
            return await self.post(fake_slack.command_body(text, **kw))

    b = Bot()
    async with aiohttp.ClientSession() as b.http, TopicReader(
        skill_env.vars["SKILL_KAFKA_BOOTSTRAP"], skill_env.topics.generate, GenerateRequest
    ) as b.requests:
        yield b
    stop.set()
    await task


async def test_a_command_is_acked_queued_and_published_with_its_status_message(bot):
    status, answer, took_s = await bot.command("a drummer's paradiddle --n 2")
    assert status == 200 and took_s < 3
    assert answer["response_type"] == "ephemeral" and "queued (2 images)" in answer["text"]
    [req] = await bot.requests.wait(1)
    assert req.prompt == "a drummer's paradiddle" and req.num_images == 2
    o = req.origin
    assert (o.platform, o.team_id, o.channel_id, o.user_id) == ("slack", "T0FAKE", CHANNEL_ID, USER_ID)
    assert o.thread_id is None  # a slash command never comes from a thread
    [status_msg] = bot.fake.visible(CHANNEL_ID)
    assert o.status_message_id == status_msg.ts and "queued" in status_msg.text


async def test_in_a_public_channel_it_is_not_in_the_bot_joins_then_posts(bot):
    bot.fake.channel("C0PUBLIC", bot_member=False)
    _, answer, took_s = await bot.command("a drummer's paradiddle", channel_id="C0PUBLIC")
    assert "queued" in answer["text"] and took_s < 3
    [req] = await bot.requests.wait(1)
    assert bot.fake.matching(lambda c: c.path == "conversations.join" and c.body["channel"] == "C0PUBLIC")
    [status_msg] = bot.fake.visible("C0PUBLIC")
    assert req.origin.status_message_id == status_msg.ts
    await bot.command("a second one", channel_id="C0PUBLIC")  # known now: no second look
    await bot.requests.wait(2)
    assert len(bot.fake.matching(lambda c: c.path.startswith("conversations."))) == 2  # info, join


@pytest.mark.parametrize("where", ["private", "public without channels:join"])
async def test_a_channel_it_is_not_in_and_cannot_join_gets_how_to_invite_and_nothing_is_published(bot, where):
    bot.fake.channel("C0CLOSED", private=where == "private", bot_member=False)
    if where != "private":
        bot.fake.scopes.discard("channels:join")
    status, answer, took_s = await bot.command("a drummer's paradiddle", channel_id="C0CLOSED")
    assert status == 200 and took_s < 3 and answer["response_type"] == "ephemeral"
    assert "`/invite @skillgen`" in answer["text"] and "queued" not in answer["text"]
    assert await bot.requests.settle(0.5) == [] and bot.fake.visible("C0CLOSED") == []
    assert bot.fake.matching(lambda c: c.path == "chat.postMessage") == []


async def test_a_slow_membership_check_still_acks_in_time_and_the_status_post_reports(bot):
    bot.fake.channel("C0SLOW", private=True, bot_member=False)
    bot.fake.delays["conversations.info"] = 2.5
    status, answer, took_s = await bot.command("a drummer's paradiddle", channel_id="C0SLOW")
    assert status == 200 and took_s < 2.5 and "queued" in answer["text"]
    await bot.fake.wait_for(lambda c: c.path.startswith("/respond/"), timeout_s=10)
    assert "`/invite @skillgen`" in bot.fake.ephemerals[-1].text
    assert await bot.requests.settle(0.5) == [] and bot.fake.visible("C0SLOW") == []


@pytest.mark.parametrize("in_thread", [True, False])
async def test_a_mention_runs_the_skill_grammar_in_its_thread(bot, in_thread):
    thread = "1700000000.000700" if in_thread else None
    envelope = bot.fake.mention_event("a drummer's paradiddle --ar 16:9", thread_ts=thread)
    assert await bot.fake.post_event(bot.url, envelope) == 200
    assert await bot.fake.post_event(bot.url, envelope, retry_num=1) == 200  # Slack's retry: no second job
    [req] = await bot.requests.wait(1)
    assert req.prompt == "a drummer's paradiddle" and req.width > req.height
    where = thread or envelope["event"]["ts"]  # a mention in the channel starts a thread on itself
    assert req.origin.thread_id == where and req.origin.user_id == USER_ID
    [status_msg] = [m for m in bot.fake.visible(CHANNEL_ID, where) if m.text.startswith("⏳")]
    assert req.origin.status_message_id == status_msg.ts
    assert len(await bot.requests.settle(0.5)) == 1


async def test_a_refused_mention_is_answered_to_the_sender_alone_in_the_thread(bot):
    envelope = bot.fake.mention_event("a cat --steps 99", thread_ts="1700000000.000800")
    await bot.fake.post_event(bot.url, envelope)
    [call] = await bot.fake.wait_for(lambda c: c.path == "chat.postEphemeral")
    assert call.body["thread_ts"] == "1700000000.000800" and call.body["user"] == USER_ID
    assert "--steps: Input should be less than or equal to 50" in call.body["text"]
    assert await bot.requests.settle(0.5) == []


async def test_a_slack_retry_of_the_same_command_creates_no_second_job(bot):
    body = bot.fake.command_body("a violinist's bow hold")
    first = await bot.post(body)
    retry = await bot.post(body, {**sign(body), "X-Slack-Retry-Num": "1", "X-Slack-Retry-Reason": "http_timeout"})
    assert first[0] == retry[0] == 200 and retry[1]["text"] == first[1]["text"]
    assert len(await bot.requests.settle()) == 1
    assert len(bot.fake.visible(CHANNEL_ID)) == 1


async def test_bad_signatures_and_stale_timestamps_get_401_and_publish_nothing(bot):
    body = bot.fake.command_body("a forged command")
    assert (await bot.post(body, sign(body, secret="not-the-secret")))[0] == 401
    stale = bot.fake.command_body("a replayed command")
    assert (await bot.post(stale, sign(stale, SIGNING_SECRET, timestamp=int(time.time()) - 6 * 60)))[0] == 401
    unsigned = bot.fake.command_body("an unsigned command")
    assert (await bot.post(unsigned, {"Content-Type": "application/x-www-form-urlencoded"}))[0] == 401
    await bot.command("the real one")
    assert [r.prompt for r in await bot.requests.settle()] == ["the real one"]
    assert [m.text for m in bot.fake.visible(CHANNEL_ID)] == [f"⏳ <@{USER_ID}> queued: _the real one_"]


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("a cat --steps 99", "--steps: Input should be less than or equal to 50"),
        ("a cat --colour red", "unknown option --colour"),
        ("a nude figure study", "Your prompt was blocked: it asks for sexual content or nudity."),
        ("help", "*/skill* draws a skill image"),
    ],
)
async def test_refusals_and_help_answer_only_the_sender(bot, text, says):
    status, answer, _ = await bot.command(text)
    assert status == 200 and answer["response_type"] == "ephemeral" and says in answer["text"]
    assert await bot.requests.settle(0.5) == [] and bot.fake.visible(CHANNEL_ID) == []


async def test_help_is_in_the_persons_language_once_it_is_known(bot):
    bot.fake.locales[USER_ID] = "zh-CN"
    _, answer, _ = await bot.command("help")  # nothing known yet (users.info is asked only after a job's ack)
    assert answer["text"].startswith("*/skill* draws a skill image")
    await bot.command("a juggler's cascade")
    await bot.requests.wait(1)  # its status was posted in Chinese: the language is held now
    _, answer, _ = await bot.command("帮助")
    assert answer["response_type"] == "ephemeral" and answer["text"].startswith("*/skill* 画一张技能图并发在这里。")
    assert "`/skill &lt;提示词&gt; [--no &lt;不要的内容&gt;]" in answer["text"]  # `<` escaped for mrkdwn
    await bot.fake.post_event(bot.url, bot.fake.mention_event("help"))  # a mention's help, in the thread
    [told] = await bot.fake.wait_for(lambda c: c.path == "chat.postEphemeral")
    assert told.body["text"].startswith("*/skill* 画一张技能图")


async def test_over_the_rate_limit_the_person_is_told_when_to_retry(bot):
    for i in range(3):
        await bot.command(f"study {i}")
    _, answer, _ = await bot.command("one too many")
    assert "You have reached your limit of 3 requests per minute. Try again in" in answer["text"]
    assert len(await bot.requests.settle()) == 3


async def test_a_chinese_user_once_known_is_refused_in_chinese_by_the_grammar_and_the_rate_limit(bot):
    bot.fake.locales[USER_ID] = "zh-CN"
    await bot.command("study 0")
    await bot.requests.wait(1)  # after its ack the bot asked users.info: zh, held from now on
    _, answer, _ = await bot.command("a cat --steps lots")
    assert answer["text"] == "--steps 必须是整数，收到的是 'lots'；例如 --steps 20"
    for i in (1, 2):
        await bot.command(f"study {i}")
    _, answer, _ = await bot.command("one too many")
    assert answer["text"].startswith("你已达到你的上限（每分钟 3 个请求）。请 ")
    assert len(await bot.requests.settle()) == 3


async def test_reroll_and_variations_buttons_publish_new_seeds_in_the_same_thread(bot):
    await bot.fake.post_event(bot.url, bot.fake.mention_event("a juggler's cascade --seed 11",
                                                              thread_ts="1700000000.000200"))
    [original] = await bot.requests.wait(1)
    status_msg = bot.fake.messages[original.origin.status_message_id]
    status_msg.blocks = render.slack_blocks("✅ done", original.request_id)  # as delivery leaves it
    for action in ("skill_reroll", "skill_vary"):
        payload = bot.fake.button_payload(status_msg, action, user_id="U0OTHER")
        body = "payload=" + quote(json.dumps(payload))
        status, _, took_s = await bot.post(body)
        assert status == 200 and took_s < 3
    remixes = [r for r in await bot.requests.wait(3) if r.request_id != original.request_id]
    # different keys, so possibly different partitions: tell them apart by size, not by order
    reroll, vary = sorted(remixes, key=lambda r: r.num_images)
    for req in (reroll, vary):
        assert req.prompt == original.prompt and req.seed != original.seed and req.request_id != original.request_id
        assert req.origin.user_id == "U0OTHER" and req.origin.thread_id == "1700000000.000200"
    assert reroll.num_images == 1 and reroll.reroll == 1 and vary.num_images == 4
    assert len(bot.fake.visible(CHANNEL_ID, "1700000000.000200")) == 4  # the mention and three status messages


async def test_a_channel_the_bot_cannot_post_in_gets_instructions_and_no_job(bot):
    bot.fake.fail("POST", r"^chat\.postMessage$", 200, body={"ok": False, "error": "not_in_channel"})
    await bot.command("a lonely drummer")
    await bot.fake.wait_for(lambda c: c.path.startswith("/respond/"))
    assert "add me with `/invite @skillgen`" in bot.fake.ephemerals[-1].text
    assert await bot.requests.settle(0.5) == []


async def test_a_channel_it_cannot_post_in_is_said_in_the_persons_known_language(bot):
    bot.fake.locales[USER_ID] = "zh-CN"
    await bot.command("a drummer's paradiddle")
    await bot.requests.wait(1)  # its ack was followed by users.info: zh, held from now on
    bot.fake.channel("C0CLOSED", private=True, bot_member=False)
    _, answer, _ = await bot.command("a second", channel_id="C0CLOSED")
    assert answer["text"] == "我不在这个频道里：请用 `/invite @skillgen` 添加我，然后再运行一次命令。"
    bot.fake.channel("D0OTHERS", private=True, bot_member=False)
    _, answer, _ = await bot.command("a third", channel_id="D0OTHERS")
    assert answer["text"].startswith("我无法在这个对话中发消息")
    assert len(await bot.requests.settle(0.5)) == 1


async def test_in_a_dm_it_is_not_in_it_says_where_to_run_the_command(bot):
    bot.fake.channel("D0OTHERS", private=True, bot_member=False)  # a DM between two people
    _, answer, _ = await bot.command("a drummer's paradiddle", channel_id="D0OTHERS")
    assert answer["text"].startswith("I cannot post in this conversation: run the command in a channel I am in")
    assert await bot.requests.settle(0.5) == []


@pytest.fixture
def other_teams_only(skill_env, monkeypatch):
    """SKILL_ALLOWED_TEAMS without the fakes' workspace and server (set before the bot fixture reads it)."""
    monkeypatch.setenv("SKILL_ALLOWED_TEAMS", "slack:T0OTHER,discord:123456789012345678")


@pytest.mark.security
async def test_a_workspace_outside_allowed_teams_is_refused_and_nothing_is_published(other_teams_only, bot):
    status, answer, _ = await bot.command("a violinist's bow hold")
    assert status == 200 and answer["response_type"] == "ephemeral"
    assert answer["text"] == NOT_ALLOWED.format(where="Slack workspace", who=f"slack:{TEAM_ID}")
    assert await bot.requests.settle(0.5) == [] and bot.fake.visible(CHANNEL_ID) == []


@pytest.mark.security
async def test_a_prompt_with_a_broadcast_and_a_link_is_shown_as_text_through_delivery(bot, skill_env):
    prompt = "<!here> see <https://evil.example|docs>"
    _, answer, _ = await bot.command(prompt)
    [req] = await bot.requests.wait(1)
    assert req.prompt == prompt  # the request keeps what was typed; only what is shown is escaped
    world = World(skill_env, slack=bot.fake)
    async with world.running():
        await world.send(event(req.origin, EventKind.succeeded, req.request_id, prompt=req.prompt,
                               blobs=[world.image()]))
        await bot.fake.wait_for(lambda c: c.path == "files.completeUploadExternal")
    [status_msg] = bot.fake.visible(CHANNEL_ID)
    assert status_msg.edits[-1].startswith(f"✅ <@{USER_ID}> _")
    section = status_msg.blocks[0]["text"]
    assert section["verbatim"] is True and section["text"] == status_msg.text
    [result] = bot.fake.matching(lambda c: c.path == "files.completeUploadExternal")
    assert result.body["initial_comment"].startswith(f"✅ <@{USER_ID}> _")  # the new message that pings
    shown = [answer["text"], *[c.body["text"] for c in bot.fake.matching(lambda c: c.path == "chat.postMessage")],
             *status_msg.edits, section["text"], result.body["initial_comment"]]
    for text in shown:
        assert "<!here>" not in text and "<https:" not in text and "|docs>" not in text
        assert "&lt;!here&gt; see &lt;https://evil.example|docs&gt;" in text
        assert text.count("<") == 1  # the requester's own mention, nothing else


async def test_socket_mode_takes_commands_over_the_websocket(skill_env, fake_slack):
    settings = SlackSettings(**{k.removeprefix("SKILL_").lower(): v for k, v in fake_slack.settings().items()},
                             slack_mode="socket")
    stop, ready = asyncio.Event(), asyncio.Event()
    task = asyncio.create_task(slack_bot.serve(settings, stop, ready.set))
    try:
        await asyncio.wait_for(ready.wait(), 15)
        body = dict(parse_qsl(fake_slack.command_body("a cellist")))
        ack = await fake_slack.send_socket("slash_commands", body)
        assert "queued" in ack["payload"]["text"]
        mention = fake_slack.mention_event("a violist --ar 16:9", thread_ts="1700000000.000900")
        await fake_slack.send_socket("events_api", mention)  # an app_mention comes the same way
        async with TopicReader(skill_env.vars["SKILL_KAFKA_BOOTSTRAP"], skill_env.topics.generate,
                               GenerateRequest) as reader:
            cellist, violist = sorted(await reader.wait(2), key=lambda r: r.prompt)
        assert cellist.prompt == "a cellist" and cellist.origin.status_message_id and cellist.origin.thread_id is None
        assert violist.prompt == "a violist" and violist.origin.thread_id == "1700000000.000900"
    finally:
        stop.set()
        await task


async def test_relax_publishes_in_the_relax_lane_and_says_so(bot):
    _, answer, _ = await bot.command("a cellist's bow hold --relax")
    [req] = await bot.requests.wait(1)
    assert req.lane == "relax" and req.prompt == "a cellist's bow hold"
    assert answer["text"] == f"⏳ <@{USER_ID}> queued · relax mode: _a cellist's bow hold_"


async def publish_view(queued_units: float, s_per_unit: float = 2.0) -> None:
    """What a consumer publishes about its queue (another team's backlog), in the test's Redis."""
    store = Store.from_settings(CommonSettings())
    try:
        await groupview.publish(store.link, store.prefix, ConsumerView(
            consumer="gpu-0", at=time.time(), s_per_unit=s_per_unit,
            queued={groupview.flow("fast", "T0OTHER"): Queued(requests=40, units=queued_units)}))
    finally:
        await store.close()


async def test_a_busy_group_refuses_new_work_and_a_quieter_one_gives_position_and_eta(bot):
    await publish_view(queued_units=1000)  # 2000 s of work, the bound 1800 s
    status, answer, took_s = await bot.command("a drummer's paradiddle")
    assert status == 200 and took_s < 3 and answer["response_type"] == "ephemeral"
    assert answer["text"] == "busy: about 33 min of work is queued; try again in about 4 min"
    assert await bot.requests.settle(0.5) == [] and bot.fake.visible(CHANNEL_ID) == []
    await publish_view(queued_units=100)  # 200 s
    _, answer, _ = await bot.command("a drummer's paradiddle")
    [req] = await bot.requests.wait(1)
    assert answer["text"].startswith(f"⏳ <@{USER_ID}> queued, position ~") and ", ready by <!date^" in answer["text"]
    [status_msg] = bot.fake.visible(CHANNEL_ID)
    assert status_msg.text == answer["text"] and status_msg.text.endswith(" UTC>: _a drummer's paradiddle_")


def responses(bot) -> list:
    return bot.fake.matching(lambda c: c.path.startswith("/respond/"))


@pytest.mark.security
async def test_only_the_owner_can_cancel_and_a_cancelled_request_pings_nobody(bot, skill_env):
    await bot.command("a juggler's cascade")
    [req] = await bot.requests.wait(1)
    status_msg = bot.fake.messages[req.origin.status_message_id]
    [_, actions] = status_msg.blocks  # the status carries the Cancel button
    assert [(e["action_id"], e["value"]) for e in actions["elements"]] == [("skill_cancel", req.request_id)]
    async with TopicReader(skill_env.vars["SKILL_KAFKA_BOOTSTRAP"], skill_env.topics.generate_cancel,
                           GenerateCancel) as cancels:
        # Someone else in the channel: told privately, nothing published.
        payload = bot.fake.button_payload(status_msg, "skill_cancel", user_id="U0OTHER")
        status, _, took_s = await bot.post("payload=" + quote(json.dumps(payload)))
        assert status == 200 and took_s < 3
        [said] = await bot.fake.wait_for(lambda c: c.path.startswith("/respond/"))
        assert said.body["text"] == NOT_OWNER and said.body["response_type"] == "ephemeral"
        assert await cancels.settle(0.5) == []
        # The owner: the cancel published with their origin, sealed, and they are told privately.
        payload = bot.fake.button_payload(status_msg, "skill_cancel")
        status, _, took_s = await bot.post("payload=" + quote(json.dumps(payload)))
        assert status == 200 and took_s < 3
        [cancel] = await cancels.wait(1)
        assert cancel.request_id == req.request_id and cancels.keys == [req.request_id.encode()]
        assert (cancel.origin.team_id, cancel.origin.user_id) == (TEAM_ID, USER_ID)
        assert cancel.origin.verify(req.request_id, SIGNING_KEY.encode())
        _, said = await bot.fake.wait_for(lambda c: c.path.startswith("/respond/"), count=2)
        assert said.body["text"] == CANCELLING and said.body["response_type"] == "ephemeral"
    # The consumer answers with `cancelled`; a result that still comes after it is never shown.
    world = World(skill_env, slack=bot.fake)
    async with world.running() as delivery:
        await world.send(event(req.origin, EventKind.cancelled, req.request_id, prompt=req.prompt),
                         event(req.origin, EventKind.succeeded, req.request_id, prompt=req.prompt,
                               blobs=[world.image()]))
        await bot.fake.wait_for(lambda c: c.path == "chat.update")
        while delivery.handled < 2:
            await asyncio.sleep(0.05)
    assert status_msg.text == "🛑 cancelled: _a juggler's cascade_" and len(status_msg.blocks) == 1  # no buttons
    # Nothing new in the channel (no result, nothing that mentions anyone), and nobody told anything more.
    assert bot.fake.visible(CHANNEL_ID) == [status_msg] and bot.fake.files == []
    assert len(bot.fake.matching(lambda c: c.path == "chat.postMessage")) == 1  # the bot's own status
    assert len(responses(bot)) == 2 and bot.fake.matching(lambda c: c.path == "chat.postEphemeral") == []



@pytest.mark.parametrize("bot", [{"max_queued_per_person": 2, "rate_user_per_min": 10}], indirect=True)
async def test_a_person_with_too_many_requests_waiting_is_refused_until_delivery_finishes_one(bot, skill_env):
    for prompt in ("a cellist's vibrato", "a drummer's rimshot"):
        assert "queued" in (await bot.command(prompt))[1]["text"]
    first, _ = sorted(await bot.requests.wait(2), key=lambda r: r.prompt)
    status, answer, took_s = await bot.command("a third")
    assert status == 200 and took_s < 3 and answer["response_type"] == "ephemeral"
    assert answer["text"] == "you already have 2 requests waiting; wait for one to finish (or cancel one)"
    assert len(await bot.requests.settle(0.5)) == 2 and len(bot.fake.visible(CHANNEL_ID)) == 2
    assert "queued" in (await bot.command("someone else's", user_id="U0OTHER"))[1]["text"]  # a cap per person
    world = World(skill_env, slack=bot.fake)
    async with world.running() as delivery:
        await world.send(event(first.origin, EventKind.failed, first.request_id, prompt=first.prompt))
        while delivery.handled < 1:
            await asyncio.sleep(0.05)
    assert "queued" in (await bot.command("a third, once the first is done"))[1]["text"]
    assert len(await bot.requests.wait(4)) == 4


async def open_remix(bot, status_msg, user_id: str = USER_ID) -> dict:
    """Click Remix on `status_msg` as `user_id`; the view the bot opened."""
    before = set(bot.fake.views)
    payload = bot.fake.button_payload(status_msg, "skill_remix", user_id=user_id)
    status, _, took_s = await bot.post("payload=" + quote(json.dumps(payload)))
    assert status == 200 and took_s < 3
    await bot.fake.wait_for(lambda c: c.path == "views.open", count=len(before) + 1)
    [view_id] = set(bot.fake.views) - before
    return bot.fake.views[view_id]


async def test_remix_opens_a_modal_and_its_submission_reruns_the_edit_with_the_same_seed_in_the_thread(bot):
    thread = "1700000000.000300"
    await bot.fake.post_event(bot.url, bot.fake.mention_event("a juggler's cascade --seed 11 --ar 16:9 --n 2",
                                                              thread_ts=thread))
    [original] = await bot.requests.wait(1)
    status_msg = bot.fake.messages[original.origin.status_message_id]
    status_msg.blocks = render.slack_blocks("✅ done", original.request_id, seed=11)  # as delivery leaves it
    [_, actions] = status_msg.blocks
    assert [e["text"]["text"] for e in actions["elements"]] == ["Re-roll", "Variations", "Remix", "Parameters", "Delete"]
    view = await open_remix(bot, status_msg, user_id="U0OTHER")  # anyone in the channel may remix
    [block] = view["blocks"]
    assert view["callback_id"] == "skill_remix" and block["element"]["initial_value"] == "a juggler's cascade"
    # A refused edit is shown on the prompt field; the modal stays open and nothing is published.
    refused = bot.fake.view_submission(view["id"], {"prompt": "a nude figure study"}, user_id="U0OTHER")
    status, answer, took_s = await bot.post("payload=" + quote(json.dumps(refused)))
    assert status == 200 and took_s < 3 and answer["response_action"] == "errors"
    assert answer["errors"]["prompt"].startswith("Your prompt was blocked: it asks for sexual content or nudity.")
    assert await bot.requests.settle(0.5) == [original]
    submission = bot.fake.view_submission(view["id"], {"prompt": "a juggler's shower"}, user_id="U0OTHER")
    status, answer, took_s = await bot.post("payload=" + quote(json.dumps(submission)))
    assert status == 200 and took_s < 3 and answer == ""  # the modal closes
    [req] = [r for r in await bot.requests.wait(2) if r.request_id != original.request_id]
    assert (req.prompt, req.seed, req.width, req.height, req.num_images) == (
        "a juggler's shower", 11, original.width, original.height, 2)
    assert req.origin.user_id == "U0OTHER" and req.origin.thread_id == thread and req.origin.channel_id == CHANNEL_ID
    [status_msg] = [m for m in bot.fake.visible(CHANNEL_ID, thread) if "a juggler's shower" in m.text]
    assert status_msg.text == "⏳ <@U0OTHER> queued (2 images): _a juggler's shower_"
    assert req.origin.status_message_id == status_msg.ts


async def test_a_remix_of_a_request_without_a_seed_uses_the_results_and_a_late_modal_says_to_click_again(bot):
    await bot.command("a juggler's cascade")
    [original] = await bot.requests.wait(1)
    assert original.seed is None  # the consumer chose it: the result's button carries it
    status_msg = bot.fake.messages[original.origin.status_message_id]
    status_msg.blocks = render.slack_blocks("✅ done", original.request_id, seed=1234)
    view = await open_remix(bot, status_msg)
    await bot.post("payload=" + quote(json.dumps(bot.fake.view_submission(view["id"], {"prompt": "a juggler's mess"}))))
    [req] = [r for r in await bot.requests.wait(2) if r.request_id != original.request_id]
    assert (req.prompt, req.seed, req.origin.thread_id) == ("a juggler's mess", 1234, None)
    # Slack's trigger_id lasts 3 seconds: a views.open after that fails, and the person is told to click again.
    bot.fake.delays["views.open"] = 3.2
    payload = bot.fake.button_payload(status_msg, "skill_remix")
    await bot.post("payload=" + quote(json.dumps(payload)))
    [said] = await bot.fake.wait_for(lambda c: c.path.startswith("/respond/"), timeout_s=10)
    assert said.body["text"] == locales.t("remix_too_slow") and said.body["response_type"] == "ephemeral"


async def test_remix_s_modal_is_in_the_clickers_language_as_far_as_it_is_known(bot):
    bot.fake.locales[USER_ID] = "zh-CN"
    await bot.command("a juggler's cascade")  # after the ack the bot asks users.info: zh, held and kept in Redis
    [original] = await bot.requests.wait(1)
    status_msg = bot.fake.messages[original.origin.status_message_id]
    status_msg.blocks = render.slack_blocks("✅ done", original.request_id, seed=5, lang="zh")
    view = await open_remix(bot, status_msg)
    [block] = view["blocks"]
    assert (view["title"]["text"], view["submit"]["text"], view["close"]["text"]) == ("改写重绘", "绘制", "取消")
    assert (block["label"]["text"], block["hint"]["text"]) == ("提示词（种子和选项不变）", "加上 --ar 16:9、--n 2 等即可更改选项。")
    assert block["element"]["initial_value"] == "a juggler's cascade"
    # Someone whose language nobody looked up yet gets English: views.open cannot wait for users.info.
    bot.fake.locales["U0OTHER"] = "zh-CN"
    other = await open_remix(bot, status_msg, user_id="U0OTHER")
    assert (other["title"]["text"], other["blocks"][0]["label"]["text"]) == ("Remix", "Prompt (same seed and options)")
    assert [c.body["user"] for c in bot.fake.matching(lambda c: c.path == "users.info")] == [USER_ID]
    # A refused edit is said on the prompt field in the language known for the submitter.
    refused = bot.fake.view_submission(view["id"], {"prompt": "help"})
    status, answer, _ = await bot.post("payload=" + quote(json.dumps(refused)))
    assert status == 200 and answer["errors"]["prompt"] == locales.t("remix_empty", "zh")


@pytest.mark.security
async def test_only_the_owner_can_delete_a_result_and_its_images_and_status_go(bot, skill_env):
    await bot.command("a juggler's cascade")
    [req] = await bot.requests.wait(1)
    world = World(skill_env, slack=bot.fake)
    async with world.running():
        await world.send(event(req.origin, EventKind.succeeded, req.request_id, prompt=req.prompt,
                               blobs=[world.image()]))
        await bot.fake.wait_for(lambda c: c.path == "chat.update")  # after the upload: "done", with the buttons
    status_msg = bot.fake.messages[req.origin.status_message_id]
    [_, actions, _] = status_msg.blocks  # (the last: Vary of its image)
    assert [e["text"]["text"] for e in actions["elements"]] == ["Re-roll", "Variations", "Remix", "Parameters", "Delete"]
    [shared] = bot.fake.pngs(CHANNEL_ID)
    payload = bot.fake.button_payload(status_msg, "skill_delete", user_id="U0OTHER")
    status, _, took_s = await bot.post("payload=" + quote(json.dumps(payload)))
    assert status == 200 and took_s < 3
    [said] = await bot.fake.wait_for(lambda c: c.path.startswith("/respond/"))
    assert said.body["text"] == "Only the person who asked can delete this." and said.body["response_type"] == "ephemeral"
    assert bot.fake.visible(CHANNEL_ID) == [status_msg] and bot.fake.pngs(CHANNEL_ID) == [shared]
    await bot.post("payload=" + quote(json.dumps(bot.fake.button_payload(status_msg, "skill_delete"))))
    [removed] = await bot.fake.wait_for(lambda c: c.path == "files.delete")
    assert removed.body["file"] == shared.file_id
    await bot.fake.wait_for(lambda c: c.path == "chat.delete")
    assert bot.fake.visible(CHANNEL_ID) == [] and bot.fake.pngs(CHANNEL_ID) == []
    assert len(responses(bot)) == 1  # the owner is told nothing: the result is simply gone


async def test_upscale_and_vary_of_one_image_publish_img2img_requests_of_the_clicker(bot, skill_env):
    thread = "1700000000.000400"
    await bot.fake.post_event(bot.url, bot.fake.mention_event("a juggler's cascade --n 2 --seed 11 --steps 30",
                                                              thread_ts=thread))
    [original] = await bot.requests.wait(1)
    world = World(skill_env, slack=bot.fake)
    refs = [world.blobs.put(png_bytes(i, 256), width=256, height=256, seed=11 + i) for i in (0, 1)]
    async with world.running():
        await world.send(event(original.origin, EventKind.succeeded, original.request_id, prompt=original.prompt,
                               blobs=refs))
        await bot.fake.wait_for(lambda c: c.path == "chat.update")  # after the upload, with the buttons
    status_msg = bot.fake.messages[original.origin.status_message_id]
    # (the fake keeps an edit's blocks only within Block Kit's limits: 25 elements a block, unique action ids)
    [_, _, per_image] = status_msg.blocks
    assert [e["text"]["text"] for e in per_image["elements"]] == ["U1", "U2", "V1", "V2"]
    payload = bot.fake.button_payload(status_msg, "skill_u2", user_id="U0OTHER")
    assert payload["actions"][0]["value"] == f"{original.request_id}:2"
    status, _, took_s = await bot.post("payload=" + quote(json.dumps(payload)))
    assert status == 200 and took_s < 3
    [upscale] = [r for r in await bot.requests.wait(2) if r.request_id != original.request_id]
    assert upscale.init_image == refs[1] and (upscale.upscale, upscale.width, upscale.height) == (2, 512, 512)
    assert (upscale.strength, upscale.seed, upscale.num_images, upscale.steps) == (0.35, 12, 1, 30)
    assert upscale.origin.user_id == "U0OTHER" and upscale.origin.thread_id == thread
    assert upscale.origin.status_message_id in bot.fake.messages  # its own status message, in the thread
    await bot.post("payload=" + quote(json.dumps(bot.fake.button_payload(status_msg, "skill_v1", user_id="U0OTHER"))))
    [varied] = [r for r in await bot.requests.wait(3) if r.request_id not in (original.request_id, upscale.request_id)]
    assert varied.init_image == refs[0] and (varied.upscale, varied.width, varied.height) == (1, 256, 256)
    assert (varied.strength, varied.num_images, varied.reroll) == (0.6, 1, 1) and varied.seed != original.seed
    # Delivery keeps the result's images as long as the bots keep the request (SKILL_REMEMBER_S); once they are
    # gone, a click is told so, privately.
    store = Store.from_settings(CommonSettings())
    try:
        assert 7 * 86400 - 120 < await store.ttl_s(f"result:{original.request_id}") <= 7 * 86400
        await store.link.call(lambda r: r.delete(store.key(f"result:{original.request_id}")), None)
    finally:
        await store.close()
    await bot.post("payload=" + quote(json.dumps(bot.fake.button_payload(status_msg, "skill_v2"))))
    [said] = await bot.fake.wait_for(lambda c: c.path.startswith("/respond/"))
    assert said.body["text"] == FORGOTTEN and said.body["response_type"] == "ephemeral"
    assert len(await bot.requests.settle(0.5)) == 3


async def click(bot, message, action_id: str, **kw) -> None:
    """Click `action_id` on `message`; the click is acked in time."""
    payload = bot.fake.button_payload(message, action_id, **kw)
    status, _, took_s = await bot.post("payload=" + quote(json.dumps(payload)))
    assert status == 200 and took_s < 3


async def test_parameters_tells_the_clicker_alone_the_command_line_with_the_results_seed(bot):
    await bot.command("a juggler's cascade --ar 16:9 --steps 30 --n 2")
    [original] = await bot.requests.wait(1)
    assert original.seed is None  # the consumer chose it: the result's button carries it
    status_msg = bot.fake.messages[original.origin.status_message_id]
    status_msg.blocks = render.slack_blocks("✅ done", original.request_id, seed=1234)  # as delivery leaves it
    await click(bot, status_msg, "skill_params", user_id="U0OTHER")  # anyone in the channel may ask
    [said] = await bot.fake.wait_for(lambda c: c.path.startswith("/respond/"))
    assert said.body["response_type"] == "ephemeral" and said.body["replace_original"] is False
    assert said.body["text"] == ("Copy this line to ask for the same picture again:\n"
                                 "```\n/skill a juggler's cascade --size 680x384 --steps 30 --seed 1234 --n 2\n```")
    # A request that named its seed shows that one, whatever the button carries; defaults are left out.
    await bot.command("a juggler's shower --seed 11")
    [named] = [r for r in await bot.requests.wait(2) if r.request_id != original.request_id]
    named_msg = bot.fake.messages[named.origin.status_message_id]
    named_msg.blocks = render.slack_blocks("✅ done", named.request_id, seed=99)
    await click(bot, named_msg, "skill_params")
    _, said = await bot.fake.wait_for(lambda c: c.path.startswith("/respond/"), count=2)
    assert said.body["text"].endswith("```\n/skill a juggler's shower --seed 11\n```")
    assert len(await bot.requests.settle(0.5)) == 2  # asking for parameters publishes nothing
    assert len(bot.fake.matching(lambda c: c.path == "chat.postMessage")) == 2  # the two statuses, nothing more
    assert bot.fake.matching(lambda c: c.path == "chat.postEphemeral") == []


async def test_parameters_of_a_prompt_with_markup_is_shown_as_text(bot):
    await bot.command("<!here> a ```fenced``` juggler")
    [original] = await bot.requests.wait(1)
    status_msg = bot.fake.messages[original.origin.status_message_id]
    status_msg.blocks = render.slack_blocks("✅ done", original.request_id, seed=7)
    await click(bot, status_msg, "skill_params")
    [said] = await bot.fake.wait_for(lambda c: c.path.startswith("/respond/"))
    text = said.body["text"]
    assert "<!here>" not in text and "&lt;!here&gt; a `\u200b``fenced`\u200b`` juggler --seed 7\n```" in text
    assert text.count("```") == 2  # the prompt's fence cannot end the code block early


async def test_parameters_of_a_forgotten_request_or_with_redis_too_slow_is_said_in_the_known_language(
        bot, monkeypatch):
    bot.fake.locales[USER_ID] = "zh-CN"
    await bot.command("a juggler")  # after its ack, the bot asks users.info and holds the answer
    [original] = await bot.requests.wait(1)
    status_msg = bot.fake.messages[original.origin.status_message_id]
    forgotten = render.slack_blocks("✅ done", "f" * 32, seed=5)
    status_msg.blocks = forgotten
    await click(bot, status_msg, "skill_params")
    await click(bot, status_msg, "skill_params", user_id="U0OTHER")  # not a person Slack knows: English
    said = await bot.fake.wait_for(lambda c: c.path.startswith("/respond/"), count=2)
    assert sorted(s.body["text"] for s in said) == sorted([locales.t("forgotten", "zh"), FORGOTTEN])
    get = Store.get

    async def slow_get(self, name: str):
        if name.startswith("req:"):
            await asyncio.sleep(5)
        return await get(self, name)

    monkeypatch.setattr(Store, "get", slow_get)
    status_msg.blocks = render.slack_blocks("✅ done", original.request_id, seed=5)
    t0 = time.monotonic()
    await click(bot, status_msg, "skill_params")
    *_, said = await bot.fake.wait_for(lambda c: c.path.startswith("/respond/"), count=3)
    assert said.body["text"] == locales.t("slow", "zh") and said.at - t0 < 3
    assert len(bot.fake.matching(lambda c: c.path == "users.info")) == 2  # once for each person


@pytest.mark.parametrize(("locale", "says"), [
    ("zh-CN", {"status": "⏳ <@U0FAKE> 已排队（2 张）：_a cellist's vibrato_",
               "progress": "🎨 <@U0FAKE> ▰▰▱▱▱▱▱▱▱▱ 第 5/20 步：_a cellist's vibrato_",
               "result": "✅ <@U0FAKE> _a cellist's vibrato_（种子 1, 2）",
               "done": " · 已完成：见下方", "next": "⏳ <@U0FAKE> 已排队：_a second_",
               "cancel": [["取消"]], "buttons": [["重新生成", "变体", "改写重绘", "参数", "删除"], ["V1", "V2"]]}),
    ("en-US", {"status": "⏳ <@U0FAKE> queued (2 images): _a cellist's vibrato_",
               "progress": "🎨 <@U0FAKE> ▰▰▱▱▱▱▱▱▱▱ step 5/20: _a cellist's vibrato_",
               "result": "✅ <@U0FAKE> _a cellist's vibrato_ (seed 1, 2)",
               "done": " · done: see below", "next": "⏳ <@U0FAKE> queued: _a second_",
               "cancel": [["Cancel"]], "buttons": [["Re-roll", "Variations", "Remix", "Parameters", "Delete"],
                                                   ["V1", "V2"]]}),
])
async def test_the_users_locale_gives_the_status_result_and_answers_language_asked_once(bot, skill_env, locale,
                                                                                       says):
    bot.fake.locales[USER_ID] = locale
    _, answer, took_s = await bot.command("a cellist's vibrato --n 2")
    # Before the ack the locale is not known yet (users.info is never asked within Slack's 3 seconds).
    assert answer["text"] == f"⏳ <@{USER_ID}> queued (2 images): _a cellist's vibrato_" and took_s < 3
    [req] = await bot.requests.wait(1)
    status_msg = bot.fake.messages[req.origin.status_message_id]
    assert status_msg.text == says["status"] and labels(status_msg.blocks) == says["cancel"]
    [asked] = bot.fake.matching(lambda c: c.path == "users.info")
    assert (asked.body["user"], asked.body["include_locale"]) == (USER_ID, "1")
    world = World(skill_env, slack=bot.fake)
    async with world.running():
        await world.send(event(req.origin, EventKind.progress, req.request_id, prompt=req.prompt, step=5,
                               total_steps=20),
                         event(req.origin, EventKind.succeeded, req.request_id, prompt=req.prompt,
                               blobs=[world.image(1), world.image(2)]))
        await bot.fake.wait_for(lambda c: c.path == "chat.update", count=2)
    assert status_msg.edits[0] == says["progress"]
    [result] = bot.fake.matching(lambda c: c.path == "files.completeUploadExternal")
    assert result.body["initial_comment"] == says["result"]
    assert status_msg.text == says["result"] + says["done"]
    assert labels(status_msg.blocks) == says["buttons"]  # the requester's language; U1/V1 are the same in each
    # Known now (in this process, and in Redis for a day): the next command is acked in that language, unasked.
    _, answer, _ = await bot.command("a second")
    assert answer["text"] == says["next"]
    await bot.requests.wait(2)
    assert len(bot.fake.matching(lambda c: c.path == "users.info")) == 1
    store = Store.from_settings(CommonSettings())
    try:
        assert 86400 - 120 < await store.ttl_s(f"slack:locale:{TEAM_ID}:{USER_ID}") <= 86400
    finally:
        await store.close()


def labels(blocks: list[dict]) -> list[list[str]]:
    """A message's button labels, an actions block a list."""
    return [[e["text"]["text"] for e in b["elements"]] for b in blocks if b["type"] == "actions"]


@pytest.mark.parametrize("how", ["without users:read", "users.info failing"])
async def test_a_locale_that_cannot_be_known_is_english_and_the_job_is_still_done(bot, skill_env, how):
    bot.fake.locales[USER_ID] = "zh-CN"
    if how == "without users:read":
        bot.fake.scopes.discard("users:read")
    else:
        bot.fake.fail("GET", r"^users\.info$", 500)
    _, answer, _ = await bot.command("a cellist's vibrato")
    assert "queued" in answer["text"]
    [req] = await bot.requests.wait(1)
    [asked] = await bot.fake.wait_for(lambda c: c.path == "users.info")
    assert asked.status == (500 if how == "users.info failing" else 200)
    status_msg = bot.fake.messages[req.origin.status_message_id]
    assert status_msg.text == f"⏳ <@{USER_ID}> queued: _a cellist's vibrato_"
    world = World(skill_env, slack=bot.fake)
    async with world.running():
        await world.send(event(req.origin, EventKind.succeeded, req.request_id, prompt=req.prompt,
                               blobs=[world.image()]))
        await bot.fake.wait_for(lambda c: c.path == "chat.update")
    assert status_msg.text == f"✅ <@{USER_ID}> _a cellist's vibrato_ (seed 1) · done: see below"
    await bot.command("a second")  # a failure is held a while too: Slack is not asked on every command
    await bot.requests.wait(2)
    assert len(bot.fake.matching(lambda c: c.path == "users.info")) == 1


async def test_a_locale_is_asked_once_per_person_even_at_once_replicas_share_it_and_it_expires(fake_slack):
    fake_slack.locales[USER_ID] = "zh-TW"
    store = Store(None)  # in memory: what Redis is to two replicas of the bot
    client = AsyncWebClient(token=BOT_TOKEN, base_url=fake_slack.api_base)
    who = Origin(platform=Platform.slack, team_id=TEAM_ID, channel_id=CHANNEL_ID, user_id=USER_ID)
    asked = lambda: fake_slack.matching(lambda c: c.path == "users.info")  # noqa: E731
    first = SlackLocales(store, ttl_s=1.0)
    assert first.known(who) == "en"  # nothing held: what is said before an ack is English
    fake_slack.delays["users.info"] = 0.3
    assert await asyncio.gather(*(first.lang(client, who) for _ in range(5))) == ["zh"] * 5
    assert first.known(who) == "zh" and len(asked()) == 1
    second = SlackLocales(store, ttl_s=1.0)  # another replica: nothing in its process, but Redis has it
    assert second.known(who) == "en" and await second.lang(client, who) == "zh" and len(asked()) == 1
    assert await SlackLocales(store).held(who) == "zh" and len(asked()) == 1  # Redis's, users.info unasked
    assert await SlackLocales(Store(None)).held(who) == "en" and len(asked()) == 1  # unknown: English, unasked
    fake_slack.locales[USER_ID] = "en-US"  # the person changes their language: it shows once the day is over
    await asyncio.sleep(1.1)
    assert await first.lang(client, who) == "en" and len(asked()) == 2
