"""Discord end to end: /skill dispatched by a fake Discord gateway to the real discord.py bot -> real broker ->
real consumer (tiny model) -> delivery -> the PNG is attached to the command's response, in the thread it came
from, exactly once."""

import asyncio
import time

import pytest

from bots import discord_bot
from bots.settings import DiscordSettings
from schemas.messages import GenerateRequest, JobEvent
from skillgen.inference import load_engine
from tests.fakes.discord import THREAD_ID, FakeDiscord
from tests.fakes.records import TopicReader
from tests.fakes.system import TINY_DEFAULTS, consumer_running
from tests.fakes.world import World

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def engine(tiny_model):
    return load_engine(tiny_model, "torch", "cpu", "fp32")


@pytest.fixture
async def discord(skill_env, tiny_model, engine):
    """Fake Discord with the bot connected to its gateway, and the consumer running."""
    fake = await FakeDiscord().start()
    settings = DiscordSettings(**{k.removeprefix("SKILL_").lower(): v for k, v in fake.settings().items()},
                               **TINY_DEFAULTS)
    stop = asyncio.Event()
    bot = asyncio.create_task(discord_bot.serve(settings, stop))
    await asyncio.wait_for(fake.identified.wait(), 15)
    fake.world = World(skill_env, discord=fake)
    try:
        async with consumer_running(tiny_model, engine):
            yield fake
    finally:
        stop.set()
        await bot
        await fake.stop()


def final_edit(token: str):
    return lambda c: c.method == "PATCH" and token in c.path and c.files and c.status == 200


async def events_for(env) -> tuple[GenerateRequest, list[JobEvent]]:
    bootstrap = env.vars["SKILL_KAFKA_BOOTSTRAP"]
    async with TopicReader(bootstrap, env.topics.generate, GenerateRequest) as requests:
        [req] = await requests.wait(1)
    async with TopicReader(bootstrap, env.topics.events, JobEvent) as events:
        await events.settle(0.5)
    return req, [e for e in events.seen if e.request_id == req.request_id]


async def test_discord_e2e_png_in_the_thread_exactly_once_across_a_delivery_restart(discord, skill_env):
    async with discord.world.running(crash_before_commit=True) as first:
        it = await discord.invoke("skill", {"prompt": "a skater's ollie, side view"}, channel_id=THREAD_ID,
                                  thread=True)
        await discord.wait_for(final_edit(it.token), timeout_s=120)
    req, events = await events_for(skill_env)
    assert events[-1].kind == "succeeded" and first.handled >= len(events)
    # The first delivery posted but committed nothing: the second reads every event again and posts nothing.
    async with discord.world.running() as second:
        deadline = time.monotonic() + 30
        while second.handled < len(events) and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
        assert second.handled >= len(events)
    assert len(discord.matching(final_edit(it.token))) == 1
    shown, ping = discord.channel(THREAD_ID)  # the result, and the follow-up that pings the requester
    assert shown is it.original and len(shown.pngs) == 1 and ping.via == "followup" and not ping.pngs
    assert shown.content.startswith("✅") and shown.components[0]["components"][0]["label"] == "Re-roll"
    assert req.origin.thread_id == THREAD_ID
    # Parameters on the real result: the request named no seed, so the line pins the one the consumer drew with;
    # the size and steps were the deployment's defaults, so the line leaves them out.
    [params] = [b for b in shown.components[0]["components"] if b["label"] == "Parameters"]
    click = await discord.click(params["custom_id"], shown, user_id="777")
    [answer] = await discord.wait_for(lambda c: c.method == "POST" and c.path.startswith(f"/interactions/{click.id}/"))
    seed = events[-1].blobs[0].seed
    assert req.seed is None and seed is not None and answer.body["data"]["flags"] & 64
    assert answer.body["data"]["content"].endswith(f"```\n/skill a skater's ollie, side view --seed {seed}\n```")


async def test_discord_e2e_a_429_with_retry_after_2_gives_one_post_at_least_2_seconds_later(discord):
    discord.fail("PATCH", r"/messages/@original$", 429, headers={"Retry-After": "2"},
                 body={"message": "You are being rate limited.", "retry_after": 2.0, "global": False},
                 when=lambda body, files: bool(files))
    async with discord.world.running():
        it = await discord.invoke("skill", {"prompt": "a violinist's bow hold"})
        [limited] = await discord.wait_for(lambda c: c.status == 429, timeout_s=120)
        [posted] = await discord.wait_for(final_edit(it.token), timeout_s=30)
    assert posted.at - limited.at >= 2
    assert len(discord.matching(final_edit(it.token))) == 1 and len(it.original.pngs) == 1
