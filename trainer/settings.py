"""Settings of the trainer service and of the `/skill-train` commands. No torch: the bots import this module.

Nested values come from `SKILL_<GROUP>__<FIELD>` variables, e.g. `SKILL_LORA__UNET_RANK=16`,
`SKILL_INGEST__MAX_IMAGES=20`, or as JSON: `SKILL_TRAIN_PERMISSIONS='{"123456789": {"discord_role_ids": ["42"]}}'`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field, SecretStr
from pydantic_settings import SettingsConfigDict

from schemas.settings import CommonSettings, default_model
from trainer.ingest import IngestLimits

DEFAULT_ADAPTER_URL = "file://./out/adapters"


class LoraRecipe(BaseModel):
    """The source article's recipe: rank 8 on the UNet's attention projections, rank 4 on the text encoder's.

    Targets are module-name suffixes as peft matches them; add "conv1", "conv2" to reach the UNet's ResNet
    convolutions (a random-weight base learns colour only through those). `text_rank=0` trains the UNet alone.
    """

    unet_rank: int = Field(8, ge=1, le=256)
    unet_alpha: float | None = Field(None, gt=0, description="LoRA alpha; None means alpha = rank (scale 1)")
    unet_targets: list[str] = Field(default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0"], min_length=1)
    text_rank: int = Field(4, ge=0, le=256)
    text_alpha: float | None = Field(None, gt=0)
    text_targets: list[str] = Field(default_factory=lambda: ["q_proj", "k_proj", "v_proj"])
    lr: float = Field(1e-4, gt=0)
    warmup_steps: int = Field(0, ge=0)
    max_grad_norm: float = Field(1.0, gt=0)
    batch_size: int = Field(4, ge=1, le=64)
    resolution_px: int | None = Field(None, ge=64, le=1024, multiple_of=8, description="None: the model's own size")
    seed: int = Field(0, ge=0)
    mixed_precision: Literal["auto", "no", "fp16", "bf16"] = Field("auto", description="auto: fp16 on CUDA, else no")
    gradient_checkpointing: bool | None = Field(None, description="None: on for CUDA")
    checkpoint_every: int = Field(100, ge=1, description="steps between resumable checkpoints")


class TrainerSettings(CommonSettings):
    model_config = SettingsConfigDict(env_prefix="SKILL_", env_file=".env", extra="ignore", env_nested_delimiter="__",
                                      env_ignore_empty=True)

    model: str = Field(default_factory=default_model, description="base model: a diffusers directory")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    adapter_url: str = Field(DEFAULT_ADAPTER_URL, description="adapter registry root: file:///path or s3://bucket/prefix")
    work_dir: Path = Field(Path(".cache/trainer"), description="checkpoints of running jobs, for resuming")
    slack_bot_token: SecretStr | None = Field(None, description="sent only to SKILL_INGEST__SLACK_FILE_HOSTS (files.slack.com), to fetch shared files")
    progress_interval_s: float = Field(2.0, ge=0, description="at most one progress event per interval")
    cancel_lookback_s: float = Field(86_400, ge=0, description="cancels this recent are read at start")
    # Tansu answers a fetch only when fetch_max_wait_ms runs out; the trainer polls twice a second anyway.
    fetch_max_wait_ms: int = Field(100, ge=1, le=10_000)
    kafka_session_timeout_ms: int = Field(10_000, ge=1000)
    kafka_heartbeat_interval_ms: int = Field(3_000, ge=100)
    kafka_rebalance_timeout_ms: int = Field(60_000, ge=1000)
    sample_images: int = Field(4, ge=1, le=8, description="images per row of the sample grid")
    sample_steps: int = Field(20, ge=1, le=50)
    sample_guidance: float = Field(7.5, ge=0, le=20, description="the embedded icon model draws best at 2.5")
    lora: LoraRecipe = LoraRecipe()
    ingest: IngestLimits = IngestLimits()


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
