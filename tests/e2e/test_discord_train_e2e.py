"""Chat to adapter on Discord, end to end: `/skill-train` with three attached images, dispatched by the fake
Discord to the real bot, which copies the attachments from the fake CDN into the blob store (their links expire)
-> real broker -> the trainer service (tiny model) reading them there -> delivery edits the command's response with progress and attaches the sample grid. Then `/skill ...
--adapter` draws a different image than the same request without it, and another guild cannot use the adapter."""

from __future__ import annotations

import asyncio
import io
import json
from urllib.parse import urlsplit

import numpy as np
import pytest
from PIL import Image

from bots import discord_bot
from bots.settings import DiscordSettings
from consumer.worker import registry_resolver
from schemas.limits import IngestLimits
from skillgen.adapters.registry import Registry
from skillgen.inference import load_engine
from tests.fakes.discord import GUILD_ID, TRAINER_ROLE_ID, USER_ID, FakeDiscord
from tests.fakes.system import TINY_DEFAULTS, consumer_running
from tests.fakes.world import World
from tests.integration.test_trainer_e2e import red_circle_png, running, trainer_settings
from trainer.worker import TrainerWorker

pytestmark = pytest.mark.e2e
OTHER_GUILD = "999999999999999999"


def final_edit(token: str):
    return lambda c: c.method == "PATCH" and token in c.path and c.files and c.status == 200


def pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=np.int16)


@pytest.fixture
async def system(skill_env, tiny_model, tmp_path, monkeypatch):
    """Fake Discord, the bot with training allowed for the trainer role, the trainer, the consumer resolving
    adapters from the same registry, and delivery."""
    fake = await FakeDiscord().start()
    host = urlsplit(fake.server.base).netloc
    limits = IngestLimits(allowed_hosts=(host,), require_https=False, allow_private_addresses=True)
    adapters = (tmp_path / "adapters").as_uri()
    monkeypatch.setenv("SKILL_TRAIN_PERMISSIONS", json.dumps({GUILD_ID: {"discord_role_ids": [TRAINER_ROLE_ID]}}))
    monkeypatch.setenv("SKILL_INGEST", limits.model_dump_json())
    monkeypatch.setenv("SKILL_ADAPTER_URL", adapters)
    settings = DiscordSettings(**{k.removeprefix("SKILL_").lower(): v for k, v in fake.settings().items()},
                               **TINY_DEFAULTS)
    stop = asyncio.Event()
    bot = asyncio.create_task(discord_bot.serve(settings, stop))
    await asyncio.wait_for(fake.identified.wait(), 15)
    engine = await asyncio.to_thread(load_engine, tiny_model, "torch", "cpu", "fp32")
    trainer = TrainerWorker(trainer_settings(tiny_model, tmp_path, limits))
    fake.registry = Registry(adapters)
    try:
        async with running(trainer), consumer_running(tiny_model, engine, resolve_adapter=registry_resolver(adapters)), \
                World(skill_env, discord=fake).running(edit_interval_s=0):
            yield fake
    finally:
        stop.set()
        await bot
        await fake.stop()


async def test_train_from_discord_then_draw_with_the_adapter(system):
    images = {f"image{i + 1}" if i else "images": system.attachment(f"circle{i}.png", red_circle_png(i))
              for i in range(3)}
    it = await system.invoke("skill-train", {"name": "circles", **images, "trigger": "zq", "steps": 10,
                                             "caption": "a red circle"}, roles=[TRAINER_ROLE_ID])
    [done] = await system.wait_for(final_edit(it.token), timeout_s=240)

    edits = [c.body.get("content", "") for c in system.matching(lambda c: c.method == "PATCH" and it.token in c.path)]
    assert edits[0].startswith(f"⏳ <@{USER_ID}> training `circles` queued: 3 images, 10 steps")
    assert any("Training `circles`: step " in e and "/10 · loss " in e for e in edits), edits
    assert done.body["content"].startswith(f"✅ <@{USER_ID}> Adapter `circles@v1` is ready")
    [grid] = done.files
    assert Image.open(io.BytesIO(grid.data)).size == (128, 128)  # two samples: base row over adapter row
    assert sorted(system.cdn_fetches) == sorted(a.id for a in images.values())  # the bot fetched each once
    meta = system.registry.meta(GUILD_ID, "circles", 1)
    assert (meta.training.images, meta.training.trained_by.user_id) == (3, USER_ID)

    drawn = {}
    for name, prompt, guild in [
        ("plain", "a zq picture, a red circle --seed 5", GUILD_ID),
        ("adapted", "a zq picture, a red circle --seed 5 --adapter circles", GUILD_ID),
        ("foreign", "a zq picture, a red circle --seed 5 --adapter circles", OTHER_GUILD),
    ]:
        it = await system.invoke("skill", {"prompt": prompt}, guild_id=guild)
        if name == "foreign":
            [answer] = await system.wait_for(
                lambda c, t=it.token: c.method == "PATCH" and t in c.path and c.body.get("content", "").startswith("❌"),
                timeout_s=120)
            assert "no adapter named 'circles'" in answer.body["content"]
        else:
            [answer] = await system.wait_for(final_edit(it.token), timeout_s=120)
            drawn[name] = pixels(answer.files[0].data)
    assert np.abs(drawn["adapted"] - drawn["plain"]).mean() > 1.0
