"""A fake Discord: the REST API (v10) and the gateway WebSocket, enough for discord.py and for delivery.

`fake.invoke("skill", {"prompt": ...})` dispatches an INTERACTION_CREATE to the connected bot, as Discord does
when someone runs a slash command; `fake.click(custom_id, message_id)` does the same for a button, and
`fake.submit_modal(interaction, {input id: value})` submits the modal the bot answered a click with (each takes
the person's `locale`, en-US unless given). Every REST
call is recorded (`fake.calls`); messages are kept in `fake.messages`, so a test reads what a channel shows.
Files a user attaches to a command (`fake.attachment(...)`) are served from the fake's own CDN path, and the
guild (with its roles) is announced by GUILD_CREATE after READY, as the guilds intent has Discord do.

It is as strict as Discord where delivery can go wrong (each documented by Discord; docs/chat-apps.md):
- an interaction callback more than 3 s after the interaction answers 404 10062 (Unknown interaction), and the
  interaction webhook 401 50027 (Invalid Webhook Token) once the token is 15 minutes old. Time is the fake's
  `clock` (injectable; `advance(s)` moves it on), so a test ages a token without waiting;
- a bot may edit a non-ephemeral interaction response with its bot token (PATCH /channels/{c}/messages/{id});
- `forbid(channel, 50001 or 50013)` makes bot-token posts there answer 403 Missing Access / Missing Permissions,
  and `close_dms(user)` a DM to that user 403 50007 (Cannot send messages to this user);
- a message with content over 2000 characters, more than 5 action rows (or more than 5 buttons in one, or two
  components with the same custom_id) or more than 10 attachments answers 400 50035 (Invalid Form Body), and so
  does a modal (callback type 9) that breaks Discord's rules for one, or one sent in answer to a modal submission;
- every REST answer carries X-RateLimit-Limit/Remaining/Reset-After/Bucket; `exhaust(path_regex, reset_after_s)`
  makes the next matching answer say Remaining 0, and a call to that bucket before its reset then gets a 429;
  `global_limit(retry_after_s)` answers the next call with a global 429 (`global: true`, X-RateLimit-Global);
- registering commands (PUT .../commands) checks each command and option as Discord does, localizations included:
  a name of 1-32 letters, digits, `-` or `_` (Devanagari and Thai marks too), lowercase where the script has case;
  a description of 1-100 characters; localizations only for Discord's locales; option names unique in each
  language; anything else answers 400 50035 and registers nothing (`command_errors`);
- attachment links are signed (`?ex=&is=&hm=`) and expire: past `ex` (a day, or an attachment's `ttl_s`, on the
  fake's clock) the CDN answers 404 "This content is no longer available.".
"""

from __future__ import annotations

import asyncio
import itertools
import json
import re
import secrets
import time
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone

from aiohttp import WSMsgType, web

from tests.fakes.common import Call, FakePlatform, Upload, now, read_body

DISCORD_EPOCH_MS = 1420070400000
APPLICATION_ID = "111111111111111111"
BOT_TOKEN = "fake-discord-bot-token"
GUILD_ID = "222222222222222222"
CHANNEL_ID = "333333333333333333"
THREAD_ID = "444444444444444444"
USER_ID = "555555555555555555"
TRAINER_ROLE_ID = "777777777777777777"  # a role of the fake guild, for commands limited by role
_counter = itertools.count(1)


def snowflake(at_ms: int | None = None) -> str:
    at_ms = int(time.time() * 1000) if at_ms is None else at_ms
    return str(((at_ms - DISCORD_EPOCH_MS) << 22) | (next(_counter) % 4096))


def _iso() -> str:
    return datetime.now(timezone.utc).isoformat()


BOT_USER = {"id": "666666666666666666", "username": "skillgen", "discriminator": "0", "global_name": None,
            "avatar": None, "bot": True}


@dataclass
class Message:
    id: str
    channel_id: str
    via: str  # "interaction", "followup" or "bot"
    content: str = ""
    files: list[Upload] = field(default_factory=list)
    components: list = field(default_factory=list)
    flags: int = 0
    deleted: bool = False
    interaction_token: str | None = None
    edits: int = 0
    reference: str | None = None  # the message this one replies to

    @property
    def ephemeral(self) -> bool:
        return bool(self.flags & 64)

    @property
    def pngs(self) -> list[Upload]:
        return [f for f in self.files if f.is_png]

    def payload(self, guild_id: str | None) -> dict:
        return {
            "id": self.id, "channel_id": self.channel_id, **({"guild_id": guild_id} if guild_id else {}),
            "author": BOT_USER, "content": self.content, "timestamp": _iso(), "edited_timestamp": None,
            "tts": False, "mention_everyone": False, "mentions": [], "mention_roles": [], "embeds": [],
            "attachments": [
                {"id": str(i), "filename": f.filename, "size": len(f.data), "url": f"https://cdn.invalid/{f.filename}",
                 "proxy_url": f"https://cdn.invalid/{f.filename}", "content_type": "image/png"}
                for i, f in enumerate(self.files)
            ],
            "pinned": False, "type": 0, "flags": self.flags, "components": self.components,
            "application_id": APPLICATION_ID, "webhook_id": APPLICATION_ID if self.via != "bot" else None,
            **({"message_reference": {"message_id": self.reference, "channel_id": self.channel_id}}
               if self.reference else {}),
        }


@dataclass
class Attachment:
    """A file someone attached to a slash command; Discord's CDN serves it at `url`."""

    id: str
    filename: str
    data: bytes
    content_type: str | None
    url: str
    expires_s: float = 2.0**40  # on the fake's clock: the signed URL answers 404 from then on

    def payload(self) -> dict:
        return {"id": self.id, "filename": self.filename, "size": len(self.data), "url": self.url,
                "proxy_url": self.url, **({"content_type": self.content_type} if self.content_type else {})}


@dataclass
class Interaction:
    id: str
    token: str
    channel_id: str
    guild_id: str
    user_id: str
    callbacks: list[int] = field(default_factory=list)  # response types the bot answered with
    original: Message | None = None
    created_s: float = 0.0  # on the fake's clock
    kind: int = 2  # 2 a command, 3 a component (button), 5 a modal submission
    modal: dict | None = None  # the modal the bot answered with (callback type 9)
    message: dict | None = None  # the message a button was on

    def age_s(self, now_s: float) -> float:
        return now_s - self.created_s


CALLBACK_DEADLINE_S = 3.0
ATTACHMENT_TTL_S = 24 * 3600  # a signed CDN link's lifetime (Discord's are about a day)
TOKEN_LIFETIME_S = 15 * 60
MAX_CONTENT, MAX_ROWS, MAX_FILES = 2000, 5, 10
MAX_BUTTONS_PER_ROW, MAX_CUSTOM_ID = 5, 100
BUCKET_LIMIT = 5
PERMISSION_ERRORS = {50001: "Missing Access", 50013: "Missing Permissions"}


def route_of(method: str, path: str) -> str:
    """A rate-limit route: the method and the path with message ids left out (channel and webhook stay: they are
    Discord's major parameters)."""
    return method + " " + re.sub(r"/messages/[^/]+", "/messages/:id", path)


class FakeDiscord(FakePlatform):
    def __init__(self, bot_token: str = BOT_TOKEN, clock: Callable[[], float] = time.time):
        super().__init__([web.get("/gateway", self._gateway), web.route("*", "/api/v10/{tail:.*}", self._rest),
                          web.get("/attachments/{id}/{filename}", self._cdn)])
        self.bot_token = bot_token
        self.messages: dict[str, Message] = {}
        self.interactions: dict[str, Interaction] = {}
        self.dead_tokens: set[str] = set()  # interaction tokens that answer 404 Unknown Webhook
        self.commands: list[dict] = []
        self.attachments: dict[str, Attachment] = {}
        self.cdn_fetches: list[str] = []  # attachment ids, each time the CDN served one
        self.guild_roles = [{"id": GUILD_ID, "name": "@everyone", "permissions": "0", "position": 0},
                            {"id": TRAINER_ROLE_ID, "name": "trainers", "permissions": "0", "position": 1}]
        self.identified = asyncio.Event()
        self._seq = 0
        self.clock = clock
        self.skew_s = 0.0
        self.forbidden: dict[str, int] = {}  # channel id -> 50001 or 50013, for bot-token posts
        self.closed_dms: set[str] = set()  # user ids whose DMs answer 403 50007
        self._exhausted: list[list] = []  # [path regex, reset_after_s, times]
        self._buckets: dict[str, float] = {}  # bucket -> clock time its Remaining 0 resets
        self._global_429s: list[float] = []

    # -- how strict it is --------------------------------------------------------------------------------
    def now_s(self) -> float:
        return self.clock() + self.skew_s

    def advance(self, seconds: float) -> None:
        """Move the fake's clock on (tokens age, rate-limit buckets reset)."""
        self.skew_s += seconds

    def forbid(self, channel_id: str, code: int = 50013) -> None:
        self.forbidden[channel_id] = code

    def close_dms(self, user_id: str) -> None:
        self.closed_dms.add(user_id)

    def exhaust(self, path_regex: str, reset_after_s: float = 1.0, times: int = 1) -> None:
        self._exhausted.append([re.compile(path_regex), reset_after_s, times])

    def global_limit(self, retry_after_s: float = 1.0, times: int = 1) -> None:
        self._global_429s += [retry_after_s] * times

    @property
    def api_base(self) -> str:
        return f"{self.server.base}/api/v10"

    @property
    def gateway_url(self) -> str:
        return f"ws://127.0.0.1:{self.server.port}/gateway"

    def settings(self) -> dict[str, str]:
        """SKILL_* values that point a bot or delivery here."""
        return {
            "SKILL_DISCORD_TOKEN": self.bot_token,
            "SKILL_DISCORD_APPLICATION_ID": APPLICATION_ID,
            "SKILL_DISCORD_API_BASE": self.api_base,
            "SKILL_DISCORD_GATEWAY_URL": self.gateway_url,
        }

    # -- what a test reads -----------------------------------------------------------------------------------
    def channel(self, channel_id: str) -> list[Message]:
        """Messages that everyone in the channel sees (not deleted, not ephemeral)."""
        return [m for m in self.messages.values() if m.channel_id == channel_id and not m.deleted and not m.ephemeral]

    def ephemeral_to(self, interaction: Interaction) -> list[Message]:
        return [m for m in self.messages.values() if m.interaction_token == interaction.token and m.ephemeral]

    # -- what Discord sends the bot ------------------------------------------------------------------------
    def attachment(self, filename: str, data: bytes, content_type: str | None = "image/png",
                   ttl_s: float = ATTACHMENT_TTL_S) -> Attachment:
        """A file a user is about to attach to a command (pass it as an option's value). Its URL is signed as
        Discord's CDN signs them (`ex`, `is`, `hm`) and stops working `ttl_s` from now on the fake's clock."""
        attachment_id = snowflake()
        issued, expires = self.now_s(), self.now_s() + ttl_s
        signature = secrets.token_hex(16)
        url = (f"{self.server.base}/attachments/{attachment_id}/{filename}"
               f"?ex={int(expires):x}&is={int(issued):x}&hm={signature}&")
        self.attachments[attachment_id] = Attachment(attachment_id, filename, data, content_type, url, expires)
        return self.attachments[attachment_id]

    async def invoke(self, name: str, options: dict[str, object], *, channel_id: str = CHANNEL_ID,
                     guild_id: str = GUILD_ID, user_id: str = USER_ID, thread: bool = False,
                     permissions: str = "0", created_ms: int | None = None,
                     roles: list[str] = (), locale: str = "en-US") -> Interaction:
        """Someone (a member with `roles`) runs `/name` with these options: INTERACTION_CREATE (type 2) goes to
        the bot. An Attachment value becomes an attachment option, resolved as Discord resolves it."""
        types = {str: 3, int: 4, bool: 5, Attachment: 11}
        data = {"id": snowflake(), "name": name, "type": 1,
                "options": [{"name": k, "type": types[type(v)], "value": v.id if isinstance(v, Attachment) else v}
                            for k, v in options.items()]}
        files = {v.id: v.payload() for v in options.values() if isinstance(v, Attachment)}
        if files:
            data["resolved"] = {"attachments": files}
        return await self._interact(2, data, channel_id, guild_id, user_id, thread, permissions, created_ms,
                                    roles=list(roles), locale=locale)

    async def autocomplete(self, name: str, options: dict[str, object], focused: str, *,
                           guild_id: str = GUILD_ID, user_id: str = USER_ID) -> Interaction:
        """Someone is typing option `focused` of `/name`: APPLICATION_COMMAND_AUTOCOMPLETE (type 4); the bot
        answers with a type 8 callback carrying its choices."""
        data = {"id": snowflake(), "name": name, "type": 1,
                "options": [{"name": k, "type": 3, "value": v, **({"focused": True} if k == focused else {})}
                            for k, v in options.items()]}
        return await self._interact(4, data, CHANNEL_ID, guild_id, user_id, False, "0", None)

    async def click(self, custom_id: str, message: Message, *, user_id: str = USER_ID,
                    guild_id: str = GUILD_ID, locale: str = "en-US") -> Interaction:
        """Someone clicks a button on `message`: INTERACTION_CREATE (type 3)."""
        data = {"custom_id": custom_id, "component_type": 2}
        thread = message.channel_id == THREAD_ID
        return await self._interact(3, data, message.channel_id, guild_id, user_id, thread, "0", None,
                                    message=message.payload(guild_id), locale=locale)

    async def submit_modal(self, opened: Interaction, values: dict[str, str] | None = None, *,
                           user_id: str | None = None, locale: str = "en-US") -> Interaction:
        """The person who opened `opened`'s modal submits it: MODAL_SUBMIT (type 5) with each text input's value
        (`values` by input custom id; an input not named keeps its prefilled value)."""
        modal = opened.modal
        assert modal is not None, "the bot answered this interaction with no modal"
        values = values or {}
        rows = [{"type": 1, "components": [{"type": 4, "custom_id": i["custom_id"],
                                            "value": values.get(i["custom_id"], i.get("value") or "")}
                                           for i in row["components"]]} for row in modal["components"]]
        data = {"custom_id": modal["custom_id"], "components": rows}
        return await self._interact(5, data, opened.channel_id, opened.guild_id, user_id or opened.user_id,
                                    opened.channel_id == THREAD_ID, "0", None, message=opened.message, locale=locale)

    async def _interact(self, kind: int, data: dict, channel_id: str, guild_id: str, user_id: str, thread: bool,
                        permissions: str, created_ms: int | None, message: dict | None = None,
                        roles: list[str] = (), locale: str = "en-US") -> Interaction:
        await asyncio.wait_for(self.identified.wait(), 20)
        interaction = Interaction(snowflake(created_ms), secrets.token_urlsafe(24), channel_id, guild_id, user_id,
                                  created_s=self.now_s() if created_ms is None else created_ms / 1000)
        interaction.kind, interaction.message = kind, message
        self.interactions[interaction.token] = interaction
        channel = {"id": channel_id, "guild_id": guild_id, "name": "general", "type": 0, "position": 0,
                   "permission_overwrites": [], "nsfw": False, "parent_id": None}
        if thread:
            channel.update(type=11, name="a thread", parent_id=CHANNEL_ID, owner_id=user_id, message_count=1,
                           member_count=1, thread_metadata={"archived": False, "auto_archive_duration": 1440,
                                                            "archive_timestamp": _iso(), "locked": False})
        payload = {
            "id": interaction.id, "application_id": APPLICATION_ID, "type": kind, "token": interaction.token,
            "version": 1, "guild_id": guild_id, "channel_id": channel_id, "channel": channel, "data": data,
            "member": {"user": {"id": user_id, "username": "player", "discriminator": "0", "global_name": None,
                                "avatar": None},
                       "roles": list(roles), "joined_at": _iso(), "deaf": False, "mute": False, "permissions": permissions,
                       "flags": 0},
            "locale": locale, "guild_locale": "en-US", "app_permissions": "2147483647", "entitlements": [],
            "authorizing_integration_owners": {"0": guild_id}, "context": 0, "attachment_size_limit": 8388608,
        }
        if message is not None:
            payload["message"] = message
        await self.dispatch("INTERACTION_CREATE", payload)
        return interaction

    def deferred(self, *, channel_id: str = CHANNEL_ID, guild_id: str = GUILD_ID, user_id: str = USER_ID) -> Interaction:
        """An interaction a bot has already deferred ("thinking..."), for testing delivery without a bot."""
        interaction = Interaction(snowflake(), secrets.token_urlsafe(24), channel_id, guild_id, user_id, [5],
                                  created_s=self.now_s())
        interaction.original = self._new_message(channel_id, "interaction", {}, [], interaction.token)
        self.interactions[interaction.token] = interaction
        return interaction

    async def dispatch(self, event: str, data: dict) -> None:
        self._seq += 1
        for ws in list(self._sockets):
            await ws.send_str(json.dumps({"op": 0, "t": event, "s": self._seq, "d": data}))

    # -- gateway -----------------------------------------------------------------------------------------
    async def _gateway(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        self._sockets.append(ws)
        await ws.send_str(json.dumps({"op": 10, "d": {"heartbeat_interval": 41250}}))
        try:
            async for msg in ws:
                if msg.type != WSMsgType.TEXT:
                    continue
                frame = json.loads(msg.data)
                if frame["op"] == 1:  # heartbeat
                    await ws.send_str(json.dumps({"op": 11}))
                elif frame["op"] == 2:  # identify
                    if frame["d"]["token"] != self.bot_token:
                        await ws.close(code=4004, message=b"Authentication failed.")
                        break
                    self._seq += 1
                    await ws.send_str(json.dumps({"op": 0, "t": "READY", "s": self._seq, "d": {
                        "v": 10, "user": BOT_USER, "guilds": [], "session_id": "fake-session",
                        "resume_gateway_url": self.gateway_url, "application": {"id": APPLICATION_ID, "flags": 0},
                        "private_channels": [], "relationships": [],
                    }}))
                    self._seq += 1
                    await ws.send_str(json.dumps({"op": 0, "t": "GUILD_CREATE", "s": self._seq, "d": {
                        "id": GUILD_ID, "name": "fake guild", "unavailable": False, "member_count": 2,
                        "roles": self.guild_roles, "channels": [], "threads": [], "members": [], "emojis": [],
                        "stickers": [], "features": [], "owner_id": USER_ID, "large": False, "joined_at": _iso(),
                        "voice_states": [], "presences": [], "stage_instances": [], "guild_scheduled_events": [],
                        "premium_tier": 0, "preferred_locale": "en-US", "nsfw_level": 0, "mfa_level": 0,
                        "verification_level": 0, "explicit_content_filter": 0, "default_message_notifications": 0,
                        "system_channel_flags": 0,
                    }}))
                    self.identified.set()
        finally:
            self._sockets.remove(ws)
        return ws

    async def _cdn(self, request: web.Request) -> web.Response:
        attachment = self.attachments.get(request.match_info["id"])
        if attachment is None or attachment.filename != request.match_info["filename"]:
            return web.Response(status=404, text="not found")
        if self.now_s() >= attachment.expires_s or request.query.get("ex") != f"{int(attachment.expires_s):x}":
            return web.Response(status=404, text="This content is no longer available.")
        self.cdn_fetches.append(attachment.id)
        return web.Response(body=attachment.data, content_type=attachment.content_type or "application/octet-stream")

    # -- REST --------------------------------------------------------------------------------------------------
    async def _rest(self, request: web.Request) -> web.StreamResponse:
        path = "/" + request.match_info["tail"]
        body, files = await read_body(request)
        fault = self.fault_for(request.method, path, body, files)
        route = route_of(request.method, path)
        bucket = f"{abs(hash(route.split('/messages/')[0])) % 10**12:012x}"
        reset_s = self._buckets.get(bucket, 0.0) - self.now_s()
        if fault is not None:
            status, headers, answer = fault.status, fault.headers, fault.body or {"message": "fault", "code": 0}
        elif self._global_429s:
            after = self._global_429s.pop(0)
            status, headers = 429, {"X-RateLimit-Global": "true", "X-RateLimit-Scope": "global",
                                    "Retry-After": str(after)}
            answer = {"message": "You are being rate limited.", "retry_after": after, "global": True}
        elif reset_s > 0:
            status, headers = 429, {"X-RateLimit-Scope": "user", "Retry-After": f"{reset_s:.3f}"}
            answer = {"message": "You are being rate limited.", "retry_after": round(reset_s, 3), "global": False}
        else:
            status, headers, answer = self._checked(request, path, body, files)
        remaining, reset_after = BUCKET_LIMIT - 1, 1.0
        for rule in self._exhausted:
            if rule[2] > 0 and rule[0].search(path):
                rule[2] -= 1
                remaining, reset_after = 0, rule[1]
                self._buckets[bucket] = self.now_s() + reset_after
                break
        headers = {"X-RateLimit-Limit": str(BUCKET_LIMIT), "X-RateLimit-Remaining": str(remaining),
                   "X-RateLimit-Reset-After": f"{max(reset_after, reset_s):.3f}", "X-RateLimit-Bucket": bucket,
                   **headers}
        await self.record(Call(request.method, path, now(), status, dict(request.headers), body, files))
        if status == 204:
            return web.Response(status=204, headers=headers)
        # discord.py parses a body as JSON only when the content type is exactly this, as Discord sends it.
        return web.Response(body=json.dumps(answer).encode(), status=status,
                            headers={**headers, "Content-Type": "application/json"})

    def _checked(self, request: web.Request, path: str, body: dict, files: list[Upload]) -> tuple[int, dict, object]:
        """Invalid Form Body and 403s before serving."""
        data = body.get("data") if path.startswith("/interactions/") and isinstance(body.get("data"), dict) else body
        errors = {}
        if len(str(data.get("content") or "")) > MAX_CONTENT:
            errors["content"] = f"Must be {MAX_CONTENT} or fewer in length."
        if len(data.get("components") or []) > MAX_ROWS:
            errors["components"] = f"Must be {MAX_ROWS} or fewer in length."
        errors.update(_component_errors(data.get("components") or []))
        if len(files) > MAX_FILES or len(data.get("attachments") or []) > MAX_FILES:
            errors["attachments"] = f"Must be {MAX_FILES} or fewer in length."
        if errors:
            return 400, {}, {"message": "Invalid Form Body", "code": 50035, "errors": errors}
        parts = path.strip("/").split("/")
        if parts[0] == "channels" and len(parts) >= 3 and parts[2] == "messages" and request.method in ("POST", "PATCH"):
            code = self.forbidden.get(parts[1])
            if code is not None:
                return 403, {}, {"message": PERMISSION_ERRORS[code], "code": code}
            if parts[1].startswith("dm-") and parts[1].removeprefix("dm-") in self.closed_dms:
                return 403, {}, {"message": "Cannot send messages to this user", "code": 50007}
        return self._serve(request, path, body, files)

    def _serve(self, request: web.Request, path: str, body: dict, files: list[Upload]) -> tuple[int, dict, object]:
        parts = path.strip("/").split("/")
        method = request.method
        unauthorized = (401, {}, {"message": "401: Unauthorized", "code": 0})
        bot_auth = request.headers.get("Authorization") == f"Bot {self.bot_token}"

        if parts[0] == "interactions" and method == "POST":  # /interactions/{id}/{token}/callback
            interaction = self.interactions.get(parts[2])
            if interaction is None or interaction.age_s(self.now_s()) > CALLBACK_DEADLINE_S:
                return 404, {}, {"message": "Unknown interaction", "code": 10062}
            return self._callback(interaction, body, files)
        if parts[0] == "webhooks":  # /webhooks/{app}/{token}[/messages/@original]
            interaction = self.interactions.get(parts[2])
            if interaction is None or interaction.token in self.dead_tokens:
                return 404, {}, {"message": "Unknown Webhook", "code": 10015}
            if interaction.age_s(self.now_s()) > TOKEN_LIFETIME_S:
                return 401, {}, {"message": "Invalid Webhook Token", "code": 50027}
            return self._webhook(interaction, method, parts[3:], body, files)
        if not bot_auth:
            return unauthorized
        if path == "/users/@me" and method == "GET":
            return 200, {}, BOT_USER
        if path == "/oauth2/applications/@me":
            return 200, {}, {"id": APPLICATION_ID, "name": "skillgen", "description": "", "icon": None,
                             "bot_public": True, "bot_require_code_grant": False, "owner": BOT_USER,
                             "team": None, "verify_key": "0" * 64, "flags": 0, "summary": ""}
        if parts[0] == "applications" and parts[-1] == "commands" and method == "PUT":
            if errors := command_errors(body.get("_list", [])):
                return 400, {}, {"message": "Invalid Form Body", "code": 50035, "errors": errors}
            self.commands = [{**c, "id": snowflake(), "application_id": APPLICATION_ID, "version": snowflake()}
                             for c in body["_list"]] if "_list" in body else []
            return 200, {}, self.commands
        if parts[0] == "channels" and parts[2:] == ["messages"] and method == "POST":
            msg = self._new_message(parts[1], "bot", body, files)
            return 200, {}, msg.payload(None)
        if parts[0] == "channels" and len(parts) == 4 and parts[2] == "messages" and method == "PATCH":
            msg = self.messages.get(parts[3])
            # The bot's own messages, and (as Discord allows) its non-ephemeral interaction responses.
            if msg is None or msg.deleted or msg.channel_id != parts[1] or msg.via == "followup" or msg.ephemeral:
                return 404, {}, {"message": "Unknown Message", "code": 10008}
            self._edit(msg, body, files)
            return 200, {}, msg.payload(None)
        if parts[0] == "channels" and len(parts) == 4 and parts[2] == "messages" and method == "DELETE":
            msg = self.messages.get(parts[3])
            if msg is None or msg.deleted or msg.channel_id != parts[1] or msg.via == "followup":
                return 404, {}, {"message": "Unknown Message", "code": 10008}
            msg.deleted = True
            return 204, {}, None
        if path == "/users/@me/channels" and method == "POST":
            return 200, {}, {"id": f"dm-{body['recipient_id']}", "type": 1, "recipients": [], "last_message_id": None}
        return 404, {}, {"message": f"fake Discord does not serve {method} {path}", "code": 0}

    def _new_message(self, channel_id: str, via: str, body: dict, files: list[Upload],
                     token: str | None = None) -> Message:
        msg = Message(snowflake(), channel_id, via, body.get("content") or "", files,
                      body.get("components") or [], int(body.get("flags") or 0), interaction_token=token,
                      reference=(body.get("message_reference") or {}).get("message_id"))
        self.messages[msg.id] = msg
        return msg

    @staticmethod
    def _edit(msg: Message, body: dict, files: list[Upload]) -> None:
        if "content" in body:
            msg.content = body["content"] or ""
        if "components" in body:
            msg.components = body["components"] or []
        if files or "attachments" in body:
            msg.files = files
        msg.edits += 1

    def _callback(self, interaction: Interaction, body: dict, files: list[Upload]) -> tuple[int, dict, object]:
        kind = body["type"]
        if interaction.callbacks:
            return 400, {}, {"message": "Interaction has already been acknowledged.", "code": 40060}
        interaction.callbacks.append(kind)
        data = body.get("data") or {}
        if kind in (4, 5):  # a message, or "thinking..." to be edited later
            msg = self._new_message(interaction.channel_id, "interaction", data, files, interaction.token)
            interaction.original = msg
            resource = {"type": kind, **({"message": msg.payload(interaction.guild_id)} if kind == 4 else {})}
            return 200, {}, {"interaction": {"id": interaction.id, "type": 2, "response_message_id": msg.id,
                                             "response_message_loading": kind == 5,
                                             "response_message_ephemeral": msg.ephemeral},
                             "resource": resource}
        if kind in (6, 7) and interaction.message is not None:  # a click's @original is the message it was on
            interaction.original = self.messages.get(interaction.message["id"])
        if kind == 9:  # a modal
            refused = self._modal_refused(interaction, data)
            if refused is not None:
                interaction.callbacks.pop()
                return 400, {}, refused
            interaction.modal = data
        return 200, {}, {"interaction": {"id": interaction.id, "type": interaction.kind}, "resource": {"type": kind}}

    @staticmethod
    def _modal_refused(interaction: Interaction, data: dict) -> dict | None:
        """Discord's rules for a modal: never in answer to a modal submission; a custom id (100), a title (45), one
        to five rows of one text input each (label 45, value within its lengths, at most 4000)."""
        if interaction.kind == 5:
            return {"message": "Interaction cannot be responded to with a modal", "code": 50035}
        errors = {}
        if not 1 <= len(data.get("custom_id") or "") <= 100:
            errors["custom_id"] = "Must be between 1 and 100 in length."
        if not 1 <= len(data.get("title") or "") <= 45:
            errors["title"] = "Must be between 1 and 45 in length."
        rows = data.get("components") or []
        if not 1 <= len(rows) <= 5:
            errors["components"] = "Must be between 1 and 5 in length."
        for i, row in enumerate(rows):
            items = row.get("components") or []
            if row.get("type") != 1 or len(items) != 1 or items[0].get("type") != 4:
                errors[f"components.{i}"] = "A modal row holds one text input."
                continue
            item = items[0]
            value = item.get("value") or ""
            if not item.get("custom_id") or not 1 <= len(item.get("label") or "") <= 45:
                errors[f"components.{i}.label"] = "A text input needs a custom id and a label of 1 to 45."
            if len(value) > min(item.get("max_length") or 4000, 4000) or (value and len(value) < (item.get("min_length") or 0)):
                errors[f"components.{i}.value"] = "The prefilled value is outside the input's lengths."
        return {"message": "Invalid Form Body", "code": 50035, "errors": errors} if errors else None

    def _webhook(self, interaction: Interaction, method: str, rest: list[str], body: dict,
                 files: list[Upload]) -> tuple[int, dict, object]:
        if rest == ["messages", "@original"]:
            msg = interaction.original
            if msg is None or msg.deleted:
                return 404, {}, {"message": "Unknown Message", "code": 10008}
            if method == "DELETE":
                msg.deleted = True
                return 204, {}, None
            if method == "PATCH":
                self._edit(msg, body, files)
                return 200, {}, msg.payload(interaction.guild_id)
            if method == "GET":
                return 200, {}, msg.payload(interaction.guild_id)
        if not rest and method == "POST":  # a follow-up message
            msg = self._new_message(interaction.channel_id, "followup", body, files, interaction.token)
            return 200, {}, msg.payload(interaction.guild_id)
        return 404, {}, {"message": "fake Discord does not serve this webhook call", "code": 0}


def _component_errors(rows: list) -> dict:
    """A message's action rows as Discord checks them: at most 5 buttons a row, each custom_id 1-100 characters and
    unique in the message."""
    errors, seen = {}, set()
    for r, row in enumerate(rows):
        items = row.get("components") or []
        if len(items) > MAX_BUTTONS_PER_ROW:
            errors[f"components.{r}.components"] = f"Must be {MAX_BUTTONS_PER_ROW} or fewer in length."
        for i, item in enumerate(items):
            cid = item.get("custom_id")
            if cid is not None and (not 1 <= len(cid) <= MAX_CUSTOM_ID or cid in seen):
                errors[f"components.{r}.components.{i}.custom_id"] = "Must be 1-100 in length and unique."
            seen.add(cid)
    return errors


# Discord's locales (https://discord.com/developers/docs/reference#locales): the only keys a localization may have.
LOCALES = {"id", "da", "de", "en-GB", "en-US", "es-ES", "es-419", "fr", "hr", "it", "lt", "hu", "nl", "no", "pl",
           "pt-BR", "ro", "fi", "sv-SE", "vi", "tr", "cs", "el", "bg", "ru", "uk", "hi", "th", "zh-CN", "ja", "zh-TW",
           "ko"}
MAX_NAME, MAX_DESCRIPTION = 32, 100


def name_error(name: object) -> str | None:
    """Why Discord refuses `name` as a command's or option's name (or a localization of one), or None.

    Discord's rule is `^[-_\\p{L}\\p{N}\\p{sc=Deva}\\p{sc=Thai}]{1,32}$`, lowercase where the script has case."""
    if not isinstance(name, str) or not 1 <= len(name) <= MAX_NAME:
        return f"Must be between 1 and {MAX_NAME} in length."
    for ch in name:
        script = 0x0900 <= ord(ch) <= 0x097F or 0x0E00 <= ord(ch) <= 0x0E7F  # Devanagari, Thai (their marks too)
        if not (ch in "-_" or unicodedata.category(ch)[0] in "LN" or script):
            return f"Command name is invalid: {ch!r} is not a letter, digit, - or _."
        if ch != ch.lower():
            return f"Command name is invalid: {ch!r} is not lowercase."
    return None


def _description_error(text: object) -> str | None:
    if not isinstance(text, str) or not 1 <= len(text) <= MAX_DESCRIPTION:
        return f"Must be between 1 and {MAX_DESCRIPTION} in length."
    return None


def _localized_errors(where: str, item: dict) -> dict:
    """A command's or option's name and description, and their localizations, as Discord checks them."""
    errors = {}
    for key, check in (("name", name_error), ("description", _description_error)):
        if (why := check(item.get(key))) is not None:
            errors[f"{where}{key}"] = why
        for locale, text in (item.get(f"{key}_localizations") or {}).items():
            if locale not in LOCALES:
                errors[f"{where}{key}_localizations.{locale}"] = f"Locale {locale!r} is not a valid locale."
            elif (why := check(text)) is not None:
                errors[f"{where}{key}_localizations.{locale}"] = why
    return errors


def command_errors(commands: list[dict]) -> dict:
    """What Discord says (the `errors` of a 400 50035) about a list of commands to register; {} when it takes them."""
    errors = {}
    for c, command in enumerate(commands):
        if command.get("type", 1) != 1:
            continue  # a context menu's name may have spaces and capitals; the fake registers none
        errors.update(_localized_errors(f"{c}.", command))
        options = command.get("options") or []
        for o, option in enumerate(options):
            errors.update(_localized_errors(f"{c}.options.{o}.", option))
        for locale in {"", *(k for option in options for k in option.get("name_localizations") or {})}:
            shown = [(option.get("name_localizations") or {}).get(locale, option.get("name")) if locale
                     else option.get("name") for option in options]
            if len(set(shown)) < len(shown):
                errors[f"{c}.options"] = f"Option names must be unique{f' in {locale}' if locale else ''}."
    return errors
