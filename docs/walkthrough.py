"""Writes docs/walkthrough.md: what a person sees on Discord and on Slack, in English and in Chinese, step by step
(queued with position and ETA, progress, the result and its buttons, Parameters, Upscale, Variation, Remix,
Cancel, and the refusals).

    .venv/bin/python docs/walkthrough.py        # rewrites docs/walkthrough.md

Nothing in the walkthrough is written by hand. Fixed requests and events (ids, seeds, times, the prompt) go through
the functions the bots and delivery call, composed as they compose them:
- the acknowledgement "queued" and its Cancel button: bots/discord_bot.py `SkillBot.start_job` (render.queued,
  `status_view`), bots/slack_bot.py `SlackFrontEnd.on_command` / `start_job` (render.queued, render.slack_blocks);
- status edits: bots/discord_post.py `DiscordPoster.status`, bots/slack_post.py `SlackPoster.status`
  (render.status, render.status_buttons);
- results: `DiscordPoster.final` (render.done, render.discord_buttons, image_actions.discord_rows, then
  render.discord_ping) and `SlackPoster.final` (the new message render.done, then the status message
  render.slack_result_posted with render.slack_blocks and image_actions.slack_blocks);
- clicks: bots/intake.py `Intake.from_image` (Upscale, Vary), `Intake.remix`, `Intake.cancel`, run for real on an
  in-memory store (bots/image_actions.py builds the img2img requests); Remix's modals are the bots' own builders,
  bots/discord_bot.py `remix_modal` and bots/slack_remix.py `remix_view`;
- Parameters: render.parameters(grammar.command_line(...));
- help: grammar.help_text, the command named as the person's client shows it (bots/locales/commands.py `shown_as`
  on Discord, SKILL_SLACK_COMMAND on Slack);
- refusals: `Intake.admit` (the prompt policy, backpressure against a consumer-group view), `Intake.cancel` (not
  the owner), bots/queued.py's `at_cap` (a Refusal from the catalogue; counting needs Redis), each said as the bots
  say it (Discord `refuse`: Refusal.say(lang); Slack: render.defuse of it).
Chinese is the catalogue bots/locales/zh.py: on Discord the interaction's locale zh-CN; on Slack the same catalogue
with lang="zh", the user's locale.

tests/unit/test_walkthrough.py fails when docs/walkthrough.md is not what this writes: run this script after a
change to what the bots say, and commit both. Not part of any package (pyproject's packages are schemas, bots,
consumer, trainer, skillgen).
"""

from __future__ import annotations

import asyncio
import hashlib
import re
import sys
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(ROOT))

from bots import grammar, image_actions, locales, render
from bots.discord_bot import remix_modal, status_view
from bots.errors import Refusal
from bots.intake import Intake
from bots.locales.commands import COMMANDS, shown_as
from bots.ratelimit import RateLimiter
from bots.settings import BotSettings
from bots.slack_remix import remix_view
from consumer.schedule import CANCELLED
from schemas.messages import (
    BlobRef,
    EventKind,
    GenerateRequest,
    JobEvent,
    Origin,
    Platform,
)
from skillgen.runtime.groupview import ConsumerView, Estimate, GroupView, Queued
from skillgen.runtime.redis import Store
from skillgen.safety.prompt import PromptPolicy

OUT = ROOT / "docs" / "walkthrough.md"
LANGS = ("en", "zh")
PLATFORMS = (Platform.discord, Platform.slack)
# The steps every walkthrough has, in order (tests/unit/test_walkthrough.py checks each is there).
STEPS = (
    "Queued with position and ETA",
    "Progress",
    "Result",
    "Parameters",
    "Upscale (U1)",
    "Variation (V2)",
    "Remix",
    "Cancel",
    "Refusal: blocked prompt",
    "Refusal: per-person cap",
    "Refusal: busy (backpressure)",
    "Refusal: cancel by someone else",
    "Refusal: a mistyped option",
    "Help",
)

PROMPT = "a drummer's paradiddle, top view"
REMIX_TEXT = "a drummer's paradiddle, side view --ar 16:9"
BLOCKED_PROMPT = "a drummer covered in gore, top view"
REF = "3fa9c2d1"  # the prompt policy's reference id is new for every refusal (time, process): a fixed one here
SEEDS = (2718281828, 2718281829)  # the result's two images (the consumer draws image i from seed + i)
VARY_SEED = 1618033988  # a Vary click draws a fresh random seed (image_actions.request): this one here
TTL_S = 7 * 86400


def at(hh: int, mm: int, ss: int = 0) -> datetime:
    return datetime(2026, 12, 6, hh, mm, ss, tzinfo=UTC)


RID = {  # fixed request ids (a request id is 32 hex digits, uuid4().hex)
    "first": "5f1c0d2a9b8e4f7a8c3d2e1f0a9b8c7d",
    "upscale": "6a2b3c4d5e6f47a8b9c0d1e2f3a4b5c6",
    "vary": "7b3c4d5e6f7a48b9c0d1e2f3a4b5c6d7",
    "remix": "8c4d5e6f7a8b49c0d1e2f3a4b5c6d7e8",
}


@dataclass(frozen=True)
class People:
    """Where it happens and who: the person who asks (Alice) and someone else in the channel (Bob)."""

    platform: Platform
    team: str
    channel: str
    alice: str
    bob: str

    def origin(self, user: str | None = None, created_at: datetime | None = None) -> Origin:
        """Where a command or click comes from: Alice (or `user`) in the channel, at `created_at` (08:57)."""
        return Origin(platform=self.platform, team_id=self.team, channel_id=self.channel, user_id=user or self.alice,
                      created_at=created_at or at(8, 57))


PEOPLE = {
    Platform.discord: People(Platform.discord, "1180000000000000001", "1180000000000000002", "1180000000000000003",
                             "1180000000000000004"),
    Platform.slack: People(Platform.slack, "T0SKILL", "C0DRUMS", "U0ALICE", "U0BOB"),
}


def slack_ts(when: datetime) -> str:
    """A Slack message ts (the status message a request carries) posted at `when`."""
    return f"{int(when.timestamp())}.000100"


# ------------------------------------------------------------------------------------------------ the document


@dataclass
class Shown:
    """One message (or modal) as a person sees it: who sees it where, the text as sent, the buttons a row a line."""

    caption: str
    text: str
    rows: list[list[str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    fenced: bool = True

    def markdown(self) -> str:
        out = [self.caption, ""]
        if self.fenced:
            out += ["````text", self.text, "````", ""]
        else:
            out += [self.text, ""]
        if len(self.rows) == 1:
            out.append(f"Buttons: {_row(self.rows[0])}")
        elif self.rows:
            out += ["Buttons, a row a line:", ""] + [f"- {_row(r)}" for r in self.rows]
        elif self.fenced:
            out.append("No buttons.")
        out += [""] + self.notes if self.notes else []
        return "\n".join(out).rstrip() + "\n"


def _row(labels: list[str]) -> str:
    return "`" + " ".join(f"[{label}]" for label in labels) + "`"


@dataclass
class Step:
    name: str
    intro: str
    shown: list[Shown]


def discord_rows(components: list[dict]) -> list[list[str]]:
    """The labels of a Discord message's action rows."""
    return [[c["label"] for c in row["components"]] for row in components]


def slack_message(blocks: list[dict]) -> tuple[str, list[list[str]]]:
    """A Slack message's text (its section) and the labels of its actions blocks."""
    text = "\n".join(b["text"]["text"] for b in blocks if b["type"] == "section")
    return text, [[e["text"]["text"] for e in b["elements"]] for b in blocks if b["type"] == "actions"]


def discord_shown(caption: str, content: str, components: list[dict], notes: list[str] = ()) -> Shown:
    return Shown(caption, render.discord_clip(content), discord_rows(components), list(notes))


def slack_shown(caption: str, blocks: list[dict], notes: list[str] = ()) -> Shown:
    text, rows = slack_message(blocks)
    return Shown(caption, text, rows, list(notes))


def when_note(text: str, sent: datetime) -> list[str]:
    """What a reader's client shows for the timestamp markup in `text`."""
    notes = []
    for unix in re.findall(r"<t:(\d+):R>", text):
        minutes = round((int(unix) - sent.timestamp()) / 60)
        notes.append(f"`<t:{unix}:R>` is Discord's relative timestamp: sent at {sent:%H:%M:%S} UTC it reads "
                     f"“in {minutes} minutes” in an English client, and in a Chinese client the same in Chinese "
                     "(Discord words it in each reader's client language); it counts down as time passes, and "
                     "hovering it shows the date and time.")
    for unix, fallback in re.findall(r"<!date\^(\d+)\^\{time\}\|([^>]*)>", text):
        moment = datetime.fromtimestamp(int(unix), UTC)
        shanghai = moment + timedelta(hours=8)
        notes.append(f"`<!date^{unix}^{{time}}|{fallback}>` is Slack's date token: the client shows the reader's "
                     f"clock time in their own time zone and format (e.g. {moment:%H:%M} in London, "
                     f"{shanghai:%H:%M} in Shanghai); a client that cannot shows the fallback, “{fallback}”.")
    return notes


# ------------------------------------------------------------------------------------------------ one walkthrough


class Walk:
    """One platform in one language: a fresh in-memory store and a real Intake over it (no Kafka, no Redis)."""

    def __init__(self, platform: Platform, lang: str):
        self.p = platform
        self.lang = lang
        self.people = PEOPLE[platform]
        self.store = Store(None)
        # Explicit values, so the walkthrough is the same whatever SKILL_* variables are set where it is run.
        self.settings = BotSettings(default_width=512, default_height=512, default_steps=20, default_guidance=7.5,
                                    default_scheduler="dpmpp", max_backlog_s=1800, max_queued_per_person=5,
                                    allowed_teams=[], admins=[], remember_s=TTL_S)
        self.intake = Intake(self.settings, producer=None, store=self.store, limiter=RateLimiter([], self.store),
                             policy=PromptPolicy())
        self.view: GroupView | None = None
        self.noted = False  # whether the timestamp markup was explained yet

        async def group_view(within_s: float) -> GroupView | None:  # what Redis would hold: the group's queue
            return self.view

        self.intake.group_view = group_view

    # -- the same in both walkthroughs of a platform -------------------------------------------------------
    def t(self, key: str, **params: object) -> str:
        return locales.t(key, self.lang, **params)

    def busy_view(self) -> GroupView:
        """The group with 40 minutes of work queued (over SKILL_MAX_BACKLOG_S, 30 minutes)."""
        return GroupView(consumers=[ConsumerView(consumer="gpu-1", at=0, s_per_unit=2.0,
                                                 queued={"fast/another-team": Queued(requests=400, units=1200)})])

    def team_view(self) -> GroupView:
        """A morning's queue: this team 10 requests (44 units), another team 11 (44 units), 2 s a unit."""
        team = self.people.team
        return GroupView(consumers=[ConsumerView(consumer="gpu-1", at=0, s_per_unit=2.0, queued={
            f"fast/{team}": Queued(requests=10, units=44), "fast/another-team": Queued(requests=11, units=44)})])

    def later_view(self) -> GroupView:
        """A few minutes later: this team 2 requests (8 units), another team 6 (24 units)."""
        team = self.people.team
        return GroupView(consumers=[ConsumerView(consumer="gpu-1", at=0, s_per_unit=2.0, queued={
            f"fast/{team}": Queued(requests=2, units=8), "fast/another-team": Queued(requests=6, units=24)})])

    def event(self, req: GenerateRequest, kind: EventKind, when: datetime, **fields) -> JobEvent:
        """The consumer's event for `req` (consumer/worker.py `_event`: its origin and prompt, and `fields`)."""
        return JobEvent(request_id=req.request_id, kind=kind, origin=req.origin, prompt=req.prompt,
                        created_at=when, **fields)

    def result(self, req: GenerateRequest, when: datetime, seeds: tuple[int, ...]) -> JobEvent:
        shas = [hashlib.sha256(f"{req.request_id} {i}".encode()).hexdigest() for i in range(len(seeds))]
        blobs = [BlobRef(url=f"s3://skill-blobs/{sha[:2]}/{sha}.png", sha256=sha, bytes=412_345, width=req.width,
                         height=req.height, seed=seed) for sha, seed in zip(shas, seeds)]
        return self.event(req, EventKind.succeeded, when, blobs=blobs)

    async def admitted(self, command: str, rid: str, when: datetime) -> tuple[GenerateRequest, Estimate | None]:
        """The request a typed command becomes (Intake.admit), with its fixed id and time, and its estimate."""
        parsed = (grammar.split(command, command=False) if self.p == Platform.slack
                  else grammar.from_options(*self.discord_fields(command)))
        req = await self.intake.admit(parsed, self.people.origin(created_at=when))
        estimate = self.intake.estimate(req.request_id)
        return self.fixed(req, rid, when), estimate

    @staticmethod
    def discord_fields(command: str) -> tuple[str, dict]:
        prompt, _, n = command.partition(" --n ")
        return prompt, {"n": int(n)} if n else {}

    def fixed(self, req: GenerateRequest, rid: str, when: datetime, **update) -> GenerateRequest:
        """`req` with a fixed id and time (and, on Slack, the status message start_job posted for it)."""
        origin = req.origin.model_copy(update={"created_at": when, **(
            {"status_message_id": slack_ts(when)} if self.p == Platform.slack else {})})
        return req.model_copy(update={"request_id": rid, "created_at": when, "origin": origin, **update})

    async def remember(self, req: GenerateRequest) -> None:
        """What Intake.publish keeps for the buttons (the request, `req:<id>`)."""
        await self.store.put(f"req:{req.request_id}", req.model_dump_json(), TTL_S)

    async def refused(self, call) -> Refusal:
        try:
            await call
        except Refusal as exc:
            return exc
        raise AssertionError("expected a refusal")

    # -- what each platform shows ----------------------------------------------------------------------
    def when(self, text: str, sent: datetime) -> list[str]:
        """The note on a timestamp, under the first message that has one."""
        if self.noted:
            return []
        notes = when_note(text, sent)
        self.noted = bool(notes)
        return notes

    def typed(self, command: str) -> str:
        """The command as Alice types it: on Discord the command and its fields named as her client shows them
        (`/技能图 提示词:...` in Chinese: bots/locales/commands.py), what the bot receives being the same."""
        if self.p == Platform.discord:
            prompt, fields = self.discord_fields(command)
            options = COMMANDS["skill"].options
            named = {name: getattr(options[name].name, self.lang) for name in ("prompt", *fields)}
            return (f"{shown_as('skill', self.lang)} {named['prompt']}:{prompt}"
                    + "".join(f" {named[k]}:{v}" for k, v in fields.items()))
        return "/skill " + command

    def queued(self, req: GenerateRequest, estimate: Estimate | None, how: str, sent: datetime,
               command: bool = False) -> list[Shown]:
        """The acknowledgement; `command`: of a typed /skill (Slack also answers the command itself)."""
        text = render.queued(req, estimate, self.lang)
        notes = self.when(text, sent)
        if self.p == Platform.discord:
            return [discord_shown(
                f"{how} Discord shows “thinking…” (the response is deferred), then the bot edits that response, "
                "in the channel, for everyone (`SkillBot.start_job`: `render.queued`, `status_view`):",
                text, status_view(req.request_id, self.lang).to_components(), notes)]
        blocks = render.slack_blocks(text, req.request_id, render.STATUS_ACTIONS, lang=self.lang)
        shown = []
        if command:
            shown.append(Shown("Slack's answer to the command, seen by Alice alone (`SlackFrontEnd.on_command`'s "
                               "ephemeral ack):", text, [], notes))
        lead = "Then the status message" if shown else f"{how} The status message"
        shown.append(slack_shown(f"{lead}, posted in the channel for everyone (`SlackFrontEnd.start_job`: "
                                 "`render.queued`, `render.slack_blocks`):", blocks, [] if shown else notes))
        return shown

    def status(self, event: JobEvent) -> Shown:
        text = render.status(event, self.lang)
        notes = self.when(text, event.created_at)
        if self.p == Platform.discord:
            return discord_shown(f"`{event.kind.value}` event at {event.created_at:%H:%M:%S}: delivery edits the "
                                 "same response (`DiscordPoster.status`):", text,
                                 render.discord_buttons(event.request_id, render.status_buttons(event), lang=self.lang), notes)
        return slack_shown(f"`{event.kind.value}` event at {event.created_at:%H:%M:%S}: delivery edits the status "
                           "message (`SlackPoster.status`, chat.update):",
                           render.slack_blocks(text, event.request_id, render.status_buttons(event), lang=self.lang),
                           notes)

    def final(self, event: JobEvent) -> list[Shown]:
        images = len(image_actions.pictures(event))
        attached = f", with {images} image{'s' if images > 1 else ''} attached"
        seed = render.result_seed(event)
        if self.p == Platform.discord:
            components = (render.discord_buttons(event.request_id, seed=seed, lang=self.lang)
                          + image_actions.discord_rows(event, self.lang))
            return [
                discord_shown(f"`succeeded` event: delivery edits the response into the result{attached} "
                              "(`DiscordPoster.final`: `render.done`, `render.discord_buttons`, "
                              "`image_actions.discord_rows`; after the interaction token's 15 minutes the same "
                              "edit, with the bot token):", render.done(event, self.lang), components),
                Shown("Then a follow-up that pings Alice, since an edit notifies nobody (`render.discord_ping`; "
                      "through the interaction webhook while its 15 minutes last, after that a channel message "
                      "replying to the result):", render.discord_ping(event, self.lang)),
            ]
        text = render.slack_result_posted(event, self.lang)
        blocks = (render.slack_blocks(text, event.request_id, seed=seed, lang=self.lang)
                  + image_actions.slack_blocks(event, self.lang))
        return [
            Shown(f"`succeeded` event: a new message in the channel{attached}, mentioning (so notifying) Alice "
                  "(`SlackPoster.final`: files_upload_v2, its comment `render.done`):", render.done(event, self.lang)),
            slack_shown("Then the status message (above the result) is edited, and carries the buttons "
                        "(`render.slack_result_posted`, `render.slack_blocks`, `image_actions.slack_blocks`):",
                        blocks),
        ]

    def private(self, caption: str, text: str) -> Shown:
        """Something only the person who clicked or typed sees (Discord: ephemeral; Slack: ephemeral)."""
        if self.p == Platform.slack:
            text = render.defuse(text, Platform.slack)
        return Shown(caption, text)

    def refusal(self, exc: Refusal, what: str) -> Shown:
        where = ("an ephemeral answer (`refuse`: `Refusal.say`)" if self.p == Platform.discord
                 else "an ephemeral answer (`render.defuse` of the refusal)")
        return self.private(f"{what}: nothing is queued; Alice alone sees {where}:", exc.say(self.lang))

    # -- the steps ------------------------------------------------------------------------------------
    async def steps(self) -> list[Step]:
        people, steps = self.people, []
        command = f"{PROMPT} --n 2"

        # Queued with position and ETA: intake's estimate from the group's view, then the consumer's own.
        self.view = self.team_view()
        first, estimate = await self.admitted(command, RID["first"], at(8, 57))
        await self.remember(first)
        queued_event = self.event(first, EventKind.queued, at(8, 57, 2), queue_position=20, eta_s=178.0, lane="fast")
        steps.append(Step(STEPS[0], f"Alice types `{self.typed(command)}` at 08:57:00 UTC. Ten requests of her team "
                          "and eleven of another are queued; the group draws a unit (one 512x512 image, 20 steps) in "
                          "2 s.", self.queued(first, estimate, "Alice types the command.", at(8, 57), command=True)
                          + [self.status(queued_event)]))

        # Progress.
        started = self.event(first, EventKind.started, at(8, 59, 40))
        progress = self.event(first, EventKind.progress, at(8, 59, 48), step=8, total_steps=20)
        steps.append(Step(STEPS[1], "The GPU starts on it, then reports each denoising step (delivery edits at most "
                          "once every SKILL_EDIT_INTERVAL_S, 2 s, per message).",
                          [self.status(started), self.status(progress)]))

        # Result.
        result = self.result(first, at(9, 0), SEEDS)
        await image_actions.remember(self.store, result, TTL_S)  # delivery keeps the images for U and V
        steps.append(Step(STEPS[2], "Two 512x512 images, seeds "
                          f"{SEEDS[0]} and {SEEDS[1]}. Re-roll and Variations repeat the request with new seeds; "
                          "Remix opens a form; Parameters shows the request as a line to copy; Delete (for Alice "
                          "alone) removes the result; U1/U2 upscale one image 2x, V1/V2 redraw one.",
                          self.final(result)))

        # Parameters.
        line = grammar.command_line(first, seed=render.result_seed(result), defaults=self.settings.defaults)
        steps.append(Step(STEPS[3], "Anyone clicks Parameters on the result.", [self.private(
            "Only whoever clicked sees it (ephemeral; `render.parameters` of `grammar.command_line`, the seed the "
            "result was drawn with):", render.parameters(line, self.lang))]))

        # Upscale (U1): a new request of whoever clicked, queued, then its result.
        self.view = self.later_view()
        up = await self.intake.from_image(first.request_id, render.UPSCALE, 1, people.origin(created_at=at(9, 2)))
        estimate = self.intake.estimate(up.request_id)
        up = self.fixed(up, RID["upscale"], at(9, 2))
        await self.remember(up)
        up_result = self.result(up, at(9, 2, 10), (up.seed,))
        click = ("Alice clicks U1. A new message (the click's own response)." if self.p == Platform.discord
                 else "Alice clicks U1.")
        steps.append(Step(STEPS[4], f"Image 1 redrawn at {up.width}x{up.height} (2x, strength "
                          f"{image_actions.UPSCALE_STRENGTH}, its own seed {up.seed}); a 1024 px image cannot be "
                          "upscaled again, so its result offers Vary alone.",
                          self.queued(up, estimate, click, at(9, 2)) + self.final(up_result)))

        # Variation (V2).
        vary = await self.intake.from_image(first.request_id, render.VARY, 2, people.origin(created_at=at(9, 3)))
        estimate = self.intake.estimate(vary.request_id)
        vary = self.fixed(vary, RID["vary"], at(9, 3), seed=VARY_SEED)
        await self.remember(vary)
        vary_result = self.result(vary, at(9, 3, 6), (VARY_SEED,))
        click = click.replace("U1", "V2")
        steps.append(Step(STEPS[5], f"Image 2 redrawn at {vary.width}x{vary.height} (strength "
                          f"{image_actions.VARY_STRENGTH}) from a fresh seed; one image, so its buttons are "
                          "`Upscale 2x` and `Vary`.", self.queued(vary, estimate, click, at(9, 3))
                          + self.final(vary_result)))

        # Remix: the modal, then the new request (same seed, the edited prompt and options).
        remix_seed = render.result_seed(result)
        steps.append(Step(STEPS[6], f"Alice clicks Remix on the first result, edits the prompt to `{REMIX_TEXT}` "
                          "and submits.", [self.remix_form(first, remix_seed)] + await self.remixed(first, remix_seed)))

        # Cancel: someone else first, then Alice; the status becomes a short line.
        remix = await self.intake.remembered(RID["remix"])
        bob = await self.refused(self.intake.cancel(remix.request_id, people.origin(people.bob, at(9, 5, 5))))
        cancelled = self.event(remix, EventKind.cancelled, at(9, 5, 8), message=CANCELLED)
        await self.intake.cancel(remix.request_id, people.origin(created_at=at(9, 5, 6)))  # Alice's: no refusal
        steps.append(Step(STEPS[7], "Alice clicks Cancel on the remix's status while it is queued.", [
            self.private("Alice alone sees, at once (`locales.t(\"cancelling\")`):", self.t("cancelling")),
            self.cancelled(cancelled)]))

        # Refusals.
        blocked = await self.refused(self.admitted(BLOCKED_PROMPT, "0" * 32, at(9, 10)))
        reason = re.sub(r"\(ref [0-9a-f]{8}\)", f"(ref {REF})", str(blocked))
        blocked = Refusal(reason)
        late = self.event(first, EventKind.blocked, at(9, 10, 30), message=reason)
        steps.append(Step(STEPS[8], f"Alice types `{self.typed(BLOCKED_PROMPT)}`. The reason names the category and "
                          "ends with a reference for the operators (`skillgen safety explain`); it is the policy's "
                          "own sentence, English in every language.", [
                              self.refusal(blocked, "Refused at intake by the prompt policy"),
                              self.blocked(late)]))
        at_cap = Refusal.of("at_cap", count=self.settings.max_queued_per_person)
        steps.append(Step(STEPS[9], "Alice already has SKILL_MAX_QUEUED_PER_PERSON (5) requests not yet finished "
                          "(bots/queued.py counts them in Redis).", [self.refusal(at_cap, "Refused")]))
        self.view = self.busy_view()
        busy = await self.refused(self.admitted(command, "0" * 32, at(9, 12)))
        steps.append(Step(STEPS[10], "The group has 40 minutes of work queued, over SKILL_MAX_BACKLOG_S (30 "
                          "minutes).", [self.refusal(busy, "Refused before any allowance is spent")]))
        steps.append(Step(STEPS[11], "Bob clicks Cancel on Alice's status (before she does).",
                          [self.private("Bob alone sees (`Intake.cancel`):", bob.say(self.lang))]))
        mistyped = f"{PROMPT} --colour red"
        wrong = await self.refused(self.admitted(mistyped, "0" * 32, at(9, 13)))
        steps.append(Step(STEPS[12], f"Alice types `{self.typed(mistyped)}`. The grammar's refusals name the options "
                          "as they are typed, in every language.", [self.refusal(wrong, "Refused by the grammar")]))
        steps.append(Step(STEPS[13], f"Alice types `{self.typed('help')}`.", [self.help()]))
        return steps

    def help(self) -> Shown:
        """`/skill help`, as the bots answer it: naming the command as the person's client shows it."""
        if self.p == Platform.discord:
            return Shown("Alice alone sees (`SkillBot.on_skill`: `grammar.help_text`, the command named as her "
                         "Discord shows it, `commands.shown_as`):",
                         grammar.help_text(self.p, self.lang, shown_as("skill", self.lang)))
        return Shown("Alice alone sees, in the command's ephemeral answer (`SlackFrontEnd.help`: `grammar.help_text` "
                     "with SKILL_SLACK_COMMAND, `render.slack_text` of it):",
                     render.slack_text(grammar.help_text(self.p, self.lang, "/skill")))

    def remix_form(self, old: GenerateRequest, seed: int | None) -> Shown:
        if self.p == Platform.discord:
            modal = remix_modal(render.custom_id(render.REMIX, old.request_id, seed), old.prompt,
                                self.lang).to_dict()
            box = modal["components"][0]["components"][0]
            text = (f"- Title: `{modal['title']}`\n"
                    f"- `{box['label']}`: a paragraph, {box['min_length']}-{box['max_length']} characters, "
                    f"prefilled with `{box['value']}`; when emptied it shows `{box['placeholder']}`\n"
                    "- Buttons: `[Cancel] [Submit]` (Discord's own, in the reader's Discord language)")
            caption = ("A modal opens, for whoever clicked (bots/discord_bot.py `remix_modal`), in their language "
                       "(the click's locale):")
        else:
            view = remix_view(old.prompt, "{}", self.lang)
            box = view["blocks"][0]
            element = box["element"]
            text = (f"- Title: `{view['title']['text']}`\n"
                    f"- `{box['label']['text']}`: {'several lines' if element['multiline'] else 'one line'}, "
                    f"{element['min_length']}-{element['max_length']} characters, prefilled with "
                    f"`{element['initial_value']}`; hint below it: `{box['hint']['text']}`\n"
                    f"- Buttons: `[{view['close']['text']}] [{view['submit']['text']}]`")
            caption = ("A modal opens, for whoever clicked (bots/slack_remix.py `remix_view`, views.open), in their "
                       "language as far as it is known without asking Slack (held, or in Redis: views.open cannot "
                       "wait for users.info), else English; a refusal is shown under the prompt field and the modal "
                       "stays open:")
        return Shown(caption, text, fenced=False)

    async def remixed(self, old: GenerateRequest, seed: int | None) -> list[Shown]:
        if self.p == Platform.discord:
            button = render.parse_custom_id(render.custom_id(render.REMIX, old.request_id, seed))
            request_id, seed = button.request_id, button.seed
        else:
            request_id, seed = render.parse_slack_value(render.slack_value(render.REMIX, old.request_id, seed))
        new = await self.intake.remix(request_id, REMIX_TEXT, self.people.origin(created_at=at(9, 5)), seed)
        estimate = self.intake.estimate(new.request_id)
        new = self.fixed(new, RID["remix"], at(9, 5))
        await self.remember(new)
        how = ("A new message (the submission's response)." if self.p == Platform.discord
               else "Posted where the result is.")
        line = grammar.command_line(new, defaults=self.settings.defaults)
        return [Shown("The new request is Alice's, with the first result's seed and options, and the edit's "
                      "`--ar` (as its Parameters line):", line)] + self.queued(new, estimate, how, at(9, 5))

    def cancelled(self, event: JobEvent) -> Shown:
        text = render.cancelled(event, self.lang)
        if self.p == Platform.discord:
            return discord_shown("`cancelled` event: delivery edits the status into a short line, no buttons, "
                                 "pinging nobody (`DiscordPoster._cancelled`: `render.cancelled`):", text, [])
        return slack_shown("`cancelled` event: delivery edits the status message, no buttons, no new message "
                           "(`SlackPoster.final`: `render.cancelled`):", render.slack_blocks(text))

    def blocked(self, event: JobEvent) -> Shown:
        where = ("deletes the channel's response and tells Alice alone, in an ephemeral follow-up (a direct message "
                 "after the token's 15 minutes)" if self.p == Platform.discord
                 else "deletes the status message and tells Alice alone, with chat.postEphemeral")
        return Shown(f"A prompt that passed the bots and was blocked by the consumer (`blocked` event): delivery "
                     f"{where}; `render.blocked`:", render.blocked(event, self.lang))


# ------------------------------------------------------------------------------------------------ the whole file

TITLE = {"en": "English", "zh": "中文 (Simplified Chinese)"}
HOW_LANG = {
    (Platform.discord, "en"): "Alice's Discord is in English (the interaction's locale `en-US`).",
    (Platform.discord, "zh"): "Alice's Discord is in Chinese (the interaction's locale `zh-CN`, read as "
                              f"`{locales.from_discord('zh-CN')}`); her request's status, result and ping follow.",
    (Platform.slack, "en"): "Alice's Slack is in English.",
    (Platform.slack, "zh"): "Alice's Slack is in Chinese (her locale `zh-CN`); rendered with the zh catalogue, "
                            "as on Discord.",
}


async def sections() -> list[str]:
    out = []
    for platform in PLATFORMS:
        for lang in LANGS:
            walk = Walk(platform, lang)
            name = "Discord" if platform == Platform.discord else "Slack"
            people = walk.people
            out.append(f"## {name} · {TITLE[lang]}\n\n{HOW_LANG[platform, lang]} Alice is `<@{people.alice}>`, "
                       f"Bob `<@{people.bob}>`.\n")
            for i, step in enumerate(await walk.steps(), 1):
                out.append(f"### {name} · {lang} · {i}. {step.name}\n\n{step.intro}\n")
                out += [shown.markdown() for shown in step.shown]
    return out


HEADER = """\
# What a person sees: Discord and Slack, in English and Chinese

<!-- Generated by docs/walkthrough.py from the code the bots and delivery run: do not edit by hand. After a
change to what the bots say, run `.venv/bin/python docs/walkthrough.py` and commit this file
(tests/unit/test_walkthrough.py fails until they agree). -->

Every message below is what the bots and delivery send, rendered by the functions they call (bots/render.py,
bots/image_actions.py, bots/grammar.py, bots/locales, bots/intake.py; Remix's modals from bots/discord_bot.py and
bots/slack_remix.py) from fixed requests and events: Alice asks for `a drummer's paradiddle, top view` with two
images at 08:57 UTC on 6 December 2026, and follows it through. Each message's text is in a fenced block as it is
sent, markup included (`<@id>` is a mention, `*...*` italics on Discord and `_..._` on Slack, `<t:...:R>` and
`<!date^...>` are timestamps each reader's client shows in their own time); its buttons follow, a row a line, as
`[Label]`.

Button labels are in the requester's language (a message has one set of labels for the whole channel), except
U1-U4 and V1-V4, the same in every language; Remix's modal is in the clicker's; the help names the command as the
reader's client shows it (`/技能图` in a Chinese Discord). The prompt policy's reasons, the request contract's own
validation messages (`--steps: Input should be less than or equal to 50`) and the consumer's own messages
(`cancelled by the person who asked`) are English in every language, and so are the option names (`--ar`: the
grammar reads them as typed); everything else comes from the catalogues (bots/locales/en.py, zh.py).
"""


def walkthrough() -> str:
    """The whole of docs/walkthrough.md (no side effects)."""
    body = asyncio.run(sections())
    contents = "\n".join(f"- [{s.splitlines()[0][3:]}](#{_anchor(s.splitlines()[0][3:])})"
                         for s in body if s.startswith("## "))
    return HEADER + "\n" + contents + "\n\n" + "\n".join(body)


def _anchor(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces as hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-")


def main() -> int:
    OUT.write_text(walkthrough(), encoding="utf-8")
    print(f"wrote {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
