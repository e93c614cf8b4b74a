from __future__ import annotations

from pathlib import Path
from typing import Annotated

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict


class SafetySettings(BaseSettings):
    """SKILL_SAFETY_EXTRA_TERMS=path1,path2 adds term lists (same format as skillgen/safety/terms/).

    SKILL_SAFETY_NSFW_THRESHOLD: NudeNet score at or above which an exposed-body-part detection blocks
    an image. NudeNet reports nothing under 0.2; plain coloured shapes score up to about 0.53.
    SKILL_SAFETY_CHECKER_DIR: a local directory with `safety_checker/` and `feature_extractor/`
    subfolders (the layout of a Stable Diffusion 1.x model directory); unset runs NudeNet alone.
    SKILL_SAFETY_AUDIT_LOG: a file that every refusal is appended to as one JSON line (ref, category, layer,
    what matched, the normalised text); unset (the default) keeps no audit log.
    """

    model_config = SettingsConfigDict(env_prefix="SKILL_SAFETY_", env_file=".env", extra="ignore", env_ignore_empty=True)

    extra_terms: Annotated[list[Path], NoDecode] = []
    nsfw_threshold: float = Field(default=0.6, ge=0.2, le=1.0)
    checker_dir: Path | None = None
    audit_log: Path | None = None

    @field_validator("extra_terms", mode="before")
    @classmethod
    def _split_commas(cls, value: object) -> object:
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value
