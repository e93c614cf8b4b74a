"""Remix at intake: the remembered request with the edited prompt, every other field kept unless the edit names
its option, the seed the result was drawn with when the request named none, and the grammar's refusals."""

import pytest

from bots.errors import Refusal
from bots.intake import Intake
from bots.ratelimit import RateLimiter
from bots.settings import BotSettings
from schemas.messages import GenerateRequest, Origin, Platform
from skillgen.runtime.redis import Store

pytestmark = pytest.mark.unit

OWNER = Origin(platform=Platform.slack, team_id="T1", channel_id="C1", user_id="U1")
CLICKER = Origin(platform=Platform.slack, team_id="T1", channel_id="C1", user_id="U2", thread_id="1700000000.000100")


async def remembered(**fields) -> tuple[Intake, GenerateRequest]:
    store = Store(None)
    intake = Intake(BotSettings(), producer=None, store=store, limiter=RateLimiter([], store))
    old = GenerateRequest(origin=OWNER, prompt="a cellist's bow hold", **fields)
    await store.put(f"req:{old.request_id}", old.model_dump_json(), 60)
    return intake, old


KEPT = ("negative_prompt", "width", "height", "steps", "num_images", "guidance", "scheduler", "lane", "deadline_s")


async def test_every_field_the_edit_does_not_name_is_the_originals():
    intake, old = await remembered(negative_prompt="blurry", width=640, height=384, steps=12, num_images=2,
                                   guidance=5.0, scheduler="euler", lane="relax", seed=7, deadline_s=600)
    new = await intake.remix(old.request_id, "a violist's bow hold", CLICKER, seed=99)
    assert new.prompt == "a violist's bow hold" and new.seed == 7  # the request's own seed wins over the result's
    assert [getattr(new, f) for f in KEPT] == [getattr(old, f) for f in KEPT]
    assert new.origin == CLICKER and new.request_id != old.request_id and new.reroll == 0


async def test_options_in_the_edit_replace_only_theirs_and_a_seedless_request_takes_the_results():
    intake, old = await remembered(width=640, height=384, steps=12, num_images=2)
    new = await intake.remix(old.request_id, "a violist --steps 30 --ar 1:1", CLICKER, seed=99)
    assert (new.steps, new.width, new.height, new.num_images, new.seed) == (30, 512, 512, 2, 99)
    assert (await intake.remix(old.request_id, "a violist --seed 5", CLICKER, seed=99)).seed == 5


@pytest.mark.parametrize(("text", "says"), [
    ("help", "Write the prompt to draw"),
    ("a violist --steps 99", "--steps: Input should be less than or equal to 50"),
    ("a violist --colour red", "unknown option --colour"),
    ("a gory beheading", "Your prompt was blocked: it asks for graphic violence or gore."),
])
async def test_an_edit_meets_the_same_refusals_as_a_command(text, says):
    intake, old = await remembered()
    with pytest.raises(Refusal) as refused:
        await intake.remix(old.request_id, text, CLICKER)
    assert says in str(refused.value)


async def test_turbo_in_the_edit_turns_the_original_into_a_turbo_request_and_a_turbo_original_stays_one():
    intake, old = await remembered(steps=30, guidance=6.0, scheduler="euler", num_images=2)
    new = await intake.remix(old.request_id, "a violist --turbo", CLICKER, seed=99)
    assert (new.turbo, new.steps, new.guidance, new.scheduler, new.num_images) == (True, 4, 1.0, "lcm", 2)
    intake, old = await remembered(turbo=True, steps=6)
    new = await intake.remix(old.request_id, "a violist", CLICKER, seed=99)
    assert (new.turbo, new.steps, new.scheduler) == (True, 6, "lcm")
    with pytest.raises(Refusal, match="turbo: turbo runs at most 8 steps"):
        await intake.remix(old.request_id, "a violist --steps 20", CLICKER)
