"""`/skill-train` and `/skill-adapters` for every front-end: parsing, who may train, the messages to publish.

    /skill-train <name> [--trigger word] [--steps n] [--caption text]    with images attached, or one zip
    /skill-train cancel <name>
    /skill-adapters

Slack sends the text after the command: `parse(text)`. Discord sends typed options: `train_command(name=...,
trigger=..., steps=..., caption=...)`. Either way `check_allowed` decides, then `finetune_request` (published on
`topics.finetune`, key `finetune_key(req)`) or `cancel_request` (published on `topics.finetune_cancel`, which every
trainer follows). A `--caption` goes through the prompt policy as soon as it is parsed (the trainer checks every
caption again: it trusts no producer). The bots fetch the training files into the blob store themselves
(`fetch_to_blobs`): Slack's need the bot's token, Discord's attachment links expire.
"""

from __future__ import annotations

import asyncio
import logging
import re
from dataclasses import dataclass, field
from functools import cache

from pydantic import ValidationError

from bots.settings import TeamPolicy, TrainCommandSettings
from schemas.codec import describe
from schemas.limits import IngestLimits
from schemas.messages import (
    AdapterRef,
    BlobRef,
    EventKind,
    FineTuneCancel,
    FineTuneRequest,
    JobEvent,
    Origin,
    Platform,
    mention,
)
from skillgen.adapters.registry import Registry
from skillgen.runtime.blobstore import BlobStore
from skillgen.runtime.fetch import IngestError, check_url, download_all
from skillgen.safety.prompt import PromptPolicy

log = logging.getLogger("skillgen.train")

HELP = """\
**/skill-train** teaches your team's model a style or a thing from a few images.
`/skill-train <name> [--trigger word] [--steps 10-5000] [--caption text]` with PNG/JPEG/WebP images attached or one zip
(a `captions.jsonl` or `captions.csv` in the zip captions each image; otherwise `--caption` or "a <trigger> picture").
`/skill-train cancel <name>` stops a training; `/skill-adapters` lists your team's adapters.
Then: `/skill <prompt with the trigger word> --adapter <name>` (latest) or `--adapter <name>@v2`."""

OPTIONS = ("trigger", "steps", "caption")
RESERVED_NAMES = ("cancel", "help")
_OPT_RE = re.compile(r"(?:^|\s)--([A-Za-z][\w-]*)(?=\s|=|$)=?")
_COMMAND_RE = re.compile(r"^\s*/?skill-train\b\s*", re.IGNORECASE)


class TrainCommandError(ValueError):
    """A message for the person who typed the command."""


class NotAllowed(TrainCommandError):
    pass


@dataclass(frozen=True)
class Member:
    """What the front-end knows about the person: Discord role ids; Slack user groups and admin flag."""

    user_id: str
    role_ids: frozenset[str] = field(default_factory=frozenset)
    usergroup_ids: frozenset[str] = field(default_factory=frozenset)
    is_admin: bool = False


@dataclass(frozen=True)
class Train:
    name: str
    trigger: str | None = None
    steps: int | None = None
    caption: str | None = None


@dataclass(frozen=True)
class Cancel:
    name: str


@dataclass(frozen=True)
class Help:
    pass


def finetune_key(req: FineTuneRequest) -> bytes:
    # One adapter's trainings share a partition, so they run in the order they were asked for.
    return f"{req.origin.team_id}/{req.adapter}".encode()


# --------------------------------------------------------------------------------------------------- parsing


def _name(value: str) -> str:
    try:
        name = AdapterRef(name=value.strip()).name
    except ValidationError as exc:
        raise TrainCommandError(f"name: {describe(exc).removeprefix('name: ')}") from None
    if name in RESERVED_NAMES:
        raise TrainCommandError(f"{name!r} is a reserved word; choose another adapter name")
    return name


@cache
def prompt_policy() -> PromptPolicy:
    """The consumer's prompt policy (SKILL_SAFETY_EXTRA_TERMS included), built once per process."""
    return PromptPolicy.from_settings()


def check_caption(caption: str | None) -> None:
    """TrainCommandError with the policy's reason when `--caption` asks for what /skill would refuse."""
    if caption:
        decision = prompt_policy().check(caption)
        if not decision.allowed:
            raise TrainCommandError(f"--caption refused. {decision.reason}")


def train_command(name: str, trigger: str | None = None, steps: int | str | None = None,
                  caption: str | None = None) -> Train:
    """A checked Train from typed options (Discord) or parsed text (Slack)."""
    if isinstance(steps, str):
        if not re.fullmatch(r"[0-9]{1,6}", steps.strip()):
            raise TrainCommandError(f"--steps must be a whole number, got {steps!r}; e.g. --steps 500")
        steps = int(steps)
    if trigger is not None and not re.fullmatch(r"[\w-]{1,32}", trigger.strip()):
        raise TrainCommandError(f"--trigger must be one word of letters, digits, '_' or '-', got {trigger!r}")
    check_caption(caption)
    return Train(_name(name), trigger.strip() if trigger else None, steps, caption.strip() if caption else None)


def cancel_command(name: str) -> Cancel:
    """A checked Cancel from a typed option (Discord) or parsed text (Slack)."""
    return Cancel(_name(name))


def parse(text: str) -> Train | Cancel | Help:
    """`[/skill-train] <name> [--trigger w] [--steps n] [--caption text]`, `cancel <name>` or `help`."""
    body = _COMMAND_RE.sub("", text, count=1).strip()
    if body.lower() in ("", "help", "--help", "-h", "?"):
        return Help()
    matches = list(_OPT_RE.finditer(body))
    head = (body[: matches[0].start()] if matches else body).split()
    if head and head[0].lower() == "cancel":
        if matches or len(head) != 2:
            raise TrainCommandError("usage: /skill-train cancel <name>")
        return cancel_command(head[1])
    if len(head) != 1:
        raise TrainCommandError("give one adapter name first, e.g. /skill-train team-style --trigger zq")
    options: dict[str, str] = {}
    for i, m in enumerate(matches):
        option = m.group(1).lower()
        if option not in OPTIONS:
            raise TrainCommandError(f"unknown option --{option}; options are " + ", ".join(f"--{o}" for o in OPTIONS))
        if option in options:
            raise TrainCommandError(f"--{option} is given twice; keep one")
        end = matches[i + 1].start() if i + 1 < len(matches) else len(body)
        value = body[m.end() : end].strip()
        if not value:
            raise TrainCommandError(f"--{option} needs a value")
        options[option] = value
    return train_command(head[0], options.get("trigger"), options.get("steps"), options.get("caption"))


# ----------------------------------------------------------------------------------------------- permission


def check_allowed(permissions: dict[str, TeamPolicy], origin: Origin, member: Member) -> None:
    """NotAllowed unless the team's policy lets this member train (and cancel); the console is the operator."""
    if origin.platform == Platform.console:
        return
    policy = permissions.get(origin.team_id)
    if policy is None:
        raise NotAllowed("training is not enabled for this team yet: an operator adds it to SKILL_TRAIN_PERMISSIONS")
    if origin.platform == Platform.discord:
        if policy.discord_role_ids & member.role_ids:
            return
        raise NotAllowed("you need one of this server's training roles to train adapters; ask a server admin")
    if (
        (policy.slack_admins and member.is_admin)
        or member.user_id in policy.slack_user_ids
        or policy.slack_usergroup_ids & member.usergroup_ids
    ):
        return
    raise NotAllowed("training is limited to this workspace's trainers; ask a workspace admin")


# ---------------------------------------------------------------------------------------------------- files

IMAGE_TYPES = ("image/png", "image/jpeg", "image/webp")
ZIP_TYPES = ("application/zip", "application/x-zip-compressed", "application/x-zip")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


@dataclass(frozen=True)
class Attached:
    """A file as the chat describes it, before any download: name, declared type and size."""

    name: str
    content_type: str | None = None
    size: int | None = None

    @property
    def kind(self) -> str | None:
        """"image", "zip" or None; by the declared type, else by the name. The trainer checks the bytes anyway."""
        declared = (self.content_type or "").split(";")[0].strip().lower()
        name = self.name.lower()
        if declared in ("", "application/octet-stream"):  # the chat could not tell: the name decides
            return "image" if name.endswith(IMAGE_SUFFIXES) else "zip" if name.endswith(".zip") else None
        return "image" if declared in IMAGE_TYPES else "zip" if declared in ZIP_TYPES else None


def size_text(n: int) -> str:
    return f"{n / 1024 / 1024:.1f} MB" if n >= 1024 * 1024 else f"{n / 1024:.0f} KB"


def check_files(files: list[Attached], limits: IngestLimits) -> None:
    """Refuse, before anything is downloaded, what the trainer would refuse by name, type, count or size."""
    if not files:
        raise TrainCommandError("attach the training images (PNG, JPEG or WebP) or one zip of them")
    # A file is named by its place among those sent ("file 2"), never by its sender-chosen name.
    for i, f in enumerate(files, 1):
        if f.kind is None:
            raise TrainCommandError(f"file {i} is not a PNG, JPEG or WebP image or a zip of them")
        if f.size is not None and f.size > limits.max_file_bytes:
            raise TrainCommandError(f"file {i} is {size_text(f.size)}; files may be at most {size_text(limits.max_file_bytes)}")
    zips = [f for f in files if f.kind == "zip"]
    if zips and len(files) > 1:
        raise TrainCommandError("send either images or one zip of them, not both and not several zips")
    if len(files) > limits.max_images:
        raise TrainCommandError(f"{len(files)} images sent; at most {limits.max_images} per training (or one zip)")
    total = sum(f.size or 0 for f in files)
    if total > limits.max_total_bytes:
        raise TrainCommandError(f"the files add up to {size_text(total)}; at most {size_text(limits.max_total_bytes)} in all")


# ------------------------------------------------------------------------------------------------- messages


def finetune_request(cmd: Train, origin: Origin, image_urls: list[str], settings: TrainCommandSettings,
                     images: list[BlobRef] | None = None) -> FineTuneRequest:
    """The request to publish: `image_urls` for the trainer to download (checked against the download policy now,
    so a bad one is reported at once), and/or `images`, files a bot already put in the blob store (Slack's
    private files). The trainer checks everything again: it trusts no producer."""
    if not image_urls and not images:
        raise TrainCommandError("attach the training images (PNG, JPEG or WebP) or one zip of them")
    check_caption(cmd.caption)
    for n, url in enumerate(image_urls, 1):
        try:
            check_url(url, settings.ingest)
        except IngestError as exc:
            raise TrainCommandError(f"file {n}: {exc}" if len(image_urls) > 1 else str(exc)) from None
    fields = {
        "origin": origin,
        "adapter": cmd.name,
        "image_urls": image_urls,
        "images": images or [],
        "steps": cmd.steps or settings.default_train_steps,
        "caption": cmd.caption,
    }
    if cmd.trigger:
        fields["trigger"] = cmd.trigger
    try:
        return FineTuneRequest(**fields)
    except ValidationError as exc:
        raise TrainCommandError(describe(exc).replace("image_urls", "images")) from None


BLOBS_DOWN = "I could not keep the files for the trainer (storage is unreachable); try again in a minute."
UPLOAD_TYPE = "application/octet-stream"  # the trainer tells images from a zip by their bytes


async def fetch_to_blobs(urls: list[str], limits: IngestLimits, blobs: BlobStore, *, slack_token: str | None = None,
                         blobs_down: str = BLOBS_DOWN) -> list[BlobRef]:
    """Download the training files (skillgen.runtime.fetch: the download policy, byte caps; a Slack token only to
    Slack's file hosts) and put each in the blob store, in order: the references for the request, so the trainer
    never needs a chat credential nor a link that expires (Discord's signed CDN URLs do). TrainCommandError when
    a download is refused (naming the file by position) or the store cannot be written (`blobs_down`)."""
    try:
        fetched = await download_all(urls, limits, slack_token=slack_token)
    except IngestError as exc:
        raise TrainCommandError(f"{exc}. Nothing was sent to the trainer.") from None
    try:
        return [await asyncio.to_thread(blobs.put, data, UPLOAD_TYPE) for _, data in fetched]
    except Exception:
        log.exception("cannot put the training files in the blob store")
        raise TrainCommandError(blobs_down) from None


def cancel_request(cmd: Cancel, origin: Origin) -> FineTuneCancel:
    return FineTuneCancel(origin=origin, adapter=cmd.name)


def describe_adapters(registry: Registry, team_id: str) -> str:
    """`/skill-adapters`: the team's adapters and versions, and nobody else's."""
    adapters = registry.adapters(team_id)
    if not adapters:
        return "Your team has no adapters yet: train one with `/skill-train <name>` and a few images."
    lines = ["Your team's adapters:"]
    for name, metas in adapters.items():
        latest = metas[-1]
        t = latest.training
        lines.append(
            f"• `{name}`: {', '.join(f'v{m.version}' for m in metas)} (latest v{latest.version}: trigger `{t.trigger}`, "
            f"{t.steps} steps on {t.images} images, by {mention(t.trained_by.platform, t.trained_by.user_id)}, "
            f"{latest.created_at:%Y-%m-%d})"
        )
    lines.append("Use one with `/skill <prompt> --adapter <name>`, or pin a version: `--adapter <name>@v1`.")
    return "\n".join(lines)


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def progress_text(event: JobEvent) -> str:
    """The one line a bot shows (and keeps editing) for a fine-tune event."""
    name = f"`{event.adapter}`" if event.adapter else "the adapter"
    if event.kind == EventKind.progress and event.step is not None and event.total_steps:
        parts = [f"Training {name}: step {event.step}/{event.total_steps}"]
        if event.loss is not None:
            parts.append(f"loss {event.loss:.4f}")
        if event.eta_s is not None:
            parts.append(f"about {_duration(event.eta_s)} left")
        return " · ".join(parts)
    if event.message:
        return event.message
    return f"Training {name}: {event.kind.value}"
