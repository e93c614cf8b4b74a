"""Delivery to Discord over its REST API (plain aiohttp, so every 429, 5xx and 404 reaches delivery's own
retry rules instead of discord.py's built-in waits).

One request is one evolving message: the command's original response. While the interaction token lives (15
minutes from the command, less a margin: SKILL_WEBHOOK_MAX_AGE_S; the bot keeps it in Redis by request id,
bots/credentials.py, never on Kafka) status and results are edits of it through the interaction webhook, images
attached. After that, or once the webhook answered 404 Unknown Webhook or 401 Invalid Webhook Token (the token is
then buried and not used again), the same message is edited with the bot token (PATCH /channels/{c}/messages/{id}:
the bot keeps the original's id next to the token). Only when that id is unknown (Redis was down when the bot
wrote it) does the result become a new channel message, and a training's progress a channel message of its own.

Edits never notify, so a result also pings the requester: a short follow-up mentioning them, through the webhook
while the token lives, else a channel message replying to the original (its reply reference links it). A ping
that cannot be sent is counted and dropped; the result is posted either way.

A cancelled request's message is edited to a short "🛑 cancelled" line, without images or buttons, and nobody is
pinged (no follow-up). Status edits carry the Cancel button; results replace it.

Blocked results are told only to the person who asked: an ephemeral follow-up while the token lives, a direct
message after; the channel's response is deleted. A channel where the bot may not post (403 50001 Missing Access,
50013 Missing Permissions) gets nothing; the requester gets a direct message saying which permissions to grant,
with the result. A direct message to someone who closed them (403 50007) is logged, counted and dropped.

Rate limits are Discord's headers: a bucket whose X-RateLimit-Remaining is 0 is waited out before its next call
(X-RateLimit-Reset-After) when that fits in `max_wait_s`, else RetryAfter re-queues the event; a global 429
holds every call until it passes. Content is clipped to Discord's 2000 characters.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time

import aiohttp

from bots import image_actions, locales, metrics, render
from bots.credentials import Interactions
from bots.errors import RetryAfter, Transient, Undeliverable
from schemas.messages import EventKind, JobEvent, Platform
from skillgen.runtime.logs import job
from skillgen.runtime.redis import Store

log = logging.getLogger("skillgen.delivery.discord")

UNKNOWN_WEBHOOK = 10015
INVALID_WEBHOOK_TOKEN = 50027
MISSING_ACCESS, MISSING_PERMISSIONS, CANNOT_DM = 50001, 50013, 50007
EPHEMERAL = 64
STATUS_MESSAGE_TTL_S = 7 * 86400


class DiscordRefused(Undeliverable):
    def __init__(self, message: str, status: int, code: int | None):
        super().__init__(message, status)
        self.code = code


class NotFound(DiscordRefused):
    def __init__(self, message: str, code: int | None):
        super().__init__(message, 404, code)


class Unauthorized(DiscordRefused):
    """401: for the interaction webhook, 50027 Invalid Webhook Token (the token's 15 minutes are over)."""


class Forbidden(DiscordRefused):
    """403: 50001 Missing Access, 50013 Missing Permissions, 50007 Cannot send messages to this user."""


WEBHOOK_GONE = (NotFound, Unauthorized)


class DiscordPoster:
    platform = Platform.discord

    def __init__(self, session: aiohttp.ClientSession, api_base: str, bot_token: str | None, store: Store,
                 webhook_max_age_s: float = 14 * 60, max_wait_s: float = 2.0):
        self.session = session
        self.api_base = api_base.rstrip("/")
        self.bot_token = bot_token
        self.store = store
        self.interactions = Interactions(store)
        self.webhook_max_age_s = webhook_max_age_s
        self.max_wait_s = max_wait_s
        self._buckets: dict[str, str] = {}  # route -> X-RateLimit-Bucket
        self._resets: dict[str, float] = {}  # bucket and major parameter -> monotonic time it has room again
        self._global_until = 0.0

    def message_key(self, event: JobEvent) -> str | None:
        return f"discord:{event.request_id}"

    async def _lang(self, event: JobEvent) -> str:
        """The language the request was made in (the bot keeps it by request id; English when none was kept)."""
        return await locales.recall(self.store, event.request_id)

    # -- what delivery calls ---------------------------------------------------------------------------
    async def status(self, event: JobEvent) -> None:
        lang = await self._lang(event)
        payload: dict = {"content": render.status(event, lang), "allowed_mentions": _only(event)}
        if buttons := render.status_buttons(event):  # Cancel stays on every status until the result
            payload["components"] = render.discord_buttons(event.request_id, buttons, lang=lang)
        if await self._edit_original(event, payload) is not None:
            return
        origin, key = event.origin, _status_key(event.request_id)
        message_id = await self._message_id(event)
        if message_id is not None:
            try:
                await self._call("PATCH", f"/channels/{origin.channel_id}/messages/{message_id}", payload, bot=True)
                return
            except NotFound:
                pass  # deleted by someone: a training posts a new one
        if event.job != "finetune":
            return  # an image job without its message: the result alone goes to the channel
        # A training runs for longer than the token lives: one channel message, edited, keeps its progress.
        posted = await self._call("POST", f"/channels/{origin.channel_id}/messages", payload, bot=True)
        await self.store.put(key, str(posted["id"]), STATUS_MESSAGE_TTL_S)

    async def final(self, event: JobEvent, images: list[tuple[str, bytes]]) -> None:
        if event.kind == EventKind.blocked:
            await self._tell_privately(event)
            return
        if event.kind == EventKind.cancelled:
            await self._cancelled(event)
            return
        succeeded, lang = event.kind == EventKind.succeeded, await self._lang(event)
        payload: dict = {
            "content": (render.done if succeeded else render.failed)(event, lang),
            "allowed_mentions": _only(event),
            "components": render.discord_buttons(event.request_id, seed=render.result_seed(event), lang=lang)
            + image_actions.discord_rows(event, lang) if succeeded and event.job == "generate" else [],
            "attachments": [{"id": i, "filename": name} for i, (name, _) in enumerate(images)],
        }
        hook = await self._edit_original(event, payload, images)
        if hook is not None:
            await self._ping(event, hook, None)
            return
        channel = f"/channels/{event.origin.channel_id}/messages"
        try:
            message_id = await self._message_id(event)
            if message_id is not None:
                try:
                    await self._call("PATCH", f"{channel}/{message_id}", payload, images, bot=True)
                    await self._ping(event, None, message_id)
                    return
                except NotFound:
                    pass  # deleted: a new message (which mentions, so notifies, the requester)
            await self._call("POST", channel, payload, images, bot=True)
        except Forbidden as exc:
            if exc.code not in (MISSING_ACCESS, MISSING_PERMISSIONS):
                raise
            await self._missing_permission(event, payload, images, exc.code)

    async def _cancelled(self, event: JobEvent) -> None:
        """The request's message becomes a short cancelled line: no images, no buttons, nobody pinged, and no new
        message when there is none to edit (the canceller was told "Cancelling…" when they clicked)."""
        payload = {"content": render.cancelled(event, await self._lang(event)),
                   "allowed_mentions": {"parse": [], "users": []},
                   "components": [], "attachments": []}
        if await self._edit_original(event, payload) is not None:
            return
        message_id = await self._message_id(event)
        if message_id is None:
            return
        try:
            await self._call("PATCH", f"/channels/{event.origin.channel_id}/messages/{message_id}", payload, bot=True)
        except (NotFound, Forbidden) as exc:  # deleted, or no longer ours to edit: nothing else to say
            log.info("cancelled, but the status could not be edited: %s", exc, extra=job(event.request_id))

    # -- the requester, privately ------------------------------------------------------------------------
    async def _ping(self, event: JobEvent, hook: str | None, original_id: str | None) -> None:
        """Notify the requester of the result that an edit just showed (edits never notify)."""
        if event.replay_of:
            return  # a re-run names no one (skillgen replay)
        body: dict = {"content": render.discord_ping(event, await self._lang(event)), "allowed_mentions": _only(event)}
        try:
            if hook is not None:
                await self._call("POST", hook, body)
            else:
                body["message_reference"] = {"message_id": original_id, "channel_id": event.origin.channel_id,
                                             "fail_if_not_exists": False}
                await self._call("POST", f"/channels/{event.origin.channel_id}/messages", body, bot=True)
        except (RetryAfter, Transient, Undeliverable) as exc:
            metrics.DROPPED.labels("discord", "ping").inc()
            log.warning("result posted, but its ping was not: %s", exc, extra=job(event.request_id))

    async def _tell_privately(self, event: JobEvent) -> None:
        text = {"content": render.blocked(event, await self._lang(event)), "allowed_mentions": _only(event)}
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
            except WEBHOOK_GONE as exc:
                await self._bury(event, exc)
        message_id = await self._message_id(event)
        if message_id is not None:
            try:  # the channel's "queued" response goes, as it does while the token lives
                await self._call("DELETE", f"/channels/{event.origin.channel_id}/messages/{message_id}", bot=True)
            except (NotFound, Forbidden):
                pass
        await self._direct_message(event, text)

    async def _missing_permission(self, event: JobEvent, payload: dict, images: list[tuple[str, bytes]],
                                  code: int) -> None:
        metrics.MISSING_PERMISSION.labels("discord", str(code)).inc()
        log.warning("no permission to post in channel %s (Discord %s): told the requester", event.origin.channel_id,
                    code, extra=job(event.request_id))
        notice = render.discord_missing_permission(event.origin.channel_id, code == MISSING_ACCESS,
                                                   await self._lang(event))
        await self._direct_message(event, {"content": f"{notice}\n\n{payload['content']}",
                                           "allowed_mentions": payload["allowed_mentions"],
                                           "attachments": payload["attachments"]}, images)

    async def _direct_message(self, event: JobEvent, body: dict, images: list[tuple[str, bytes]] = ()) -> None:
        dm = await self._call("POST", "/users/@me/channels", {"recipient_id": event.origin.user_id}, bot=True)
        try:
            await self._call("POST", f"/channels/{dm['id']}/messages", body, images, bot=True)
        except Forbidden as exc:
            if exc.code != CANNOT_DM:
                raise
            metrics.DROPPED.labels("discord", "dms_closed").inc()
            log.warning("the requester's direct messages are closed (Discord 50007): dropped",
                        extra=job(event.request_id))

    # -- the interaction webhook and the original response -------------------------------------------------
    async def _webhook(self, event: JobEvent) -> str | None:
        """The path of the interaction webhook while it can still be used, else None."""
        interaction = await self.interactions.recall(event.request_id)
        if interaction is None or interaction.age_s() > self.webhook_max_age_s:
            return None
        if await self.store.get(_dead_key(event.request_id)) is not None:
            return None
        return f"/webhooks/{interaction.application_id}/{interaction.token}"

    async def _edit_original(self, event: JobEvent, payload: dict, images: list[tuple[str, bytes]] = ()) -> str | None:
        """Edit the original response through the interaction webhook while it can still be used: the webhook's
        path once edited, else None (no token, too old, or it answered 404 Unknown Webhook / 401 Invalid Webhook
        Token just now: buried, so the caller goes on with the bot token)."""
        hook = await self._webhook(event)
        if hook is None:
            return None
        try:
            await self._call("PATCH", f"{hook}/messages/@original", payload, images)
        except WEBHOOK_GONE as exc:
            await self._bury(event, exc)
            return None
        return hook

    async def _message_id(self, event: JobEvent) -> str | None:
        """The message that shows this request, to edit with the bot token: the original response, or the
        channel message a training's progress moved to."""
        original = await self.interactions.original(event.request_id)
        if original is not None:
            return original
        return await self.store.get(_status_key(event.request_id)) if event.job == "finetune" else None

    async def _bury(self, event: JobEvent, exc: DiscordRefused) -> None:
        if exc.code in (UNKNOWN_WEBHOOK, INVALID_WEBHOOK_TOKEN, None):
            await self.store.put(_dead_key(event.request_id), str(exc.status), 15 * 60)  # dead by then anyway

    # -- HTTP ------------------------------------------------------------------------------------------
    async def _call(self, method: str, path: str, payload: dict | None = None,
                    files: list[tuple[str, bytes]] = (), *, bot: bool = False) -> dict | None:
        headers = {}
        if bot:
            if not self.bot_token:
                raise Undeliverable("posting to a channel needs the bot token: set SKILL_DISCORD_TOKEN")
            headers["Authorization"] = f"Bot {self.bot_token}"
        if payload is not None and isinstance(payload.get("content"), str):
            payload = {**payload, "content": render.discord_clip(payload["content"])}
        kwargs: dict = {"headers": headers}
        if files:
            form = aiohttp.FormData()
            form.add_field("payload_json", json.dumps(payload), content_type="application/json")
            for i, (name, data) in enumerate(files):
                form.add_field(f"files[{i}]", data, filename=name, content_type="image/png")
            kwargs["data"] = form
        elif payload is not None:
            kwargs["json"] = payload
        route = _route(method, path)
        await self._room(route, method, path)
        try:
            async with self.session.request(method, self.api_base + path, **kwargs) as resp:
                body = await resp.read()
                self._learn(route, resp.headers)
                if resp.status < 300:
                    return json.loads(body) if body and resp.status != 204 else None
                data = _json(body)
                where = f"{method} {_redact(path)}"
                if resp.status == 429:
                    after = _number(data.get("retry_after")) or _number(resp.headers.get("Retry-After")) or 1.0
                    if data.get("global") is True or resp.headers.get("X-RateLimit-Global") == "true":
                        self._global_until = time.monotonic() + after
                        raise RetryAfter(f"Discord global 429 on {where}", after)
                    self._hold(route, after)
                    raise RetryAfter(f"Discord 429 on {where}", after)
                if resp.status >= 500:
                    raise Transient(f"Discord {resp.status} on {where}")
                message, code = f"Discord {resp.status} on {where}: {data.get('message')}", data.get("code")
                if resp.status == 404:
                    raise NotFound(message, code)
                kind = {401: Unauthorized, 403: Forbidden}.get(resp.status, DiscordRefused)
                raise kind(message, resp.status, code)
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise Transient(f"Discord unreachable on {method} {_redact(path)}: {exc!r}") from exc

    async def _room(self, route: str, method: str, path: str) -> None:
        """Wait for the route's bucket (and any global limit) to have room, or raise RetryAfter past max_wait_s."""
        bucket = self._buckets.get(route)
        until = max(self._global_until, self._resets.get(_limit_key(bucket, route), 0.0) if bucket else 0.0)
        wait = until - time.monotonic()
        if wait <= 0:
            return
        if wait > self.max_wait_s:
            raise RetryAfter(f"Discord rate limit on {method} {_redact(path)} (bucket empty)", wait)
        metrics.RETRIES.labels("discord", "bucket_wait").inc()
        await asyncio.sleep(wait)

    def _learn(self, route: str, headers) -> None:
        bucket = headers.get("X-RateLimit-Bucket")
        if bucket:
            self._buckets[route] = bucket
        if headers.get("X-RateLimit-Remaining") == "0":
            self._hold(route, _number(headers.get("X-RateLimit-Reset-After")) or 1.0)

    def _hold(self, route: str, seconds: float) -> None:
        key = _limit_key(self._buckets.get(route), route)
        self._resets[key] = time.monotonic() + min(seconds, 3600.0)
        if len(self._resets) > 10_000:  # old entries of finished requests
            now = time.monotonic()
            self._resets = {k: v for k, v in self._resets.items() if v > now}


def _route(method: str, path: str) -> str:
    """Discord's rate-limit route: method and path, message ids left out."""
    return method + " " + re.sub(r"/messages/[^/]+", "/messages/:id", path)


def _limit_key(bucket: str | None, route: str) -> str:
    """A bucket applies per major parameter (the channel, the webhook and its token)."""
    parts = route.split(" ", 1)[1].split("/")
    major = "/".join(parts[1:4] if len(parts) > 1 and parts[1] in ("webhooks", "interactions") else parts[1:3])
    return f"{bucket or route}:{major}"


def _number(raw) -> float | None:
    try:
        value = float(raw)
    except (TypeError, ValueError):
        return None
    return value if 0 < value < 86400 else None


def _only(event: JobEvent) -> dict:
    """Who a post may ping: the requester alone, and nobody for a re-run (replay names no one)."""
    return {"parse": [], "users": [] if event.replay_of else [event.origin.user_id]}


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
