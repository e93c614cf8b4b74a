"""Message contracts that travel through Kafka.

Every field that a person can set has a limit and a message that names the field, because the bots show
these messages to whoever typed the command. Images never travel in messages: a succeeded event carries blob
references (claim check), so records stay small.
"""

from __future__ import annotations

import hashlib
import hmac
import json
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
    StrictBool,
    ValidationInfo,
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
# A request id becomes a file name (the trainer's work dir, replay's sink), a Redis key and part of a URL: it is
# letters, digits, '_' and '-' only, so '../victim', '/' and 'a/b' never get past the contract.
REQUEST_ID_PATTERN = r"^[A-Za-z0-9_-]{1,64}$"
RequestId = Annotated[str, Field(pattern=REQUEST_ID_PATTERN, description="letters, digits, '_' and '-', 1-64")]
# The one list of samplers: the request contract, the engine's table, the bots' settings and the grammar's
# messages are all derived from it.
Scheduler = Literal["dpmpp", "euler", "lcm"]
SCHEDULERS: tuple[str, ...] = get_args(Scheduler)
# Scheduling lanes (consumer/scheduler.py): `fast` is the default, `relax` is served when fast work leaves room
# (a team's fast budget per day spent, or asked for), `replay` is `skillgen replay`'s re-runs, never ahead of live
# work beyond its share. The consumer may move a `fast` request to `relax`; never the other way.
Lane = Literal["fast", "relax", "replay"]
LANES: tuple[str, ...] = get_args(Lane)
MAX_DEADLINE_S = 24 * 3600
# Turbo (GenerateRequest.turbo): a few steps of the LCM scheduler at low guidance with this service's fast LoRA (an
# LCM-LoRA, SKILL_FAST_LORA). What a turbo request leaves out defaults to these; more steps or guidance is refused.
TURBO_STEPS, MAX_TURBO_STEPS = 4, 8
TURBO_GUIDANCE, MAX_TURBO_GUIDANCE = 1.0, 2.0
# img2img (the chat's Vary and Upscale actions): how much of the init image is redrawn, and the upscale factors.
MIN_STRENGTH, MAX_STRENGTH, DEFAULT_STRENGTH = 0.05, 1.0, 0.6
Upscale = Literal[1, 2]
# An init image is one of our own results: a PNG of at most MAX_SIDE_PX a side, far below this many bytes.
MAX_INIT_IMAGE_BYTES = 16 * 1024 * 1024
# What a blob store reference to a PNG looks like (skillgen/runtime/blobstore.py writes `<store>/ab/ab12...64.png`);
# the consumer's blob store checks the whole URL again against its own location before reading.
_PNG_BLOB_URL = re.compile(r"[a-z][a-z0-9+.-]*://[^?#\\\s]*/([0-9a-f]{2})/([0-9a-f]{64})\.png")


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


# What each platform's ids look like. They become REST paths (Discord's /channels/{id}) and Redis keys, so free
# text such as '../../guilds/1' is refused here rather than escaped everywhere it is used.
_SNOWFLAKE = r"[0-9]{1,20}"
_SLACK_TS = r"[0-9]{1,12}\.[0-9]{1,8}"
ID_PATTERNS: dict[str, dict[str, str]] = {
    "discord": {"team_id": rf"(dm-)?{_SNOWFLAKE}", "channel_id": _SNOWFLAKE, "user_id": _SNOWFLAKE,
                "thread_id": _SNOWFLAKE, "status_message_id": _SNOWFLAKE},
    "slack": {"team_id": r"[TE][A-Z0-9]{1,20}", "channel_id": r"[CDG][A-Z0-9]{1,20}", "user_id": r"[UWB][A-Z0-9]{1,20}",
              "thread_id": _SLACK_TS, "status_message_id": _SLACK_TS},
    "console": dict.fromkeys(("team_id", "channel_id", "user_id", "thread_id", "status_message_id"),
                             r"[A-Za-z0-9_-][A-Za-z0-9_.-]{0,63}"),  # never '.' first: not '..' either
}
_WHAT = {"discord": "a Discord id (digits)", "slack": "a Slack id", "console": "letters, digits, '_', '.' or '-'"}
SEAL_FIELDS = ("platform", "team_id", "channel_id", "user_id", "thread_id", "status_message_id")


class Origin(_Message):
    """Everything needed to answer in the same channel (and thread) the request came from.

    No chat credential travels here (or anywhere on Kafka): Discord interaction tokens stay in the bots' Redis,
    keyed by request id. `seal` is the bots' HMAC over the request id, the routing fields (SEAL_FIELDS) and
    created_at, so delivery posts only where an accepted request pointed, whoever wrote the event."""

    platform: Platform
    team_id: str = Field(min_length=1, max_length=64, description="Discord guild id, Slack team id, or 'local'")
    channel_id: str = Field(min_length=1, max_length=64)
    user_id: str = Field(min_length=1, max_length=64)
    thread_id: str | None = Field(default=None, max_length=64, description="Slack thread_ts or Discord thread id")
    # Slack: the status message that chat.update keeps current.
    status_message_id: str | None = Field(default=None, max_length=64)
    seal: str | None = Field(default=None, pattern=r"^[0-9a-f]{64}$")
    created_at: datetime = Field(default_factory=_now)

    @field_validator("team_id", "channel_id", "user_id", "thread_id", "status_message_id")
    @classmethod
    def _id(cls, value: str | None, info: ValidationInfo) -> str | None:
        platform = info.data.get("platform")
        if value is None or platform is None:  # (an unknown platform is refused on its own field)
            return value
        if not re.fullmatch(ID_PATTERNS[platform.value][info.field_name], value):
            raise ValueError(f"{value[:80]!r} is not {_WHAT[platform.value]}")
        return value

    def _mac(self, request_id: str, key: bytes) -> str:
        # created_at too: delivery refuses an origin older than its markers live, so a seal cannot be replayed
        # after the marker that stops a second post has expired.
        at_ms = round(self.created_at.timestamp() * 1000)
        body = json.dumps([request_id, *self.routing(), at_ms], separators=(",", ":"))
        return hmac.new(key, body.encode(), hashlib.sha256).hexdigest()

    def sealed(self, request_id: str, key: bytes) -> "Origin":
        """This origin with its seal for `request_id` (what the bots do when they accept a request)."""
        return self.model_copy(update={"seal": self._mac(request_id, key)})

    def verify(self, request_id: str, key: bytes) -> bool:
        """Whether the seal was made with `key` for this request id and these routing fields."""
        return self.seal is not None and hmac.compare_digest(self.seal, self._mac(request_id, key))

    def routing(self) -> tuple:
        """The fields that decide where an answer goes (equal tuples: the same place)."""
        return tuple(getattr(self, f) for f in SEAL_FIELDS)


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


def steps_run(steps: int, strength: float | None) -> int:
    """The denoising steps a picture really runs: all `steps` from noise, or (img2img, `strength` given) the last
    int(steps x strength) of the schedule's, as the engine runs them."""
    return steps if strength is None else int(steps * strength)


class GenerateRequest(_Message):
    schema_version: Literal[1] = SCHEMA_VERSION
    request_id: RequestId = Field(default_factory=new_request_id)
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
    # A replay's copy under a fresh id: the request id it re-runs (the consumer copies it into its events).
    replay_of: RequestId | None = None
    lane: Lane = "fast"
    # Turbo: the few-step path (scheduler lcm, TURBO_STEPS steps, guidance TURBO_GUIDANCE unless given, within the
    # limits above) with the consumer's fast LoRA; no team adapter. After the fields its check reads.
    turbo: StrictBool = False
    # Seconds after created_at by which the result must be ready, or the request is refused early ("busy, try
    # again in about N min"); None: the lane's default (ConsumerSettings.lane_deadline_s).
    deadline_s: int | None = Field(default=None, ge=10, le=MAX_DEADLINE_S)
    # img2img: start from `init_image`, one of our own results in the blob store, and redraw `strength` of it
    # (1.0: everything, the image only sets the layout and colours; 0.3: small changes). With upscale=2 the
    # init image is enlarged 2x first: width and height are then the output size, twice the init image's.
    # (In this order: each one's check reads the fields before it.)
    upscale: Upscale = 1
    init_image: BlobRef | None = Field(default=None, validate_default=True)
    strength: float = Field(default=DEFAULT_STRENGTH, ge=MIN_STRENGTH, le=MAX_STRENGTH, validate_default=True)
    created_at: datetime = Field(default_factory=_now)

    @model_validator(mode="before")
    @classmethod
    def _turbo_defaults(cls, data):
        """A turbo request's scheduler, steps and guidance, where its sender left them out."""
        if isinstance(data, dict) and data.get("turbo") is True:
            data = {"scheduler": "lcm", "steps": TURBO_STEPS, "guidance": TURBO_GUIDANCE, **data}
        return data

    @field_validator("turbo")
    @classmethod
    def _turbo(cls, on: bool, info: ValidationInfo) -> bool:
        if not on:
            return on
        d = info.data  # a field refused on its own is missing here
        if d.get("scheduler", "lcm") != "lcm":
            raise ValueError("turbo runs the LCM scheduler: leave the scheduler out")
        if d.get("steps", TURBO_STEPS) > MAX_TURBO_STEPS:
            raise ValueError(f"turbo runs at most {MAX_TURBO_STEPS} steps (default {TURBO_STEPS}), got {d['steps']}: "
                             "lower steps or leave them out")
        if d.get("guidance", TURBO_GUIDANCE) > MAX_TURBO_GUIDANCE:
            raise ValueError(f"turbo runs at guidance {MAX_TURBO_GUIDANCE:g} at most (default {TURBO_GUIDANCE:g}), "
                             f"got {d['guidance']:g}: lower guidance or leave it out")
        if d.get("adapter") is not None:
            raise ValueError("turbo uses this service's fast LoRA; it cannot be combined with an adapter")
        return on

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

    @field_validator("upscale")
    @classmethod
    def _upscale(cls, f: int, info: ValidationInfo) -> int:
        w, h = info.data.get("width"), info.data.get("height")
        if f > 1 and w is not None and h is not None and (w % (8 * f) or h % (8 * f) or min(w, h) < MIN_SIDE_PX * f):
            raise ValueError(f"with upscale={f}, width and height are the output size ({f}x the init image's): "
                             f"multiples of {8 * f} between {MIN_SIDE_PX * f} and {MAX_SIDE_PX} pixels, got {w}x{h}")
        return f

    @field_validator("init_image")
    @classmethod
    def _init_image(cls, ref: BlobRef | None, info: ValidationInfo) -> BlobRef | None:
        f = info.data.get("upscale")  # None: refused on its own field
        if ref is None:
            if f not in (None, 1):
                raise ValueError(f"upscale={f} enlarges an init_image: give init_image, or leave upscale out")
            return ref
        if ref.content_type != "image/png":
            raise ValueError(f"init_image must be a PNG result of this service, got content type {ref.content_type!r}")
        m = _PNG_BLOB_URL.fullmatch(ref.url)
        if m is None or m.group(2) != ref.sha256 or m.group(1) != ref.sha256[:2]:
            raise ValueError("init_image must be a result of this service: its url must end in the blob store's own "
                             "name for its sha256 (.../ab/ab12...png), without '?', '#' or '\\'")
        if {".", ".."} & set(ref.url.split("://", 1)[1].split("/")):
            raise ValueError("init_image url must not contain '.' or '..' segments")
        if ref.bytes > MAX_INIT_IMAGE_BYTES:
            raise ValueError(f"init_image is {ref.bytes} bytes; at most {MAX_INIT_IMAGE_BYTES}")
        w, h = info.data.get("width"), info.data.get("height")
        if None not in (f, w, h, ref.width, ref.height) and (ref.width * f, ref.height * f) != (w, h):
            what = "the request's size" if f == 1 else f"half the request's size (upscale={f})"
            raise ValueError(f"init_image is {ref.width}x{ref.height} pixels; it must be {what}, "
                             f"{w // f}x{h // f}: set width and height to match")
        return ref

    @property
    def steps_to_run(self) -> int:
        """The denoising steps this request's pictures really run (img2img: steps x strength)."""
        return steps_run(self.steps, self.strength if self.init_image is not None else None)

    @field_validator("strength")
    @classmethod
    def _strength(cls, v: float, info: ValidationInfo) -> float:
        if "init_image" not in info.data:  # refused on its own field
            return v
        if info.data["init_image"] is None:
            if v != DEFAULT_STRENGTH:
                raise ValueError("strength applies to an init_image: give init_image, or leave strength out")
            return v
        steps = info.data.get("steps")
        if steps is not None and steps_run(steps, v) < 1:
            raise ValueError(f"strength {v:g} at {steps} steps redraws nothing (steps x strength must be at "
                             "least 1): raise strength or steps")
        return v


class FineTuneRequest(_Message):
    schema_version: Literal[1] = SCHEMA_VERSION
    request_id: RequestId = Field(default_factory=new_request_id)
    origin: Origin
    adapter: AdapterName
    # Files a bot already fetched into the blob store (Slack's private files: only the Slack bot holds the token)
    # and files to fetch over HTTPS (Discord attachments: no token needed). At least one of the two; `images`
    # comes first so that the check on `image_urls` (always run) sees it.
    images: list[BlobRef] = Field(default_factory=list, max_length=200)
    image_urls: list[str] = Field(default_factory=list, max_length=200, validate_default=True)
    trigger: str = Field(default="sks", min_length=1, max_length=32, pattern=r"^[\w-]+$")
    caption: str | None = Field(default=None, max_length=MAX_PROMPT_CHARS)
    steps: int = Field(default=500, ge=10, le=5000)
    created_at: datetime = Field(default_factory=_now)

    @field_validator("image_urls")
    @classmethod
    def _some_images(cls, urls: list[str], info: ValidationInfo) -> list[str]:
        if not urls and not info.data.get("images"):
            raise ValueError("give at least one image URL or uploaded image")
        return urls


class FineTuneCancel(_Message):
    """Stop a team's running (or queued) training of `adapter`; published on `Topics.finetune_cancel`."""

    schema_version: Literal[1] = SCHEMA_VERSION
    origin: Origin
    adapter: AdapterName
    created_at: datetime = Field(default_factory=_now)


class GenerateCancel(_Message):
    """Cancel image request `request_id`; published on `Topics.generate_cancel` and read by every consumer.
    `origin` is the person who cancels (sealed by the bot for `request_id`): only the request's owner (same
    platform, team and user) may cancel it; the consumer checks, and ignores anyone else's cancel."""

    schema_version: Literal[1] = SCHEMA_VERSION
    request_id: RequestId
    origin: Origin
    created_at: datetime = Field(default_factory=_now)


class EventKind(StrEnum):
    queued = "queued"
    started = "started"
    progress = "progress"
    succeeded = "succeeded"
    failed = "failed"
    blocked = "blocked"
    cancelled = "cancelled"

    @property
    def terminal(self) -> bool:
        return self in TERMINAL_KINDS


# A job's last event: the one after which its record is committed and its result posted.
TERMINAL_KINDS = frozenset({EventKind.succeeded, EventKind.failed, EventKind.blocked, EventKind.cancelled})


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
    request_id: RequestId
    kind: EventKind
    origin: Origin
    job: Literal["generate", "finetune"] = "generate"
    message: str | None = Field(default=None, max_length=2000)
    queue_position: int | None = Field(default=None, ge=0)
    step: int | None = Field(default=None, ge=0)
    total_steps: int | None = Field(default=None, ge=1)
    loss: float | None = None
    # Seconds from this event's created_at until the result is expected (queued and progress events).
    eta_s: float | None = Field(default=None, ge=0)
    lane: Lane | None = None
    blobs: list[BlobRef] = Field(default_factory=list, max_length=16)
    cache_level: Literal["l1", "l2", "flight"] | None = None
    prompt: str | None = Field(default=None, max_length=MAX_PROMPT_CHARS)
    adapter: str | None = None
    # A re-run (`skillgen replay`): the request id it re-runs, and the operator's reason, shown in the post.
    replay_of: RequestId | None = None
    replay_reason: str | None = Field(default=None, max_length=300)
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
