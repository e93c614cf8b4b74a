"""Upscale and Vary of one image of a result: the buttons a result gets (U hidden past 512 px a side, within
Discord's and Slack's limits), and the img2img request a click builds from the remembered request and the result's
images as delivery kept them."""

import hashlib

import pytest

from bots import image_actions, render
from bots.errors import Refusal
from bots.intake import Intake
from bots.ratelimit import RateLimiter
from bots.settings import BotSettings
from schemas.messages import (
    BlobRef,
    EventKind,
    GenerateRequest,
    JobEvent,
    Origin,
    Platform,
)
from skillgen.runtime.redis import Store

pytestmark = pytest.mark.unit

OWNER = Origin(platform=Platform.discord, team_id="1", channel_id="2", user_id="3")
CLICKER = Origin(platform=Platform.discord, team_id="1", channel_id="2", user_id="4")


def ref(n: int, side_px: int = 512, seed: int | None = None) -> BlobRef:
    sha = hashlib.sha256(f"image {n}".encode()).hexdigest()
    return BlobRef(url=f"file:///blobs/{sha[:2]}/{sha}.png", sha256=sha, bytes=1000, width=side_px, height=side_px,
                   seed=100 + n if seed is None else seed)


def original(**fields) -> GenerateRequest:
    fields = {"negative_prompt": "blurry", "steps": 30, "guidance": 6.0, "scheduler": "euler", "num_images": 2,
              "seed": 7, **fields}
    return GenerateRequest(origin=OWNER, prompt="a cellist's bow hold", **fields)


def result(old: GenerateRequest, refs: list[BlobRef]) -> JobEvent:
    return JobEvent(request_id=old.request_id, kind=EventKind.succeeded, origin=old.origin, blobs=refs)


KEPT = ("prompt", "negative_prompt", "steps", "guidance", "scheduler", "adapter", "lane")


def test_upscale_of_the_second_image_doubles_its_size_with_its_own_seed():
    old, refs = original(), [ref(1), ref(2, 384)]
    new = image_actions.request(old, refs, render.UPSCALE, 2, CLICKER)
    assert new.init_image == refs[1] and (new.upscale, new.width, new.height) == (2, 768, 768)
    assert (new.strength, new.seed, new.num_images) == (0.35, 102, 1)
    assert [getattr(new, f) for f in KEPT] == [getattr(old, f) for f in KEPT]
    assert new.origin == CLICKER and new.request_id != old.request_id


def test_vary_keeps_the_size_at_strength_0_6_from_a_fresh_seed_each_click():
    old, refs = original(), [ref(1, 256), ref(2, 256)]
    first = image_actions.request(old, refs, render.VARY, 1, CLICKER)
    second = image_actions.request(old, refs, render.VARY, 1, CLICKER)
    assert first.init_image == refs[0] and (first.width, first.height, first.upscale) == (256, 256, 1)
    assert (first.strength, first.num_images, first.reroll) == (0.6, 1, 1)
    assert first.seed != second.seed  # (1 in 2**32 that this fails by chance)
    assert [getattr(first, f) for f in KEPT] == [getattr(old, f) for f in KEPT]


def test_a_variation_of_an_upscale_is_a_plain_variation_at_the_upscales_size():
    old = image_actions.request(original(), [ref(1)], render.UPSCALE, 1, CLICKER)
    again = image_actions.request(old, [ref(9, 1024)], render.VARY, 1, OWNER)
    assert (again.upscale, again.width, again.strength) == (1, 1024, 0.6)


def test_upscale_is_offered_only_up_to_512_a_side_and_refused_past_it():
    old = original(width=640, height=512)
    big = [ref(1, 640), ref(2, 512)]
    [ups, varies] = image_actions.offered(result(old, big))
    assert [label for _, _, label in ups] == ["U2"] and [label for _, _, label in varies] == ["V1", "V2"]
    with pytest.raises(Refusal) as refused:
        image_actions.request(old, big, render.UPSCALE, 1, CLICKER)
    assert str(refused.value) == ("This image is 640x640: twice that is more than 1024 pixels a side, so it cannot "
                                  "be upscaled.")
    assert image_actions.offered(result(old, [ref(1, 1024)])) == [[(render.VARY, 1, "Vary")]]
    with pytest.raises(Refusal, match="This result has no image 3."):
        image_actions.request(old, big, render.VARY, 3, CLICKER)


def test_a_single_image_gets_upscale_and_vary_and_four_get_two_rows_within_the_platforms_limits():
    old = original(num_images=4)
    one = [(render.UPSCALE, 1, "Upscale 2x"), (render.VARY, 1, "Vary")]
    assert image_actions.offered(result(old, [ref(1)])) == [one]
    four = result(old, [ref(i) for i in range(1, 5)])
    rows = render.discord_buttons(old.request_id, seed=101) + image_actions.discord_rows(four)
    assert len(rows) == 3 and all(len(row["components"]) <= 5 for row in rows)  # Discord: 5 rows of 5 at most
    assert [b["label"] for b in rows[1]["components"]] == ["U1", "U2", "U3", "U4"]
    assert rows[2]["components"][1]["custom_id"] == f"skill:v:{old.request_id}:2"
    blocks = render.slack_blocks("done", old.request_id) + image_actions.slack_blocks(four)
    elements = [e for b in blocks if b["type"] == "actions" for e in b["elements"]]
    ids = [e["action_id"] for e in elements]
    assert len(ids) == len(set(ids)) == 13 and all(len(b.get("elements", ())) <= 25 for b in blocks)
    u2 = next(e for e in elements if e["action_id"] == "skill_u2")
    assert u2["value"] == f"{old.request_id}:2" and image_actions.SLACK_ACTION_ID.match("skill_u2")


def test_per_image_custom_ids_round_trip_and_one_without_an_image_is_not_ours():
    u2 = render.custom_id(render.UPSCALE, "abc", index=2)
    assert u2 == "skill:u:abc:2" and render.parse_custom_id(u2) == render.Button("u", "abc", index=2)
    assert render.parse_custom_id("skill:v:abc:4") == render.Button("v", "abc", None, 4)
    assert render.parse_custom_id("skill:u:abc") is None and render.parse_custom_id("skill:u:abc:0") is None
    assert render.parse_custom_id("skill:remix:abc:5") == render.Button("remix", "abc", 5)


def test_a_failed_result_or_a_training_gets_no_per_image_buttons():
    old = original()
    training = JobEvent(request_id=old.request_id, kind=EventKind.succeeded, origin=OWNER, job="finetune",
                        blobs=[ref(1)])
    assert image_actions.offered(training) == [] and image_actions.slack_blocks(training) == []
    failed = JobEvent(request_id=old.request_id, kind=EventKind.failed, origin=OWNER, message="out of memory")
    assert image_actions.discord_rows(failed) == [] and image_actions.slack_blocks(failed) == []


async def intake_with(old: GenerateRequest) -> Intake:
    store = Store(None)
    await store.put(f"req:{old.request_id}", old.model_dump_json(), 60)
    return Intake(BotSettings(rate_user_per_min=0), producer=None, store=store, limiter=RateLimiter([], store))


async def test_a_click_reads_what_delivery_kept_and_a_result_no_longer_kept_is_forgotten():
    old = original()
    intake = await intake_with(old)
    with pytest.raises(Refusal) as refused:
        await intake.from_image(old.request_id, render.UPSCALE, 1, CLICKER)
    assert refused.value.key == "forgotten"
    await image_actions.remember(intake.store, result(old, [ref(1, 256), ref(2, 256)]), 60)
    new = await intake.from_image(old.request_id, render.UPSCALE, 2, CLICKER)
    assert (new.init_image.sha256, new.width, new.upscale, new.origin) == (ref(2).sha256, 512, 2, CLICKER)


async def test_a_click_meets_the_prompt_policy_like_a_reroll():
    old = GenerateRequest(origin=OWNER, prompt="a gory beheading")  # remembered before a stricter policy
    intake = await intake_with(old)
    await image_actions.remember(intake.store, result(old, [ref(1)]), 60)
    with pytest.raises(Refusal, match="graphic violence or gore"):
        await intake.from_image(old.request_id, render.VARY, 1, CLICKER)
