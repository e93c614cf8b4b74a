"""What the bots and delivery say, in English and Simplified Chinese: one catalogue per language (en.py, zh.py),
the same keys and placeholders in each (tests/unit/test_locales.py checks).

A request's language is its requester's: on Discord the interaction's `locale`; on Slack the user's `locale` as
users.info tells it (with include_locale, scope users:read), which no Slack payload carries, so the Slack bot asks
after its acknowledgement and keeps the answer per person for a day (bots/slack_locale.py): its answers before an
acknowledgement are in the person's language once it is known, in English before. Either way `zh-CN` and `zh-TW`
read as zh, anything else (or nothing) as en. It travels beside the request, not in it: the bot keeps it in Redis
by request id (`lang:<request id>`, only when it is not English, for as long as the request is remembered), and
delivery reads it there, so the status lines, the result and the ping come in the requester's language. Without
Redis they come in English.

What the catalogues leave out stays English: the grammar's messages (they name options), the rate-limit lines,
the consumer's and the trainer's own messages (quoted as they come), the help text.
"""

from __future__ import annotations

from bots.locales import en, zh
from skillgen.runtime.redis import Store

DEFAULT = "en"
CATALOGUES: dict[str, dict[str, str]] = {"en": en.MESSAGES, "zh": zh.MESSAGES}


def t(key: str, lang: str = DEFAULT, **params: object) -> str:
    """The message `key` in `lang` (English for a language without a catalogue), its placeholders filled."""
    return CATALOGUES.get(lang, en.MESSAGES)[key].format(**params)


def from_discord(locale: object) -> str:
    """A Discord locale (`zh-CN`, `zh-TW`, `en-US`, ...) as one of ours."""
    return "zh" if str(locale or "").lower().startswith("zh") else DEFAULT


def from_slack(locale: object) -> str:
    """A Slack user's locale (users.info's `user.locale`: `zh-CN`, `zh-TW`, `en-US`, ...; absent without
    include_locale) as one of ours: the same tags as Discord's."""
    return from_discord(locale)


def _key(request_id: str) -> str:
    return f"lang:{request_id}"


async def remember(store: Store, request_id: str, lang: str, ttl_s: float) -> None:
    """Keep a request's language for delivery (English, the default, is not written)."""
    if lang != DEFAULT:
        await store.put(_key(request_id), lang, ttl_s)


async def recall(store: Store | None, request_id: str) -> str:
    """A request's language; English when none was kept (or Redis cannot say)."""
    if store is None:
        return DEFAULT
    lang = await store.get(_key(request_id))
    return lang if lang in CATALOGUES else DEFAULT
