"""The one `/skill` command grammar, shared by the Discord, Slack and console front-ends.

    /skill <prompt> [--no <negative>] [--ar 16:9 | --size 512x768] [--steps N] [--seed N] [--n 1-4]
           [--adapter name[@vN]] [--scheduler <one of schemas.messages.SCHEDULERS>] [--relax] [--turbo]
    /skill help

Prompts are free text (apostrophes, commas, quotes), so the line is not shell-split: an option starts at
` --name` and its value runs to the next option. A flag (`--relax`: the relax lane; `--turbo`: a few LCM steps with the
service's fast LoRA) takes no value. Discord's typed fields come in through `from_options` and
meet the same checks. Every error says exactly what to change, in the sender's language (the catalogues' keys,
bots/locales; the request contract's own validation messages, and the option names, stay English).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field

from pydantic import ValidationError

from bots.errors import Refusal
from bots.locales import t
from schemas.codec import describe
from schemas.messages import (
    MAX_SIDE_PX,
    MIN_SIDE_PX,
    SCHEDULERS,
    TURBO_STEPS,
    AdapterRef,
    GenerateRequest,
    Origin,
    Platform,
    Scheduler,
)

HELP_WORDS = ("help", "--help", "-h", "?", "帮助")

OPTIONS = ("no", "ar", "size", "steps", "seed", "n", "adapter", "scheduler", "relax", "turbo")
FLAGS = ("relax", "turbo")  # options without a value
_OPT_RE = re.compile(r"(?:^|\s)--([A-Za-z][\w-]*)(?=\s|=|$)=?")
_COMMAND_RE = re.compile(r"^\s*/?skill\b\s*", re.IGNORECASE)


class CommandError(Refusal, ValueError):
    """A message for the person who typed the command (shown only to them)."""


def help_text(platform: Platform, lang: str = "en", command: str = "/skill") -> str:
    """`/skill help` in `lang` (the catalogues' `help`), naming the command as the person's client shows it
    (`command`: Discord shows people whose client is in Chinese `/技能图`, bots/locales/commands.py; a Slack app may
    name it otherwise, SKILL_SLACK_COMMAND), in the platform's markup: Slack's mrkdwn bolds with one asterisk,
    Discord's Markdown with two. The options keep their English names in every language: the grammar reads those."""
    text = t("help", lang, command=command)
    return text.replace("**", "*") if platform == Platform.slack else text


HELP = help_text(Platform.discord)  # in English, as Discord shows it


@dataclass(frozen=True)
class Defaults:
    """Per-deployment defaults: the embedded tiny model draws 64x64, SD 1.5 512x512."""

    width: int = 512
    height: int = 512
    steps: int = 20
    guidance: float = 7.5
    scheduler: Scheduler = "dpmpp"


@dataclass
class Parsed:
    prompt: str
    options: dict[str, str] = field(default_factory=dict)
    help: bool = False


def split(text: str, *, command: bool = True) -> Parsed:
    """Split `/skill ...` (the leading `/skill` optional) into the prompt and raw option strings.

    `command=False` for text that never carries the command word (Slack's `text`, Discord's prompt field), so
    a prompt that starts with the word "skill" keeps it."""
    body = (_COMMAND_RE.sub("", text, count=1) if command else text).strip()
    if body.lower() in HELP_WORDS:
        return Parsed(prompt="", help=True)
    matches = list(_OPT_RE.finditer(body))
    prompt = body[: matches[0].start()].strip() if matches else body
    options: dict[str, str] = {}
    for i, m in enumerate(matches):
        name = m.group(1).lower()
        if name not in OPTIONS:
            raise CommandError.of("unknown_option", name=name, options=", ".join(f"--{o}" for o in OPTIONS))
        if name in options:
            raise CommandError.of("given_twice", name=name)
        end = matches[i + 1].start() if i + 1 < len(matches) else len(body)
        value = body[m.end() : end].strip()
        if name in FLAGS:
            if value:
                raise CommandError.of("takes_no_value", name=name, example=_EXAMPLES[name])
            options[name] = ""
            continue
        if not value:
            raise CommandError.of("needs_value", name=name, example=_EXAMPLES[name])
        options[name] = value
    if "ar" in options and "size" in options:
        raise CommandError.of("ar_or_size")
    return Parsed(prompt=prompt, options=options)


def from_options(prompt: str, options: Mapping[str, object | None]) -> Parsed:
    """Parsed from typed options (Discord's slash-command fields) plus whatever `--options` the prompt field
    itself carries, so `/skill prompt:a cat --ar 16:9` and `/skill prompt:a cat ar:16:9` mean the same."""
    parsed = split(prompt, command=False)
    for name, value in options.items():
        if value is None or value == "" or value is False:
            continue
        if name not in OPTIONS:
            raise CommandError.of("unknown_field", name=repr(name), options=", ".join(OPTIONS))
        if name in parsed.options:
            raise CommandError.of("field_given_twice", name=name)
        parsed.options[name] = "" if name in FLAGS else str(value).strip()
    if "ar" in parsed.options and "size" in parsed.options:
        raise CommandError.of("ar_or_size_fields")
    if parsed.help and parsed.options:
        raise CommandError.of("help_takes_no_options")
    return parsed


_EXAMPLES = {
    "no": "--no blurry, text",
    "ar": "--ar 16:9",
    "size": "--size 512x768",
    "steps": "--steps 20",
    "seed": "--seed 42",
    "n": "--n 2",
    "adapter": "--adapter team-style@v2",
    "scheduler": "--scheduler euler",
    "relax": "a cellist's bow hold --relax",
    "turbo": "a cellist's bow hold --turbo",
}


def _int(name: str, value: str) -> int:
    if not re.fullmatch(r"[0-9]+", value):
        raise CommandError.of("whole_number", name=name, value=repr(value), example=_EXAMPLES[name])
    # Digits past 12 only make the number larger than any limit; the request's own check names the limit.
    return int(value) if len(value) <= 12 else 10**12


def _round8(x: float) -> int:
    return max(MIN_SIDE_PX, min(MAX_SIDE_PX, int(round(x / 8)) * 8))


def size_for(options: dict[str, str], defaults: Defaults) -> tuple[int, int]:
    if "size" in options:
        m = re.fullmatch(r"([0-9]{1,5})\s*[xX×]\s*([0-9]{1,5})", options["size"])
        if not m:
            raise CommandError.of("size_format", value=repr(options["size"]))
        return int(m.group(1)), int(m.group(2))
    if "ar" in options:
        m = re.fullmatch(r"([0-9]{1,3})\s*:\s*([0-9]{1,3})", options["ar"])
        if not m or int(m.group(1)) == 0 or int(m.group(2)) == 0:
            raise CommandError.of("ar_format", value=repr(options["ar"]))
        ratio = int(m.group(1)) / int(m.group(2))
        if not 1 / 4 <= ratio <= 4:
            raise CommandError.of("ar_extreme", value=options["ar"])
        area = defaults.width * defaults.height  # keep the model's native pixel count
        return _round8(math.sqrt(area * ratio)), _round8(math.sqrt(area / ratio))
    return defaults.width, defaults.height


def to_request(parsed: Parsed, origin: Origin, defaults: Defaults = Defaults(), **extra) -> GenerateRequest:
    """Build the request; every validation error becomes one CommandError naming the option to change. With
    `--turbo` the deployment's steps, guidance and scheduler give way to the request contract's turbo defaults
    (what the person typed still counts, and meets turbo's limits)."""
    o = parsed.options
    width, height = size_for(o, defaults)
    turbo = "turbo" in o
    fields = {
        "origin": origin,
        "prompt": parsed.prompt,
        "negative_prompt": o.get("no", ""),
        "width": width,
        "height": height,
        "steps": _int("steps", o["steps"]) if "steps" in o else defaults.steps,
        "num_images": _int("n", o["n"]) if "n" in o else 1,
        "seed": _int("seed", o["seed"]) if "seed" in o else None,
        "guidance": defaults.guidance,
        "scheduler": o.get("scheduler", defaults.scheduler),
        "lane": "relax" if "relax" in o else "fast",
        **extra,
    }
    if turbo:
        fields["turbo"] = True
        del fields["guidance"]
        if "steps" not in o:
            del fields["steps"]
        if "scheduler" not in o:
            del fields["scheduler"]
    if "adapter" in o:
        try:
            fields["adapter"] = AdapterRef.parse(o["adapter"])
        except ValidationError as exc:
            raise CommandError("--adapter: " + "; ".join(e["msg"].removeprefix("Value error, ") for e in exc.errors())) from None
        except ValueError as exc:
            raise CommandError(f"--adapter: {exc}") from None
    try:
        return GenerateRequest(**fields)
    except ValidationError as exc:
        raise CommandError(_friendly(exc)) from None


_FIELD_TO_OPTION = {
    "prompt": "the prompt",
    "negative_prompt": "--no",
    "width": "--size/--ar width",
    "height": "--size/--ar height",
    "steps": "--steps",
    "num_images": "--n",
    "seed": "--seed",
    "adapter": "--adapter",
    "scheduler": "--scheduler",
    "turbo": "--turbo",
}


def _friendly(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors():
        key = str(err["loc"][0]) if err["loc"] else ""
        where = _FIELD_TO_OPTION.get(key, key)
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "literal_error" and key == "scheduler":
            msg = f"must be one of {', '.join(SCHEDULERS)}"
        parts.append(f"{where}: {msg}")
    return "; ".join(parts) or describe(exc)


def command_line(req: GenerateRequest, seed: int | None = None, defaults: Defaults = Defaults()) -> str:
    """The `/skill ...` line that asks for `req` again: what the Parameters button shows, to copy. Options at
    their deployment default are left out; `seed` (a result's, when the request named none) pins the pictures.
    An Upscale's or Vary's source image cannot be typed: the line is the request it was drawn from.
    `parse(command_line(req))` gives back the same prompt, negative, size, steps, seed, count, adapter,
    scheduler, lane and turbo (tests/unit/test_grammar.py); a turbo request's own defaults are left out too."""
    parts = ["/skill", req.prompt]
    if req.negative_prompt:
        parts += ["--no", req.negative_prompt]
    width, height = (req.width // req.upscale, req.height // req.upscale)
    if (width, height) != (defaults.width, defaults.height):
        parts += ["--size", f"{width}x{height}"]
    if req.steps != (TURBO_STEPS if req.turbo else defaults.steps):
        parts += ["--steps", str(req.steps)]
    if (seed := req.seed if req.seed is not None else seed) is not None:
        parts += ["--seed", str(seed)]
    if req.num_images != 1:
        parts += ["--n", str(req.num_images)]
    if req.adapter is not None:
        parts += ["--adapter", str(req.adapter)]
    if req.scheduler != ("lcm" if req.turbo else defaults.scheduler):
        parts += ["--scheduler", req.scheduler]
    if req.lane == "relax":
        parts.append("--relax")
    if req.turbo:
        parts.append("--turbo")
    return " ".join(parts)


def parse(
    text: str | Parsed, origin: Origin, defaults: Defaults = Defaults(), **extra
) -> GenerateRequest | None:
    """A request, or None for `/skill help`; raises CommandError with a message for the sender."""
    parsed = split(text) if isinstance(text, str) else text
    if parsed.help:
        return None
    return to_request(parsed, origin, defaults, **extra)
