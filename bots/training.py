"""`/skill-train`, `/skill-train cancel` and `/skill-adapters` in the chat bots: the SKILL_BOT_EXTENSIONS module
(bots/extensions.py), on by default.

    Discord  /skill-train name:<adapter> images:<image or zip> [image2..image10] [trigger] [steps] [caption]
             /skill-train-cancel name:<adapter>
             /skill-adapters
    Slack    /skill-train <name> [--trigger w] [--steps n] [--caption text]   then images or one zip in its thread
             /skill-train cancel <name>
             /skill-adapters

Parsing, who may train and the messages to publish are bots/train_commands.py's, shared by both front-ends; the
platform modules only read what the platform sends and answer. Progress and the sample grid come back through
delivery like any other job's events. No torch is imported here: the bots load this module.
"""

from __future__ import annotations

from typing import Any

from bots.settings import TrainCommandSettings


def setup_discord(bot: Any) -> None:
    from bots.training_discord import register

    register(bot, TrainCommandSettings())


def setup_slack(app: Any, intake: Any) -> None:
    from bots.training_slack import register

    register(app, intake, TrainCommandSettings())
