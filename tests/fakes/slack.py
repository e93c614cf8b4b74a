"""A fake Slack: the Web API methods the bot and delivery call, file uploads, response_url posts, and a
Socket Mode WebSocket; plus signed slash-command requests for a Bolt app in HTTP mode.

Point slack_sdk at it with `AsyncWebClient(base_url=fake.api_base)` (SKILL_SLACK_API_BASE). A test reads
what a channel shows from `fake.messages`, `fake.files` and `fake.ephemerals`.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import itertools
import json
import secrets
import time
import uuid
from dataclasses import dataclass, field
from urllib.parse import urlencode

from aiohttp import WSMsgType, web

from tests.fakes.common import Call, Recorder, Server, now, read_body

BOT_TOKEN = "xoxb-fake-slack-bot-token"
APP_TOKEN = "xapp-fake-slack-app-token"
SIGNING_SECRET = "fake-signing-secret"
TEAM_ID = "T0FAKE"
CHANNEL_ID = "C0FAKE"
USER_ID = "U0FAKE"
BOT_USER_ID = "U0BOT"
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

    @property
    def is_png(self) -> bool:
        return self.data.startswith(b"\x89PNG\r\n\x1a\n")


@dataclass
class Ephemeral:
    channel: str | None
    user: str | None
    text: str
    via: str  # "chat.postEphemeral" or "response_url"


def sign(body: str, secret: str = SIGNING_SECRET, timestamp: int | None = None) -> dict[str, str]:
    """The headers Slack puts on a request it sends an app in HTTP mode."""
    ts = str(int(time.time()) if timestamp is None else timestamp)
    digest = hmac.new(secret.encode(), f"v0:{ts}:{body}".encode(), hashlib.sha256).hexdigest()
    return {"X-Slack-Request-Timestamp": ts, "X-Slack-Signature": f"v0={digest}",
            "Content-Type": "application/x-www-form-urlencoded"}


class FakeSlack(Recorder):
    def __init__(self, bot_token: str = BOT_TOKEN):
        super().__init__()
        self.bot_token = bot_token
        self.messages: dict[str, SlackMessage] = {}
        self.files: list[SharedFile] = []
        self.ephemerals: list[Ephemeral] = []
        self._uploads: dict[str, tuple[str, bytes | None]] = {}
        self._sockets: list[web.WebSocketResponse] = []
        self._acks: dict[str, asyncio.Future] = {}
        self.socket_connected = asyncio.Event()
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.add_routes([
            web.post("/api/{method}", self._api),
            web.post("/upload/{file_id}", self._upload),
            web.post("/respond/{id}", self._respond),
            web.get("/socket", self._socket),
        ])
        self.server = Server(app)

    async def start(self) -> FakeSlack:
        await self.server.start()
        return self

    async def stop(self) -> None:
        for ws in list(self._sockets):
            await ws.close()
        await self.server.stop()

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
        return [f for f in self.files if f.channel == channel and f.thread_ts == thread_ts and f.is_png]

    # -- what Slack sends the app --------------------------------------------------------------------
    def command_body(self, text: str, *, channel_id: str = CHANNEL_ID, user_id: str = USER_ID,
                     team_id: str = TEAM_ID, thread_ts: str | None = None, trigger_id: str | None = None,
                     command: str = "/skill") -> str:
        fields = {
            "token": "deprecated-verification-token", "team_id": team_id, "team_domain": "fake",
            "channel_id": channel_id, "channel_name": "general", "user_id": user_id, "user_name": "player",
            "command": command, "text": text, "api_app_id": "A0FAKE", "is_enterprise_install": "false",
            "response_url": f"{self.server.base}/respond/{uuid.uuid4().hex}",
            "trigger_id": trigger_id or f"{secrets.randbelow(10**10)}.{secrets.randbelow(10**10)}.{uuid.uuid4().hex}",
        }
        if thread_ts:
            fields["thread_ts"] = thread_ts
        return urlencode(fields)

    def button_payload(self, message: SlackMessage, action_id: str, *, user_id: str = USER_ID,
                       team_id: str = TEAM_ID) -> dict:
        element = next(e for b in message.blocks if b.get("type") == "actions" for e in b["elements"]
                       if e["action_id"] == action_id)
        return {
            "type": "block_actions", "team": {"id": team_id, "domain": "fake"},
            "user": {"id": user_id, "username": "player", "team_id": team_id}, "api_app_id": "A0FAKE",
            "token": "deprecated-verification-token", "trigger_id": f"{secrets.randbelow(10**10)}.x",
            "container": {"type": "message", "message_ts": message.ts, "channel_id": message.channel,
                          "is_ephemeral": False, **({"thread_ts": message.thread_ts} if message.thread_ts else {})},
            "channel": {"id": message.channel, "name": "general"},
            "message": {"type": "message", "ts": message.ts, "text": message.text, "blocks": message.blocks,
                        **({"thread_ts": message.thread_ts} if message.thread_ts else {})},
            "response_url": f"{self.server.base}/respond/{uuid.uuid4().hex}",
            "actions": [{"action_id": action_id, "block_id": "b", "type": "button", "value": element["value"],
                         "text": element["text"], "action_ts": str(time.time())}],
        }

    async def send_socket(self, kind: str, payload: dict, timeout_s: float = 10) -> dict:
        """Send an envelope over Socket Mode (kind "slash_commands" or "interactive"); returns the app's ack."""
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
        body, files = await read_body(request)
        body.update({k: v for k, v in request.query.items() if k not in body})
        fault = self.fault_for("POST", method)
        if fault is not None:
            status, headers, answer = fault.status, fault.headers, fault.body or {"ok": False, "error": "fault"}
        elif request.headers.get("Authorization") not in (f"Bearer {self.bot_token}", f"Bearer {APP_TOKEN}"):
            status, headers, answer = 200, {}, {"ok": False, "error": "invalid_auth"}
        else:
            status, headers, answer = 200, {}, self._serve(method, body)
        await self.record(Call("POST", method, now(), status, dict(request.headers), body, files))
        if status >= 500:
            return web.Response(status=status, text="upstream error", headers=headers)
        return web.json_response(answer, status=status, headers=headers)

    def _serve(self, method: str, body: dict) -> dict:
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
        if method == "apps.connections.open":
            return {"ok": True, "url": f"ws://127.0.0.1:{self.server.port}/socket"}
        return {"ok": False, "error": "unknown_method"}

    async def _upload(self, request: web.Request) -> web.Response:
        file_id = request.match_info["file_id"]
        data = await request.read()
        fault = self.fault_for("POST", f"upload/{file_id}")
        status = fault.status if fault else 200
        if file_id in self._uploads and fault is None:
            self._uploads[file_id] = (self._uploads[file_id][0], data)
        await self.record(Call("POST", f"upload/{file_id}", now(), status, dict(request.headers), {}, []))
        return web.Response(status=status, text=f"OK - {len(data)}")

    async def _respond(self, request: web.Request) -> web.Response:
        body, _ = await read_body(request)
        self.ephemerals.append(Ephemeral(None, None, body.get("text", ""), "response_url"))
        await self.record(Call("POST", request.path, now(), 200, dict(request.headers), body, []))
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
