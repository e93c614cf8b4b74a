"""Chat credentials stay with the bots: Discord interaction tokens live in the bots' Redis, never on Kafka.

An interaction token lets whoever holds it post as the bot in that channel for 15 minutes, so it is kept out
of every message model (and so out of every topic, DLQ and replay sink). The Discord bot writes it here, keyed
by the request id, before it publishes the request; delivery reads it back to edit the deferred response. The
entry expires when the token does. A Redis value is read as hostile like any other input: one that does not
parse into the expected shape is treated as absent, which makes delivery post to the channel with the bot
token instead.

While Redis is unreachable the write lands in the bot's own memory, which delivery cannot see: results of
requests accepted during the outage go to the channel as new messages (the token path is an optimisation, the
channel post is the guarantee).

Next to the token the bot keeps the id of the interaction's original response (the message "queued" was written
into), for longer than the token lives (ORIGINAL_TTL_S): past the token's 15 minutes delivery edits that same
message with the bot token (Discord lets a bot edit its non-ephemeral interaction responses that way), so one
request stays one evolving message however long it takes.
"""

from __future__ import annotations

import logging
import re
from datetime import datetime, timezone

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from schemas.messages import RequestId
from skillgen.runtime.redis import Store

log = logging.getLogger("skillgen.credentials")

TOKEN_LIFETIME_S = 15 * 60  # Discord's, from the interaction's creation
ORIGINAL_TTL_S = 7 * 86400  # a training may take hours; its message is edited until the result
_SNOWFLAKE = r"^[0-9]{1,20}$"


class Interaction(BaseModel):
    """What delivery needs to use a Discord interaction webhook."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    application_id: str = Field(pattern=r"^[0-9]{1,20}$")
    # Becomes a URL path segment: only the characters Discord's tokens use.
    token: str = Field(pattern=r"^[A-Za-z0-9._-]{1,1024}$")
    created_at: datetime

    def age_s(self) -> float:
        return (datetime.now(timezone.utc) - self.created_at).total_seconds()


class Interactions:
    def __init__(self, store: Store):
        self.store = store

    @staticmethod
    def key(request_id: RequestId) -> str:
        return f"discord:interaction:{request_id}"

    async def remember(self, request_id: RequestId, application_id: str, token: str, created_at: datetime) -> None:
        interaction = Interaction(application_id=application_id, token=token, created_at=created_at)
        left_s = TOKEN_LIFETIME_S - interaction.age_s()
        if left_s > 1:
            await self.store.put(self.key(request_id), interaction.model_dump_json(), left_s)

    @staticmethod
    def original_key(request_id: RequestId) -> str:
        return f"discord:original:{request_id}"

    async def remember_original(self, request_id: RequestId, message_id: str) -> None:
        """The id of the interaction's original response (non-ephemeral), for bot-token edits after the token."""
        if re.fullmatch(_SNOWFLAKE, message_id):
            await self.store.put(self.original_key(request_id), message_id, ORIGINAL_TTL_S)

    async def original(self, request_id: RequestId) -> str | None:
        raw = await self.store.get(self.original_key(request_id))
        return raw if raw is not None and re.fullmatch(_SNOWFLAKE, raw) else None

    async def recall(self, request_id: RequestId) -> Interaction | None:
        raw = await self.store.get(self.key(request_id))
        if raw is None:
            return None
        try:
            return Interaction.model_validate_json(raw)
        except ValidationError:
            log.warning("ignored a malformed interaction entry for %s", request_id)
            return None
