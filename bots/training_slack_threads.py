"""A Slack training thread's state (bots/training_slack.py holds its listeners): the pending training stored
under its thread, the keys it lives under, the lock that lets one event of a thread be handled at a time, what
its status message says, and, at `go`, the download of its files into the blob store.

Slack's files are private: only the bot's token fetches them. The trainer never holds that token, so at `go` the
bot downloads each file itself (skillgen.runtime.fetch: Slack's file hosts only, the token only to
IngestLimits.slack_file_hosts, byte caps) into the blob store, and the request carries the blob references.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Literal

from pydantic import BaseModel

from bots import train_commands
from bots.render import slack_text
from bots.train_commands import (
    UPLOAD_TYPE as UPLOAD_TYPE,  # the web front-end's uploads use it too
)
from bots.train_commands import Train
from schemas.limits import IngestLimits
from schemas.messages import BlobRef, Origin, Platform
from skillgen.runtime.blobstore import BlobStore
from skillgen.runtime.redis import Lease, Store, WithoutRedis

LOCK_TTL_S = 15
LOCK_WAIT_S = 120  # an event waits this long for the one before it in its thread (each Slack call times out)
LOCK_POLL_S = 0.05


class SharedFile(BaseModel):
    id: str
    name: str
    kind: Literal["image", "zip"]
    url: str
    size_bytes: int = 0


class Session(BaseModel):
    """A training waiting for its files in a thread; stored as JSON under its thread's key."""

    request_id: str  # fixed when the thread starts, so a publish retried after a failure is one job
    team_id: str
    channel_id: str
    thread_ts: str  # the thread's root: the status message, or the thread the command came from
    status_ts: str
    user_id: str
    name: str
    trigger: str | None = None
    steps: int | None = None
    caption: str | None = None
    files: list[SharedFile] = []

    def command(self) -> Train:
        return Train(self.name, self.trigger, self.steps, self.caption)

    def origin(self) -> Origin:
        return Origin(platform=Platform.slack, team_id=self.team_id, channel_id=self.channel_id,
                      user_id=self.user_id, thread_id=self.thread_ts, status_message_id=self.status_ts)

    def key(self) -> str:
        return thread_key(self.team_id, self.channel_id, self.thread_ts)


# ---------------------------------------------------------------------------------------------- store keys


def thread_key(team_id: str, channel_id: str, thread_ts: str) -> str:
    return f"slack:train:thread:{team_id}:{channel_id}:{thread_ts}"


def pending_key(team_id: str, name: str) -> str:
    return f"slack:train:pending:{team_id}:{name}"


def sent_key(thread: str) -> str:
    return f"{thread}:sent"


@asynccontextmanager
async def thread_lock(store: Store, thread: str) -> AsyncIterator[None]:
    """One event of a thread at a time, across replicas. The holder renews the lock while it works; one that
    died lets go after LOCK_TTL_S. Without Redis the lock falls back to this process's memory, as the session
    it guards does: events of a thread stay one at a time within this replica."""
    lease = Lease(store, f"{thread}:lease", LOCK_TTL_S, WithoutRedis.MEMORY)
    deadline = time.monotonic() + LOCK_WAIT_S
    while not await lease.acquire():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{lease.name} was held for more than {LOCK_WAIT_S} s")
        await asyncio.sleep(LOCK_POLL_S)
    lease.keep_renewed()
    try:
        yield
    finally:
        await lease.release()


# ------------------------------------------------------------------------------------------------- wording


def escape(text: str) -> str:
    """Sender text for inside backticks: Slack's escaping (bots/render.py), and no backtick to end the code span."""
    return slack_text(text).replace("`", "'")


def received(files: list[SharedFile]) -> str:
    if files and files[0].kind == "zip":
        return "1 zip"  # not its name: the sender's text stays out of the channel
    return f"{len(files)} image" + ("" if len(files) == 1 else "s")


def collecting_text(s: Session, limits: IngestLimits) -> str:
    text = (
        f"📎 <@{s.user_id}> training `{s.name}`: reply in this thread with the training images "
        f"(PNG, JPEG or WebP; up to {limits.max_images}) or one zip, then reply `go`. Reply `cancel` to drop it."
    )
    return f"{text}\nReceived so far: {received(s.files)}." if s.files else text


def queued_text(s: Session) -> str:
    return f"⏳ <@{s.user_id}> training `{s.name}` queued: {received(s.files)}"


def dropped_text(s: Session, by: str) -> str:
    who = "" if by == s.user_id else f" by <@{by}>"
    return f"🗑️ <@{s.user_id}> training `{s.name}` dropped{who}: nothing was sent to the trainer."


# ------------------------------------------------------------------------------------------------- files at go

BLOBS_DOWN = "I could not keep the files for the trainer (storage is unreachable). Your files are kept: reply `go` again."


async def fetch_to_blobs(files: list[SharedFile], limits: IngestLimits, token: str | None,
                         blobs: BlobStore) -> list[BlobRef]:
    """Download the thread's files with the bot's token into the blob store (train_commands.fetch_to_blobs)."""
    return await train_commands.fetch_to_blobs([f.url for f in files], limits, blobs, slack_token=token,
                                               blobs_down=BLOBS_DOWN)
