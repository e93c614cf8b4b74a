"""The language a Slack user reads (bots/locales), for the bot's own answers and for delivery's lines.

Slack's payloads (a slash command, a button click, a modal submission, an event) carry no locale; users.info with
`include_locale=true` does (`user.locale`: "zh-CN", "en-US", ...), with the scope users:read. That call is never
made before an acknowledgement (Slack gives 3 seconds, and the membership check and Redis already share them):
before it the bot answers in the language it already holds in this process (`known`), and after it looks the
person up (`lang`): in this process, then in Redis (`slack:locale:<team>:<user>`, LOCALE_TTL_S, so every replica
shares one look-up and a change of locale shows within a day), then users.info, one call at a time per person.
A failure (the app without users:read, a user Slack does not know, a slow or broken call) is English, never an
error; it is kept in this process only, for FAILURE_TTL_S, so a workspace without the scope is not asked on every
command and a passing fault heals.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict

from slack_sdk.errors import SlackApiError
from slack_sdk.web.async_client import AsyncWebClient

from bots import locales
from schemas.messages import Origin
from skillgen.runtime.redis import Store

log = logging.getLogger("skillgen.slack")

LOCALE_TTL_S = 86400.0  # how long a person's language is trusted, here and in Redis
FAILURE_TTL_S = 600.0  # how long a failed look-up (English) stands before users.info is asked again
LOOKUP_S = 2.0  # users.info's time, after the acknowledgement: the status message waits for it
REDIS_S = 0.5  # Redis's, likewise
KEPT = 10_000  # people held in this process


def redis_key(team_id: str, user_id: str) -> str:
    return f"slack:locale:{team_id}:{user_id}"


class SlackLocales:
    """Per (workspace, user): the language, from users.info, held in process and in Redis."""

    def __init__(self, store: Store, ttl_s: float = LOCALE_TTL_S):
        self.store = store
        self.ttl_s = ttl_s
        self._held: OrderedDict[tuple[str, str], tuple[str, float]] = OrderedDict()  # -> (lang, until: monotonic)
        self._asking: dict[tuple[str, str], asyncio.Future[str]] = {}

    def known(self, who: Origin) -> str:
        """The language held in this process for `who`, English when none: free, for answers before an ack."""
        return self._get((who.team_id, who.user_id)) or locales.DEFAULT

    async def held(self, who: Origin) -> str:
        """`who`'s language as far as it is known without asking Slack: held in this process, else in Redis (within
        REDIS_S), else English. For an answer that cannot wait for users.info (Remix's modal: views.open within
        the trigger's 3 seconds)."""
        key = (who.team_id, who.user_id)
        return self._get(key) or await self._shared(key) or locales.DEFAULT

    async def lang(self, client: AsyncWebClient, who: Origin) -> str:
        """`who`'s language: held, or in Redis, or asked of users.info (once at a time per person); English when
        it cannot be known. Never raises; for after the acknowledgement."""
        key = (who.team_id, who.user_id)
        if (held := self._get(key)) is not None:
            return held
        asking = self._asking.get(key)
        if asking is None:
            asking = self._asking[key] = asyncio.ensure_future(self._look_up(client, key))
            asking.add_done_callback(lambda _: self._asking.pop(key, None))
        return await asyncio.shield(asking)

    async def _shared(self, key: tuple[str, str]) -> str | None:
        """The language another replica (or this one) kept in Redis, now held here too; None when Redis has none,
        or none of ours, or does not answer within REDIS_S."""
        try:
            shared = await asyncio.wait_for(self.store.get(redis_key(*key)), REDIS_S)
        except TimeoutError:
            return None
        if shared not in locales.CATALOGUES:
            return None
        self._put(key, shared, self.ttl_s)
        return shared

    async def _look_up(self, client: AsyncWebClient, key: tuple[str, str]) -> str:
        if (shared := await self._shared(key)) is not None:
            return shared
        try:
            answer = await asyncio.wait_for(client.users_info(user=key[1], include_locale=True), LOOKUP_S)
        except Exception as exc:  # noqa: BLE001 (whatever it is, the person is answered in English)
            data = exc.response.data if isinstance(exc, SlackApiError) else None
            error = data.get("error") if isinstance(data, dict) else repr(exc)  # a 5xx's body is text
            log.warning("cannot look up the locale of a Slack user (%s): English for %.0f s", error, FAILURE_TTL_S)
            self._put(key, locales.DEFAULT, FAILURE_TTL_S)
            return locales.DEFAULT
        lang = locales.from_slack((answer.get("user") or {}).get("locale"))
        self._put(key, lang, self.ttl_s)
        try:
            await asyncio.wait_for(self.store.put(redis_key(*key), lang, self.ttl_s), REDIS_S)
        except TimeoutError:
            log.info("Redis did not keep a Slack user's locale in time; this process holds it")
        return lang

    def _get(self, key: tuple[str, str]) -> str | None:
        held = self._held.get(key)
        if held is None or held[1] <= time.monotonic():
            return None
        return held[0]

    def _put(self, key: tuple[str, str], lang: str, ttl_s: float) -> None:
        self._held[key] = (lang, time.monotonic() + ttl_s)
        self._held.move_to_end(key)
        while len(self._held) > KEPT:
            self._held.popitem(last=False)
