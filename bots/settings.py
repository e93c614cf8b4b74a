from __future__ import annotations

from pydantic import Field

from bots.grammar import Defaults
from schemas.settings import CommonSettings


class BotSettings(CommonSettings):
    """What every front-end shares: the defaults a bare `/skill <prompt>` gets for this deployment's model."""

    default_width: int = Field(default=512, ge=64, le=1024, multiple_of=8)
    default_height: int = Field(default=512, ge=64, le=1024, multiple_of=8)
    default_steps: int = Field(default=20, ge=1, le=50)
    default_guidance: float = Field(default=7.5, ge=0, le=20)
    default_scheduler: str = Field(default="dpmpp", pattern="^(dpmpp|euler|lcm)$")

    @property
    def defaults(self) -> Defaults:
        return Defaults(
            self.default_width, self.default_height, self.default_steps, self.default_guidance, self.default_scheduler
        )
