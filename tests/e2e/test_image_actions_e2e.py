"""Upscale and Vary end to end: a two-image result drawn by the real consumer, then U1 and V2 clicked in the fake
Discord: each click is a new img2img request through the real bot, broker and consumer, and its result is a
picture of the chosen image (U1: twice its size; V2: its size, a new picture), posted to the clicker."""

import hashlib
import io

import pytest
from PIL import Image

from bots import render
from schemas.messages import GenerateRequest
from tests.e2e.test_discord_e2e import discord, engine, final_edit  # noqa: F401 (fixtures)
from tests.fakes.records import TopicReader

pytestmark = pytest.mark.e2e


def size_of(message) -> tuple[int, int]:
    [png] = message.pngs
    return Image.open(io.BytesIO(png.data)).size


def pixels(message) -> bytes:
    [png] = message.pngs
    return Image.open(io.BytesIO(png.data)).convert("RGB").tobytes()


async def test_upscale_and_vary_of_one_image_of_a_real_result(discord, skill_env):  # noqa: F811
    async with discord.world.running():
        it = await discord.invoke("skill", {"prompt": "a juggler's cascade", "n": 2, "seed": 5})
        await discord.wait_for(final_edit(it.token), timeout_s=120)
        assert len(it.original.pngs) == 2
        rows = [[b["custom_id"] for b in row["components"]] for row in it.original.components]
        request_id = render.parse_custom_id(rows[0][0]).request_id
        assert rows[1] == [render.custom_id(render.UPSCALE, request_id, index=i) for i in (1, 2)]

        up = await discord.click(rows[1][0], it.original, user_id="777")
        await discord.wait_for(final_edit(up.token), timeout_s=120)
        vary = await discord.click(rows[2][1], it.original, user_id="777")
        await discord.wait_for(final_edit(vary.token), timeout_s=120)

    first, second = (Image.open(io.BytesIO(p.data)) for p in it.original.pngs)
    assert size_of(up.original) == (2 * first.width, 2 * first.height)
    assert up.original.content.startswith("✅ <@777>")
    # Each click redrew the image it names: its request on the topic starts from that posted PNG, byte for byte.
    async with TopicReader(skill_env.vars["SKILL_KAFKA_BOOTSTRAP"], skill_env.topics.generate, GenerateRequest) as rr:
        drawn_from = {r.upscale: r.init_image.sha256 for r in await rr.wait(3) if r.init_image is not None}
    posted = [hashlib.sha256(p.data).hexdigest() for p in it.original.pngs]
    assert drawn_from == {2: posted[0], 1: posted[1]}  # U1 (2x) from image 1, V2 (1x) from image 2
    assert size_of(vary.original) == second.size and pixels(vary.original) != second.convert("RGB").tobytes()
    assert vary.original.content.startswith("✅ <@777>")

