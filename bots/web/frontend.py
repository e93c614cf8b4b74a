"""The web front-end's work, without the page: admit, publish, follow the events, fetch the images.

Each browser session is one person: platform `console`, team `web`, a random user id made when the page loads.
So the same intake as the chat bots (bots/intake.py) applies: the prompt policy, backpressure, the per-person and
per-team rate limits and quotas (a reload makes a new person, but the team's limits still count everyone), the
remembered request behind Re-roll and Variations, the kept result behind Upscale 2x and Vary of one image
(bots/image_actions.py: the page keeps it as delivery does for the chat), and the owner check and seal of a Cancel.

Kafka is connected on the first request, not at start, so the page comes up (and says so) while the broker is down;
a request that cannot be published, or that no consumer answers within SKILL_WEB_ANSWER_S, gets a one-line message.
"""

from __future__ import annotations

import asyncio
import io
import logging
import secrets
from collections import OrderedDict
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image
from pydantic import Field

from bots import image_actions, render
from bots.errors import Refusal
from bots.events import EventFollower
from bots.intake import CANCELLING, Intake
from bots.queued import finished
from bots.settings import BotSettings, TrainCommandSettings
from bots.train_commands import (
    Attached,
    TrainCommandError,
    cancel_command,
    cancel_request,
    check_files,
    describe_adapters,
    finetune_key,
    finetune_request,
    train_command,
)
from bots.training_slack_threads import UPLOAD_TYPE
from bots.web.form import (
    CHOOSE_AN_IMAGE,
    NO_TRAINING_TO_CANCEL,
    NOT_ANSWERING,
    NOTHING_TO_CANCEL,
    NOTHING_TO_PICK,
    NOTHING_TO_REPEAT,
    OOPS,
    STOPPED_ANSWERING,
    TRAINING_OFF,
    Form,
    Progress,
    caption,
    choice_line,
    final_line,
    progress_of,
)
from schemas.messages import (
    BlobRef,
    EventKind,
    FineTuneRequest,
    GenerateRequest,
    Origin,
    Platform,
)
from skillgen.adapters.registry import Registry
from skillgen.runtime.blobstore import BlobStore
from skillgen.runtime.logs import job
from skillgen.runtime.redis import Store

log = logging.getLogger("skillgen.web")

TEAM = "web"
SESSIONS_KEPT = 10_000  # browser sessions remembered (their last request, for Re-roll, Variations and Cancel)


class WebSettings(BotSettings, TrainCommandSettings):
    """`skillgen web`: the bots' settings (and their training commands'), plus where the page listens, how long it
    waits for a consumer, and whether it may start trainings."""

    web_host: str = "127.0.0.1"
    web_port: int = Field(default=7860, ge=1, le=65535)
    # A request with no event at all after this long: no consumer is reading (or the broker lost it).
    web_answer_s: float = Field(default=30.0, gt=0)
    # After its first event, the longest silence (beyond its ETA) before the page gives up on a request.
    web_stall_s: float = Field(default=120.0, gt=0)
    # Connecting to Kafka and publishing, each: past this the broker counts as down.
    web_publish_s: float = Field(default=10.0, gt=0)
    # The Train tab. Off by default: everyone on the page is one team ("web"), and the trainer's permission check
    # treats the console platform as the operator; turn it on only for a page behind your own access control.
    web_training: bool = False


@dataclass
class Session:
    """One browser session: who it is, the request it is following and its last picture."""

    user_id: str
    current: str | None = None  # queued or drawing: what Cancel cancels
    last: str | None = None  # the last request that drew: what Re-roll and Variations repeat
    result: list[BlobRef] = field(default_factory=list)  # its pictures, in the gallery's order
    chosen: int | None = None  # the picture (from 1) clicked in the gallery: what Upscale 2x and Vary redraw
    training: str | None = None  # the adapter this session is training: what Cancel training stops

    @property
    def origin(self) -> Origin:
        return Origin(platform=Platform.console, team_id=TEAM, channel_id=TEAM, user_id=self.user_id)

    def drew(self, request_id: str, pictures: list[BlobRef]) -> None:
        """A request of this session drew `pictures`: the last picture now, with nothing chosen in it yet."""
        self.last, self.result, self.chosen = request_id, pictures, None


def new_user_id() -> str:
    return "web-" + secrets.token_hex(8)


@dataclass
class View:
    """What the page shows for a request at one moment: a message, where it stands, and (at the end) images."""

    notice: str | None = None  # None: leave the message shown as it is
    progress: Progress | None = None
    final: str | None = None
    images: list[tuple[Image.Image, str]] | None = None  # (image, caption): the gallery, when it changes
    request_id: str | None = None
    pictures: list[BlobRef] | None = None  # a drawn result's images as references, for Upscale 2x and Vary


@dataclass(frozen=True)
class TrainForm:
    """The Train tab's fields: `/skill-train <name> [--trigger w] [--steps n] [--caption text]` and the files."""

    name: str = ""
    trigger: str = ""
    steps: str = ""
    caption: str = ""
    files: list[str] = field(default_factory=list)  # paths of the uploads, as the page saved them


class Follower(EventFollower):
    def forget(self, request_id: str) -> None:
        """Stop routing a finished request's events (the follower keeps a queue per watched id until then)."""
        self._queues.pop(request_id, None)


@dataclass
class Frontend:
    settings: WebSettings
    sessions: OrderedDict[str, Session] = field(default_factory=OrderedDict)

    def __post_init__(self) -> None:
        self.blobs = BlobStore(self.settings.blob_url)
        self.registry = Registry(self.settings.adapter_url)
        self.store = Store.from_settings(self.settings)
        self.intake: Intake | None = None
        self.follower: Follower | None = None
        self._connecting = asyncio.Lock()

    # -- lifecycle ----------------------------------------------------------------------------------------
    async def connect(self) -> Intake:
        """The intake and the event follower, started on first use (and again after a failed start)."""
        async with self._connecting:
            if self.intake is not None:
                return self.intake
            from skillgen.runtime.kafka import make_producer

            producer = make_producer(self.settings)
            follower = Follower(self.settings)
            try:
                await asyncio.wait_for(producer.start(), self.settings.web_publish_s)
                await asyncio.wait_for(follower.start(), self.settings.web_publish_s)
            except BaseException:
                # whichever half started is stopped again (stopping one that never started only raises, ignored)
                await asyncio.gather(producer.stop(), follower.stop(), return_exceptions=True)
                raise
            self.follower = follower
            self.intake = Intake(self.settings, producer, self.store)
            log.info("connected to Kafka at %s", self.settings.kafka_bootstrap)
            return self.intake

    async def close(self) -> None:
        if self.follower is not None:
            await self.follower.stop()
        if self.intake is not None:
            await self.intake.producer.stop()
        await self.store.close()

    def session(self, user_id: str) -> Session:
        found = self.sessions.get(user_id)
        if found is None:
            found = self.sessions[user_id] = Session(user_id)
            while len(self.sessions) > SESSIONS_KEPT:
                self.sessions.popitem(last=False)
        self.sessions.move_to_end(user_id)
        return found

    # -- actions ------------------------------------------------------------------------------------------
    async def draw(self, user_id: str, form: Form) -> AsyncIterator[View]:
        """A new request from the form, followed to its end."""
        session = self.session(user_id)
        async for view in self._run(session, lambda intake: intake.admit(form.parsed(), session.origin)):
            yield view

    async def remix(self, user_id: str, action: str) -> AsyncIterator[View]:
        """Re-roll (render.REROLL) or Variations (render.VARIATIONS) of this session's last picture."""
        session = self.session(user_id)
        if session.last is None:
            yield View(notice=NOTHING_TO_REPEAT)
            return
        last = session.last
        async for view in self._run(session, lambda intake: intake.repeat(last, action, session.origin)):
            yield view

    def choose(self, user_id: str, index: int) -> str:
        """The gallery's image `index` (from 0) clicked: the one Upscale 2x and Vary redraw. Says which, and its
        size."""
        session = self.session(user_id)
        if 0 <= index < len(session.result):
            session.chosen = index + 1
        return choice_line(session.result, session.chosen)

    async def from_image(self, user_id: str, action: str) -> AsyncIterator[View]:
        """Upscale 2x (render.UPSCALE) or Vary (render.VARY) of the chosen image of this session's last picture (its
        only image needs no choosing): the chat's U<i> and V<i>, through Intake.from_image."""
        session = self.session(user_id)
        if session.last is None or not session.result:
            yield View(notice=NOTHING_TO_PICK)
            return
        index = session.chosen or (1 if len(session.result) == 1 else None)
        if index is None:
            yield View(notice=CHOOSE_AN_IMAGE)
            return
        last = session.last
        async for view in self._run(session, lambda intake: intake.from_image(last, action, index, session.origin)):
            yield view

    async def cancel(self, user_id: str) -> str:
        """Cancel this session's request in progress: the intake checks the owner and seals it as the bots do."""
        session = self.session(user_id)
        if session.current is None:
            return NOTHING_TO_CANCEL
        try:
            intake = await self.connect()
            msg = await intake.cancel(session.current, session.origin)
            await asyncio.wait_for(intake.publish_cancel(msg), self.settings.web_publish_s)
        except Refusal as exc:
            return str(exc)
        except Exception:
            log.warning("a cancel could not be published", exc_info=True, extra=job(session.current))
            return render.queue_down("The cancel")
        return CANCELLING

    async def adapters(self) -> str:
        """The team's adapters, as `/skill-adapters` lists them."""
        try:
            return await asyncio.to_thread(describe_adapters, self.registry, TEAM)
        except Exception:
            log.warning("the adapter registry could not be read", exc_info=True)
            return "The adapter registry cannot be read just now; try again in a minute."

    # -- training -----------------------------------------------------------------------------------------
    async def train(self, user_id: str, form: TrainForm) -> AsyncIterator[View]:
        """A fine-tune of the uploaded images (as `/skill-train`: the same checks and message), followed to its end;
        the final view's image is the trainer's sample grid."""
        if not self.settings.web_training:
            yield View(notice=TRAINING_OFF)
            return
        session = self.session(user_id)
        try:
            cmd = train_command(form.name.strip(), form.trigger.strip() or None, form.steps.strip() or None,
                                form.caption.strip() or None)
            check_files([Attached(Path(f).name, None, Path(f).stat().st_size) for f in form.files], self.settings.ingest)
            images = await asyncio.to_thread(lambda: [self.blobs.put(Path(f).read_bytes(), UPLOAD_TYPE)
                                                      for f in form.files])
            req = finetune_request(cmd, session.origin, [], self.settings, images=images)
        except TrainCommandError as exc:
            yield View(notice=str(exc))
            return
        session.training = req.adapter

        async def admitted(intake: Intake) -> FineTuneRequest:  # checked above, as /skill-train checks it
            return req

        try:
            async for view in self._run(session, admitted):
                yield view
        finally:
            if session.training == req.adapter:
                session.training = None

    async def cancel_training(self, user_id: str) -> str:
        """Stop this session's training, as `/skill-train cancel <name>` does (every trainer reads the cancel)."""
        session = self.session(user_id)
        if session.training is None:
            return NO_TRAINING_TO_CANCEL
        msg = cancel_request(cancel_command(session.training), session.origin)
        try:
            intake = await self.connect()
            await asyncio.wait_for(intake.send(self.settings.topics.finetune_cancel, msg,
                                               key=f"{TEAM}/{msg.adapter}".encode()), self.settings.web_publish_s)
        except Exception:
            log.warning("a training cancel could not be published", exc_info=True)
            return render.queue_down("The cancel")
        return f"Asked the trainer to stop {msg.adapter}."

    # -- one request --------------------------------------------------------------------------------------
    async def _run(self, session: Session, admit) -> AsyncIterator[View]:
        """Connect, admit (`await admit(intake)`: the request, None for help; a Refusal says why not), publish and
        follow it to its end. An image request is the one Cancel cancels meanwhile, and its picture the last one."""
        try:
            intake = await self.connect()
        except Exception as exc:
            log.warning("cannot reach Kafka at %s: %s", self.settings.kafka_bootstrap, exc)
            yield View(notice=render.QUEUE_DOWN)
            return
        try:
            req: GenerateRequest | FineTuneRequest | None = await admit(intake)
        except Refusal as exc:
            yield View(notice=str(exc))
            return
        if req is None:  # `help` typed as the prompt
            yield View(notice=HELP_LINE)
            return
        drawing = isinstance(req, GenerateRequest)
        if drawing:
            session.current = req.request_id
        try:
            async for view in self._publish_and_follow(intake, req):
                if drawing and view.pictures:
                    session.drew(req.request_id, view.pictures)
                yield view
        finally:
            if session.current == req.request_id:
                session.current = None

    def _publish(self, intake: Intake, req: GenerateRequest | FineTuneRequest):
        """An image request as the bots publish it (remembered, counted as queued); a fine-tune on its own topic."""
        if isinstance(req, FineTuneRequest):
            return intake.send(self.settings.topics.finetune, req, key=finetune_key(req))
        return intake.publish(req)

    async def _publish_and_follow(self, intake: Intake, req: GenerateRequest | FineTuneRequest
                                  ) -> AsyncIterator[View]:
        """Watch the request's events, publish it, and show each event until its final one."""
        assert self.follower is not None
        events = self.follower.watch(req.request_id)  # before publishing: no event can come before it
        try:
            estimate = intake.estimate(req.request_id)
            where = f", position ~{estimate.position}" if estimate and estimate.eta_s is not None else ""
            yield View(notice="", progress=Progress(f"Queued{where}"), images=[], request_id=req.request_id)
            try:
                await asyncio.wait_for(self._publish(intake, req), self.settings.web_publish_s)
            except Exception:
                log.warning("publish failed", exc_info=True, extra=job(req.request_id))
                yield View(notice=render.QUEUE_DOWN, final="", request_id=req.request_id)
                return
            async for view in self._follow(req, events):
                yield view
        except Exception:
            log.exception("the page could not follow a request", extra=job(req.request_id))
            yield View(notice=OOPS, final="", request_id=req.request_id)
        finally:
            self.follower.forget(req.request_id)

    async def _follow(self, req: GenerateRequest | FineTuneRequest, events: asyncio.Queue) -> AsyncIterator[View]:
        wait_s, answered = self.settings.web_answer_s, False
        while True:
            try:
                event = await asyncio.wait_for(events.get(), wait_s)
            except TimeoutError:
                log.warning("no event for %.0fs", wait_s, extra=job(req.request_id))
                yield View(notice=STOPPED_ANSWERING if answered else NOT_ANSWERING, final="",
                           request_id=req.request_id)
                return
            answered = True
            wait_s = self.settings.web_stall_s + (event.eta_s or 0)
            if not event.kind.terminal:
                yield View(progress=progress_of(event), request_id=req.request_id)
                continue
            if isinstance(req, GenerateRequest):  # delivery does these for chat requests, the page for its own
                await finished(self.store, req.origin, req.request_id)
                # before Upscale 2x and Vary can be clicked: what Intake.from_image redraws
                await image_actions.remember(self.store, event, self.settings.remember_s)
            images = None
            if event.kind == EventKind.succeeded:
                images = await asyncio.to_thread(self._images, event)
            yield View(final=final_line(event), images=images, request_id=req.request_id,
                       pictures=image_actions.pictures(event) if isinstance(req, GenerateRequest) else None)
            return

    def _images(self, event) -> list[tuple[Image.Image, str]]:
        out = []
        for ref in event.blobs:
            image = Image.open(io.BytesIO(self.blobs.get(ref)))
            image.load()
            out.append((image, caption(ref.seed)))
        return out


HELP_LINE = ("Describe a skill to draw, e.g. a drummer's paradiddle, top view. Options go in the fields below, "
             "or after the prompt as in chat: --ar 16:9 --n 2 --seed 42.")
