"""Settings of the trainer service.

Nested values come from `SKILL_<GROUP>__<FIELD>` variables, e.g. `SKILL_LORA__UNET_RANK=16`,
`SKILL_INGEST__MAX_IMAGES=20`, or as JSON: `SKILL_TRAIN_PERMISSIONS='{"123456789": {"discord_role_ids": ["42"]}}'`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from schemas.limits import IngestLimits
from skillgen.adapters.recipe import LoraRecipe
from skillgen.adapters.registry import DEFAULT_ADAPTER_URL
from skillgen.runtime.settings import CommonSettings, default_model


class TrainerSettings(CommonSettings):
    model_config = SettingsConfigDict(env_prefix="SKILL_", env_file=".env", extra="ignore", env_nested_delimiter="__",
                                      env_ignore_empty=True)

    model: str = Field(default_factory=default_model, description="base model: a diffusers directory")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    adapter_url: str = Field(DEFAULT_ADAPTER_URL, description="adapter registry root: file:///path or s3://bucket/prefix")
    # No chat token: Slack's private files reach the trainer through the blob store, fetched by the Slack bot.
    work_dir: Path = Field(Path(".cache/trainer"), description="checkpoints of running jobs, for resuming")
    progress_interval_s: float = Field(2.0, ge=0, description="at most one progress event per interval")
    cancel_lookback_s: float = Field(86_400, ge=0, description="cancels this recent are read at start")
    # One trainer at a time per job: a Redis lease renewed every third of this while steps progress, so a trainer
    # that died (or hangs) holding a job lets another resume it after this long.
    train_lease_s: float = Field(30.0, gt=0, description="TTL of a job's training lease, in seconds")
    sample_images: int = Field(4, ge=1, le=8, description="images per row of the sample grid")
    sample_steps: int = Field(20, ge=1, le=50)
    sample_guidance: float = Field(7.5, ge=0, le=20, description="the embedded icon model draws best at 2.5")
    lora: LoraRecipe = LoraRecipe()
    ingest: IngestLimits = IngestLimits()
