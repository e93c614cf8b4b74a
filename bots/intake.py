"""From a person's command to a published request, the same for every chat front-end.

Parse (bots/grammar.py), the prompt policy (the consumer's own, run early; the consumer stays authoritative),
backpressure, rate limits and quotas, then publish to `skill.generate`. Each published request is remembered for
a while (SKILL_REMEMBER_S) so the Re-roll and Variations buttons on its result can repeat it, Remix can rerun it
with an edited prompt, Upscale and Vary can redraw one of its images (with the images delivery keeps), and the
Cancel button on its status and the Delete button on its result can tell its owner from anyone else.

Backpressure: the consumer group publishes its queue to Redis (skillgen.runtime.groupview). While it holds more
than SKILL_MAX_BACKLOG_S seconds of work a new request is refused ("busy: ... try again in about M min") and
nothing is published; an accepted one is acknowledged with the group's estimate of its position and ETA. The view
is advice: without it (Redis unset, down or slow) every request goes ahead. A person with
SKILL_MAX_QUEUED_PER_PERSON requests not yet finished is refused too (bots/queued.py), before the rate limits, so
neither refusal spends an allowance.

`admit`, `repeat`, `from_image`, `remix` and `cancel` run before a chat command, click or modal is acknowledged
(Discord: 3 seconds), so what they ask Redis is time-boxed to PRE_ACK_S all together: the group view and the count of a
person's queued requests are skipped when they do not come in time (and then left alone for BREAKER_S), the rate-limit check falls
back to the limiter's own windows (and its breaker), and a remembered request that cannot be read in time is
answered with a "try again" refusal.
"""

from __future__ import annotations

import asyncio
import logging
import math
import secrets
import time
from collections import OrderedDict
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from aiokafka import AIOKafkaProducer
from pydantic import BaseModel, ValidationError

from bots import grammar, image_actions, render
from bots.errors import Refusal
from bots.keys import partition_key
from bots.locales import en, msg, t
from bots.queued import QueuedJobs, finished
from bots.ratelimit import RateLimiter
from bots.settings import BotSettings
from bots.timebox import TimeBox
from schemas.codec import describe, encode
from schemas.messages import (
    MAX_IMAGES,
    MAX_SEED,
    GenerateCancel,
    GenerateRequest,
    Origin,
)
from skillgen.runtime import groupview
from skillgen.runtime.groupview import Estimate, GroupView
from skillgen.runtime.kafka import make_producer
from skillgen.runtime.logs import job
from skillgen.runtime.redis import Store
from skillgen.safety.prompt import PromptPolicy

log = logging.getLogger("skillgen.intake")

NOT_ALLOWED = en.MESSAGES["not_allowed"]  # {where}: "Discord server", "Slack workspace"
PRE_ACK_S = 1.5  # Redis's share of Discord's 3 seconds before the acknowledgement
SLOW = t("slow")
FORGOTTEN = t("forgotten")
NOT_OWNER = t("not_owner_cancel")
CANCELLING = t("cancelling")
NOT_OWNER_DELETE = t("not_owner_delete")
REMIX_EMPTY = t("remix_empty")
# What an option typed into Remix's edit replaces; every other field is the original's.
_REMIX_OPTIONS = {"no": ("negative_prompt",), "ar": ("width", "height"), "size": ("width", "height"),
                  "steps": ("steps",), "seed": ("seed",), "n": ("num_images",), "adapter": ("adapter",),
                  "scheduler": ("scheduler",), "relax": ("lane",), "turbo": ("turbo", "steps", "scheduler", "guidance")}
ESTIMATES_KEPT = 1000  # estimates made at admission, kept for the acknowledgment that follows


class Intake:
    def __init__(
        self,
        settings: BotSettings,
        producer: AIOKafkaProducer,
        store: Store,
        limiter: RateLimiter | None = None,
        policy: PromptPolicy | None = None,
    ):
        self.settings = settings
        self.producer = producer
        self.store = store
        self.limiter = limiter or RateLimiter.from_settings(settings, store)
        self.queued = QueuedJobs.from_settings(settings, store)
        self.policy = policy or PromptPolicy.from_settings()
        self._key = settings.signing_key.get_secret_value().encode() if settings.signing_key else None
        self._estimates: OrderedDict[str, Estimate] = OrderedDict()
        self._view_box = TimeBox("show the group's queue", "admitting without it")

    @classmethod
    @asynccontextmanager
    async def open(cls, settings: BotSettings) -> AsyncIterator[Intake]:
        store = Store.from_settings(settings)
        producer = make_producer(settings)
        try:
            await producer.start()
            try:
                yield cls(settings, producer, store)
            finally:
                await producer.stop()
        finally:
            await store.close()

    async def admit(self, command: str | grammar.Parsed, origin: Origin) -> GenerateRequest | None:
        """The request a command asks for, or None for help. Raises Refusal with a message for the sender."""
        self.check_team(origin)
        req = grammar.parse(command, origin, self.settings.defaults)
        if req is None:
            return None
        self.check_prompt(req.prompt, req.negative_prompt)
        deadline = time.monotonic() + PRE_ACK_S
        view = await self.group_view(PRE_ACK_S)
        self.check_backlog(view)  # before the limiter: a refused request spends nobody's allowance
        await self.queued.check(origin, deadline - time.monotonic())
        await self.limiter.admit(origin, req.num_images, deadline - time.monotonic())
        self._keep_estimate(req, view)
        return req

    def estimate(self, request_id: str) -> Estimate | None:
        """The group's estimate of this request's position and ETA, made when it was admitted (None without one)."""
        return self._estimates.get(request_id)

    async def group_view(self, within_s: float) -> GroupView | None:
        """The consumer group's queue, or None when Redis is unset, down or slower than `within_s`."""
        link = self.store.link
        if link is None or self.limiter.local_only or self._view_box.tripped:
            return None
        return await self._view_box.run(lambda: groupview.read(link, self.store.prefix), within_s)

    def check_backlog(self, view: GroupView | None) -> None:
        """Refuse new work while the group has more than SKILL_MAX_BACKLOG_S seconds of it queued."""
        bound_s = self.settings.max_backlog_s
        backlog_s = view.backlog_s if view is not None else None
        if not bound_s or backlog_s is None or backlog_s <= bound_s:
            return
        queued_min = max(1, round(backlog_s / 60))
        retry_min = max(1, math.ceil((backlog_s - bound_s) / 60))
        log.info("refused: %.0fs of work queued (SKILL_MAX_BACKLOG_S=%d)", backlog_s, bound_s)
        raise Refusal.of("busy", queued_min=queued_min, retry_min=retry_min)

    def _keep_estimate(self, req: GenerateRequest, view: GroupView | None) -> None:
        if view is None or not view.consumers:
            return
        cost = groupview.units(req.num_images, req.width, req.height, req.steps, req.guidance)
        estimate = view.estimate(req.lane, team_of(req.origin), cost)
        if estimate.eta_s is None:
            return
        self._estimates[req.request_id] = estimate
        while len(self._estimates) > ESTIMATES_KEPT:
            self._estimates.popitem(last=False)

    async def remembered(self, request_id: str, within_s: float = PRE_ACK_S) -> GenerateRequest:
        """The request behind a button, as published; Refusal when it cannot be read in time or is forgotten."""
        return GenerateRequest.model_validate_json(await self._recall(f"req:{request_id}", within_s))

    async def _recall(self, key: str, within_s: float) -> str:
        """What a button needs from Redis; Refusal when it cannot be read in time ("slow") or is gone ("forgotten")."""
        try:
            raw = await asyncio.wait_for(self.store.get(key), max(0.05, within_s))
        except TimeoutError:
            log.warning("Redis took over %.1fs to read %s", within_s, key.partition(":")[0])
            raise Refusal.of("slow") from None
        if raw is None:
            raise Refusal.of("forgotten")
        return raw

    async def repeat(self, request_id: str, action: str, origin: Origin) -> GenerateRequest:
        """Re-roll (the same request, a new seed) or Variations (four images from new seeds) of a remembered request,
        on behalf of whoever clicked, in the channel they clicked in."""
        self.check_team(origin)
        deadline = time.monotonic() + PRE_ACK_S
        old = await self.remembered(request_id)
        fields = old.model_dump(exclude={"request_id", "created_at", "origin", "seed", "reroll", "num_images"})
        req = GenerateRequest(
            **fields,
            origin=origin,
            seed=secrets.randbelow(MAX_SEED + 1),
            reroll=min(old.reroll + 1, 1_000_000),
            num_images=MAX_IMAGES if action == render.VARIATIONS else old.num_images,
        )
        return await self._admit_again(req, deadline)

    async def from_image(self, request_id: str, action: str, index: int, origin: Origin) -> GenerateRequest:
        """Upscale or Vary (render.UPSCALE, render.VARY) of image `index` (from 1) of a remembered request's result
        (its pictures as delivery kept them: bots/image_actions.py), on behalf of whoever clicked, in the channel they
        clicked in."""
        self.check_team(origin)
        deadline = time.monotonic() + PRE_ACK_S
        old = await self.remembered(request_id, deadline - time.monotonic())
        kept = await self._recall(image_actions.result_key(request_id), deadline - time.monotonic())
        refs = image_actions.parse(kept)
        return await self._admit_again(image_actions.request(old, refs, action, index, origin), deadline)

    async def remix(self, request_id: str, text: str, origin: Origin, seed: int | None = None) -> GenerateRequest:
        """Remix: a remembered request with the prompt `text` (edited in a modal), the same seed (`seed`, the one its
        result was drawn with, when the request named none) and the same options, on behalf of whoever submitted it
        (a new request of theirs). `--options` in the text change those options; the text meets the /skill grammar
        and the prompt policy like a new command."""
        self.check_team(origin)
        deadline = time.monotonic() + PRE_ACK_S
        parsed = grammar.split(text, command=False)
        if parsed.help:
            raise Refusal.of("remix_empty")
        typed = grammar.to_request(parsed, origin, self.settings.defaults)  # the grammar's checks and limits
        old = await self.remembered(request_id, deadline - time.monotonic())
        given = set(parsed.options)
        fields = old.model_dump(exclude={"request_id", "created_at", "reroll", "replay_of"})
        fields.update(origin=origin, prompt=typed.prompt)
        for option, names in _REMIX_OPTIONS.items():
            if option in given:
                fields.update({name: getattr(typed, name) for name in names})
        if "seed" not in given and old.seed is None:
            fields["seed"] = seed
        try:
            req = GenerateRequest(**fields)  # every field of the original that the edit did not name
        except ValidationError as exc:
            raise Refusal(describe(exc)) from None
        return await self._admit_again(req, deadline)

    async def _admit_again(self, req: GenerateRequest, deadline: float) -> GenerateRequest:
        """What every new request from a button meets before it is published, within what is left of PRE_ACK_S."""
        self.check_prompt(req.prompt, req.negative_prompt)  # the policy may have changed since
        view = await self.group_view(deadline - time.monotonic())
        self.check_backlog(view)
        await self.queued.check(req.origin, deadline - time.monotonic())
        await self.limiter.admit(req.origin, req.num_images, deadline - time.monotonic())
        self._keep_estimate(req, view)
        return req

    async def cancel(self, request_id: str, origin: Origin) -> GenerateCancel:
        """The cancel of a remembered request by whoever clicked, or Refusal when that is not its owner (same
        platform, team and user: the consumer checks the same) or the request is not remembered."""
        await self.owned(request_id, origin, "cancel")
        return GenerateCancel(request_id=request_id, origin=origin)

    async def owned(self, request_id: str, origin: Origin, what: str) -> GenerateRequest:
        """The remembered request when `origin` is its owner (same platform, team and user); else Refusal: "Only
        the person who asked can <what> this.", or that it is forgotten (nobody can tell the owner then). `what`:
        cancel or delete."""
        try:
            req = await self.remembered(request_id)
        except Refusal as exc:
            raise (Refusal.of(f"{what}_forgotten") if exc.key == "forgotten" else exc) from None
        owner = req.origin
        if (owner.platform, owner.team_id, owner.user_id) != (origin.platform, origin.team_id, origin.user_id):
            log.info("%s refused: not the owner", what, extra=job(request_id, platform=origin.platform.value))
            raise Refusal.of(f"not_owner_{what}")
        return req

    async def publish_cancel(self, msg: GenerateCancel) -> None:
        """On the cancel topic, keyed by the request id, the canceller's origin sealed for that request id."""
        await self.send(self.settings.topics.generate_cancel, msg, key=msg.request_id.encode())
        log.info("cancel published", extra=job(msg.request_id, platform=msg.origin.platform.value))

    def check_team(self, origin: Origin) -> None:
        """Refuse a team (Discord server, Slack workspace) that SKILL_ALLOWED_TEAMS does not list."""
        if not self.settings.team_allowed(origin.platform.value, origin.team_id):
            platform = origin.platform.value
            where = msg(f"where_{platform}" if platform in ("discord", "slack") else "where_team")
            raise Refusal.of("not_allowed", where=where, who=f"{platform}:{origin.team_id}")

    def check_prompt(self, prompt: str, negative: str = "") -> None:
        decision = self.policy.check(prompt, negative)
        if not decision.allowed:
            log.info("prompt refused early (%s)", decision.category)
            raise Refusal(decision.reason)

    def seal(self, msg: BaseModel) -> BaseModel:
        """The message with its origin sealed for its request id: delivery posts only where a sealed origin points.
        (Without SKILL_SIGNING_KEY, as in the console demo, nothing is sealed and delivery posts nothing.)"""
        request_id = getattr(msg, "request_id", None)
        if self._key is None or request_id is None:
            return msg
        return msg.model_copy(update={"origin": msg.origin.sealed(request_id, self._key)})

    async def publish(self, req: GenerateRequest) -> None:
        # Remembered first: the buttons on its result can appear before a slow write here would finish.
        await self.store.put(f"req:{req.request_id}", req.model_dump_json(), self.settings.remember_s)
        await self.queued.add(req.origin, req.request_id)  # until delivery handles its terminal event
        try:
            await self.send(self.settings.topics.generate, req, key=partition_key(req))
        except BaseException:
            await finished(self.store, req.origin, req.request_id)  # never published: it holds no slot
            raise
        log.info("published %r", req.prompt[:60], extra=job(req.request_id, platform=req.origin.platform.value))

    async def send(self, topic: str, msg: BaseModel, key: bytes) -> None:
        """Publish any message (extensions use this for their own requests, e.g. fine-tunes), its origin sealed."""
        value, headers = encode(self.seal(msg))
        await self.producer.send_and_wait(topic, value, key=key, headers=headers)


def team_of(origin: Origin) -> str:
    """A team as the consumer's scheduler (and so the group view) names it: the origin's team id."""
    return origin.team_id
