"""The slash commands' names, descriptions and option names in Chinese, for Discord's client.

Discord shows a command's `name_localizations` and `description_localizations` (and each option's) to people whose
client is in that locale; what the bot receives is still the English name, so nothing else changes. discord.py
asks a `Translator` for them when the commands are synced: `CommandTranslator` answers from `COMMANDS` for the
locales that read as Chinese (`zh-CN`, `zh-TW`: bots/locales.from_discord) and leaves every other locale, and any
command or option the catalogue does not know (an extension's), to the English.

Each entry holds the English the code registers and its translation. The English is the key's check: where the code
puts a number into a description (`f"denoising steps, 1-{MAX_STEPS}"`), the English here says `{max}` and the
number the code registered fills the Chinese's `{max}` too; a registered English that no longer matches gets no
translation (and a warning) rather than a stale one. Discord refuses the whole sync (400 50035) over one bad
localization: names are 1-32 letters, digits, `-` or `_` (Devanagari and Thai marks too), lowercase where the
script has case; descriptions 1-100 characters. tests/unit/test_command_locales.py checks every entry against
those rules and against the commands as really registered.
"""

from __future__ import annotations

import logging
import re
from string import Formatter
from typing import NamedTuple

from discord import Locale, app_commands
from discord.app_commands import TranslationContextLocation as Where

from bots.locales import DEFAULT, from_discord

log = logging.getLogger("skillgen.locales")


class Text(NamedTuple):
    """One string: the English the code registers (with `{placeholders}` where the code puts a number) and its
    Chinese (the same placeholders)."""

    en: str
    zh: str

    def translate(self, registered: str, lang: str) -> str | None:
        """The translation of `registered` (the English as the code registered it), or None when it is not this
        entry's English (the code's text changed since)."""
        match = _pattern(self.en).fullmatch(registered)
        return None if match is None else getattr(self, lang).format(**match.groupdict())


class Option(NamedTuple):
    name: Text
    description: Text | None = None  # None: the code gives it none (discord.py registers "…")


class Command(NamedTuple):
    name: Text
    description: Text
    options: dict[str, Option]


def _pattern(template: str) -> re.Pattern:
    """`template` as a regex: its text literally, each `{name}` a number."""
    parts = Formatter().parse(template)
    return re.compile("".join(re.escape(text) + (f"(?P<{name}>[0-9]+)" if name else "") for text, name, _, _ in parts))


def _images() -> dict[str, Option]:
    """/skill-train's image2 ... image10: more training images, described by nothing but their name."""
    return {f"image{i}": Option(Text(f"image{i}", f"图片{i}")) for i in range(2, 11)}


COMMANDS: dict[str, Command] = {
    "skill": Command(
        Text("skill", "技能图"),
        Text("Draw a skill image (write help for how)", "画一张技能图（写 help 查看用法）"),
        {
            "prompt": Option(Text("prompt", "提示词"), Text(
                "what to draw; may also carry options, e.g. a cellist's bow hold --ar 16:9",
                "要画什么；也可以带选项，例如 a cellist's bow hold --ar 16:9")),
            "no": Option(Text("no", "排除"), Text("things to keep out of the picture", "不要出现在画面里的东西")),
            "ar": Option(Text("ar", "宽高比"), Text("aspect ratio, e.g. 16:9 (or use size)", "宽高比，例如 16:9（或改用尺寸）")),
            "size": Option(Text("size", "尺寸"), Text(
                "exact size WxH, multiples of 8 from 64 to 1024, e.g. 512x768",
                "精确尺寸 宽x高，64 到 1024 之间 8 的倍数，例如 512x768")),
            "steps": Option(Text("steps", "步数"), Text("denoising steps, 1-{max}", "去噪步数，1-{max}")),
            "seed": Option(Text("seed", "种子"), Text("a seed for a repeatable image", "种子：用同一个种子可以画出同一张图")),
            "n": Option(Text("n", "数量"), Text("how many images, 1-{max}", "画几张图，1-{max}")),
            "adapter": Option(Text("adapter", "适配器"), Text(
                "one of your team's LoRA adapters: name or name@v2", "你团队的一个 LoRA 适配器：名称或 名称@v2")),
            "relax": Option(Text("relax", "放松模式"), Text(
                "relax mode: no hurry, drawn when the GPUs have room (spares your team's fast share)",
                "放松模式：不赶时间，GPU 有空时再画（节省团队的快速额度）")),
            "turbo": Option(Text("turbo", "极速模式"), Text(
                "turbo: a quick draft in a few steps (4, at most 8 with steps); not with adapter",
                "极速模式：几步就画出草图（默认 4 步，用步数最多 8 步）；不能与适配器同用")),
        },
    ),
    "skill-train": Command(
        Text("skill-train", "技能训练"),
        Text("Teach your team's model a style or thing from images", "用图片教团队的模型学会一种风格或事物"),
        {
            "name": Option(Text("name", "名称"), Text(
                "the adapter's name, e.g. team-style (letters, digits, - and _)",
                "适配器的名称，例如 team-style（字母、数字、- 和 _）")),
            "images": Option(Text("images", "图片"), Text(
                "a training image (PNG, JPEG or WebP), or one zip of many (a captions.jsonl inside captions them)",
                "一张训练图片（PNG、JPEG 或 WebP），或一个装有多张图片的 zip（其中的 captions.jsonl 为它们配说明）")),
            "trigger": Option(Text("trigger", "触发词"), Text(
                "the word that calls the concept in prompts (default sks)", "在提示词里唤出这个概念的词（默认 sks）")),
            "steps": Option(Text("steps", "步数"), Text("training steps (default {default})", "训练步数（默认 {default}）")),
            "caption": Option(Text("caption", "说明"), Text(
                "caption for every image; the trigger word is added if missing", "每张图片的说明；缺少触发词时会自动加上")),
            **_images(),
        },
    ),
    "skill-train-cancel": Command(
        Text("skill-train-cancel", "技能训练取消"),
        Text("Stop your team's training of an adapter", "停止团队对某个适配器的训练"),
        {"name": Option(Text("name", "名称"), Text("the adapter whose training to stop", "要停止训练的适配器"))},
    ),
    "skill-adapters": Command(
        Text("skill-adapters", "技能适配器"),
        Text("List your team's LoRA adapters and their versions", "列出团队的 LoRA 适配器及其版本"),
        {},
    ),
}


def shown_as(command: str, lang: str) -> str:
    """`/command` as Discord shows it to someone whose client reads as `lang` (`/技能图` for `skill` in Chinese):
    what the help names. A command the catalogue does not know keeps its name."""
    entry = COMMANDS.get(command)
    return "/" + (getattr(entry.name, lang) if entry is not None and lang != DEFAULT else command)


def lookup(location: Where, data: object) -> Text | None:
    """The catalogue's entry for a string discord.py asks about (`data`: the command, or the parameter)."""
    if location in (Where.command_name, Where.command_description):
        command = COMMANDS.get(getattr(data, "qualified_name", ""))
        if command is None:
            return None
        return command.name if location is Where.command_name else command.description
    if location in (Where.parameter_name, Where.parameter_description):
        command = COMMANDS.get(getattr(getattr(data, "command", None), "qualified_name", ""))
        option = command.options.get(getattr(data, "name", "")) if command is not None else None
        if option is None:
            return None
        return option.name if location is Where.parameter_name else option.description
    return None  # choices: the only ones are autocomplete's adapter names, which stay as they are


class CommandTranslator(app_commands.Translator):
    """The commands' Chinese for Discord (bot.tree.set_translator before sync); None (the English) elsewhere."""

    async def translate(self, string: app_commands.locale_str, locale: Locale,
                        context: app_commands.TranslationContext) -> str | None:
        lang = from_discord(locale.value)
        if lang == DEFAULT:
            return None
        text = lookup(context.location, context.data)
        if text is None:
            return None
        translated = text.translate(string.message, lang)
        if translated is None:
            log.warning("%s %r is not the catalogue's %r (bots/locales/commands.py): left in English",
                        context.location.name, string.message, text.en)
        return translated
