"""A fake Slack: the Web API methods the bot and delivery call, file uploads, response_url posts, and a
Socket Mode WebSocket; plus signed slash-command requests for a Bolt app in HTTP mode.

Point slack_sdk at it with `AsyncWebClient(base_url=fake.api_base)` (SKILL_SLACK_API_BASE). A test reads
what a channel shows from `fake.messages`, `fake.files` and `fake.ephemerals`.

People and their files: `fake.users` (users.info, which needs users:read: admins and owners, and with
include_locale the person's `locale`, from `fake.locales`, en-US by default) and `fake.usergroups`
(usergroups.users.list); `fake.share_files(thread_ts, [(name, bytes)])` is a person sharing files into a thread:
the files are kept (files.info) and served from the fake's private file host (`GET /files-pri/...`, which
answers 403 without the bot token, as only the bot may fetch them; `file_delay_s` makes each download that
slow), and the `message`/`file_share` event
comes back as an Events API envelope, to send the app with `send_socket("events_api", ...)` or
`post_event(...)` (signed, HTTP mode).

Channels and membership, as Slack enforces them: `fake.channel(id, private=..., bot_member=...)` declares one (a
channel the fake was not told about is a public channel the bot is in, as CHANNEL_ID is). Every write
(chat.postMessage, chat.update, chat.delete, chat.postEphemeral, files.completeUploadExternal) answers
`not_in_channel` when the bot is not a member, except chat.postMessage to a public channel when `fake.scopes` has
`chat:write.public` (the default); an upload always needs membership. conversations.info (a private channel the bot
is not in is `channel_not_found`), conversations.join (`channels:join`, public channels only) and
conversations.members answer from the same state. A message's text over 40,000 characters is `msg_too_long`, a
section block's text over 3,000 `invalid_blocks`, and so is an actions block of more than 25 elements (or two
with one action_id, or a button value over 2,000 characters). Slash commands carry no thread_ts (Slack never runs
one in a thread); `mention_event(text, thread_ts=...)` is an `app_mention` Events API envelope.

Response URLs: every command and click carries a response_url that takes at most 5 posts within 30 minutes
(`used_url`, `expired_url`: 404, as Slack answers); `fake.advance(seconds)` ages them.

Modals: every command and click carries a trigger_id that views.open accepts once, within 3 seconds
(`invalid_trigger_id`, `expired_trigger_id` otherwise); the view opened is kept in `fake.views`, and
`view_submission(view_id, {block_id: value})` is its submission's payload, to post to the app.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import itertools
import json
import mimetypes
import secrets
import time
import uuid
from dataclasses import dataclass, field
from urllib.parse import urlencode

from aiohttp import ClientSession, WSMsgType, web

from tests.fakes.common import Call, FakePlatform, now, read_body

BOT_TOKEN = "xoxb-fake-slack-bot-token"
APP_TOKEN = "xapp-fake-slack-app-token"
SIGNING_SECRET = "fake-signing-secret"
TEAM_ID = "T0FAKE"
CHANNEL_ID = "C0FAKE"
USER_ID = "U0FAKE"
BOT_USER_ID = "U0BOT"
FILE_TYPES = {"jpeg": "jpg"}  # Slack's filetype for an extension, where they differ
_ts = itertools.count(1)


def next_ts() -> str:
    return f"{int(time.time())}.{next(_ts):06d}"


@dataclass
class SlackMessage:
    ts: str
    channel: str
    thread_ts: str | None
    text: str
    blocks: list = field(default_factory=list)
    deleted: bool = False
    edits: list[str] = field(default_factory=list)  # the text of each chat.update, in order


@dataclass
class SharedFile:
    file_id: str
    channel: str
    thread_ts: str | None
    filename: str
    data: bytes
    initial_comment: str | None
    deleted: bool = False

    @property
    def is_png(self) -> bool:
        return self.data.startswith(b"\x89PNG\r\n\x1a\n")


@dataclass
class UserFile:
    """A file a person shared: what files.info answers and the private file host serves."""

    file_id: str
    name: str
    mimetype: str
    data: bytes
    user: str
    base: str  # the fake's URL

    @property
    def url_private_download(self) -> str:
        return f"{self.base}/files-pri/{TEAM_ID}-{self.file_id}/download/{self.name}"

    def info(self) -> dict:
        """The file object as files.info and a complete file_share event carry it."""
        suffix = self.name.rsplit(".", 1)[-1].lower() if "." in self.name else ""
        return {
            "id": self.file_id, "created": int(time.time()), "timestamp": int(time.time()), "name": self.name,
            "title": self.name, "mimetype": self.mimetype, "filetype": FILE_TYPES.get(suffix, suffix),
            "pretty_type": suffix.upper(), "user": self.user, "user_team": TEAM_ID, "editable": False,
            "size": len(self.data), "mode": "hosted", "is_external": False, "external_type": "", "is_public": True,
            "public_url_shared": False, "display_as_bot": False, "username": "",
            "url_private": f"{self.base}/files-pri/{TEAM_ID}-{self.file_id}/{self.name}",
            "url_private_download": self.url_private_download,
            "permalink": f"https://fake.slack.com/files/{self.user}/{self.file_id}/{self.name}",
            "is_starred": False, "has_rich_preview": False, "file_access": "visible",
        }

    def stub(self) -> dict:
        """What Slack sometimes sends in an event instead: the app must ask files.info for the rest."""
        return {"id": self.file_id, "mode": "file_access", "file_access": "check_file_info", "created": 0,
                "timestamp": 0, "user": ""}


DEFAULT_SCOPES = frozenset({"commands", "chat:write", "chat:write.public", "channels:join", "channels:read",
                            "groups:read", "im:read", "app_mentions:read", "files:write", "files:read",
                            "channels:history", "groups:history", "users:read", "usergroups:read"})


@dataclass
class Channel:
    channel_id: str
    private: bool = False
    members: set[str] = field(default_factory=lambda: {BOT_USER_ID, USER_ID})

    @property
    def is_im(self) -> bool:
        return self.channel_id.startswith("D")

    def info(self) -> dict:
        return {"id": self.channel_id, "name": self.channel_id.lower(), "is_channel": not self.private and not self.is_im,
                "is_group": self.private and not self.is_im, "is_im": self.is_im, "is_private": self.private or self.is_im,
                "is_archived": False, "is_member": BOT_USER_ID in self.members}


RESPONSE_URL_TTL_S, RESPONSE_URL_USES = 30 * 60, 5  # a response_url: 5 posts within 30 minutes
WRITES = ("chat.postMessage", "chat.update", "chat.delete", "chat.postEphemeral", "files.completeUploadExternal")


def user(user_id: str, *, is_admin: bool = False, is_owner: bool = False) -> dict:
    """A users.info `user` object."""
    return {"id": user_id, "team_id": TEAM_ID, "name": user_id.lower(), "deleted": False, "is_bot": False,
            "is_admin": is_admin, "is_owner": is_owner, "is_primary_owner": False, "is_restricted": False,
            "is_ultra_restricted": False, "profile": {"display_name": user_id.lower()}}


@dataclass
class Ephemeral:
    channel: str | None
    user: str | None
    text: str
    via: str  # "chat.postEphemeral" or "response_url"


def sign(body: str, secret: str = SIGNING_SECRET, timestamp: int | None = None,
         content_type: str = "application/x-www-form-urlencoded") -> dict[str, str]:
    """The headers Slack puts on a request it sends an app in HTTP mode (events come as application/json)."""
    ts = str(int(time.time()) if timestamp is None else timestamp)
    digest = hmac.new(secret.encode(), f"v0:{ts}:{body}".encode(), hashlib.sha256).hexdigest()
    return {"X-Slack-Request-Timestamp": ts, "X-Slack-Signature": f"v0={digest}", "Content-Type": content_type}


class FakeSlack(FakePlatform):
    def __init__(self, bot_token: str = BOT_TOKEN):
        super().__init__([
            web.post("/api/{method}", self._api),
            web.get("/api/{method}", self._api),  # slack_sdk reads some methods with GET (files.info, users.info)
            web.post("/upload/{file_id}", self._upload),
            web.post("/respond/{id}", self._respond),
            web.get("/socket", self._socket),
            web.get("/files-pri/{ref}/{tail:.*}", self._private_file),
        ])
        self.bot_token = bot_token
        self.messages: dict[str, SlackMessage] = {}
        self.files: list[SharedFile] = []
        self.ephemerals: list[Ephemeral] = []
        self.users: dict[str, dict] = {USER_ID: user(USER_ID)}
        self.locales: dict[str, str] = {}  # user id -> the locale users.info tells (with include_locale): en-US else
        self.usergroups: dict[str, list[str]] = {}  # user group id -> member ids
        self.user_files: dict[str, UserFile] = {}
        self.file_delay_s = 0.0  # how long the private file host takes to answer each download
        self._uploads: dict[str, tuple[str, bytes | None]] = {}
        self._acks: dict[str, asyncio.Future] = {}
        self.socket_connected = asyncio.Event()
        self.channels: dict[str, Channel] = {CHANNEL_ID: Channel(CHANNEL_ID)}
        self.scopes: set[str] = set(DEFAULT_SCOPES)
        self.delays: dict[str, float] = {}  # Web API method -> seconds it takes to answer
        self.triggers: dict[str, float] = {}  # trigger_id -> when it was issued (monotonic), until exchanged
        self.views: dict[str, dict] = {}  # view id -> the view views.open showed, with its `id`
        self.response_urls: dict[str, list[float]] = {}  # id -> [issued (fake clock), posts so far]
        self.skew_s = 0.0  # how far the fake's clock is ahead of the monotonic one (advance)

    def channel(self, channel_id: str, *, private: bool = False, bot_member: bool = True) -> Channel:
        """Declare a channel: public or private, with the bot in it or not (the requester is always in it)."""
        self.channels[channel_id] = Channel(channel_id, private, {USER_ID, *([BOT_USER_ID] if bot_member else [])})
        return self.channels[channel_id]

    def _channel(self, channel_id: str | None) -> Channel:
        return self.channels.setdefault(channel_id or "", Channel(channel_id or ""))

    def _refuse_write(self, method: str, body: dict) -> dict | None:
        """Slack's membership rule for a write, or None when it may go ahead."""
        ch = self._channel(body.get("channel_id") if method == "files.completeUploadExternal" else body.get("channel"))
        if BOT_USER_ID in ch.members:
            return None
        if method == "chat.postMessage" and not ch.private and not ch.is_im and "chat:write.public" in self.scopes:
            return None
        return {"ok": False, "error": "not_in_channel"}

    @property
    def api_base(self) -> str:
        return f"{self.server.base}/api/"

    def settings(self) -> dict[str, str]:
        return {"SKILL_SLACK_BOT_TOKEN": self.bot_token, "SKILL_SLACK_API_BASE": self.api_base,
                "SKILL_SLACK_SIGNING_SECRET": SIGNING_SECRET, "SKILL_SLACK_APP_TOKEN": APP_TOKEN}

    # -- what a test reads ---------------------------------------------------------------------------
    def visible(self, channel: str, thread_ts: str | None = None) -> list[SlackMessage]:
        return [m for m in self.messages.values()
                if m.channel == channel and m.thread_ts == thread_ts and not m.deleted]

    def pngs(self, channel: str, thread_ts: str | None = None) -> list[SharedFile]:
        return [f for f in self.files
                if f.channel == channel and f.thread_ts == thread_ts and f.is_png and not f.deleted]

    @property
    def file_host(self) -> str:
        """host:port of the private file host, for IngestLimits.allowed_hosts and slack_file_hosts."""
        return f"127.0.0.1:{self.server.port}"

    # -- what Slack sends the app --------------------------------------------------------------------
    def command_body(self, text: str, *, channel_id: str = CHANNEL_ID, user_id: str = USER_ID,
                     team_id: str = TEAM_ID, trigger_id: str | None = None,
                     command: str = "/skill") -> str:
        fields = {
            "token": "deprecated-verification-token", "team_id": team_id, "team_domain": "fake",
            "channel_id": channel_id, "channel_name": "general", "user_id": user_id, "user_name": "player",
            "command": command, "text": text, "api_app_id": "A0FAKE", "is_enterprise_install": "false",
            "response_url": self._response_url(),
            "trigger_id": self._trigger(trigger_id),
        }
        return urlencode(fields)  # no thread_ts: Slack never says a slash command came from a thread

    def button_payload(self, message: SlackMessage, action_id: str, *, user_id: str = USER_ID,
                       team_id: str = TEAM_ID) -> dict:
        element = next(e for b in message.blocks if b.get("type") == "actions" for e in b["elements"]
                       if e["action_id"] == action_id)
        return {
            "type": "block_actions", "team": {"id": team_id, "domain": "fake"},
            "user": {"id": user_id, "username": "player", "team_id": team_id}, "api_app_id": "A0FAKE",
            "token": "deprecated-verification-token", "trigger_id": self._trigger(),
            "container": {"type": "message", "message_ts": message.ts, "channel_id": message.channel,
                          "is_ephemeral": False, **({"thread_ts": message.thread_ts} if message.thread_ts else {})},
            "channel": {"id": message.channel, "name": "general"},
            "message": {"type": "message", "ts": message.ts, "text": message.text, "blocks": message.blocks,
                        **({"thread_ts": message.thread_ts} if message.thread_ts else {})},
            "response_url": self._response_url(),
            "actions": [{"action_id": action_id, "block_id": "b", "type": "button", "value": element["value"],
                         "text": element["text"], "action_ts": str(time.time())}],
        }

    def _trigger(self, trigger_id: str | None = None) -> str:
        """A trigger_id, as Slack puts on a command or a click: good for one views.open within 3 seconds."""
        trigger_id = trigger_id or f"{secrets.randbelow(10**10)}.{secrets.randbelow(10**10)}.{uuid.uuid4().hex}"
        self.triggers[trigger_id] = time.monotonic()
        return trigger_id

    def view_submission(self, view_id: str, values: dict[str, str], *, user_id: str = USER_ID,
                        team_id: str = TEAM_ID) -> dict:
        """Someone submits the modal views.open showed: the `view_submission` payload, each input's value by its
        block_id (its action_id being the one element's), the rest of the view as Slack keeps it."""
        view = self.views[view_id]
        state = {}
        for block in view.get("blocks") or []:
            if block.get("type") == "input":
                element = block["element"]
                value = values.get(block["block_id"], element.get("initial_value"))
                state[block["block_id"]] = {element["action_id"]: {"type": element["type"], "value": value}}
        return {
            "type": "view_submission", "team": {"id": team_id, "domain": "fake"},
            "user": {"id": user_id, "username": "player", "name": "player", "team_id": team_id},
            "api_app_id": "A0FAKE", "token": "deprecated-verification-token", "trigger_id": self._trigger(),
            "view": {**view, "state": {"values": state}, "hash": uuid.uuid4().hex, "team_id": team_id,
                     "app_id": "A0FAKE", "bot_id": "B0BOT"},
            "response_urls": [], "is_enterprise_install": False,
        }

    def share_files(self, thread_ts: str, files: list[tuple[str, bytes]], *, text: str = "", user_id: str = USER_ID,
                    channel_id: str = CHANNEL_ID, team_id: str = TEAM_ID, stubs: bool = False) -> dict:
        """A person shares `files` (name, bytes) into a thread, with `text`: the Events API envelope of the
        `message`/`file_share` event. `stubs` sends the file objects Slack sometimes sends, to be completed with
        files.info. The mimetype is guessed from each name, as Slack does."""
        shared = []
        for name, data in files:
            f = UserFile(f"F{uuid.uuid4().hex[:10].upper()}", name,
                         mimetypes.guess_type(name)[0] or "application/octet-stream", data, user_id, self.server.base)
            self.user_files[f.file_id] = f
            shared.append(f.stub() if stubs else f.info())
        return self.message_event(thread_ts, text, user_id=user_id, channel_id=channel_id, team_id=team_id,
                                  subtype="file_share", files=shared)

    def message_event(self, thread_ts: str | None, text: str, *, user_id: str = USER_ID,
                      channel_id: str = CHANNEL_ID, team_id: str = TEAM_ID, subtype: str | None = None,
                      files: list[dict] | None = None) -> dict:
        """A person's message (a reply in `thread_ts`, or in the channel when None) as an Events API envelope."""
        ts = next_ts()
        event = {"type": "message", "text": text, "user": user_id, "ts": ts, "team": team_id,
                 "channel": channel_id, "channel_type": "channel", "event_ts": ts,
                 "blocks": [{"type": "rich_text", "block_id": "b", "elements": []}] if text else []}
        if thread_ts:
            event.update(thread_ts=thread_ts, parent_user_id=BOT_USER_ID)
        if subtype:
            event.update(subtype=subtype, upload=False, display_as_bot=False)
        if files is not None:
            event["files"] = files
        return {"token": "deprecated-verification-token", "team_id": team_id, "context_team_id": team_id,
                "api_app_id": "A0FAKE", "event": event, "type": "event_callback",
                "event_id": f"Ev{uuid.uuid4().hex[:10].upper()}", "event_time": int(time.time()),
                "authorizations": [{"enterprise_id": None, "team_id": team_id, "user_id": BOT_USER_ID,
                                    "is_bot": True, "is_enterprise_install": False}],
                "is_ext_shared_channel": False, "event_context": uuid.uuid4().hex}

    def mention_event(self, text: str, *, thread_ts: str | None = None, user_id: str = USER_ID,
                      channel_id: str = CHANNEL_ID, team_id: str = TEAM_ID) -> dict:
        """A person's "@skillgen ..." (`text` after the mention) as an `app_mention` Events API envelope: in the
        thread `thread_ts`, or in the channel when None. The message itself is kept, as Slack shows it."""
        envelope = self.message_event(thread_ts, f"<@{BOT_USER_ID}> {text}", user_id=user_id, channel_id=channel_id,
                                      team_id=team_id)
        event = envelope["event"]
        event["type"] = "app_mention"
        event.pop("parent_user_id", None)
        self.messages[event["ts"]] = SlackMessage(event["ts"], channel_id, thread_ts, event["text"])
        return envelope

    async def post_event(self, url: str, envelope: dict, *, retry_num: int | None = None) -> int:
        """POST an Events API envelope to an app in HTTP mode, signed; Slack's retries carry X-Slack-Retry-Num.
        Returns the HTTP status the app answered."""
        body = json.dumps(envelope)
        headers = sign(body, content_type="application/json")
        if retry_num is not None:
            headers.update({"X-Slack-Retry-Num": str(retry_num), "X-Slack-Retry-Reason": "http_timeout"})
        async with ClientSession() as http, http.post(url, data=body, headers=headers) as resp:
            await resp.read()
            return resp.status

    async def send_socket(self, kind: str, payload: dict, timeout_s: float = 10) -> dict:
        """Send an envelope over Socket Mode (kind "slash_commands", "interactive" or "events_api"); returns the
        app's ack."""
        await asyncio.wait_for(self.socket_connected.wait(), timeout_s)
        envelope_id = uuid.uuid4().hex
        future = asyncio.get_running_loop().create_future()
        self._acks[envelope_id] = future
        await self._sockets[-1].send_str(json.dumps({"envelope_id": envelope_id, "type": kind, "payload": payload,
                                                     "accepts_response_payload": kind == "slash_commands",
                                                     "retry_attempt": 0, "retry_reason": ""}))
        return await asyncio.wait_for(future, timeout_s)

    # -- Web API -------------------------------------------------------------------------------------
    async def _api(self, request: web.Request) -> web.Response:
        method = request.match_info["method"]
        await asyncio.sleep(self.delays.get(method, 0))
        body, files = await read_body(request)
        body.update({k: v for k, v in request.query.items() if k not in body})
        fault = self.fault_for(request.method, method)
        if fault is not None:
            status, headers, answer = fault.status, fault.headers, fault.body or {"ok": False, "error": "fault"}
        elif request.headers.get("Authorization") not in (f"Bearer {self.bot_token}", f"Bearer {APP_TOKEN}"):
            status, headers, answer = 200, {}, {"ok": False, "error": "invalid_auth"}
        else:
            status, headers, answer = 200, {}, self._serve(method, body)
        await self.record(Call(request.method, method, now(), status, dict(request.headers), body, files))
        if status >= 500:
            return web.Response(status=status, text="upstream error", headers=headers)
        return web.json_response(answer, status=status, headers=headers)

    def _serve(self, method: str, body: dict) -> dict:
        if method in WRITES and (refused := self._refuse_write(method, body)) is not None:
            return refused
        if method in ("chat.postMessage", "chat.update", "chat.postEphemeral"):  # Slack's limits on a message
            if len(body.get("text") or "") > 40000:
                return {"ok": False, "error": "msg_too_long"}
            if any(len((b.get("text") or {}).get("text", "")) > 3000 for b in _blocks(body) if b.get("type") == "section"):
                return {"ok": False, "error": "invalid_blocks"}
            if any(not _actions_ok(b) for b in _blocks(body) if b.get("type") == "actions"):
                return {"ok": False, "error": "invalid_blocks"}
        if method in ("conversations.info", "conversations.join", "conversations.members"):
            return self._conversations(method, body)
        if method == "auth.test":
            return {"ok": True, "url": "https://fake.slack.com/", "team": "fake", "user": "skillgen",
                    "team_id": TEAM_ID, "user_id": BOT_USER_ID, "bot_id": "B0BOT", "is_enterprise_install": False}
        if method == "chat.postMessage":
            msg = SlackMessage(next_ts(), body["channel"], body.get("thread_ts") or None, body.get("text", ""),
                               _blocks(body))
            self.messages[msg.ts] = msg
            return {"ok": True, "channel": msg.channel, "ts": msg.ts, "message": {"text": msg.text, "ts": msg.ts}}
        if method == "chat.update":
            msg = self.messages.get(body.get("ts", ""))
            if msg is None or msg.deleted or msg.channel != body.get("channel"):
                return {"ok": False, "error": "message_not_found"}
            msg.text = body.get("text", msg.text)
            if "blocks" in body:
                msg.blocks = _blocks(body)
            msg.edits.append(msg.text)
            return {"ok": True, "channel": msg.channel, "ts": msg.ts, "text": msg.text}
        if method == "chat.delete":
            msg = self.messages.get(body.get("ts", ""))
            if msg is None or msg.deleted:
                return {"ok": False, "error": "message_not_found"}
            msg.deleted = True
            return {"ok": True, "channel": msg.channel, "ts": msg.ts}
        if method == "chat.postEphemeral":
            self.ephemerals.append(Ephemeral(body.get("channel"), body.get("user"), body.get("text", ""),
                                             "chat.postEphemeral"))
            return {"ok": True, "message_ts": next_ts()}
        if method == "files.getUploadURLExternal":
            file_id = f"F{uuid.uuid4().hex[:10].upper()}"
            self._uploads[file_id] = (body.get("filename", "file"), None)
            return {"ok": True, "file_id": file_id, "upload_url": f"{self.server.base}/upload/{file_id}"}
        if method == "files.completeUploadExternal":
            shared = []
            for f in json.loads(body["files"]):
                filename, data = self._uploads.get(f["id"], ("", None))
                if data is None:
                    return {"ok": False, "error": "file_upload_not_found"}
                self.files.append(SharedFile(f["id"], body.get("channel_id"), body.get("thread_ts") or None,
                                             filename, data, body.get("initial_comment")))
                shared.append({"id": f["id"], "title": f.get("title"), "name": filename})
            return {"ok": True, "files": shared}
        if method == "users.info":
            return self._users_info(body)
        if method == "usergroups.users.list":
            members = self.usergroups.get(body.get("usergroup", ""))
            return {"ok": True, "users": members} if members is not None else {"ok": False, "error": "no_such_subteam"}
        if method == "files.info":
            shared = self.user_files.get(body.get("file", ""))
            return {"ok": True, "file": shared.info()} if shared else {"ok": False, "error": "file_not_found"}
        if method == "files.delete":  # the bot may delete the files it uploaded (files:write)
            shared = next((f for f in self.files if f.file_id == body.get("file") and not f.deleted), None)
            if shared is None:
                return {"ok": False, "error": "file_not_found"}
            shared.deleted = True
            return {"ok": True}
        if method == "views.open":
            return self._views_open(body)
        if method == "apps.connections.open":
            return {"ok": True, "url": f"ws://127.0.0.1:{self.server.port}/socket"}
        return {"ok": False, "error": "unknown_method"}

    def _users_info(self, body: dict) -> dict:
        """users:read, as Slack asks of users.info; the person's `locale` only with include_locale (slack_sdk sends
        a bool as 1)."""
        if "users:read" not in self.scopes:
            return {"ok": False, "error": "missing_scope", "needed": "users:read", "provided": ",".join(self.scopes)}
        found = self.users.get(body.get("user", ""))
        if found is None:
            return {"ok": False, "error": "user_not_found"}
        if str(body.get("include_locale", "")).lower() in ("1", "true"):
            found = {**found, "locale": self.locales.get(found["id"], "en-US")}
        return {"ok": True, "user": found}

    def _views_open(self, body: dict) -> dict:
        """A trigger_id is good once, for 3 seconds; a modal's title is at most 24 characters, its
        private_metadata 3,000, a plain_text_input's initial value within its max_length (3,000 at most)."""
        trigger = body.get("trigger_id", "")
        issued = self.triggers.pop(trigger, None)
        if issued is None:
            return {"ok": False, "error": "invalid_trigger_id"}
        if time.monotonic() - issued > 3:
            return {"ok": False, "error": "expired_trigger_id"}
        view = body.get("view")
        view = json.loads(view) if isinstance(view, str) else view or {}
        problems = []
        if view.get("type") != "modal":
            problems.append("must be a modal [json-pointer:/view/type]")
        if not 1 <= len((view.get("title") or {}).get("text", "")) <= 24:
            problems.append("must be less than 25 characters [json-pointer:/view/title/text]")
        if len(view.get("private_metadata") or "") > 3000:
            problems.append("must be less than 3001 characters [json-pointer:/view/private_metadata]")
        for i, block in enumerate(view.get("blocks") or []):
            element = block.get("element") or {}
            if block.get("type") == "input" and element.get("type") == "plain_text_input":
                if len(element.get("initial_value") or "") > min(element.get("max_length") or 3000, 3000):
                    problems.append(f"initial value too long [json-pointer:/view/blocks/{i}/element/initial_value]")
                if not view.get("submit"):
                    problems.append("a view with inputs needs submit [json-pointer:/view/submit]")
        if problems:
            return {"ok": False, "error": "invalid_arguments", "response_metadata": {"messages": problems}}
        view_id = f"V{uuid.uuid4().hex[:10].upper()}"
        self.views[view_id] = {**view, "id": view_id}
        return {"ok": True, "view": self.views[view_id]}

    def _conversations(self, method: str, body: dict) -> dict:
        ch = self._channel(body.get("channel"))
        if ch.private and BOT_USER_ID not in ch.members:
            return {"ok": False, "error": "channel_not_found"}  # a private channel is invisible from outside
        if method == "conversations.info":
            return {"ok": True, "channel": ch.info()}
        if method == "conversations.members":
            return {"ok": True, "members": sorted(ch.members), "response_metadata": {"next_cursor": ""}}
        if "channels:join" not in self.scopes:
            return {"ok": False, "error": "missing_scope", "needed": "channels:join", "provided": ",".join(self.scopes)}
        if ch.private or ch.is_im:
            return {"ok": False, "error": "method_not_supported_for_channel_type"}
        ch.members.add(BOT_USER_ID)
        return {"ok": True, "channel": ch.info()}

    async def _upload(self, request: web.Request) -> web.Response:
        file_id = request.match_info["file_id"]
        data = await request.read()
        fault = self.fault_for("POST", f"upload/{file_id}")
        status = fault.status if fault else 200
        if file_id in self._uploads and fault is None:
            self._uploads[file_id] = (self._uploads[file_id][0], data)
        await self.record(Call("POST", f"upload/{file_id}", now(), status, dict(request.headers), {}, []))
        return web.Response(status=status, text=f"OK - {len(data)}")

    async def _private_file(self, request: web.Request) -> web.Response:
        """files.slack.com: a shared file, to the bot token only."""
        await asyncio.sleep(self.file_delay_s)
        path = request.path.lstrip("/")
        shared = self.user_files.get(request.match_info["ref"].rsplit("-", 1)[-1])
        fault = self.fault_for("GET", path)
        if fault is not None:
            status, answer = fault.status, web.Response(status=fault.status, headers=fault.headers, text="fault")
        elif shared is None or request.match_info["tail"] not in (shared.name, f"download/{shared.name}"):
            status, answer = 404, web.Response(status=404, text="file not found")
        elif request.headers.get("Authorization") != f"Bearer {self.bot_token}":
            status, answer = 403, web.Response(status=403, text="a private file: send the bot token")
        else:
            status, answer = 200, web.Response(body=shared.data, content_type=shared.mimetype)
        await self.record(Call("GET", path, now(), status, dict(request.headers), {}, []))
        return answer

    def advance(self, seconds: float) -> None:
        """Move the fake's clock on: response URLs age."""
        self.skew_s += seconds

    def _response_url(self) -> str:
        url_id = uuid.uuid4().hex
        self.response_urls[url_id] = [time.monotonic() + self.skew_s, 0]
        return f"{self.server.base}/respond/{url_id}"

    async def _respond(self, request: web.Request) -> web.Response:
        body, _ = await read_body(request)
        issued = self.response_urls.get(request.match_info["id"])
        error = ("no_such_url" if issued is None
                 else "expired_url" if time.monotonic() + self.skew_s - issued[0] > RESPONSE_URL_TTL_S
                 else "used_url" if issued[1] >= RESPONSE_URL_USES else None)
        await self.record(Call("POST", request.path, now(), 404 if error else 200, dict(request.headers), body, []))
        if error:
            return web.Response(status=404, text=error)
        issued[1] += 1
        self.ephemerals.append(Ephemeral(None, None, body.get("text", ""), "response_url"))
        return web.Response(text="ok")

    async def _socket(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        self._sockets.append(ws)
        await ws.send_str(json.dumps({"type": "hello", "num_connections": 1,
                                      "debug_info": {"host": "fake", "approximate_connection_time": 3600},
                                      "connection_info": {"app_id": "A0FAKE"}}))
        self.socket_connected.set()
        try:
            async for msg in ws:
                if msg.type == WSMsgType.TEXT:
                    ack = json.loads(msg.data)
                    future = self._acks.pop(ack.get("envelope_id", ""), None)
                    if future is not None and not future.done():
                        future.set_result(ack)
        finally:
            self._sockets.remove(ws)
        return ws


def _blocks(body: dict) -> list:
    blocks = body.get("blocks") or []
    return json.loads(blocks) if isinstance(blocks, str) else blocks


def _actions_ok(block: dict) -> bool:
    """An actions block as Block Kit allows one: 1-25 elements, action ids unique in it, values of 2,000 at most."""
    elements = block.get("elements") or []
    ids = [e.get("action_id") for e in elements if e.get("action_id")]
    return 1 <= len(elements) <= 25 and len(ids) == len(set(ids)) and all(
        len(e.get("value") or "") <= 2000 for e in elements)
