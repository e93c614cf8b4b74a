"""The Discord front-end: the real discord.py client on a fake Discord (REST and gateway), publishing to a
real broker. /skill defers within 3 seconds, refusals are ephemeral, and the result buttons start new jobs."""

import asyncio
import os
import signal
import time

import aiohttp
import pytest

from bots import discord_bot, locales, render
from bots.credentials import Interactions
from bots.intake import (
    CANCELLING,
    FORGOTTEN,
    NOT_ALLOWED,
    NOT_OWNER,
    NOT_OWNER_DELETE,
    SLOW,
)
from bots.settings import DiscordSettings
from schemas.messages import (
    MAX_PROMPT_CHARS,
    EventKind,
    GenerateCancel,
    GenerateRequest,
)
from skillgen.runtime import groupview
from skillgen.runtime.groupview import ConsumerView, Queued
from skillgen.runtime.redis import Store
from skillgen.runtime.settings import CommonSettings
from tests.fakes.discord import (
    APPLICATION_ID,
    CHANNEL_ID,
    GUILD_ID,
    THREAD_ID,
    USER_ID,
    FakeDiscord,
)
from tests.fakes.records import TopicReader
from tests.fakes.world import World, event, png_bytes
from tests.harness import SIGNING_KEY

ADMINISTRATOR = str(1 << 3)
SKILL_ADMIN_ID = "888888888888888888"  # in SKILL_ADMINS, where a test's bot says so


async def recall_interaction(request_id: str):
    store = Store.from_settings(CommonSettings())
    try:
        return await Interactions(store).recall(request_id)
    finally:
        await store.close()


async def recall_original(request_id: str) -> str | None:
    store = Store.from_settings(CommonSettings())
    try:
        return await Interactions(store).original(request_id)
    finally:
        await store.close()


@pytest.fixture
async def bot(skill_env, request):
    """A running bot on a fake Discord; a test changes its settings with parametrize("bot", [{...}], indirect=True)."""
    fake = await FakeDiscord().start()
    overrides = {"rate_user_per_min": 2, **getattr(request, "param", {})}
    settings = DiscordSettings(**{k.removeprefix("SKILL_").lower(): v for k, v in fake.settings().items()},
                               **overrides)
    stop = asyncio.Event()
    task = asyncio.create_task(discord_bot.serve(settings, stop))
    await asyncio.wait_for(fake.identified.wait(), 15)
    async with TopicReader(skill_env.vars["SKILL_KAFKA_BOOTSTRAP"], skill_env.topics.generate,
                           GenerateRequest) as fake.requests:
        yield fake
    stop.set()
    await task
    await fake.stop()


def callback_of(fake: FakeDiscord, interaction):
    return lambda c: c.method == "POST" and c.path.startswith(f"/interactions/{interaction.id}/")


async def test_skill_defers_within_3_seconds_says_queued_and_publishes(bot):
    t0 = time.monotonic()
    it = await bot.invoke("skill", {"prompt": "a violinist's bow hold --ar 16:9", "n": 2, "seed": 42})
    [callback] = await bot.wait_for(callback_of(bot, it))
    assert callback.at - t0 < 3 and callback.body["type"] == 5  # deferred, "thinking..."
    [req] = await bot.requests.wait(1)
    assert (req.prompt, req.num_images, req.seed) == ("a violinist's bow hold", 2, 42) and req.width > req.height
    o = req.origin
    assert (o.platform, o.team_id, o.channel_id, o.user_id) == ("discord", GUILD_ID, CHANNEL_ID, USER_ID)
    # The interaction token stays out of Kafka: delivery finds it in Redis by request id.
    assert o.thread_id is None and it.token not in req.model_dump_json()
    assert o.verify(req.request_id, SIGNING_KEY.encode())
    kept = await recall_interaction(req.request_id)
    assert (kept.token, kept.application_id) == (it.token, APPLICATION_ID)
    assert abs(o.created_at.timestamp() - time.time()) < 10  # from the interaction's snowflake
    assert it.original.content == f"⏳ <@{USER_ID}> queued (2 images): *a violinist's bow hold*"
    assert not it.original.ephemeral
    [edit] = bot.matching(lambda c: c.method == "PATCH")
    assert [str(u) for u in edit.body["allowed_mentions"]["users"]] == [USER_ID] and edit.body["allowed_mentions"]["parse"] == []


async def test_the_command_is_registered_with_typed_options(bot):
    [skill] = [c for c in bot.commands if c["name"] == "skill"]  # with the training extension's commands
    options = {o["name"]: o for o in skill["options"]}
    assert skill["name"] == "skill" and options["prompt"]["required"]
    assert set(options) == {"prompt", "no", "ar", "size", "steps", "seed", "n", "adapter", "relax", "turbo"}
    assert options["relax"]["type"] == 5 and not options["relax"].get("required")  # a boolean
    assert (options["n"]["min_value"], options["n"]["max_value"]) == (1, 4)
    # Discord's client enforces these as the person types: nothing longer than the request allows is sent.
    assert (options["prompt"]["min_length"], options["prompt"]["max_length"]) == (1, MAX_PROMPT_CHARS) == (1, 500)
    assert options["no"]["max_length"] == 500 and options["size"]["max_length"] == options["ar"]["max_length"] == 16
    assert options["adapter"]["max_length"] == discord_bot.MAX_ADAPTER_REF_CHARS


async def test_the_commands_are_registered_with_chinese_names_that_discord_takes(bot):
    [sync] = bot.matching(lambda c: c.method == "PUT" and c.path.endswith("/commands"))
    assert sync.status == 200  # the fake checks every name and localization as Discord does (400 50035 otherwise)
    by_name = {c["name"]: c for c in bot.commands}
    assert {n: c["name_localizations"]["zh-CN"] for n, c in by_name.items()} == {
        "skill": "技能图", "skill-train": "技能训练", "skill-train-cancel": "技能训练取消", "skill-adapters": "技能适配器"}
    skill = by_name["skill"]
    assert skill["description_localizations"] == {"zh-CN": "画一张技能图（写 help 查看用法）",
                                                  "zh-TW": "画一张技能图（写 help 查看用法）"}
    options = {o["name"]: o for o in skill["options"]}
    assert options["prompt"]["name_localizations"] == {"zh-CN": "提示词", "zh-TW": "提示词"}
    assert options["n"]["description_localizations"]["zh-CN"] == "画几张图，1-4"
    # What Discord refuses, the fake refuses too: one bad localization and nothing is registered.
    bad = [{**skill, "name_localizations": {"zh-CN": "技能 图"}}]
    async with aiohttp.ClientSession() as session:
        async with session.put(f"{bot.api_base}/applications/{APPLICATION_ID}/commands", json=bad,
                               headers={"Authorization": f"Bot {bot.bot_token}"}) as resp:
            refused = (resp.status, await resp.json())
    assert refused[0] == 400 and refused[1]["code"] == 50035 and "0.name_localizations.zh-CN" in refused[1]["errors"]
    assert bot.commands and bot.commands[0]["name_localizations"]["zh-CN"] == "技能图"  # the last good sync stands
    # A Chinese client still sends the English names: /skill runs as before.
    it = await bot.invoke("skill", {"prompt": "a cellist's vibrato", "n": 2}, locale="zh-CN")
    [req] = await bot.requests.wait(1)
    assert req.num_images == 2 and it.original.content.startswith(f"⏳ <@{USER_ID}> 已排队")


async def test_a_command_in_a_thread_is_answered_in_the_thread(bot):
    await bot.invoke("skill", {"prompt": "a skater's ollie"}, channel_id=THREAD_ID, thread=True)
    [req] = await bot.requests.wait(1)
    assert req.origin.channel_id == req.origin.thread_id == THREAD_ID


@pytest.mark.parametrize(
    ("options", "says"),
    [
        ({"prompt": "a cat", "size": "500x512"}, "--size/--ar width: must be a multiple of 8"),
        ({"prompt": "a cat --n 2", "n": 3}, "n is given twice"),
        ({"prompt": "a gory beheading"}, "Your prompt was blocked: it asks for graphic violence or gore."),
        ({"prompt": "help"}, "**/skill** draws a skill image"),
        ({"prompt": "a cat", "turbo": True, "adapter": "clay"},
         "--turbo: turbo uses this service's fast LoRA; it cannot be combined with an adapter"),
    ],
)
async def test_refusals_and_help_are_ephemeral_and_publish_nothing(bot, options, says):
    it = await bot.invoke("skill", options)
    [callback] = await bot.wait_for(callback_of(bot, it))
    assert callback.body["type"] == 4 and callback.body["data"]["flags"] & 64
    assert says in callback.body["data"]["content"]
    assert await bot.requests.settle(0.5) == []


async def test_help_names_the_command_as_the_persons_client_shows_it(bot):
    for locale, first_line in (("zh-CN", "**/技能图** 画一张技能图并发在这里。"), ("zh-TW", "**/技能图** 画一张技能图并发在这里。"),
                               ("en-US", "**/skill** draws a skill image and posts it here.")):
        for word in ("help", "帮助"):
            said = (await answered(bot, word, locale=locale))["data"]
            assert said["flags"] & 64 and said["content"].splitlines()[0] == first_line, (locale, word)
    assert "示例：`/技能图 a drummer's paradiddle" in said["content"] or "Example: `/skill a drummer's" in said["content"]
    assert await bot.requests.settle(0.5) == []


async def answered(bot: FakeDiscord, prompt: str, **kw) -> dict:
    """Run /skill and wait for the bot's answer to it (one at a time: discord.py handles interactions at once)."""
    it = await bot.invoke("skill", {"prompt": prompt}, **kw)
    [callback] = await bot.wait_for(callback_of(bot, it))
    return callback.body


@pytest.mark.security
@pytest.mark.parametrize("bot", [{"admins": [f"discord:{SKILL_ADMIN_ID}"], "quota_team_per_day": 5}], indirect=True)
async def test_over_the_rate_limit_is_told_when_to_retry_and_only_skill_admins_skip_it(bot):
    # A server administrator is limited like anyone: whoever adds the bot to a server administers it.
    for i in range(2):
        assert (await answered(bot, f"study {i}", permissions=ADMINISTRATOR))["type"] == 5
    said = (await answered(bot, "one too many", permissions=ADMINISTRATOR))["data"]
    assert said["flags"] & 64 and "You have reached your limit of 2 requests per minute. Try again in" in said["content"]
    # Someone in SKILL_ADMINS skips the per-person rate, not the team's daily quota (5 images: 2 used above).
    for i in range(3):
        assert (await answered(bot, f"admin's study {i}", user_id=SKILL_ADMIN_ID))["type"] == 5
    said = (await answered(bot, "admin's fourth", user_id=SKILL_ADMIN_ID))["data"]
    assert said["flags"] & 64 and "You have reached your team's limit of 5 images per day" in said["content"]
    assert sorted(r.prompt for r in await bot.requests.wait(5)) == [
        "admin's study 0", "admin's study 1", "admin's study 2", "study 0", "study 1"]
    assert len(await bot.requests.settle(0.5)) == 5


@pytest.mark.parametrize("bot", [{"rate_user_per_min": 1}], indirect=True)
async def test_a_chinese_client_is_refused_in_chinese_by_the_grammar_and_the_rate_limit(bot):
    said = (await answered(bot, "a cat --colour red", locale="zh-CN"))["data"]
    assert said["flags"] & 64 and said["content"].startswith("未知选项 --colour；可用的选项有 --no, --ar")
    said = (await answered(bot, "a cat --ar 9:1", locale="zh-CN"))["data"]
    assert said["content"] == "--ar 9:1 太极端了；请用 1:4 到 4:1 之间的比例"
    assert (await answered(bot, "a cat", locale="zh-CN"))["type"] == 5
    said = (await answered(bot, "another cat", locale="zh-CN"))["data"]
    assert said["flags"] & 64 and said["content"].startswith("你已达到你的上限（每分钟 1 个请求）。请 ")
    said = (await answered(bot, "a third cat"))["data"]  # the same person on an English client
    assert said["content"].startswith("You have reached your limit of 1 requests per minute. Try again in ")
    assert len(await bot.requests.settle(0.5)) == 1


@pytest.fixture
def other_teams_only(skill_env, monkeypatch):
    """SKILL_ALLOWED_TEAMS without the fakes' server and workspace (set before the bot fixture reads it)."""
    monkeypatch.setenv("SKILL_ALLOWED_TEAMS", "discord:123456789012345678,slack:T0OTHER")


@pytest.mark.security
async def test_a_server_outside_allowed_teams_is_refused_and_nothing_is_published(other_teams_only, bot):
    said = (await answered(bot, "a violinist's bow hold"))["data"]
    expected = NOT_ALLOWED.format(where="Discord server", who=f"discord:{GUILD_ID}")
    assert said["flags"] & 64 and said["content"] == expected
    said = (await answered(bot, "a violinist's bow hold", locale="zh-CN"))["data"]
    assert said["content"] == f"skillgen 尚未在这个 Discord 服务器启用。请让运行它的人把 `discord:{GUILD_ID}` 加入 SKILL_ALLOWED_TEAMS。"
    assert await bot.requests.settle(0.5) == []
    assert bot.matching(lambda c: c.method == "PATCH") == []  # nothing shown in the channel


@pytest.mark.security
async def test_a_prompt_with_a_masked_link_and_mentions_is_shown_as_text_through_delivery(bot, skill_env):
    prompt = "see [the docs](https://evil.example) @everyone <@&1> <#123> **now**"
    it = await bot.invoke("skill", {"prompt": prompt})
    [req] = await bot.requests.wait(1)
    assert req.prompt == prompt  # the request keeps what was typed; only what is shown is escaped
    world = World(skill_env, discord=bot)
    async with world.running():
        await world.send(event(req.origin, EventKind.succeeded, req.request_id, prompt=req.prompt,
                               blobs=[world.image()]))
        await bot.wait_for(lambda c: c.method == "PATCH" and c.path.endswith(f"/{it.token}/messages/@original")
                           and bool(c.files))
    shown = it.original.content
    assert shown.startswith(f"✅ <@{USER_ID}> *see \\[the docs\\]\\(https:") and "\\*\\*now\\*\\**" in shown
    assert "@everyone" not in shown and "](" not in shown and "://" not in shown
    assert "<@&" not in shown and "<#" not in shown
    edits = bot.matching(lambda c: c.method == "PATCH")  # the bot's "queued", then delivery's result
    assert len(edits) == 2 and edits[0].body["content"].startswith(f"⏳ <@{USER_ID}> queued: *see \\[the docs\\]")
    for call in edits:
        assert "](" not in call.body["content"] and "@everyone" not in call.body["content"]
        assert call.body["allowed_mentions"]["parse"] == []


async def test_reroll_and_variations_buttons_start_new_jobs(bot):
    first = await bot.invoke("skill", {"prompt": "a juggler's cascade", "seed": 11})
    [original] = await bot.requests.wait(1)
    first.original.components = render.discord_buttons(original.request_id)  # as delivery leaves it
    for action in (render.REROLL, render.VARIATIONS):
        it = await bot.click(render.custom_id(action, original.request_id), first.original, user_id="777")
        [callback] = await bot.wait_for(callback_of(bot, it))
        assert callback.body["type"] == 5
    remixes = [r for r in await bot.requests.wait(3) if r.request_id != original.request_id]
    reroll, vary = sorted(remixes, key=lambda r: r.num_images)
    for req in (reroll, vary):
        assert req.prompt == original.prompt and req.seed != original.seed and req.origin.user_id == "777"
        kept = await recall_interaction(req.request_id)
        assert kept is not None and kept.token not in (None, first.token)
    assert (reroll.num_images, reroll.reroll, vary.num_images) == (1, 1, 4)


async def test_a_button_on_a_forgotten_request_says_so(bot):
    first = await bot.invoke("skill", {"prompt": "a juggler"})
    await bot.requests.wait(1)
    it = await bot.click(render.custom_id(render.REROLL, "f" * 32), first.original)
    [callback] = await bot.wait_for(callback_of(bot, it))
    assert callback.body["data"]["flags"] & 64 and callback.body["data"]["content"] == FORGOTTEN


async def test_a_result_after_16_minutes_edits_the_same_message_with_the_bot_token(bot, skill_env):
    it = await bot.invoke("skill", {"prompt": "a cellist's vibrato"})
    [req] = await bot.requests.wait(1)
    bot.advance(16 * 60)  # the interaction token is dead now: its webhook answers 401 50027
    world = World(skill_env, discord=bot)
    async with world.running():
        await world.send(event(req.origin, EventKind.progress, req.request_id, prompt=req.prompt, step=5,
                               total_steps=20),
                         event(req.origin, EventKind.succeeded, req.request_id, prompt=req.prompt,
                               blobs=[world.image()]))
        await bot.wait_for(lambda c: c.method == "POST" and c.path == f"/channels/{CHANNEL_ID}/messages")
    # Progress and result alike: edits of the original response with the bot token (its id kept in Redis).
    assert await recall_original(req.request_id) == it.original.id
    progress, result = bot.matching(
        lambda c: c.method == "PATCH" and c.path == f"/channels/{CHANNEL_ID}/messages/{it.original.id}")
    assert progress.body["content"].startswith(f"🎨 <@{USER_ID}> ▰▰▱") and "step 5/20" in progress.body["content"]
    assert result.files
    assert result.status == 200 and result.headers["Authorization"] == f"Bot {bot.bot_token}"
    # One message shows the request from "queued" to the result; the only other one is the ping replying to it.
    [result] = [m for m in bot.channel(CHANNEL_ID) if m.pngs]
    assert result is it.original and result.content.startswith(f"✅ <@{USER_ID}> *a cellist's vibrato*")
    assert [m.reference for m in bot.channel(CHANNEL_ID) if m is not result] == [it.original.id]
    assert bot.matching(lambda c: c.status >= 400 and c.path.startswith("/channels/")) == []


@pytest.fixture(params=["silent socket", "SIGSTOP"])
async def hung_redis(request):
    """A Redis that never answers: a socket that accepts connections and stays silent, or a real redis-server
    stopped with SIGSTOP once the bot is connected (`hung_redis.hang()`)."""
    if request.param == "SIGSTOP":
        server = request.getfixturevalue("redis_factory")()
        hang = lambda: os.kill(server.process.pid, signal.SIGSTOP)
        yield server.url, hang
        os.kill(server.process.pid, signal.SIGCONT)
        return
    held: list[asyncio.StreamWriter] = []

    async def accept(reader, writer):
        held.append(writer)

    server = await asyncio.start_server(accept, "127.0.0.1", 0)
    yield f"redis://127.0.0.1:{server.sockets[0].getsockname()[1]}/0", lambda: None
    for writer in held:
        writer.close()
    server.close()


@pytest.fixture
async def bot_on_silent_redis(skill_env, hung_redis):
    url, hang = hung_redis
    fake = await FakeDiscord().start()
    settings = DiscordSettings(**{k.removeprefix("SKILL_").lower(): v for k, v in fake.settings().items()},
                               redis_url=url, rate_user_per_min=2)
    stop = asyncio.Event()
    task = asyncio.create_task(discord_bot.serve(settings, stop))
    await asyncio.wait_for(fake.identified.wait(), 15)
    hang()
    yield fake
    stop.set()
    await task
    await fake.stop()


async def test_a_redis_that_never_answers_still_gets_the_command_deferred_within_3_seconds(bot_on_silent_redis):
    bot = bot_on_silent_redis
    for prompt in ("a cellist's vibrato", "a drummer's rimshot"):
        t0 = time.monotonic()
        it = await bot.invoke("skill", {"prompt": prompt})
        [callback] = await bot.wait_for(callback_of(bot, it))
        assert callback.status == 200 and callback.body["type"] == 5 and callback.at - t0 < 3
    # Over the per-person limit of 2, counted in the bot's own windows meanwhile.
    said = (await answered(bot, "a third"))["data"]
    assert said["flags"] & 64 and "You have reached your limit of 2 requests per minute" in said["content"]


async def test_parameters_on_a_redis_that_never_answers_is_still_answered_within_3_seconds(bot_on_silent_redis):
    bot = bot_on_silent_redis
    it = await bot.invoke("skill", {"prompt": "a cellist's vibrato", "seed": 3})
    await bot.wait_for(lambda c: c.method == "PATCH" and "queued" in c.body.get("content", ""))
    # The request was kept in the bot's memory while Redis was out: its line still comes, privately.
    [request_id] = [b["custom_id"].split(":")[2] for b in it.original.components[0]["components"]]
    t0 = time.monotonic()
    click = await bot.click(render.custom_id(render.PARAMS, request_id), it.original)
    [callback] = await bot.wait_for(callback_of(bot, click))
    assert callback.status == 200 and callback.at - t0 < 3 and callback.body["data"]["flags"] & 64
    assert callback.body["data"]["content"].endswith("```\n/skill a cellist's vibrato --seed 3\n```")


async def test_relax_publishes_in_the_relax_lane_and_says_so(bot):
    it = await bot.invoke("skill", {"prompt": "a cellist's bow hold", "relax": True})
    [req] = await bot.requests.wait(1)
    assert req.lane == "relax"
    assert it.original.content == f"⏳ <@{USER_ID}> queued · relax mode: *a cellist's bow hold*"


async def test_the_turbo_option_publishes_a_turbo_request(bot):
    await bot.invoke("skill", {"prompt": "a cellist's bow hold", "turbo": True, "steps": 6})
    [req] = await bot.requests.wait(1)
    assert (req.turbo, req.steps, req.scheduler, req.guidance) == (True, 6, "lcm", 1.0)


async def publish_view(queued_units: float, s_per_unit: float = 2.0) -> None:
    """What a consumer publishes about its queue (another team's backlog), in the test's Redis."""
    store = Store.from_settings(CommonSettings())
    try:
        await groupview.publish(store.link, store.prefix, ConsumerView(
            consumer="gpu-0", at=time.time(), s_per_unit=s_per_unit,
            queued={groupview.flow("fast", "999"): Queued(requests=40, units=queued_units)}))
    finally:
        await store.close()


async def test_a_busy_group_refuses_new_work_and_a_quieter_one_gives_position_and_eta(bot):
    await publish_view(queued_units=1000)  # 2000 s of work, the bound 1800 s
    said = (await answered(bot, "a violinist's bow hold"))["data"]
    assert said["flags"] & 64 and said["content"] == "busy: about 33 min of work is queued; try again in about 4 min"
    assert await bot.requests.settle(0.5) == []
    await publish_view(queued_units=100)  # 200 s
    it = await bot.invoke("skill", {"prompt": "a violinist's bow hold"})
    [req] = await bot.requests.wait(1)
    [edit] = await bot.wait_for(lambda c: c.method == "PATCH" and c.path.endswith(f"/{it.token}/messages/@original"))
    assert edit.body["content"].startswith(f"⏳ <@{USER_ID}> queued, position ~")
    assert ", ready <t:" in edit.body["content"] and edit.body["content"].endswith(":R>: *a violinist's bow hold*")


@pytest.mark.security
async def test_only_the_owner_can_cancel_and_a_cancelled_request_pings_nobody(bot, skill_env):
    it = await bot.invoke("skill", {"prompt": "a juggler's cascade"})
    [req] = await bot.requests.wait(1)
    [row] = it.original.components  # "queued" carries the Cancel button
    [button] = row["components"]
    assert (button["label"], button["custom_id"]) == ("Cancel", f"skill:cancel:{req.request_id}")
    async with TopicReader(skill_env.vars["SKILL_KAFKA_BOOTSTRAP"], skill_env.topics.generate_cancel,
                           GenerateCancel) as cancels:
        # Someone else in the channel: told privately, nothing published.
        other = await bot.click(button["custom_id"], it.original, user_id="777")
        [callback] = await bot.wait_for(callback_of(bot, other))
        assert callback.body["type"] == 4 and callback.body["data"]["flags"] & 64
        assert callback.body["data"]["content"] == NOT_OWNER
        assert await cancels.settle(0.5) == []
        # The owner: acknowledged privately within 3 s, and the cancel published with their origin, sealed.
        t0 = time.monotonic()
        own = await bot.click(button["custom_id"], it.original)
        [callback] = await bot.wait_for(callback_of(bot, own))
        assert callback.at - t0 < 3 and callback.body["data"]["flags"] & 64
        assert callback.body["data"]["content"] == CANCELLING
        [cancel] = await cancels.wait(1)
        assert cancel.request_id == req.request_id and cancels.keys == [req.request_id.encode()]
        assert (cancel.origin.team_id, cancel.origin.user_id) == (GUILD_ID, USER_ID)
        assert cancel.origin.verify(req.request_id, SIGNING_KEY.encode())
    # The consumer answers with `cancelled`; a result that still comes after it is never shown.
    world = World(skill_env, discord=bot)
    async with world.running() as delivery:
        await world.send(event(req.origin, EventKind.cancelled, req.request_id, prompt=req.prompt),
                         event(req.origin, EventKind.succeeded, req.request_id, prompt=req.prompt,
                               blobs=[world.image()]))
        await bot.wait_for(lambda c: c.method == "PATCH" and c.body.get("content", "").startswith("🛑"))
        while delivery.handled < 2:
            await asyncio.sleep(0.05)
    assert it.original.content == "🛑 cancelled: *a juggler's cascade*"
    assert it.original.components == [] and it.original.files == []
    [edit] = bot.matching(lambda c: c.method == "PATCH" and c.body.get("content", "").startswith("🛑"))
    assert edit.body["allowed_mentions"] == {"parse": [], "users": []}
    # No result, and no ping: the channel shows the one message, and no follow-up went anywhere.
    assert bot.channel(CHANNEL_ID) == [it.original]
    assert bot.matching(lambda c: c.method == "POST" and c.path.startswith("/webhooks/")) == []
    assert bot.matching(lambda c: bool(c.files)) == []


@pytest.mark.parametrize("bot", [{"max_queued_per_person": 2, "rate_user_per_min": 10}], indirect=True)
async def test_a_person_with_too_many_requests_waiting_is_refused_until_delivery_finishes_one(bot, skill_env):
    for prompt in ("a cellist's vibrato", "a drummer's rimshot"):
        assert (await answered(bot, prompt))["type"] == 5
    first, _ = sorted(await bot.requests.wait(2), key=lambda r: r.prompt)
    said = (await answered(bot, "a third"))["data"]
    assert said["flags"] & 64
    assert said["content"] == "you already have 2 requests waiting; wait for one to finish (or cancel one)"
    assert len(await bot.requests.settle(0.5)) == 2
    assert (await answered(bot, "someone else's", user_id="777"))["type"] == 5  # a cap per person
    world = World(skill_env, discord=bot)
    async with world.running() as delivery:
        await world.send(event(first.origin, EventKind.succeeded, first.request_id, prompt=first.prompt,
                               blobs=[world.image()]))
        while delivery.handled < 1:
            await asyncio.sleep(0.05)
    assert (await answered(bot, "a third, once the first is done"))["type"] == 5
    assert len(await bot.requests.wait(4)) == 4


@pytest.mark.parametrize("bot", [{"rate_user_per_min": 10}], indirect=True)
async def test_remix_opens_a_modal_with_the_prompt_and_reruns_the_edit_with_the_same_seed_and_options(bot):
    first = await bot.invoke("skill", {"prompt": "a juggler's cascade --ar 16:9 --no blurry", "n": 2, "seed": 11})
    [original] = await bot.requests.wait(1)
    first.original.components = render.discord_buttons(original.request_id, seed=11)  # as delivery leaves it
    [remix] = [b for b in first.original.components[0]["components"] if b["label"] == "Remix"]
    # Anyone in the channel may remix: a modal (type 9), within 3 s, with the prompt to edit.
    t0 = time.monotonic()
    click = await bot.click(remix["custom_id"], first.original, user_id="777")
    [callback] = await bot.wait_for(callback_of(bot, click))
    assert callback.status == 200 and callback.body["type"] == 9 and callback.at - t0 < 3
    [[field]] = [row["components"] for row in click.modal["components"]]
    assert field["value"] == "a juggler's cascade" and field["max_length"] == MAX_PROMPT_CHARS
    submitted = await bot.submit_modal(click, {field["custom_id"]: "a juggler's shower"})
    [callback] = await bot.wait_for(callback_of(bot, submitted))
    assert callback.body["type"] == 5
    [req] = [r for r in await bot.requests.wait(2) if r.request_id != original.request_id]
    assert req.prompt == "a juggler's shower" and req.seed == 11 and req.origin.user_id == "777"
    same = ("width", "height", "num_images", "negative_prompt", "steps", "scheduler", "lane")
    assert [getattr(req, f) for f in same] == [getattr(original, f) for f in same]
    assert submitted.original.content == "⏳ <@777> queued (2 images): *a juggler's shower*"
    assert (await recall_interaction(req.request_id)).token == submitted.token
    # `--options` in the edit change those options; the rest, and the seed, stay.
    again = await bot.click(remix["custom_id"], first.original, user_id="777")
    await bot.wait_for(callback_of(bot, again))
    await bot.submit_modal(again, {field["custom_id"]: "a juggler's mills mess --n 1 --steps 12"})
    [changed] = [r for r in await bot.requests.wait(3) if r.prompt == "a juggler's mills mess"]
    assert (changed.num_images, changed.steps, changed.seed, changed.width) == (1, 12, 11, original.width)


async def test_remix_s_modal_is_in_the_clickers_language(bot):
    first = await bot.invoke("skill", {"prompt": "a juggler's cascade"})
    [original] = await bot.requests.wait(1)
    custom_id = render.custom_id(render.REMIX, original.request_id, 5)
    for locale, title, label in (("zh-CN", "改写重绘：种子和选项不变", "提示词"),
                                 ("en-US", "Remix: same seed and options", "Prompt")):
        click = await bot.click(custom_id, first.original, user_id="777", locale=locale)
        [callback] = await bot.wait_for(callback_of(bot, click))
        assert callback.status == 200 and callback.body["type"] == 9  # within Discord's limits (the fake checks)
        [[field]] = [row["components"] for row in click.modal["components"]]
        assert (click.modal["title"], field["label"]) == (title, label)
        assert field["placeholder"] == locales.t("remix_placeholder", locales.from_discord(locale))
        assert field["value"] == "a juggler's cascade"
    # An empty edit is refused in the submitter's language.
    click = await bot.click(custom_id, first.original, user_id="777", locale="zh-CN")
    await bot.wait_for(callback_of(bot, click))
    refused = await bot.submit_modal(click, {"prompt": "help"}, locale="zh-CN")
    [callback] = await bot.wait_for(callback_of(bot, refused))
    assert callback.body["data"]["content"] == locales.t("remix_empty", "zh")


@pytest.mark.parametrize("bot", [{"rate_user_per_min": 10}], indirect=True)
async def test_a_remix_of_a_request_without_a_seed_uses_the_results_and_a_blocked_edit_is_refused(bot):
    first = await bot.invoke("skill", {"prompt": "a juggler's cascade"})
    [original] = await bot.requests.wait(1)
    assert original.seed is None  # the consumer chose it: the result's button carries it
    first.original.components = render.discord_buttons(original.request_id, seed=1234)
    [remix] = [b for b in first.original.components[0]["components"] if b["label"] == "Remix"]
    assert remix["custom_id"] == f"skill:remix:{original.request_id}:1234"
    blocked = await bot.click(remix["custom_id"], first.original)
    await bot.wait_for(callback_of(bot, blocked))
    refused = await bot.submit_modal(blocked, {"prompt": "a gory beheading"})
    [callback] = await bot.wait_for(callback_of(bot, refused))
    assert callback.body["type"] == 4 and callback.body["data"]["flags"] & 64
    assert callback.body["data"]["content"].startswith("Your prompt was blocked: it asks for graphic violence or gore.")
    bad = await bot.click(remix["custom_id"], first.original)
    await bot.wait_for(callback_of(bot, bad))
    refused = await bot.submit_modal(bad, {"prompt": "a cat --steps 99"})
    [callback] = await bot.wait_for(callback_of(bot, refused))
    assert "--steps: Input should be less than or equal to 50" in callback.body["data"]["content"]
    assert await bot.requests.settle(0.5) == [original]
    ok = await bot.click(remix["custom_id"], first.original)
    await bot.wait_for(callback_of(bot, ok))
    await bot.submit_modal(ok, {"prompt": "a juggler's shower"})
    [req] = [r for r in await bot.requests.wait(2) if r.request_id != original.request_id]
    assert (req.prompt, req.seed) == ("a juggler's shower", 1234)


async def test_remix_of_a_forgotten_request_says_so_without_a_modal(bot):
    first = await bot.invoke("skill", {"prompt": "a juggler"})
    await bot.requests.wait(1)
    it = await bot.click(render.custom_id(render.REMIX, "f" * 32, 5), first.original)
    [callback] = await bot.wait_for(callback_of(bot, it))
    assert callback.body["type"] == 4 and callback.body["data"]["content"] == FORGOTTEN and it.modal is None


@pytest.mark.parametrize("bot", [{"rate_user_per_min": 10, "default_steps": 12}], indirect=True)
async def test_parameters_tells_whoever_clicks_alone_the_line_that_asks_for_the_same_picture(bot):
    first = await bot.invoke("skill", {"prompt": "a juggler's cascade --ar 16:9 --no blurry", "steps": 20, "n": 2})
    [original] = await bot.requests.wait(1)
    assert original.seed is None  # the consumer chose it: the result's button carries it
    first.original.components = render.discord_buttons(original.request_id, seed=1234)  # as delivery leaves it
    [params] = [b for b in first.original.components[0]["components"] if b["label"] == "Parameters"]
    # Anyone who sees the result may ask; only they see the answer, within 3 s.
    t0 = time.monotonic()
    click = await bot.click(params["custom_id"], first.original, user_id="777")
    [callback] = await bot.wait_for(callback_of(bot, click))
    assert callback.status == 200 and callback.body["type"] == 4 and callback.at - t0 < 3
    line = "/skill a juggler's cascade --no blurry --size 680x384 --steps 20 --seed 1234 --n 2"
    said = f"Copy this line to ask for the same picture again:\n```\n{line}\n```"
    assert callback.body["data"]["flags"] & 64 and callback.body["data"]["content"] == said
    assert [m.content for m in bot.ephemeral_to(click)] == [said] and bot.channel(CHANNEL_ID) == [first.original]
    # In the clicker's language; the line itself is the grammar's, the same in every language.
    zh = await bot.click(params["custom_id"], first.original, user_id="888", locale="zh-CN")
    [callback] = await bot.wait_for(callback_of(bot, zh))
    assert callback.body["data"]["content"] == f"复制这一行即可再次生成同一张图：\n```\n{line}\n```"
    # A request that named its seed keeps it; options at this deployment's defaults (steps 12 here) are left out.
    second = await bot.invoke("skill", {"prompt": "a cellist's bow hold", "seed": 11})
    [named] = [r for r in await bot.requests.wait(2) if r.request_id != original.request_id]
    click = await bot.click(render.custom_id(render.PARAMS, named.request_id, 99), second.original)
    [callback] = await bot.wait_for(callback_of(bot, click))
    assert callback.body["data"]["content"].endswith("```\n/skill a cellist's bow hold --seed 11\n```")
    assert await bot.requests.settle(0.5) == [original, named]  # asking for parameters publishes nothing


async def test_parameters_of_a_forgotten_request_says_so_in_the_clickers_language(bot):
    first = await bot.invoke("skill", {"prompt": "a juggler"})
    await bot.requests.wait(1)
    for locale, says in (("en-US", FORGOTTEN), ("zh-TW", locales.t("forgotten", "zh"))):
        it = await bot.click(render.custom_id(render.PARAMS, "f" * 32, 5), first.original, locale=locale)
        [callback] = await bot.wait_for(callback_of(bot, it))
        assert callback.body["type"] == 4 and callback.body["data"]["flags"] & 64
        assert callback.body["data"]["content"] == says


async def test_parameters_when_redis_is_slower_than_the_acknowledgement_allows_says_try_again(bot, monkeypatch):
    """A read of the remembered request that would take longer than intake.PRE_ACK_S (a Redis call queued behind a
    full connection pool) is given up on: the click is still answered within 3 s, asking to try again."""
    first = await bot.invoke("skill", {"prompt": "a juggler", "seed": 5})
    [original] = await bot.requests.wait(1)
    get = Store.get

    async def slow_get(self, name: str):
        if name.startswith("req:"):
            await asyncio.sleep(5)
        return await get(self, name)

    monkeypatch.setattr(Store, "get", slow_get)
    for locale, says in (("en-US", SLOW), ("zh-CN", locales.t("slow", "zh"))):
        t0 = time.monotonic()
        it = await bot.click(render.custom_id(render.PARAMS, original.request_id, 5), first.original, locale=locale)
        [callback] = await bot.wait_for(callback_of(bot, it))
        assert callback.status == 200 and callback.at - t0 < 3 and callback.body["data"]["flags"] & 64
        assert callback.body["data"]["content"] == says


@pytest.mark.security
async def test_only_the_owner_can_delete_a_result_even_after_its_token_died(bot, skill_env):
    it = await bot.invoke("skill", {"prompt": "a juggler's cascade"})
    [req] = await bot.requests.wait(1)
    world = World(skill_env, discord=bot)
    async with world.running():
        await world.send(event(req.origin, EventKind.succeeded, req.request_id, prompt=req.prompt,
                               blobs=[world.image()]))
        await bot.wait_for(lambda c: c.method == "PATCH" and c.path.endswith(f"/{it.token}/messages/@original")
                           and bool(c.files))
    [delete] = [b for b in it.original.components[0]["components"] if b["label"] == "Delete"]
    assert (delete["custom_id"], delete["style"]) == (f"skill:delete:{req.request_id}", 4)
    bot.advance(16 * 60)  # the request's own token is dead: the click's token deletes the message
    other = await bot.click(delete["custom_id"], it.original, user_id="777")
    [callback] = await bot.wait_for(callback_of(bot, other))
    assert callback.body["type"] == 4 and callback.body["data"]["flags"] & 64
    assert callback.body["data"]["content"] == NOT_OWNER_DELETE == "Only the person who asked can delete this."
    assert not it.original.deleted and bot.matching(lambda c: c.method == "DELETE") == []
    own = await bot.click(delete["custom_id"], it.original)
    [callback] = await bot.wait_for(callback_of(bot, own))
    assert callback.body["type"] == 6  # acknowledged, nothing said
    [deleted] = await bot.wait_for(lambda c: c.method == "DELETE")
    assert deleted.status == 204 and deleted.path.endswith(f"/{own.token}/messages/@original")
    assert it.original.deleted and it.original not in bot.channel(CHANNEL_ID)


@pytest.mark.parametrize("bot", [{"rate_user_per_min": 10, "max_queued_per_person": 1}], indirect=True)
async def test_a_chinese_interaction_gets_chinese_status_lines_through_delivery(bot, skill_env):
    it = await bot.invoke("skill", {"prompt": "a cellist's vibrato", "n": 2}, locale="zh-CN")
    [req] = await bot.requests.wait(1)
    assert it.original.content == f"⏳ <@{USER_ID}> 已排队（2 张）：*a cellist's vibrato*"
    assert labels(it.original.components) == [["取消"]]  # the status's Cancel, in the requester's language
    # A refusal from the catalogue is said in their language (the cap of 1 is reached); zh-TW reads as zh too.
    said = (await answered(bot, "a second", locale="zh-TW"))["data"]
    assert said["flags"] & 64 and said["content"] == "你已有 1 个请求在等待；请等其中一个完成（或取消一个）"
    # Delivery writes the request's status, result and ping in the language it was asked in.
    world = World(skill_env, discord=bot)
    async with world.running():
        await world.send(event(req.origin, EventKind.progress, req.request_id, prompt=req.prompt, step=10,
                               total_steps=20))
        [edit] = await bot.wait_for(lambda c: c.method == "PATCH" and "第 10/20 步" in c.body.get("content", ""))
        assert labels(edit.body["components"]) == [["取消"]]
        await world.send(event(req.origin, EventKind.succeeded, req.request_id, prompt=req.prompt,
                               blobs=[world.image(7)]))
        [ping] = await bot.wait_for(lambda c: c.method == "POST" and c.path.endswith(f"/{it.token}"))
    assert it.original.content == f"✅ <@{USER_ID}> *a cellist's vibrato*（种子 7）" and it.original.pngs
    assert ping.body["content"] == f"🔔 <@{USER_ID}> 你的图片已完成（见上方）。"
    # The result's buttons too (a 16x16 image is too small to upscale: Vary alone); their ids are the same.
    assert labels(it.original.components) == [["重新生成", "变体", "改写重绘", "参数", "删除"], ["变化"]]
    assert [b["custom_id"] for b in it.original.components[1]["components"]] == [f"skill:v:{req.request_id}:1"]
    # Someone on an English client is still answered in English.
    said = (await answered(bot, "a third", user_id="777"))
    assert said["type"] == 5
    [other] = [r for r in await bot.requests.wait(2) if r.origin.user_id == "777"]
    [edit] = await bot.wait_for(lambda c: c.method == "PATCH" and "a third" in c.body.get("content", ""))
    assert edit.body["content"] == "⏳ <@777> queued: *a third*"
    assert labels(edit.body["components"]) == [["Cancel"]]


def labels(components: list[dict]) -> list[list[str]]:
    """A message's button labels, a row a list."""
    return [[b["label"] for b in row["components"]] for row in components]


async def test_a_result_the_clicks_token_cannot_delete_is_deleted_with_the_bot_token(bot):
    it = await bot.invoke("skill", {"prompt": "a juggler's cascade"})
    [req] = await bot.requests.wait(1)
    it.original.components = render.discord_buttons(req.request_id)  # as delivery leaves it
    bot.fail("DELETE", r"^/webhooks/.*/messages/@original$", 404, body={"message": "Unknown Message", "code": 10008})
    await bot.click(render.custom_id(render.DELETE, req.request_id), it.original)
    [deleted] = await bot.wait_for(lambda c: c.method == "DELETE" and c.path.startswith("/channels/"))
    assert deleted.status == 204 and deleted.path == f"/channels/{CHANNEL_ID}/messages/{it.original.id}"
    assert deleted.headers["Authorization"] == f"Bot {bot.bot_token}" and it.original.deleted
    assert bot.matching(lambda c: c.method == "POST" and c.path.startswith("/webhooks/")) == []  # nothing to say


async def test_upscale_and_vary_of_one_image_publish_img2img_requests_of_the_clicker(bot, skill_env):
    it = await bot.invoke("skill", {"prompt": "a juggler's cascade --no blurry", "n": 2, "seed": 11, "steps": 30})
    [original] = await bot.requests.wait(1)
    # Before delivery posts the result (and keeps its images) a click has nothing to redraw.
    early = await bot.click(render.custom_id(render.UPSCALE, original.request_id, index=1), it.original)
    [callback] = await bot.wait_for(callback_of(bot, early))
    assert callback.body["data"]["flags"] & 64 and callback.body["data"]["content"] == FORGOTTEN
    world = World(skill_env, discord=bot)
    refs = [world.blobs.put(png_bytes(i, 256), width=256, height=256, seed=11 + i) for i in (0, 1)]
    async with world.running():
        await world.send(event(original.origin, EventKind.succeeded, original.request_id, prompt=original.prompt,
                               blobs=refs))
        [posted] = await bot.wait_for(lambda c: c.method == "PATCH" and bool(c.files)
                                      and c.path.endswith(f"/{it.token}/messages/@original"))
    assert posted.status == 200  # the fake checks Discord's limits: 5 rows, 5 buttons a row, unique custom ids
    rows = [[b["label"] for b in row["components"]] for row in it.original.components]
    assert rows == [["Re-roll", "Variations", "Remix", "Parameters", "Delete"], ["U1", "U2"], ["V1", "V2"]]
    [u2] = [b for b in it.original.components[1]["components"] if b["label"] == "U2"]
    assert u2["custom_id"] == f"skill:u:{original.request_id}:2"
    up = await bot.click(u2["custom_id"], it.original, user_id="777")
    [callback] = await bot.wait_for(callback_of(bot, up))
    assert callback.body["type"] == 5
    [upscale] = [r for r in await bot.requests.wait(2) if r.request_id != original.request_id]
    assert upscale.init_image == refs[1] and (upscale.upscale, upscale.width, upscale.height) == (2, 512, 512)
    assert (upscale.strength, upscale.seed, upscale.num_images) == (0.35, 12, 1)
    assert (upscale.prompt, upscale.negative_prompt, upscale.steps) == ("a juggler's cascade", "blurry", 30)
    assert upscale.origin.user_id == "777" and upscale.origin.verify(upscale.request_id, SIGNING_KEY.encode())
    assert up.original.content == "⏳ <@777> queued: *a juggler's cascade*"
    assert (await recall_interaction(upscale.request_id)).token == up.token
    vary = await bot.click(render.custom_id(render.VARY, original.request_id, index=1), it.original, user_id="777")
    await bot.wait_for(callback_of(bot, vary))
    [varied] = [r for r in await bot.requests.wait(3) if r.request_id not in (original.request_id, upscale.request_id)]
    assert varied.init_image == refs[0] and (varied.upscale, varied.width, varied.height) == (1, 256, 256)
    assert (varied.strength, varied.num_images, varied.reroll) == (0.6, 1, 1) and varied.seed != original.seed
