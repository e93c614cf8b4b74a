"""Remix's modal on Slack: the prompt of a result, prefilled, to edit (bots/slack_bot.py opens it and takes its
submission)."""

from __future__ import annotations

from schemas.messages import MAX_PROMPT_CHARS

REMIX_VIEW = "skill_remix"  # the modal's callback_id
REMIX_INPUT = "prompt"  # its input block's block_id and its text input's action_id
REMIX_TOO_SLOW = "I could not open the Remix form in time; click Remix again."


def remix_view(prompt: str, private_metadata: str) -> dict:
    """Remix's modal: the prompt, prefilled, to edit; the seed and options stay unless --options are added."""
    return {
        "type": "modal", "callback_id": REMIX_VIEW, "private_metadata": private_metadata,
        "title": {"type": "plain_text", "text": "Remix"},
        "submit": {"type": "plain_text", "text": "Draw"},
        "close": {"type": "plain_text", "text": "Cancel"},
        "blocks": [{
            "type": "input", "block_id": REMIX_INPUT,
            "label": {"type": "plain_text", "text": "Prompt (same seed and options)"},
            "hint": {"type": "plain_text", "text": "Add --ar 16:9, --n 2, ... to change an option."},
            "element": {"type": "plain_text_input", "action_id": REMIX_INPUT, "multiline": True,
                        "initial_value": prompt, "min_length": 1, "max_length": MAX_PROMPT_CHARS},
        }],
    }
