"""Message contracts that travel through Kafka.

Every field that a person can set has a limit and a message that names the field, because the bots show
these messages to whoever typed the command. Images never travel in messages: a succeeded event carries blob
references (claim check), so records stay small.
"""

from __future__ import annotations

import re
import uuid
from datetime import datetime, timezone
from enum import StrEnum
from typing import Annotated, Literal, get_args

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    field_validator,
    model_validator,
)

SCHEMA_VERSION = 1

MAX_PROMPT_CHARS = 500
MIN_SIDE_PX, MAX_SIDE_PX = 64, 1024
MAX_STEPS = 50
MAX_IMAGES = 4
MIN_GUIDANCE, MAX_GUIDANCE = 0.0, 20.0
MAX_SEED = 2**32 - 1
ADAPTER_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}$")
# The one list of samplers: the request contract, the engine's table, the bots' settings and the grammar's
# messages are all derived from it.
Scheduler = Literal["dpmpp", "euler", "lcm"]
SCHEDULERS: tuple[str, ...] = get_args(Scheduler)


def _now() -> datetime:
    return datetime.now(timezone.utc)


def new_request_id() -> str:
    return uuid.uuid4().hex


class _Message(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class Platform(StrEnum):
    discord = "discord"
    slack = "slack"
    console = "console"


def mention(platform: Platform, user_id: str) -> str:
    """How a chat names a person: `<@id>` on Discord and Slack."""
    return f"<@{user_id}>" if platform in (Platform.discord, Platform.slack) else user_id


class Origin(_Message):
    """Everything needed to answer in the same channel (and thread) the request came from."""

    platform: Platform
    team_id: str = Field(min_length=1, max_length=64, description="Discord guild id, Slack team id, or 'local'")
    channel_id: str = Field(min_length=1, max_length=64)
    user_id: str = Field(min_length=1, max_length=64)
    thread_id: str | None = Field(default=None, max_length=64, description="Slack thread_ts or Discord thread id")
    # Discord: the interaction token (valid 15 minutes) and application id, to edit the deferred response.
    interaction_token: str | None = Field(default=None, max_length=512)
    application_id: str | None = Field(default=None, max_length=64)
    # Slack: the status message that chat.update keeps current; Slack/Discord response URLs die too.
    status_message_id: str | None = Field(default=None, max_length=64)
    created_at: datetime = Field(default_factory=_now)


def _adapter_name(v: str) -> str:
    if not ADAPTER_NAME_RE.fullmatch(v):
        raise ValueError(
            "adapter name must be 1-64 characters of lowercase letters, digits, '_' or '-', "
            "starting with a letter or digit"
        )
    return v


AdapterName = Annotated[str, AfterValidator(_adapter_name)]


class AdapterRef(_Message):
    """A LoRA adapter by name, optionally pinned to a version (`name@v3`)."""

    name: AdapterName
    version: int | None = Field(default=None, ge=1, le=999_999)

    @classmethod
    def parse(cls, text: str) -> "AdapterRef":
        name, sep, ver = text.partition("@")
        if not sep:
            return cls(name=name)
        if not re.fullmatch(r"v?[0-9]{1,6}", ver):
            raise ValueError(f"adapter version must look like name@v3, got {text!r}")
        return cls(name=name, version=int(ver.lstrip("v")))

    def __str__(self) -> str:
        return self.name if self.version is None else f"{self.name}@v{self.version}"


Prompt = Annotated[str, Field(max_length=MAX_PROMPT_CHARS)]


class GenerateRequest(_Message):
    schema_version: Literal[1] = SCHEMA_VERSION
    request_id: str = Field(default_factory=new_request_id, min_length=1, max_length=64)
    origin: Origin
    prompt: Prompt
    negative_prompt: Prompt = ""
    width: int = 512
    height: int = 512
    steps: int = Field(default=20, ge=1, le=MAX_STEPS)
    num_images: int = Field(default=1, ge=1, le=MAX_IMAGES)
    guidance: float = Field(default=7.5, ge=MIN_GUIDANCE, le=MAX_GUIDANCE)
    seed: int | None = Field(default=None, ge=0, le=MAX_SEED)
    scheduler: Scheduler = "dpmpp"
    adapter: AdapterRef | None = None
    # A re-roll asks for a fresh seed on purpose; it must not be deduplicated against the original.
    reroll: int = Field(default=0, ge=0, le=1_000_000)
    created_at: datetime = Field(default_factory=_now)

    @field_validator("prompt")
    @classmethod
    def _prompt_not_blank(cls, v: str) -> str:
        v = v.strip()
        if not v:
            raise ValueError("prompt is empty: describe the skill to draw, e.g. 'a drummer's paradiddle, top view'")
        return v

    @field_validator("width", "height")
    @classmethod
    def _side(cls, v: int) -> int:
        if not MIN_SIDE_PX <= v <= MAX_SIDE_PX or v % 8:
            raise ValueError(f"must be a multiple of 8 between {MIN_SIDE_PX} and {MAX_SIDE_PX} pixels, got {v}")
        return v


class FineTuneRequest(_Message):
    schema_version: Literal[1] = SCHEMA_VERSION
    request_id: str = Field(default_factory=new_request_id, min_length=1, max_length=64)
    origin: Origin
    adapter: AdapterName
    image_urls: list[str] = Field(min_length=1, max_length=200)
    trigger: str = Field(default="sks", min_length=1, max_length=32, pattern=r"^[\w-]+$")
    caption: str | None = Field(default=None, max_length=MAX_PROMPT_CHARS)
    steps: int = Field(default=500, ge=10, le=5000)
    created_at: datetime = Field(default_factory=_now)


class FineTuneCancel(_Message):
    """Stop a team's running (or queued) training of `adapter`; published on `Topics.finetune_cancel`."""

    schema_version: Literal[1] = SCHEMA_VERSION
    origin: Origin
    adapter: AdapterName
    created_at: datetime = Field(default_factory=_now)


class EventKind(StrEnum):
    queued = "queued"
    started = "started"
    progress = "progress"
    succeeded = "succeeded"
    failed = "failed"
    blocked = "blocked"

    @property
    def terminal(self) -> bool:
        return self in TERMINAL_KINDS


# A job's last event: the one after which its record is committed and its result posted.
TERMINAL_KINDS = frozenset({EventKind.succeeded, EventKind.failed, EventKind.blocked})


class BlobRef(_Message):
    """A pointer into the blob store: the URL plus enough to check and show it without fetching."""

    url: str = Field(min_length=1, max_length=1024)
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    content_type: str = "image/png"
    bytes: int = Field(ge=0)
    width: int | None = None
    height: int | None = None
    seed: int | None = None


class JobEvent(_Message):
    schema_version: Literal[1] = SCHEMA_VERSION
    request_id: str = Field(min_length=1, max_length=64)
    kind: EventKind
    origin: Origin
    job: Literal["generate", "finetune"] = "generate"
    message: str | None = Field(default=None, max_length=2000)
    queue_position: int | None = Field(default=None, ge=0)
    step: int | None = Field(default=None, ge=0)
    total_steps: int | None = Field(default=None, ge=1)
    loss: float | None = None
    eta_s: float | None = Field(default=None, ge=0)
    blobs: list[BlobRef] = Field(default_factory=list, max_length=16)
    cache_level: Literal["l1", "l2", "flight"] | None = None
    prompt: str | None = Field(default=None, max_length=MAX_PROMPT_CHARS)
    adapter: str | None = None
    created_at: datetime = Field(default_factory=_now)

    @model_validator(mode="after")
    def _shape(self) -> "JobEvent":
        if self.kind == EventKind.succeeded and not self.blobs and self.job == "generate":
            # (a fine-tune's may carry none: the image check can withhold its sample grid)
            raise ValueError("a succeeded event must carry at least one blob reference")
        if self.kind != EventKind.succeeded and self.blobs and self.job == "generate":
            raise ValueError("only succeeded events carry blob references")
        if self.kind in (EventKind.failed, EventKind.blocked) and not self.message:
            raise ValueError(f"a {self.kind.value} event must say why in 'message'")
        return self
