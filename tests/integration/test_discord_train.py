"""`/skill-train`, `/skill-train-cancel` and `/skill-adapters` on Discord: the real discord.py client on the fake
Discord, the training extension loaded by SKILL_BOT_EXTENSIONS' default, publishing to a real broker. Who may
train, every early refusal, what is published, and that one guild never sees another's adapters."""

from __future__ import annotations

import asyncio
import io
import json
import uuid
import zipfile
from urllib.parse import urlsplit

import aiohttp
import pytest
from PIL import Image

from bots import discord_bot
from bots.settings import DiscordSettings
from schemas.messages import FineTuneCancel, FineTuneRequest
from skillgen.adapters.registry import Registry
from skillgen.runtime.blobstore import BlobStore
from tests.fakes.discord import (
    CHANNEL_ID,
    GUILD_ID,
    TRAINER_ROLE_ID,
    USER_ID,
    FakeDiscord,
)
from tests.fakes.records import TopicReader
from tests.harness import SIGNING_KEY
from tests.integration.test_discord_bot import recall_interaction, recall_original
from tests.unit.test_registry import lora_weights, record

OTHER_GUILD = "999999999999999999"


def png(color=(200, 30, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), color).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture
def permissions(request) -> dict:
    """SKILL_TRAIN_PERMISSIONS; a test may pass its own (indirect parametrisation)."""
    return getattr(request, "param", {GUILD_ID: {"discord_role_ids": [TRAINER_ROLE_ID]},
                                      OTHER_GUILD: {"discord_role_ids": ["1"]}})


@pytest.fixture
async def bot(skill_env, tmp_path, monkeypatch, permissions):
    """The bot with training allowed for GUILD_ID's trainer role, downloads allowed from the fake's CDN;
    `bot.finetunes` and `bot.cancels` read what it published."""
    fake = await FakeDiscord().start()
    host = urlsplit(fake.server.base).netloc
    monkeypatch.setenv("SKILL_TRAIN_PERMISSIONS", json.dumps(permissions))
    monkeypatch.setenv("SKILL_INGEST__ALLOWED_HOSTS", json.dumps([host]))
    monkeypatch.setenv("SKILL_INGEST__REQUIRE_HTTPS", "false")
    monkeypatch.setenv("SKILL_INGEST__ALLOW_PRIVATE_ADDRESSES", "true")
    monkeypatch.setenv("SKILL_INGEST__MAX_FILE_BYTES", "100000")
    monkeypatch.setenv("SKILL_ADAPTER_URL", (tmp_path / "adapters").as_uri())
    settings = DiscordSettings(**{k.removeprefix("SKILL_").lower(): v for k, v in fake.settings().items()})
    stop = asyncio.Event()
    task = asyncio.create_task(discord_bot.serve(settings, stop))
    await asyncio.wait_for(fake.identified.wait(), 15)
    bootstrap = skill_env.vars["SKILL_KAFKA_BOOTSTRAP"]
    async with TopicReader(bootstrap, skill_env.topics.finetune, FineTuneRequest) as fake.finetunes, \
            TopicReader(bootstrap, skill_env.topics.finetune_cancel, FineTuneCancel) as fake.cancels:
        fake.registry = Registry((tmp_path / "adapters").as_uri())
        yield fake
    stop.set()
    await task
    await fake.stop()


async def answer(fake: FakeDiscord, interaction) -> dict:
    """The interaction's first answer: its callback, or for a deferred one, the first edit of the response."""
    [callback] = await fake.wait_for(
        lambda c: c.method == "POST" and c.path.startswith(f"/interactions/{interaction.id}/"))
    if callback.body["type"] != 5:
        return callback.body["data"]
    [edit] = await fake.wait_for(lambda c: c.method == "PATCH" and interaction.token in c.path)
    return {**edit.body, "flags": 64 if interaction.original.ephemeral else 0}


async def test_the_commands_are_registered_with_typed_options(bot):
    commands = {c["name"]: c for c in bot.commands}
    assert set(commands) == {"skill", "skill-train", "skill-train-cancel", "skill-adapters"}
    options = {o["name"]: o for o in commands["skill-train"]["options"]}
    assert [o["name"] for o in commands["skill-train"]["options"] if o.get("required")] == ["name", "images"]
    assert {n for n, o in options.items() if o["type"] == 11} == {"images", *(f"image{i}" for i in range(2, 11))}
    assert (options["steps"]["min_value"], options["steps"]["max_value"]) == (10, 5000)
    assert [o["name"] for o in commands["skill-train-cancel"]["options"]] == ["name"]


async def test_a_trainer_trains_the_request_carries_the_attachments_and_the_interaction(bot, skill_env):
    a, b = bot.attachment("one.png", png()), bot.attachment("two.webp", png(), "image/webp")
    it = await bot.invoke("skill-train", {"name": "team-style", "images": a, "image2": b, "trigger": "zq",
                                          "steps": 40}, roles=[TRAINER_ROLE_ID])
    said = await answer(bot, it)
    assert said["content"] == f"⏳ <@{USER_ID}> training `team-style` queued: 2 images, 40 steps, trigger word `zq`"
    assert not said["flags"] & 64
    [req] = await bot.finetunes.wait(1)
    assert (req.adapter, req.trigger, req.steps, req.image_urls) == ("team-style", "zq", 40, [])
    o = req.origin
    assert (o.platform, o.team_id, o.channel_id, o.user_id) == ("discord", GUILD_ID, CHANNEL_ID, USER_ID)
    assert it.token not in req.model_dump_json() and o.verify(req.request_id, SIGNING_KEY.encode())
    assert (await recall_interaction(req.request_id)).token == it.token
    # The response's id too: after the token's 15 minutes delivery edits it with the bot token.
    assert await recall_original(req.request_id) == it.original.id
    # The bot fetched each attachment once, into the blob store: the request carries no link that can expire.
    assert bot.finetunes.seen == [req] and bot.cdn_fetches == [a.id, b.id]
    blobs = BlobStore(skill_env.vars["SKILL_BLOB_URL"])
    assert [blobs.get(ref) for ref in req.images] == [a.data, b.data]
    bot.advance(2 * 86400)  # two days on, when the trainer may only now get to it
    async with aiohttp.ClientSession() as http, http.get(a.url) as gone:
        assert gone.status == 404 and await gone.text() == "This content is no longer available."
    assert [blobs.get(ref) for ref in req.images] == [a.data, b.data]


@pytest.mark.parametrize(
    ("options", "roles", "says"),
    [
        ({"name": "team-style"}, [], "you need one of this server's training roles"),
        ({"name": "Team Style!"}, [TRAINER_ROLE_ID], "name:"),
        ({"name": "cancel"}, [TRAINER_ROLE_ID], "'cancel' is a reserved word"),
        ({"name": "team-style", "trigger": "two words"}, [TRAINER_ROLE_ID], "--trigger must be one word"),
        ({"name": "team-style", "images": ("notes.txt", b"hello", "text/plain")}, [TRAINER_ROLE_ID],
         "file 1 is not a PNG, JPEG or WebP image or a zip of them"),
        ({"name": "team-style", "images": ("huge.png", b"\x89PNG" + bytes(200_000), "image/png")}, [TRAINER_ROLE_ID],
         "file 1 is 195 KB; files may be at most 98 KB"),
        ({"name": "team-style", "image2": ("more.zip", b"PK\x03\x04", "application/zip")}, [TRAINER_ROLE_ID],
         "send either images or one zip of them, not both"),
    ],
)
async def test_refusals_are_ephemeral_say_what_to_change_and_publish_nothing(bot, options, roles, says):
    files = {k: bot.attachment(*v) for k, v in options.items() if isinstance(v, tuple)}
    options = {"images": bot.attachment("one.png", png()), **options, **files}
    it = await bot.invoke("skill-train", options, roles=roles)
    said = await answer(bot, it)
    assert said["flags"] & 64 and said["content"].startswith("❌") and says in said["content"]
    assert await bot.finetunes.settle(0.5) == []


async def test_a_guild_without_a_training_policy_is_told_how_to_get_one(bot):
    it = await bot.invoke("skill-train", {"name": "x", "images": bot.attachment("one.png", png())},
                          guild_id="888888888888888888", roles=[TRAINER_ROLE_ID])
    said = await answer(bot, it)
    assert said["flags"] & 64 and "training is not enabled for this team yet" in said["content"]
    assert await bot.finetunes.settle(0.5) == []


async def test_cancel_publishes_for_the_team_and_only_trainers_may(bot):
    it = await bot.invoke("skill-train-cancel", {"name": "team-style"})
    assert "training roles" in (await answer(bot, it))["content"]
    it = await bot.invoke("skill-train-cancel", {"name": "team-style"}, roles=[TRAINER_ROLE_ID])
    said = await answer(bot, it)
    assert said["content"].startswith("Asked the trainer to stop `team-style`") and said["flags"] & 64
    [cancel] = await bot.cancels.wait(1)
    assert (cancel.adapter, cancel.origin.team_id, cancel.origin.user_id) == ("team-style", GUILD_ID, USER_ID)
    assert await bot.cancels.settle(0.5) == [cancel]


async def test_adapters_lists_this_guilds_adapters_and_never_another_guilds(bot):
    it = await bot.invoke("skill-adapters", {})
    assert "Your team has no adapters yet" in (await answer(bot, it))["content"]
    bot.registry.publish(GUILD_ID, "team-style", lora_weights(1), record(uuid.uuid4().hex, user=USER_ID))
    bot.registry.publish(GUILD_ID, "team-style", lora_weights(2), record(uuid.uuid4().hex, user=USER_ID))
    bot.registry.publish(OTHER_GUILD, "their-secret", lora_weights(3), record(uuid.uuid4().hex, user="1"))
    it = await bot.invoke("skill-adapters", {})
    said = await answer(bot, it)
    assert said["flags"] & 64 and "`team-style`: v1, v2 (latest v2: trigger `zq`" in said["content"]
    assert "their-secret" not in said["content"]
    it = await bot.invoke("skill-adapters", {}, guild_id=OTHER_GUILD)
    said = await answer(bot, it)
    assert "their-secret" in said["content"] and "team-style" not in said["content"]


async def test_a_zip_alone_is_accepted_as_one_file(bot):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("a.png", png())
    it = await bot.invoke("skill-train", {"name": "zipped", "images": bot.attachment("set.zip", buf.getvalue(),
                                                                                      "application/zip")},
                          roles=[TRAINER_ROLE_ID])
    assert "queued: one zip" in (await answer(bot, it))["content"]
    [req] = await bot.finetunes.wait(1)
    assert len(req.images) == 1 and req.image_urls == []


async def test_adapter_names_autocomplete_from_the_teams_registry_only(bot):
    for seed in (1, 2):
        bot.registry.publish(GUILD_ID, "team-style", lora_weights(seed), record(uuid.uuid4().hex, user=USER_ID))
    bot.registry.publish(GUILD_ID, "zz-other", lora_weights(3), record(uuid.uuid4().hex, user=USER_ID))
    bot.registry.publish(OTHER_GUILD, "team-secret", lora_weights(4), record(uuid.uuid4().hex, user="1"))
    skill = next(c for c in bot.commands if c["name"] == "skill")
    assert next(o for o in skill["options"] if o["name"] == "adapter").get("autocomplete") is True

    async def choices(command: str, options: dict, focused: str, **kw) -> list[tuple[str, str]]:
        it = await bot.autocomplete(command, options, focused, **kw)
        [callback] = await bot.wait_for(
            lambda c: c.method == "POST" and c.path.startswith(f"/interactions/{it.id}/"))
        assert callback.body["type"] == 8
        return [(c["name"], c["value"]) for c in callback.body["data"]["choices"]]

    assert await choices("skill", {"prompt": "a zq icon", "adapter": "team"}, "adapter") == [
        ("team-style (latest: v2)", "team-style"), ("team-style@v2", "team-style@v2"), ("team-style@v1", "team-style@v1")]
    assert await choices("skill-train-cancel", {"name": ""}, "name") == [
        ("team-style (latest: v2)", "team-style"), ("zz-other (latest: v1)", "zz-other")]
    assert await choices("skill", {"prompt": "x", "adapter": "team"}, "adapter", guild_id=OTHER_GUILD) == [
        ("team-secret (latest: v1)", "team-secret"), ("team-secret@v1", "team-secret@v1")]



@pytest.mark.parametrize("permissions", [{GUILD_ID: {"discord_role_ids": [GUILD_ID]}}], indirect=True)
async def test_listing_the_servers_own_id_lets_everyone_train(bot):
    it = await bot.invoke("skill-train", {"name": "open-style", "images": bot.attachment("one.png", png())})
    assert "training `open-style` queued" in (await answer(bot, it))["content"]
    [req] = await bot.finetunes.wait(1)
    assert req.adapter == "open-style"


async def test_a_url_the_download_policy_refuses_is_told_privately_after_the_defer(bot):
    # The URL check may resolve host names, so it runs after the acknowledgement (Discord allows 3 seconds);
    # a refusal then is still the requester's alone: the channel's "thinking..." goes, an ephemeral follow-up says why.
    elsewhere = bot.attachment("one.png", png())
    elsewhere.url = "http://cdn.elsewhere.invalid/one.png"
    it = await bot.invoke("skill-train", {"name": "team-style", "images": elsewhere}, roles=[TRAINER_ROLE_ID])
    [callback] = await bot.wait_for(lambda c: c.method == "POST" and c.path.startswith(f"/interactions/{it.id}/"))
    assert callback.body["type"] == 5 and callback.status == 200
    [followup] = await bot.wait_for(lambda c: c.method == "POST" and c.path.endswith(f"/{it.token}"))
    assert followup.body["flags"] & 64 and followup.body["content"].startswith("❌")
    assert "downloads only come from" in followup.body["content"]
    assert it.original.deleted and bot.channel(CHANNEL_ID) == []
    assert await bot.finetunes.settle(0.5) == []


async def test_an_attachment_whose_link_expired_before_the_bot_fetched_it_is_told_privately(bot):
    stale = bot.attachment("one.png", png(), ttl_s=60)
    bot.advance(120)  # Discord's signed link is dead: its CDN answers 404
    it = await bot.invoke("skill-train", {"name": "team-style", "images": stale}, roles=[TRAINER_ROLE_ID])
    [followup] = await bot.wait_for(lambda c: c.method == "POST" and c.path.endswith(f"/{it.token}"))
    assert followup.body["flags"] & 64 and followup.body["content"].startswith("❌ file 1: ")
    assert "Nothing was sent to the trainer." in followup.body["content"]
    assert it.original.deleted and await bot.finetunes.settle(0.5) == []
