"""Settings of the front-ends and of delivery. Every field reads `SKILL_<FIELD>` (or `.env`); tokens are SecretStr.

The API base URLs default to the real services; tests point them at local fakes, and nothing else changes.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, Field, SecretStr, field_validator
from pydantic_settings import NoDecode, SettingsConfigDict

from bots.grammar import Defaults
from schemas.limits import IngestLimits
from schemas.messages import Scheduler
from skillgen.adapters.registry import DEFAULT_ADAPTER_URL
from skillgen.runtime.settings import CommonSettings

CommaList = Annotated[list[str], NoDecode]


def _split_commas(value: object) -> object:
    if isinstance(value, str):
        if value.strip().lower() == "none":  # an empty variable means unset, so "none" is how to say none
            return []
        return [part.strip() for part in value.split(",") if part.strip()]
    return value


class DiscordAccess(CommonSettings):
    discord_token: SecretStr | None = None
    discord_application_id: str | None = None
    # discord.py and delivery send every REST call here (API version included).
    discord_api_base: str = "https://discord.com/api/v10"


class SlackAccess(CommonSettings):
    slack_bot_token: SecretStr | None = None
    # slack_sdk's base_url: every Web API method is this plus its name.
    slack_api_base: str = "https://slack.com/api/"


class Remembering(CommonSettings):
    # How long the buttons on a result keep working: the bots keep each request (Re-roll, Variations, Remix,
    # Cancel, Delete) and delivery each result's images (Upscale, Vary) this long.
    remember_s: int = Field(default=7 * 86400, ge=60)


class BotSettings(Remembering):
    """What every front-end shares: the defaults a bare `/skill <prompt>` gets for this deployment's model,
    rate limits and quotas, and who is exempt from them."""

    default_width: int = Field(default=512, ge=64, le=1024, multiple_of=8)
    default_height: int = Field(default=512, ge=64, le=1024, multiple_of=8)
    default_steps: int = Field(default=20, ge=1, le=50)
    default_guidance: float = Field(default=7.5, ge=0, le=20)
    default_scheduler: Scheduler = "dpmpp"

    # 0 turns a limit off. Rates count requests; daily quotas count images (--n 4 uses four).
    rate_user_per_min: int = Field(default=6, ge=0)
    rate_team_per_min: int = Field(default=60, ge=0)
    quota_user_per_day: int = Field(default=200, ge=0)
    quota_team_per_day: int = Field(default=2000, ge=0)
    # "discord:<user id>" or "slack:<user id>", comma-separated: never rate limited.
    admins: CommaList = []
    # Backpressure: a /skill is refused ("busy, try again in about N min") while the consumer group has more than
    # this many seconds of work queued (skillgen.runtime.groupview, read from Redis); 0 turns the check off.
    max_backlog_s: int = Field(default=1800, ge=0)
    # A person with this many requests not yet finished (queued or drawing) is refused another until one finishes
    # (bots/queued.py); 0 turns the cap off. SKILL_ADMINS are exempt.
    max_queued_per_person: int = Field(default=5, ge=0)
    # Modules that add commands to the bots (see bots/extensions.py), comma-separated; none for /skill alone.
    bot_extensions: CommaList = ["bots.training"]

    _split = field_validator("admins", "bot_extensions", mode="before")(_split_commas)

    def check_chat(self) -> None:
        """What a bot facing Discord or Slack refuses to start without (docs/security.md)."""
        from bots.errors import BotError

        if self.signing_key is None:
            raise BotError("set SKILL_SIGNING_KEY (the same key as delivery's; `openssl rand -hex 32`): the bots seal "
                           "each request's origin so that delivery posts only where a request came from")
        if not self.allowed_teams:
            raise BotError("set SKILL_ALLOWED_TEAMS to the servers and workspaces that may use the bot, e.g. "
                           "discord:123456789012345678,slack:T0123ABCD (or * for any, which lets every server that "
                           "adds the bot use your GPUs)")

    @property
    def defaults(self) -> Defaults:
        return Defaults(
            self.default_width, self.default_height, self.default_steps, self.default_guidance, self.default_scheduler
        )


class DiscordSettings(BotSettings, DiscordAccess):
    discord_gateway_url: str = "wss://gateway.discord.gg/"
    # Set to register the commands in one server only: instant, where global registration takes up to an hour.
    discord_guild_id: str | None = None
    discord_sync_commands: bool = True


class SlackSettings(BotSettings, SlackAccess):
    slack_signing_secret: SecretStr | None = None
    slack_app_token: SecretStr | None = None
    slack_mode: Literal["socket", "http"] = "socket"
    slack_port: int = Field(default=3000, ge=1, le=65535)
    slack_path: str = "/slack/events"
    slack_command: str = Field(default="/skill", pattern=r"^/[a-z0-9_-]{1,31}$")


class DeliverySettings(DiscordAccess, SlackAccess, Remembering):
    # Progress edits per message: at most one per this many seconds.
    edit_interval_s: float = Field(default=2.0, ge=0)
    # The longest a handler waits in line per pass (429s and 5xx backoffs together), holding its partition;
    # a longer wait re-queues the event instead.
    max_retry_after_s: float = Field(default=2.0, ge=0)
    # Tries per pass for a 5xx or a broken connection, with backoff_s doubling in between (while it fits above).
    max_attempts: int = Field(default=5, ge=1, le=20)
    backoff_s: float = Field(default=0.5, ge=0)
    # Passes through the topic (re-queues) before an event goes to the dead-letter topic.
    max_requeues: int = Field(default=20, ge=0)
    # A delivery that crashed mid-post holds its lease this long before another may take over.
    lease_s: float = Field(default=60.0, gt=0)
    marker_ttl_s: int = Field(default=7 * 86400, ge=60)
    # Where delivery journals its done markers before Redis, so that a Redis outage or a restart repeats no post.
    delivery_state_dir: Path = Field(default_factory=lambda: Path(tempfile.gettempdir()) / "skillgen-delivery")
    # Interaction tokens die after 15 minutes; past this age, results go to the channel with the bot token.
    webhook_max_age_s: float = Field(default=14 * 60, gt=0, le=15 * 60)


class TeamPolicy(BaseModel):
    """Who may train in one team (a Discord guild or a Slack workspace)."""

    discord_role_ids: set[str] = Field(default_factory=set, description="members with any of these roles")
    slack_admins: bool = Field(False, description="workspace admins and owners")
    slack_user_ids: set[str] = Field(default_factory=set)
    slack_usergroup_ids: set[str] = Field(default_factory=set, description="members of any of these user groups")


class TrainCommandSettings(CommonSettings):
    """What the bots need for `/skill-train` and `/skill-adapters`."""

    model_config = SettingsConfigDict(env_prefix="SKILL_", env_file=".env", extra="ignore", env_nested_delimiter="__",
                                      env_ignore_empty=True)

    adapter_url: str = DEFAULT_ADAPTER_URL
    train_permissions: dict[str, TeamPolicy] = Field(default_factory=dict, description="team id -> who may train")
    default_train_steps: int = Field(500, ge=10, le=5000)
    train_thread_ttl_s: int = Field(3600, ge=60, description="Slack: a training thread waits this long for `go`")
    ingest: IngestLimits = IngestLimits()
