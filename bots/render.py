"""What the bots and delivery say in a channel, for Discord and Slack alike, and the Re-roll/Variations buttons.

A button names its action and the request it acts on (`skill:reroll:<request id>`); the bot that receives the
click looks the request up (bots/intake.py). Text quoting a prompt is escaped so a prompt cannot mention
@everyone or break out of its formatting.
"""

from __future__ import annotations

import re

from schemas.messages import EventKind, GenerateRequest, JobEvent, Platform


def queue_down(what: str = "Your request") -> str:
    """The one refusal for a request Kafka could not take, worded alike on every front-end."""
    return f"❌ {what} could not be queued (the queue is unreachable). Try again in a minute."


QUEUE_DOWN = queue_down()

REROLL = "reroll"
VARIATIONS = "vary"
ACTIONS = (REROLL, VARIATIONS)
_LABELS = {REROLL: "Re-roll", VARIATIONS: "Variations"}
_CUSTOM_ID = re.compile(r"^skill:(reroll|vary):([A-Za-z0-9_-]{1,64})$")
# Slack action ids must be unique within a message; the value carries the request id.
SLACK_ACTION_IDS = {REROLL: "skill_reroll", VARIATIONS: "skill_vary"}


def custom_id(action: str, request_id: str) -> str:
    return f"skill:{action}:{request_id}"


def parse_custom_id(value: str) -> tuple[str, str] | None:
    m = _CUSTOM_ID.match(value)
    return (m.group(1), m.group(2)) if m else None


def quote(prompt: str, platform: Platform) -> str:
    if platform == Platform.slack:
        text = prompt.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
        return f"_{text.replace('_', ' ')}_"
    text = re.sub(r"([\\*_~`|])", r"\\\1", prompt)
    return f"*{text}*"


def mention(user_id: str) -> str:
    """The same syntax on both platforms; posts allow only this user to be pinged."""
    return f"<@{user_id}>"


def queued(req: GenerateRequest) -> str:
    p = req.origin.platform
    n = f" ({req.num_images} images)" if req.num_images > 1 else ""
    return f"⏳ {mention(req.origin.user_id)} queued{n}: {quote(req.prompt, p)}"


def status(event: JobEvent) -> str:
    """One line for a status that is not final: queue position, started, or a progress bar."""
    who = mention(event.origin.user_id)
    progress = event.kind == EventKind.progress and event.step is not None and event.total_steps
    if event.job == "finetune":
        from bots.train_commands import (
            progress_text,  # the trainer's own words for its jobs (no torch)
        )

        bar = f"{_bar(event.step, event.total_steps)} " if progress else ""
        return f"🧪 {who} {bar}{progress_text(event)}"
    p = event.origin.platform
    what = quote(event.prompt, p) if event.prompt else "your request"
    if event.kind == EventKind.queued:
        where = f", position {event.queue_position}" if event.queue_position is not None else ""
        return f"⏳ {who} queued{where}: {what}"
    if progress:
        return f"🎨 {who} {_bar(event.step, event.total_steps)} step {event.step}/{event.total_steps}: {what}"
    return f"🎨 {who} drawing: {what}"


def _bar(step: int, total: int) -> str:
    filled = round(10 * step / total)
    return "▰" * filled + "▱" * (10 - filled)


def done(event: JobEvent) -> str:
    p = event.origin.platform
    what = quote(event.prompt, p) if event.prompt else "your request"
    seeds = [b.seed for b in event.blobs if b.seed is not None]
    seed_note = f" (seed {', '.join(map(str, seeds))})" if seeds else ""
    cached = " · from cache" if event.cache_level else ""
    if event.job == "finetune":
        return f"✅ {mention(event.origin.user_id)} {event.message or f'adapter {event.adapter} is ready'}"
    return f"✅ {mention(event.origin.user_id)} {what}{seed_note}{cached}"


def failed(event: JobEvent) -> str:
    if event.job == "finetune":  # the trainer's message is a whole sentence: "Training of `x` failed: ..."
        return f"❌ {mention(event.origin.user_id)} {event.message}"
    p = event.origin.platform
    what = quote(event.prompt, p) if event.prompt else "your request"
    return f"❌ {mention(event.origin.user_id)} could not draw {what}: {event.message}"


def blocked(event: JobEvent) -> str:
    """Shown only to the person who asked; never names the prompt in a channel."""
    return f"🚫 {event.message} Nothing was posted to the channel."


def discord_buttons(request_id: str) -> list[dict]:
    return [
        {
            "type": 1,
            "components": [
                {"type": 2, "style": 1 if a == REROLL else 2, "label": _LABELS[a], "custom_id": custom_id(a, request_id)}
                for a in ACTIONS
            ],
        }
    ]


def slack_blocks(text: str, request_id: str | None = None) -> list[dict]:
    blocks: list[dict] = [{"type": "section", "text": {"type": "mrkdwn", "text": text}}]
    if request_id:
        blocks.append(
            {
                "type": "actions",
                "elements": [
                    {
                        "type": "button",
                        "action_id": SLACK_ACTION_IDS[a],
                        "text": {"type": "plain_text", "text": _LABELS[a]},
                        "value": request_id,
                        **({"style": "primary"} if a == REROLL else {}),
                    }
                    for a in ACTIONS
                ],
            }
        )
    return blocks
