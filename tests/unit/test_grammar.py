"""The one `/skill` grammar: what parses, and that every mistake says exactly what to change."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bots.errors import Refusal
from bots.grammar import (
    OPTIONS,
    CommandError,
    Defaults,
    command_line,
    from_options,
    help_text,
    parse,
    split,
)
from schemas.messages import MAX_PROMPT_CHARS, Origin, Platform

pytestmark = pytest.mark.unit

ORIGIN = Origin(platform=Platform.slack, team_id="T1", channel_id="C1", user_id="U1")


def error_of(text: str) -> str:
    with pytest.raises(CommandError) as info:
        parse(text, ORIGIN)
    return str(info.value)


def test_a_free_text_prompt_keeps_apostrophes_commas_and_quotes():
    req = parse("/skill a drummer's paradiddle, \"top\" view", ORIGIN)
    assert req.prompt == "a drummer's paradiddle, \"top\" view"
    assert (req.width, req.height, req.steps, req.num_images, req.seed) == (512, 512, 20, 1, None)


def test_every_option_reaches_the_request():
    req = parse("/skill a cellist --no blurry, text --size 512x768 --steps 12 --seed 7 --n 3 "
                "--adapter team-style@v2 --scheduler euler", ORIGIN)
    assert req.negative_prompt == "blurry, text"
    assert (req.width, req.height, req.steps, req.seed, req.num_images) == (512, 768, 12, 7, 3)
    assert str(req.adapter) == "team-style@v2" and req.scheduler == "euler"


def test_aspect_ratio_keeps_the_models_pixel_count_in_multiples_of_8():
    req = parse("a skater --ar 16:9", ORIGIN)
    assert req.width % 8 == 0 and req.height % 8 == 0
    assert req.width > req.height
    assert abs(req.width * req.height - 512 * 512) / (512 * 512) < 0.02
    small = parse("a skater --ar 1:1", ORIGIN, Defaults(width=64, height=64))
    assert (small.width, small.height) == (64, 64)


@pytest.mark.parametrize("text", ["/skill help", "help", "/skill --help", "/skill ?", "/SKILL HELP"])
def test_help_is_recognised(text):
    assert parse(text, ORIGIN) is None


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("a cat --colour red", "unknown option --colour; options are --no, --ar"),
        ("a cat --n 2 --n 3", "--n is given twice; keep one"),
        ("a cat --seed", "--seed needs a value, e.g. --seed 42"),
        ("a cat --ar 16:9 --size 512x512", "use either --ar or --size, not both"),
        ("a cat --steps many", "--steps must be a whole number, got 'many'; e.g. --steps 20"),
        ("a cat --steps 80", "--steps: Input should be less than or equal to 50"),
        ("a cat --n 5", "--n: Input should be less than or equal to 4"),
        ("a cat --seed 99999999999", "--seed: Input should be less than or equal to 4294967295"),
        ("a cat --size 500x512", "--size/--ar width: must be a multiple of 8 between 64 and 1024 pixels, got 500"),
        ("a cat --size big", "--size must look like 512x768, got 'big'"),
        ("a cat --ar 16", "--ar must look like 16:9, got '16'"),
        ("a cat --ar 10:1", "--ar 10:1 is too extreme; use a ratio between 1:4 and 4:1"),
        ("a cat --adapter Bad Name", "--adapter: adapter name must be 1-64 characters"),
        ("a cat --adapter style@latest", "--adapter: adapter version must look like name@v3, got 'style@latest'"),
        ("a cat --scheduler ddim", "--scheduler: must be one of dpmpp, euler, lcm"),
        ("--ar 16:9", "the prompt: prompt is empty: describe the skill to draw"),
    ],
)
def test_mistakes_name_the_option_and_the_fix(text, says):
    assert says in error_of(text)


def test_a_prompt_over_the_limit_is_refused_with_the_limit():
    assert f"at most {MAX_PROMPT_CHARS} characters" in error_of("x" * (MAX_PROMPT_CHARS + 1))


def test_command_errors_are_refusals_and_value_errors():
    assert issubclass(CommandError, Refusal) and issubclass(CommandError, ValueError)


def test_text_without_the_command_word_keeps_a_leading_skill():
    assert split("skill tree of a guitarist", command=False).prompt == "skill tree of a guitarist"
    assert split("/skill skill tree of a guitarist").prompt == "skill tree of a guitarist"


def test_typed_options_merge_with_options_in_the_prompt():
    req = parse(from_options("a violinist --ar 16:9", {"n": 2, "seed": 5, "no": None, "size": ""}), ORIGIN)
    assert (req.num_images, req.seed) == (2, 5) and req.width > req.height
    assert from_options("skill tree", {}).prompt == "skill tree"


@pytest.mark.parametrize(
    ("prompt", "options", "says"),
    [
        ("a cat --n 2", {"n": 3}, "n is given twice, as a field and as --n in the prompt; keep one"),
        ("a cat", {"ar": "16:9", "size": "512x512"}, "use either ar or size, not both"),
        ("help", {"n": 2}, "`help` takes no options"),
        ("a cat", {"colour": "red"}, "unknown option 'colour'"),
    ],
)
def test_typed_option_mistakes_name_the_fix(prompt, options, says):
    with pytest.raises(CommandError, match=None) as info:
        from_options(prompt, options)
    assert says in str(info.value)


def test_typed_values_are_validated_like_typed_text():
    with pytest.raises(CommandError, match="--steps: Input should be less than or equal to 50"):
        parse(from_options("a cat", {"steps": 99}), ORIGIN)


def test_help_uses_each_platforms_bold():
    assert "**/skill**" in help_text(Platform.discord)
    assert "*/skill*" in help_text(Platform.slack) and "**" not in help_text(Platform.slack)


def test_help_in_chinese_names_the_command_as_given_and_keeps_the_option_names():
    zh = help_text(Platform.discord, "zh", "/技能图")
    assert zh.startswith("**/技能图** 画一张技能图") and "/skill" not in zh
    assert all(f"`--{o}`" in zh for o in OPTIONS if o != "scheduler")  # the grammar reads the English names
    assert help_text(Platform.slack, "zh").startswith("*/skill* 画一张技能图") and "**" not in help_text(Platform.slack, "zh")
    assert help_text(Platform.slack, command="/draw").startswith("*/draw* draws")
    assert split("帮助").help and split("/skill 帮助").help


_words = st.text(st.characters(blacklist_categories=("Cs", "Cc"), blacklist_characters="-"), min_size=1, max_size=40)


@settings(max_examples=150, deadline=None)
@given(_words)
def test_any_prompt_without_options_comes_through_unchanged(prompt):
    text = prompt.strip()
    if not text or text.lower() in ("help", "--help", "-h", "?"):
        return
    assert parse(from_options(prompt, {}), ORIGIN).prompt == text


async def test_the_console_refuses_a_blocked_prompt_before_publishing(tmp_path):
    from bots.console import ConsoleBot
    from bots.settings import BotSettings

    bot = ConsoleBot(BotSettings(kafka_bootstrap="127.0.0.1:1"), tmp_path)  # never connected: nothing published
    with pytest.raises(CommandError, match="Your prompt was blocked: it asks for sexual content or nudity."):
        await bot.submit("/skill a nude figure study")


_KEPT = ("prompt", "negative_prompt", "width", "height", "steps", "seed", "num_images", "adapter", "scheduler", "lane",
         "turbo", "guidance")


@pytest.mark.parametrize("line", [
    "/skill a cellist --no blurry, text --size 512x768 --steps 12 --seed 7 --n 3 --adapter team-style@v2 "
    "--scheduler euler --relax",
    "/skill a drummer's paradiddle, \"top\" view",
    "/skill a skater --ar 16:9 --seed 0",
    "/skill a rower's catch --turbo",
    "/skill a rower's catch --no blur --steps 6 --seed 9 --n 2 --relax --turbo",
])
def test_the_parameters_line_asks_for_the_same_request_again(line):
    req = parse(line, ORIGIN)
    again = parse(command_line(req), ORIGIN)
    assert again.model_dump(include=set(_KEPT)) == req.model_dump(include=set(_KEPT))


def test_the_parameters_line_leaves_defaults_out_and_pins_the_results_seed():
    req = parse("/skill a violinist's bow hold", ORIGIN)
    assert command_line(req) == "/skill a violinist's bow hold"
    assert command_line(req, seed=42) == "/skill a violinist's bow hold --seed 42"
    small = Defaults(width=64, height=64, steps=8)
    assert command_line(parse("a cat --size 64x64 --steps 8", ORIGIN, small), defaults=small) == "/skill a cat"


def test_an_upscales_parameters_are_those_of_the_image_it_enlarged():
    req = parse("/skill a cat --size 256x256 --seed 3", ORIGIN).model_copy(update={"width": 512, "height": 512, "upscale": 2})
    assert command_line(req) == "/skill a cat --size 256x256 --seed 3"


# -- --turbo -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("defaults", [Defaults(), Defaults(width=64, height=64, steps=8, guidance=5.0, scheduler="euler")])
def test_turbo_takes_a_few_lcm_steps_at_low_guidance_whatever_the_deployments_defaults(defaults):
    req = parse("/skill a rower's catch --turbo", ORIGIN, defaults)
    assert (req.prompt, req.turbo, req.scheduler, req.steps, req.guidance) == ("a rower's catch", True, "lcm", 4, 1.0)
    assert (req.width, req.height, req.lane) == (defaults.width, defaults.height, "fast")
    assert parse("/skill a rower's catch --turbo --steps 8 --scheduler lcm", ORIGIN, defaults).steps == 8
    assert parse("/skill a rower's catch", ORIGIN, defaults).turbo is False


@pytest.mark.parametrize(
    ("line", "reason"),
    [
        ("a cat --turbo --steps 12", "--turbo: turbo runs at most 8 steps (default 4), got 12: lower steps or leave them out"),
        ("a cat --turbo --scheduler euler", "--turbo: turbo runs the LCM scheduler: leave the scheduler out"),
        ("a cat --adapter clay --turbo",
         "--turbo: turbo uses this service's fast LoRA; it cannot be combined with an adapter"),
        ("a cat --turbo fast", "--turbo takes no value; put it after the prompt, e.g. a cellist's bow hold --turbo"),
        ("a cat --turbo --turbo", "--turbo is given twice; keep one"),
    ],
)
def test_turbo_refusals_name_what_to_change(line, reason):
    assert error_of(line) == reason


def test_turbo_as_a_typed_field_is_the_flag():
    assert from_options("a cat", {"turbo": True}).options == {"turbo": ""}
    assert from_options("a cat", {"turbo": False}).options == {}
    assert parse(from_options("a cat --steps 2", {"turbo": True}), ORIGIN).steps == 2
    with pytest.raises(CommandError, match="turbo is given twice"):
        from_options("a cat --turbo", {"turbo": True})


def test_the_parameters_line_of_a_turbo_request_leaves_turbos_defaults_out():
    assert command_line(parse("/skill a cat --turbo", ORIGIN)) == "/skill a cat --turbo"
    assert command_line(parse("/skill a cat --turbo --steps 6", ORIGIN)) == "/skill a cat --steps 6 --turbo"
    small = Defaults(width=64, height=64, steps=4, scheduler="lcm")  # a deployment whose defaults look like turbo's
    assert command_line(parse("/skill a cat", ORIGIN, small), defaults=small) == "/skill a cat"


@pytest.mark.parametrize("lang", ["en", "zh"])
def test_help_says_what_turbo_is_in_each_language(lang):
    text = help_text(Platform.discord, lang)
    assert "[--turbo]" in text
    line = next(x for x in text.splitlines() if x.startswith("• `--turbo`"))
    assert ("quick draft in a few steps" if lang == "en" else "极速模式：几步就画出草图") in line and "--adapter" in line
