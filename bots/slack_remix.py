"""Remix's modal on Slack: the prompt of a result, prefilled, to edit (bots/slack_bot.py opens it and takes its
submission)."""

from __future__ import annotations

from bots.locales import t
from schemas.messages import MAX_PROMPT_CHARS

REMIX_VIEW = "skill_remix"  # the modal's callback_id
REMIX_INPUT = "prompt"  # its input block's block_id and its text input's action_id
REMIX_TOO_SLOW = t("remix_too_slow")


def remix_view(prompt: str, private_metadata: str, lang: str = "en") -> dict:
    """Remix's modal: the prompt, prefilled, to edit; the seed and options stay unless --options are added. Its
    texts are in `lang`, the clicker's (the modal is theirs alone) as far as it is known when it opens."""
    return {
        "type": "modal", "callback_id": REMIX_VIEW, "private_metadata": private_metadata,
        "title": {"type": "plain_text", "text": t("remix_slack_title", lang)},
        "submit": {"type": "plain_text", "text": t("remix_submit", lang)},
        "close": {"type": "plain_text", "text": t("remix_close", lang)},
        "blocks": [{
            "type": "input", "block_id": REMIX_INPUT,
            "label": {"type": "plain_text", "text": t("remix_slack_label", lang)},
            "hint": {"type": "plain_text", "text": t("remix_hint", lang)},
            "element": {"type": "plain_text_input", "action_id": REMIX_INPUT, "multiline": True,
                        "initial_value": prompt, "min_length": 1, "max_length": MAX_PROMPT_CHARS},
        }],
    }
