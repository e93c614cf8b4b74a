"""The commands' Chinese (bots/locales/commands.py): every entry in both languages and within Discord's limits, the
catalogue and the commands the bot really registers in step, and the fake Discord's check of a registration (the
one the integration tests sync against) refusing what Discord refuses."""

import types
from string import Formatter

import pytest
from discord import Locale
from discord.app_commands import TranslationContext
from discord.app_commands import TranslationContextLocation as Where

from bots.discord_bot import SkillBot
from bots.locales.commands import COMMANDS, CommandTranslator, Text
from bots.settings import DiscordSettings
from tests.fakes.discord import MAX_DESCRIPTION, command_errors, name_error

pytestmark = pytest.mark.unit

CHINESE = ("zh-CN", "zh-TW")


def names() -> list[Text]:
    return [t for c in COMMANDS.values() for t in (c.name, *(o.name for o in c.options.values()))]


def descriptions() -> list[Text]:
    return [t for c in COMMANDS.values()
            for t in (c.description, *(o.description for o in c.options.values())) if t is not None]


def fields(text: str) -> set[str]:
    return {name for _, name, _, _ in Formatter().parse(text) if name is not None}


@pytest.mark.parametrize("text", names(), ids=lambda t: t.en)
def test_every_name_has_both_languages_and_is_one_discord_takes(text):
    assert text.en and text.zh and text.zh != text.en
    assert name_error(text.en) is None and name_error(text.zh) is None, text


@pytest.mark.parametrize("text", descriptions(), ids=lambda t: t.en[:30])
def test_every_description_has_both_languages_with_the_same_placeholders_and_fits_discords_100(text):
    assert text.en.strip() and text.zh.strip() and fields(text.en) == fields(text.zh)
    widest = {name: "9" * 10 for name in fields(text.en)}  # a number as wide as a seed
    assert len(text.en.format(**widest)) <= MAX_DESCRIPTION and len(text.zh.format(**widest)) <= MAX_DESCRIPTION


def test_localized_option_names_are_unique_in_each_command_and_command_names_across_commands():
    for command in COMMANDS.values():
        shown = [o.name.zh for o in command.options.values()]
        assert len(set(shown)) == len(shown), command.name.en
    assert len({c.name.zh for c in COMMANDS.values()}) == len(COMMANDS)


async def registered(translator=None) -> list[dict]:
    """The commands as the bot syncs them (the training extension's included), translated as at sync."""
    settings = DiscordSettings()
    bot = SkillBot(settings, intake=types.SimpleNamespace(settings=settings))  # registering asks nothing of it
    tree = bot.tree
    return [await c.get_translated_payload(tree, translator or CommandTranslator()) for c in tree.get_commands()]


async def test_the_registered_commands_carry_chinese_for_every_name_and_description_and_discord_takes_them():
    commands = await registered()
    assert command_errors(commands) == {}
    assert {c["name"] for c in commands} == set(COMMANDS)  # no stale entry, no command left in English
    for command in commands:
        entry = COMMANDS[command["name"]]
        assert set(command["name_localizations"]) == set(command["description_localizations"]) == set(CHINESE)
        assert [o["name"] for o in command["options"]] == list(entry.options)
        for option in command["options"]:
            assert set(option["name_localizations"]) == set(CHINESE), option["name"]
            described = entry.options[option["name"]].description is not None
            assert set(option.get("description_localizations") or {}) == (set(CHINESE) if described else set())
    [skill] = [c for c in commands if c["name"] == "skill"]
    steps = next(o for o in skill["options"] if o["name"] == "steps")
    assert skill["name_localizations"]["zh-CN"] == "技能图"
    assert (steps["name_localizations"]["zh-TW"], steps["description_localizations"]["zh-CN"]) == ("步数", "去噪步数，1-50")


def context(location: Where, command: str, option: str | None = None) -> TranslationContext:
    data = types.SimpleNamespace(qualified_name=command)
    if option is not None:
        data = types.SimpleNamespace(name=option, command=data)
    return TranslationContext(location, data)


async def test_other_locales_unknown_commands_and_changed_english_stay_english(caplog):
    from discord.app_commands import locale_str

    translate = CommandTranslator().translate
    steps = context(Where.parameter_description, "skill", "steps")
    assert await translate(locale_str("denoising steps, 1-50"), Locale.chinese, steps) == "去噪步数，1-50"
    assert await translate(locale_str("denoising steps, 1-50"), Locale.japanese, steps) is None
    assert await translate(locale_str("denoising steps, 1-50"), Locale.american_english, steps) is None
    assert await translate(locale_str("an extension's"), Locale.chinese, context(Where.command_name, "other")) is None
    assert await translate(locale_str("x"), Locale.chinese, context(Where.parameter_name, "skill", "other")) is None
    # The code's English changed and the catalogue's did not: no stale Chinese, and a warning that says which.
    assert await translate(locale_str("denoising steps, up to 50"), Locale.taiwan_chinese, steps) is None
    assert "'denoising steps, up to 50' is not the catalogue's 'denoising steps, 1-{max}'" in caplog.text
    assert Text("training steps (default {default})", "训练步数（默认 {default}）").translate(
        "training steps (default 800)", "zh") == "训练步数（默认 800）"


@pytest.mark.parametrize(
    ("name", "why"),
    [("技能图", None), ("image-2_b", None), ("चित्र", None), ("ภาพ", None), ("Skill", "not lowercase"),
     ("技能 图", "not a letter"), ("skill!", "not a letter"), ("", "between 1 and 32"), ("a" * 33, "between 1 and 32")],
)
def test_the_fakes_name_rule_is_discords(name, why):
    said = name_error(name)
    assert (said is None) if why is None else (why in said)


def test_the_fake_refuses_a_bad_localization_an_unknown_locale_a_long_description_and_clashing_options():
    def command(**changes) -> dict:
        base = {"name": "skill", "description": "Draw", "type": 1,
                "name_localizations": {"zh-CN": "技能图"}, "description_localizations": {"zh-CN": "画"},
                "options": [{"name": "prompt", "description": "what", "type": 3, "name_localizations": {"zh-CN": "提示词"}},
                            {"name": "no", "description": "not", "type": 3, "name_localizations": {"zh-CN": "排除"}}]}
        return {**base, **changes}

    assert command_errors([command()]) == {}
    assert set(command_errors([command(name_localizations={"zh-CN": "Skill Image"})])) == {"0.name_localizations.zh-CN"}
    assert set(command_errors([command(name_localizations={"zh": "技能图"})])) == {"0.name_localizations.zh"}
    long = command(description_localizations={"zh-TW": "画" * 101})
    assert set(command_errors([long])) == {"0.description_localizations.zh-TW"}
    clash = command(options=[{"name": "prompt", "description": "what", "name_localizations": {"zh-CN": "排除"}},
                             {"name": "no", "description": "not", "name_localizations": {"zh-CN": "排除"}}])
    assert command_errors([clash]) == {"0.options": "Option names must be unique in zh-CN."}

