"""The registration point for more chat commands (the trainer's `/skill-train` and `/skill-adapters`).

SKILL_BOT_EXTENSIONS names modules, comma-separated. Each may define either hook or both:

    def setup_discord(bot: bots.discord_bot.SkillBot) -> None:
        # add app commands to bot.tree; they are synced with /skill at start-up
    def setup_slack(app: slack_bolt.async_app.AsyncApp, intake: bots.intake.Intake) -> None:
        # add listeners: app.command("/skill-train")(...); add the command in the Slack app's settings too

`bot.intake` (Discord) and `intake` (Slack) give the settings, the Kafka producer (`intake.send(topic, msg,
key)`), the Redis-or-memory store and the rate limiter. Delivery posts any JobEvent back to its Origin,
fine-tune jobs included, so a command that publishes with an Origin built like the bots' needs no more.
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Any

from bots.errors import BotError


def load(names: list[str]) -> list[ModuleType]:
    modules = []
    for name in names:
        try:
            modules.append(importlib.import_module(name))
        except ImportError as exc:
            raise BotError(f"bot extension {name!r} (SKILL_BOT_EXTENSIONS) cannot be imported: {exc}") from exc
    return modules


def setup_discord(bot: Any, names: list[str]) -> None:
    for module in load(names):
        hook = getattr(module, "setup_discord", None)
        if hook is not None:
            hook(bot)


def setup_slack(app: Any, intake: Any, names: list[str]) -> None:
    for module in load(names):
        hook = getattr(module, "setup_slack", None)
        if hook is not None:
            hook(app, intake)
