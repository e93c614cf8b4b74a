"""Delivery to Discord over its REST API (plain aiohttp, so every 429, 5xx and 404 reaches delivery's own
retry rules instead of discord.py's built-in waits).

While the interaction token lives (15 minutes from the command, less a margin: SKILL_WEBHOOK_MAX_AGE_S; the bot
keeps it in Redis by request id, bots/credentials.py, never on Kafka),
status and results are edits of the command's original response through the interaction webhook, images
attached. After that, or once the webhook answered 404, results go to the channel with the bot token, and a
webhook that answered 404 is not used again. A training outlives the token: its progress then moves to a channel
message posted with the bot token, which later progress and the result edit. Blocked results are told only to the person who asked: an
ephemeral follow-up while the token lives, a direct message after; the channel's "thinking" response is deleted.
"""

from __future__ import annotations

import asyncio
import json

import aiohttp

from bots import render
from bots.credentials import Interactions
from bots.errors import RetryAfter, Transient, Undeliverable
from schemas.messages import EventKind, JobEvent, Origin, Platform
from skillgen.runtime.redis import Store

UNKNOWN_WEBHOOK = 10015
EPHEMERAL = 64
STATUS_MESSAGE_TTL_S = 7 * 86400


class NotFound(Undeliverable):
    def __init__(self, message: str, code: int | None):
        super().__init__(message, 404)
        self.code = code


class DiscordPoster:
    platform = Platform.discord

    def __init__(self, session: aiohttp.ClientSession, api_base: str, bot_token: str | None, store: Store,
                 webhook_max_age_s: float = 14 * 60):
        self.session = session
        self.api_base = api_base.rstrip("/")
        self.bot_token = bot_token
        self.store = store
        self.interactions = Interactions(store)
        self.webhook_max_age_s = webhook_max_age_s

    def message_key(self, event: JobEvent) -> str | None:
        return f"discord:{event.request_id}"

    # -- what delivery calls ---------------------------------------------------------------------------
    async def status(self, event: JobEvent) -> None:
        payload = {"content": render.status(event), "allowed_mentions": _only(event.origin)}
        hook = await self._webhook(event)
        if hook is not None:
            try:
                await self._call("PATCH", f"{hook}/messages/@original", payload)
                return
            except NotFound as exc:
                await self._bury(event, exc)
        if event.job != "finetune":
            return  # an image job without the token: the result alone goes to the channel
        # A training runs for longer than the token lives: one channel message, edited, keeps its progress.
        origin, key = event.origin, _status_key(event.request_id)
        message_id = await self.store.get(key)
        if message_id is not None:
            try:
                await self._call("PATCH", f"/channels/{origin.channel_id}/messages/{message_id}", payload, bot=True)
                return
            except NotFound:
                pass  # deleted by someone: post a new one
        posted = await self._call("POST", f"/channels/{origin.channel_id}/messages", payload, bot=True)
        await self.store.put(key, str(posted["id"]), STATUS_MESSAGE_TTL_S)

    async def final(self, event: JobEvent, images: list[tuple[str, bytes]]) -> None:
        if event.kind == EventKind.blocked:
            await self._tell_privately(event)
            return
        succeeded = event.kind == EventKind.succeeded
        payload: dict = {
            "content": render.done(event) if succeeded else render.failed(event),
            "allowed_mentions": _only(event.origin),
            "components": render.discord_buttons(event.request_id) if succeeded and event.job == "generate" else [],
            "attachments": [{"id": i, "filename": name} for i, (name, _) in enumerate(images)],
        }
        hook = await self._webhook(event)
        if hook is not None:
            try:
                await self._call("PATCH", f"{hook}/messages/@original", payload, images)
                return
            except NotFound as exc:
                await self._bury(event, exc)
        channel = f"/channels/{event.origin.channel_id}/messages"
        message_id = await self.store.get(_status_key(event.request_id)) if event.job == "finetune" else None
        if message_id is not None:
            try:
                await self._call("PATCH", f"{channel}/{message_id}", payload, images, bot=True)
                return
            except NotFound:
                pass
        await self._call("POST", channel, payload, images, bot=True)

    async def _tell_privately(self, event: JobEvent) -> None:
        text = {"content": render.blocked(event), "allowed_mentions": _only(event.origin)}
        hook = await self._webhook(event)
        if hook is not None:
            try:
                try:
                    await self._call("DELETE", f"{hook}/messages/@original")
                except NotFound as exc:
                    if exc.code == UNKNOWN_WEBHOOK:
                        raise
                    # the response is gone already (a redelivery): the follow-up may still be owed
                await self._call("POST", hook, {**text, "flags": EPHEMERAL})
                return
            except NotFound as exc:
                await self._bury(event, exc)
        dm = await self._call("POST", "/users/@me/channels", {"recipient_id": event.origin.user_id}, bot=True)
        await self._call("POST", f"/channels/{dm['id']}/messages", text, bot=True)

    # -- the interaction webhook -------------------------------------------------------------------------------
    async def _webhook(self, event: JobEvent) -> str | None:
        """The path of the interaction webhook while it can still be used, else None."""
        interaction = await self.interactions.recall(event.request_id)
        if interaction is None or interaction.age_s() > self.webhook_max_age_s:
            return None
        if await self.store.get(_dead_key(event.request_id)) is not None:
            return None
        return f"/webhooks/{interaction.application_id}/{interaction.token}"

    async def _bury(self, event: JobEvent, exc: NotFound) -> None:
        if exc.code in (UNKNOWN_WEBHOOK, None):
            await self.store.put(_dead_key(event.request_id), "404", 15 * 60)  # the token dies by then anyway

    # -- HTTP ------------------------------------------------------------------------------------------
    async def _call(self, method: str, path: str, payload: dict | None = None,
                    files: list[tuple[str, bytes]] = (), *, bot: bool = False) -> dict | None:
        headers = {}
        if bot:
            if not self.bot_token:
                raise Undeliverable("posting to a channel needs the bot token: set SKILL_DISCORD_TOKEN")
            headers["Authorization"] = f"Bot {self.bot_token}"
        kwargs: dict = {"headers": headers}
        if files:
            form = aiohttp.FormData()
            form.add_field("payload_json", json.dumps(payload), content_type="application/json")
            for i, (name, data) in enumerate(files):
                form.add_field(f"files[{i}]", data, filename=name, content_type="image/png")
            kwargs["data"] = form
        elif payload is not None:
            kwargs["json"] = payload
        try:
            async with self.session.request(method, self.api_base + path, **kwargs) as resp:
                body = await resp.read()
                if resp.status < 300:
                    return json.loads(body) if body and resp.status != 204 else None
                data = _json(body)
                if resp.status == 429:
                    after = data.get("retry_after") or resp.headers.get("Retry-After") or 1
                    raise RetryAfter(f"Discord 429 on {method} {_redact(path)}", float(after))
                if resp.status >= 500:
                    raise Transient(f"Discord {resp.status} on {method} {_redact(path)}")
                if resp.status == 404:
                    raise NotFound(f"Discord 404 on {method} {_redact(path)}: {data.get('message')}", data.get("code"))
                raise Undeliverable(f"Discord {resp.status} on {method} {_redact(path)}: {data.get('message')}",
                                    resp.status)
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            raise Transient(f"Discord unreachable on {method} {_redact(path)}: {exc!r}") from exc


def _only(origin: Origin) -> dict:
    return {"parse": [], "users": [origin.user_id]}


def _dead_key(request_id: str) -> str:
    return f"discord:dead-webhook:{request_id}"


def _status_key(request_id: str) -> str:
    return f"discord:status-message:{request_id}"


def _json(body: bytes) -> dict:
    try:
        data = json.loads(body)
    except ValueError:
        return {}
    return data if isinstance(data, dict) else {}


def _redact(path: str) -> str:
    """Interaction tokens are credentials: logs get their first characters only."""
    parts = path.split("/")
    if len(parts) > 3 and parts[1] == "webhooks":
        parts[3] = parts[3][:6] + "…"
    return "/".join(parts)
