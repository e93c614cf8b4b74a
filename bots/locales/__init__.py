"""What the bots and delivery say, in English and Simplified Chinese: one catalogue per language (en.py, zh.py),
the same keys and placeholders in each (tests/unit/test_locales.py checks).

A request's language is its requester's: on Discord the interaction's `locale`; on Slack the user's `locale` as
users.info tells it (with include_locale, scope users:read), which no Slack payload carries, so the Slack bot asks
after its acknowledgement and keeps the answer per person for a day (bots/slack_locale.py): its answers before an
acknowledgement are in the person's language once it is known, in English before. Either way `zh-CN` and `zh-TW`
read as zh, anything else (or nothing) as en. It travels beside the request, not in it: the bot keeps it in Redis
by request id (`lang:<request id>`, only when it is not English, for as long as the request is remembered), and
delivery reads it there, so the status lines, the result, the ping and the buttons under them come in the
requester's language (a message has one set of labels for the whole channel: the requester's). Without Redis they
come in English. What only the clicker sees (a refusal, Remix's modal, Parameters, the help) is in the clicker's.

Refusals are made before it is known who reads them (the grammar, the rate limiter, intake): one made with
`Refusal.of(key, ...)` keeps its key and params and is said in the reader's language (`Refusal.say`); a param
that is itself a `Msg` is said in that language too. What the catalogues leave out stays English: the request
contract's own validation messages (`--steps: Input should be less than or equal to 50`), the prompt policy's
reasons, the consumer's and the trainer's messages (quoted as they come), and the training commands' lines.
"""

from __future__ import annotations

from typing import NamedTuple

from bots.locales import en, zh
from skillgen.runtime.redis import Store

DEFAULT = "en"
CATALOGUES: dict[str, dict[str, str]] = {"en": en.MESSAGES, "zh": zh.MESSAGES}


class Msg(NamedTuple):
    """A piece of a message said in the reader's language when the message is: a catalogue key and its params
    (themselves Msgs or values). A refusal built before anyone knows who reads it (the grammar's, the rate
    limiter's) carries these, so `limit` in "You have reached {limit}." becomes "your limit of 3 requests per
    minute" or "你的上限（每分钟 3 个请求）" with the rest of it."""

    key: str
    params: dict[str, object] = {}

    def say(self, lang: str = DEFAULT) -> str:
        return t(self.key, lang, **self.params)


def msg(key: str, **params: object) -> Msg:
    return Msg(key, params)


def t(key: str, lang: str = DEFAULT, **params: object) -> str:
    """The message `key` in `lang` (English for a language without a catalogue), its placeholders filled (a Msg
    said in `lang` too)."""
    said = {name: value.say(lang) if isinstance(value, Msg) else value for name, value in params.items()}
    return CATALOGUES.get(lang, en.MESSAGES)[key].format(**said)


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
