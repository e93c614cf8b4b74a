"""`/skill-train` and `/skill-adapters` in Slack, registered on the Slack bot's Bolt app (bots/training.py).

A slash command carries no files, so a training is a thread:

    /skill-train team-style --trigger zq     -> a status message: "reply in this thread with the images, then `go`"
    (images or one zip shared in its thread)  -> the status message counts what arrived
    go                                        -> one FineTuneRequest on topics.finetune; the status message says
                                                 queued, and delivery keeps editing it and posts the sample grid
                                                 in the thread
    cancel                                    -> the thread is dropped; nothing was published

The pending training (a Session: who, the command's fields, the files so far) lives in the bots' store under
its thread, for SKILL_TRAIN_THREAD_TTL_S after the last thing shared. Only the person who ran the command feeds it; what
others say in the thread is theirs. Slack may deliver two events of one thread at once (two uploads) or again
(a retry), so each is handled under a lock on the thread held in the store (shared by every replica), and a
file already taken is skipped. A team has at most one pending thread per adapter name, which is what lets
`/skill-train cancel <name>` drop it. The thread's state, store keys, lock and wording live in
bots/training_slack_threads.py.

Files are Slack-private: at `go` (after Slack's ack: Bolt acks an event before its listener runs) the bot fetches
them with its own token into the blob store (fetch_to_blobs), and the request carries blob references, never a
Slack URL: the trainer holds no Slack token. No torch here.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
from typing import TYPE_CHECKING

from slack_sdk.errors import SlackApiError
from slack_sdk.web.async_client import AsyncWebClient

from bots.metrics import TRAIN_COMMANDS
from bots.render import QUEUE_DOWN, defuse, safe
from bots.settings import TeamPolicy, TrainCommandSettings
from bots.slack_bot import CANNOT_POST
from bots.train_commands import (
    HELP,
    Attached,
    Cancel,
    Help,
    Member,
    Train,
    TrainCommandError,
    cancel_request,
    check_allowed,
    describe_adapters,
    finetune_key,
    finetune_request,
    parse,
    size_text,
)
from bots.training_slack_threads import (
    Session,
    SharedFile,
    collecting_text,
    dropped_text,
    fetch_to_blobs,
    pending_key,
    queued_text,
    received,
    sent_key,
    thread_key,
    thread_lock,
)
from schemas.messages import Origin, Platform, new_request_id
from skillgen.adapters.registry import Registry
from skillgen.runtime.blobstore import BlobStore
from skillgen.runtime.fetch import IngestError, check_url
from skillgen.runtime.logs import job

if TYPE_CHECKING:
    from slack_bolt.async_app import AsyncApp

    from bots.intake import Intake

log = logging.getLogger("skillgen.slack.train")

TRAIN_COMMAND = "/skill-train"
ADAPTERS_COMMAND = "/skill-adapters"
CLAIM_TTL_S = 3600  # Slack retries commands and events within minutes
PUBLISH_TIMEOUT_S = 10
LOOKUP_TIMEOUT_S = 2.0  # who may train is asked of Slack before the ack, which is due within 3 s
ADAPTERS_ACK_WAIT_S = 2.0  # a slower registry answers through the response_url instead of the ack

SLACK_HELP = HELP.replace("**", "*").replace(
    "with PNG/JPEG/WebP images attached or one zip",
    "starts a thread: share PNG/JPEG/WebP images or one zip in it, then reply `go` there (`cancel` drops it)",
)
LOOKUP_SLOW = "Slack took too long to say who may train here; try again in a moment."
CANCEL_DOWN = "❌ The trainer could not be told to stop (the queue is unreachable). Try again in a minute."
REGISTRY_DOWN = "❌ I cannot read the adapter registry right now; try again in a minute."


def _slack_field(exc: SlackApiError, name: str) -> str | None:
    data = exc.response.data
    return data.get(name) if isinstance(data, dict) else None


def _slack_error(exc: SlackApiError) -> str:
    """Slack's error code, or the HTTP status where the answer was not Slack's JSON (a proxy, an outage)."""
    return _slack_field(exc, "error") or f"HTTP {exc.response.status_code}"


def _thread_word(text: str | None) -> str | None:
    """`go` or `cancel` when that is all the message says (any case, trailing punctuation allowed)."""
    word = (text or "").strip().rstrip(".!").strip().lower()
    return word if word in ("go", "cancel") else None


# ---------------------------------------------------------------------------------------------- commands


class SlackTrainCommands:
    """The listeners; `register(app)` wires them into the Slack bot's Bolt app."""

    def __init__(self, intake: Intake, settings: TrainCommandSettings, registry: Registry | None = None):
        self.intake = intake
        self.store = intake.store
        self.settings = settings
        self.registry = registry or Registry(settings.adapter_url)
        self.blobs = BlobStore(settings.blob_url)

    def register(self, app: AsyncApp) -> None:
        app.command(TRAIN_COMMAND)(self.on_train)
        app.command(ADAPTERS_COMMAND)(self.on_adapters)
        app.event("message")(self.on_message)

    # -- /skill-train -------------------------------------------------------------------------------------
    async def on_train(self, ack, command: dict, client: AsyncWebClient, respond) -> None:
        claim = f"slack:train:cmd:{command['team_id']}:{command['trigger_id']}"
        if not await self.store.add(claim, "", CLAIM_TTL_S):
            # A retry of a command already taken: the first delivery of it did the work.
            await ack(text=(await self.store.get(claim)) or "Already received.", response_type="ephemeral")
            return
        origin = Origin(platform=Platform.slack, team_id=command["team_id"], channel_id=command["channel_id"],
                        user_id=command["user_id"], thread_id=command.get("thread_ts") or None)
        try:
            cmd = parse(command.get("text") or "")
            if isinstance(cmd, Help):
                TRAIN_COMMANDS.labels("slack", "train", "help").inc()
                await self._ack(ack, claim, SLACK_HELP)
                return
            await self.check_member(client, origin)
        except TrainCommandError as exc:
            TRAIN_COMMANDS.labels("slack", "train", "refused").inc()
            await self._ack(ack, claim, defuse(str(exc), Platform.slack))  # it may quote what was typed
            return
        if isinstance(cmd, Cancel):
            await self.cancel(ack, claim, client, respond, cmd, origin)
        else:
            await self.start(ack, claim, client, respond, cmd, origin)

    async def _ack(self, ack, claim: str, text: str) -> None:
        await ack(text=text, response_type="ephemeral")
        await self.store.put(claim, text, CLAIM_TTL_S)  # what a retry of this command is answered

    async def check_member(self, client: AsyncWebClient, origin: Origin) -> None:
        """NotAllowed unless the team's policy lets this person train; asks Slack only what the policy needs."""
        policy = self.settings.train_permissions.get(origin.team_id)
        member = Member(origin.user_id)
        if policy is not None and origin.user_id not in policy.slack_user_ids:
            try:
                async with asyncio.timeout(LOOKUP_TIMEOUT_S):
                    member = await self._member(client, origin.user_id, policy)
            except SlackApiError as exc:
                error, needed = _slack_error(exc), _slack_field(exc, "needed")
                scope = f" (this app needs the `{needed}` scope: ask a workspace admin)" if needed else ""
                raise TrainCommandError(f"I cannot check who may train here: Slack answered `{error}`{scope}") from None
            except TimeoutError:
                raise TrainCommandError(LOOKUP_SLOW) from None
        check_allowed(self.settings.train_permissions, origin, member)

    @staticmethod
    async def _member(client: AsyncWebClient, user_id: str, policy: TeamPolicy) -> Member:
        is_admin = False
        if policy.slack_admins:
            user = (await client.users_info(user=user_id)).get("user") or {}
            is_admin = bool(user.get("is_admin") or user.get("is_owner") or user.get("is_primary_owner"))
        groups: frozenset[str] = frozenset()
        if policy.slack_usergroup_ids and not is_admin:
            ids = sorted(policy.slack_usergroup_ids)
            answers = await asyncio.gather(*(client.usergroups_users_list(usergroup=g) for g in ids))
            groups = frozenset(g for g, a in zip(ids, answers, strict=True) if user_id in (a.get("users") or []))
        return Member(user_id, usergroup_ids=groups, is_admin=is_admin)

    async def cancel(self, ack, claim: str, client: AsyncWebClient, respond, cmd: Cancel, origin: Origin) -> None:
        # Acked first: the publish and the thread's lease may take longer than Slack's 3 seconds.
        await self._ack(ack, claim, f"Asked the trainer to stop `{cmd.name}`.")
        await self.drop_pending(client, origin.team_id, cmd.name, origin.user_id)
        try:
            async with asyncio.timeout(PUBLISH_TIMEOUT_S):
                await self.intake.send(self.intake.settings.topics.finetune_cancel, cancel_request(cmd, origin),
                                       key=f"{origin.team_id}/{cmd.name}".encode())
        except Exception:
            log.exception("cannot publish the cancel of %s/%s", origin.team_id, cmd.name)
            TRAIN_COMMANDS.labels("slack", "cancel", "queue_down").inc()
            await respond(text=CANCEL_DOWN, response_type="ephemeral")
            return
        TRAIN_COMMANDS.labels("slack", "cancel", "sent").inc()

    async def drop_pending(self, client: AsyncWebClient, team_id: str, name: str, by: str) -> None:
        """Drop the team's thread still collecting files for `name`, if there is one."""
        pending = pending_key(team_id, name)
        thread = await self.store.get(pending)
        if thread is None:
            return
        if not thread.startswith("slack:train:thread:"):  # a start that never finished posting its thread
            await self.store.delete_if(pending, thread)
            return
        async with thread_lock(self.store, thread):
            raw = await self.store.get(thread)
            if raw is not None:
                await self._drop(client, Session.model_validate_json(raw), raw, by)

    async def start(self, ack, claim: str, client: AsyncWebClient, respond, cmd: Train, origin: Origin) -> None:
        """Post the status message that starts the thread, and remember the pending training under it."""
        pending = pending_key(origin.team_id, cmd.name)
        placeholder = f"starting:{secrets.token_hex(8)}"
        if not await self.store.add(pending, placeholder, self.settings.train_thread_ttl_s):
            await self._ack(ack, claim, f"A training of `{cmd.name}` is already waiting for its images in a thread: "
                                        f"reply `go` or `cancel` there, or run `/skill-train cancel {cmd.name}`.")
            return
        if origin.thread_id and await self.store.get(thread_key(origin.team_id, origin.channel_id,
                                                                     origin.thread_id)):
            await self.store.delete_if(pending, placeholder)
            await self._ack(ack, claim, "This thread already has a training waiting for images: reply `go` or "
                                        "`cancel` in it first, or run the command outside the thread.")
            return
        await self._ack(ack, claim, f"Started a training thread for `{cmd.name}`: share the images in it, then "
                                    "reply `go` there.")
        session = Session(request_id=new_request_id(), team_id=origin.team_id, channel_id=origin.channel_id,
                          thread_ts="", status_ts="", user_id=origin.user_id, name=cmd.name, trigger=cmd.trigger,
                          steps=cmd.steps, caption=cmd.caption)
        try:
            posted = await client.chat_postMessage(channel=origin.channel_id, thread_ts=origin.thread_id,
                                                   text=collecting_text(session, self.settings.ingest))
        except SlackApiError as exc:
            error = _slack_error(exc)
            log.warning("cannot post the training thread's status message: %s", error)
            await self.store.delete_if(pending, placeholder)
            await respond(text=CANNOT_POST.get(error, f"I cannot post here ({error})."), response_type="ephemeral")
            return
        session.status_ts = posted["ts"]
        session.thread_ts = origin.thread_id or posted["ts"]
        key = session.key()
        await self.store.put(key, session.model_dump_json(), self.settings.train_thread_ttl_s)
        await self.store.put(pending, key, self.settings.train_thread_ttl_s)
        TRAIN_COMMANDS.labels("slack", "train", "thread").inc()
        log.info("training thread for %s started", cmd.name, extra=job(session.request_id, team=origin.team_id))

    # -- the thread ---------------------------------------------------------------------------------------
    async def on_message(self, event: dict, body: dict, client: AsyncWebClient, context) -> None:
        """Files, `go` and `cancel` in a training thread; every other message in the workspace passes by."""
        if event.get("subtype") not in (None, "file_share", "thread_broadcast") or event.get("bot_id"):
            return
        thread_ts, channel_id, user_id = event.get("thread_ts"), event.get("channel"), event.get("user")
        team_id = context.team_id or body.get("team_id") or event.get("team")
        if not (thread_ts and channel_id and user_id and team_id):
            return
        key = thread_key(team_id, channel_id, thread_ts)
        raw = await self.store.get(key)
        word = _thread_word(event.get("text"))
        if raw is None:
            if (word == "go" or event.get("files")) and await self._first_delivery(team_id, body):
                await self._already_sent(client, key, channel_id, thread_ts, user_id)
            return
        if Session.model_validate_json(raw).user_id != user_id:
            return  # the thread is open to talk in; only its owner's files and words count
        if not await self._first_delivery(team_id, body):
            return
        async with thread_lock(self.store, key):
            raw = await self.store.get(key)  # as the event handled before this one left it
            if raw is None:
                return
            await self._take(client, Session.model_validate_json(raw), raw, event.get("files") or [], word)

    async def _first_delivery(self, team_id: str, body: dict) -> bool:
        """False for an event Slack delivered again (it retries when it thinks the app did not answer)."""
        event_id = body.get("event_id")
        return not event_id or await self.store.add(f"slack:train:event:{team_id}:{event_id}", "", CLAIM_TTL_S)

    async def _already_sent(self, client: AsyncWebClient, key: str, channel_id: str, thread_ts: str,
                            user_id: str) -> None:
        sent = await self.store.get(sent_key(key))
        if sent is None:
            return
        info = json.loads(sent)
        if info.get("user_id") == user_id:
            await self._post(client, channel_id, thread_ts,
                             f"`{info['name']}` was already sent to the trainer; to train again, run "
                             f"`/skill-train {info['name']}` and share the images in its new thread.")

    async def _take(self, client: AsyncWebClient, session: Session, raw: str, files: list[dict],
                    word: str | None) -> None:
        if word == "cancel":
            await self._drop(client, session, raw, session.user_id)
            return
        before = len(session.files)
        # A file is named by its place in the thread ("File 3", counting the files kept so far), never by its name.
        refused = [reason for i, f in enumerate(files, len(session.files) + 1)
                   if (reason := await self._add(client, session, f, f"File {i}"))]
        if len(session.files) != before:
            raw = session.model_dump_json()
            key = session.key()
            await self.store.put(key, raw, self.settings.train_thread_ttl_s)
            await self.store.put(pending_key(session.team_id, session.name), key, self.settings.train_thread_ttl_s)
            await self._update(client, session, collecting_text(session, self.settings.ingest))
        if refused:
            lines = [f"❌ {r}" for r in refused]
            if word == "go" and session.files:
                lines.append(f"Not started: reply `go` again to train on the {received(session.files)} received.")
            elif word == "go":
                lines.append("Nothing was sent to the trainer.")
            await self._post(client, session.channel_id, session.thread_ts, "\n".join(lines))
        elif word == "go":
            await self._go(client, session, raw)

    async def _add(self, client: AsyncWebClient, session: Session, f: dict, name: str) -> str | None:
        """Take one shared file into the session; the reason it is refused, for the thread, otherwise (the file
        called `name`: its position, never the sender's file name)."""
        if any(taken.id == f.get("id") for taken in session.files):
            return None  # the same file again (a retried event)
        if f.get("file_access") == "check_file_info" or not f.get("url_private_download"):
            # Slack sends some file objects as a stub to be completed with files.info.
            try:
                f = (await client.files_info(file=f["id"]))["file"]
            except SlackApiError as exc:
                return f"I cannot read a shared file (Slack answered `{_slack_error(exc)}`)."
        kind = Attached(f.get("name") or "", f.get("mimetype"), f.get("size")).kind
        limits = self.settings.ingest
        if kind is None:
            what = safe(f.get("mimetype") or "", Platform.slack) or "of an unknown type"
            return f"{name} is {what}: share PNG, JPEG or WebP images, or one zip of them."
        url = f.get("url_private_download") or f.get("url_private")
        if not url or f.get("is_external"):
            return f"{name} is a link to another service: share the file itself."
        try:
            await asyncio.to_thread(check_url, url, limits)  # resolves the host: off the event loop
        except IngestError as exc:
            return f"{name}: {defuse(str(exc), Platform.slack)}"
        size = int(f.get("size") or 0)
        if size > limits.max_file_bytes:
            return f"{name} is {size_text(size)}; files may be at most {size_text(limits.max_file_bytes)}."
        total = size + sum(x.size_bytes for x in session.files)
        if total > limits.max_total_bytes:
            return (f"{name} would bring the files to {size_text(total)}; at most "
                    f"{size_text(limits.max_total_bytes)} in all.")
        has_zip = any(x.kind == "zip" for x in session.files)
        if has_zip:
            return f"{name} not added: this thread already has {received(session.files)}, and a zip comes alone."
        if kind == "zip" and session.files:
            return (f"{name} not added: send one zip or images, not both; this thread already has "
                    f"{received(session.files)} (reply `cancel` and start again to send a zip instead).")
        if kind == "image" and len(session.files) >= limits.max_images:
            return f"{name} not added: at most {limits.max_images} images per training."
        session.files.append(SharedFile(id=f["id"], name=f.get("name") or f["id"], kind=kind, url=url,
                                        size_bytes=size))
        return None

    async def _go(self, client: AsyncWebClient, session: Session, raw: str) -> None:
        if not session.files:
            await self._post(client, session.channel_id, session.thread_ts,
                             "Share the training images (PNG, JPEG or WebP) or one zip in this thread first, "
                             "then reply `go`.")
            return
        try:  # who may train can have changed since the thread started
            await self.check_member(client, session.origin())
        except TrainCommandError as exc:
            TRAIN_COMMANDS.labels("slack", "train", "refused").inc()
            await self._post(client, session.channel_id, session.thread_ts, f"❌ {exc} Nothing was sent to the trainer.")
            return
        try:  # with this bot's token, into the blob store: the trainer never holds a Slack token
            images = await fetch_to_blobs(session.files, self.settings.ingest, client.token, self.blobs)
            req = finetune_request(session.command(), session.origin(), [], self.settings, images=images)
        except TrainCommandError as exc:
            await self._post(client, session.channel_id, session.thread_ts, f"❌ {exc}")
            return
        req = req.model_copy(update={"request_id": session.request_id})
        try:
            async with asyncio.timeout(PUBLISH_TIMEOUT_S):
                await self.intake.send(self.intake.settings.topics.finetune, req, key=finetune_key(req))
        except Exception:
            log.exception("cannot publish the training", extra=job(req.request_id))
            TRAIN_COMMANDS.labels("slack", "train", "queue_down").inc()
            await self._post(client, session.channel_id, session.thread_ts,
                             f"{QUEUE_DOWN} Your files are kept: reply `go` again.")
            return
        TRAIN_COMMANDS.labels("slack", "train", "queued").inc()
        log.info("published the training of %s (%d files)", session.name, len(session.files),
                 extra=job(req.request_id, team=session.team_id))
        key = session.key()
        await self.store.put(sent_key(key), json.dumps({"user_id": session.user_id, "name": session.name}),
                             self.settings.train_thread_ttl_s)
        await self._forget(session, raw)
        await self._update(client, session, queued_text(session))

    async def _drop(self, client: AsyncWebClient, session: Session, raw: str, by: str) -> None:
        await self._forget(session, raw)
        await self._update(client, session, dropped_text(session, by))
        log.info("training thread for %s dropped by %s", session.name, by, extra=job(session.request_id))

    async def _forget(self, session: Session, raw: str) -> None:
        key = session.key()
        await self.store.delete_if(key, raw)
        await self.store.delete_if(pending_key(session.team_id, session.name), key)

    async def _update(self, client: AsyncWebClient, session: Session, text: str) -> None:
        try:
            await client.chat_update(channel=session.channel_id, ts=session.status_ts, text=text)
        except SlackApiError as exc:  # e.g. someone deleted the status message: the thread still works
            log.warning("cannot update the training status message: %s", _slack_error(exc))

    async def _post(self, client: AsyncWebClient, channel_id: str, thread_ts: str, text: str) -> None:
        try:
            await client.chat_postMessage(channel=channel_id, thread_ts=thread_ts, text=text)
        except SlackApiError as exc:
            log.warning("cannot reply in the training thread: %s", _slack_error(exc))

    # -- /skill-adapters ----------------------------------------------------------------------------------
    async def on_adapters(self, ack, command: dict, respond) -> None:
        TRAIN_COMMANDS.labels("slack", "adapters", "listed").inc()
        listing = asyncio.ensure_future(asyncio.to_thread(describe_adapters, self.registry, command["team_id"]))
        done, _ = await asyncio.wait({listing}, timeout=ADAPTERS_ACK_WAIT_S)
        if done:
            await ack(text=self._listing(listing), response_type="ephemeral")
            return
        await ack(text="Looking up your team's adapters…", response_type="ephemeral")
        await asyncio.wait({listing})
        await respond(text=self._listing(listing), response_type="ephemeral")

    @staticmethod
    def _listing(listing: asyncio.Future) -> str:
        try:
            return listing.result()
        except Exception:
            log.exception("cannot list adapters")
            return REGISTRY_DOWN


def register(app: AsyncApp, intake: Intake, settings: TrainCommandSettings) -> None:
    SlackTrainCommands(intake, settings).register(app)
