"""Where a request goes before the GPU: refused, answered from the cache, or drawn.

    route = await Router(prompt_policy, resolve_adapter, cache, model_id, policy_id).route(req)

The order is the rule: the team first (SKILL_ALLOWED_TEAMS, checked again here: whoever writes the topic is not
trusted to have passed the bots), the prompt policy next (nothing is looked up for a prompt that may not be drawn), then
the adapter (a name the team does not have is the requester's mistake, said plainly; a turbo request's is the
service's fast LoRA, SKILL_FAST_LORA, or it is refused), then an img2img request's init
image reference (one of the blob store's own names, or refused), then the cache under the key of everything that
decides the pixels and of the safety policy's fingerprint; on a miss the init image is read and opened within bounds
(in a thread: consumer/init_image.py), so a missing or bad one is refused before the GPU. What is left is a `Draw`:
single flight and the batcher take it from there (consumer/worker.py). No Kafka here, so the rules are
unit-tested on their own.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass

from consumer.cache import CacheEntry, Level, TwoLevelCache
from consumer.init_image import InitImageError, check_ref, read_init_image
from consumer.keys import (
    AdapterResolver,
    BatchKey,
    ResolvedAdapter,
    batch_key,
    cache_key,
    image_seeds,
)
from schemas.messages import EventKind, GenerateRequest
from skillgen.inference.errors import PipelineError
from skillgen.runtime.blobstore import BlobStore
from skillgen.runtime.logs import job as job_fields
from skillgen.safety import PromptPolicy

log = logging.getLogger("skillgen.consumer")


@dataclass(frozen=True)
class Refuse:
    """Answer at once with `kind` (blocked or failed) and a message for the requester."""

    kind: EventKind
    message: str
    stage: str  # "team", "prompt", "adapter", "turbo" or "init_image"


@dataclass(frozen=True)
class Hit:
    entry: CacheEntry
    level: Level


@dataclass(frozen=True)
class Draw:
    """A picture to make: its cache key, the batch it may share, the adapter version, one seed per image and,
    for img2img, the init image (PIL, RGB) at the size the request names it."""

    key: str
    batch: BatchKey
    adapter: ResolvedAdapter | None
    seeds: list[int]
    init_image: object | None = None


Route = Refuse | Hit | Draw
NOT_ALLOWED = "this team may not use skillgen (SKILL_ALLOWED_TEAMS); ask whoever runs it"
NO_TURBO = "turbo is not available on this service: no fast LoRA is configured (SKILL_FAST_LORA)"


class Router:
    def __init__(self, prompt_policy: PromptPolicy, resolve_adapter: AdapterResolver, cache: TwoLevelCache,
                 model_id: str, policy_id: str, team_allowed: Callable[[str, str], bool] = lambda _p, _t: True,
                 blobs: BlobStore | None = None, fast_adapter: ResolvedAdapter | None = None):
        self.fast_adapter = fast_adapter  # what turbo requests run with (keys.fast_adapter); None: refused
        self.blobs = blobs  # where init images are read; None: img2img requests are refused
        self.team_allowed = team_allowed  # (platform, team id) -> may it use the system
        self.prompt_policy = prompt_policy
        self.resolve_adapter = resolve_adapter
        self.cache = cache
        self.model_id = model_id
        self.policy_id = policy_id  # skillgen.safety.fingerprint.policy_fingerprint, computed once at start

    async def route(self, req: GenerateRequest) -> Route:
        if not self.team_allowed(req.origin.platform.value, req.origin.team_id):
            log.warning("request from a team outside SKILL_ALLOWED_TEAMS (%s:%s)", req.origin.platform.value,
                        req.origin.team_id, extra=job_fields(req.request_id))
            return Refuse(EventKind.failed, NOT_ALLOWED, "team")
        decision = self.prompt_policy.check(req.prompt, req.negative_prompt)
        if not decision.allowed:
            log.info("prompt blocked (%s: %s)", decision.category, decision.detail, extra=job_fields(req.request_id))
            return Refuse(EventKind.blocked, decision.reason, "prompt")
        adapter = None
        if req.turbo:  # (the contract refuses turbo with a team adapter)
            if self.fast_adapter is None:
                return Refuse(EventKind.failed, NO_TURBO, "turbo")
            adapter = self.fast_adapter
        elif req.adapter is not None:
            try:
                adapter = await asyncio.to_thread(self.resolve_adapter, req.adapter, req.origin.team_id)
            except PipelineError as exc:
                return Refuse(EventKind.failed, str(exc), "adapter")
        if req.init_image is not None:
            if self.blobs is None:
                return Refuse(EventKind.failed, "init_image cannot be used: this consumer has no blob store",
                              "init_image")
            try:
                check_ref(self.blobs, req)
            except InitImageError as exc:
                return Refuse(EventKind.failed, str(exc), "init_image")
        key = cache_key(req, self.model_id, adapter, self.policy_id)
        hit = await self.cache.get(key)
        if hit is not None:
            return Hit(*hit)
        init = None
        if req.init_image is not None:
            try:
                init = await asyncio.to_thread(read_init_image, self.blobs, req)
            except InitImageError as exc:
                return Refuse(EventKind.failed, str(exc), "init_image")
        return Draw(key, batch_key(req, adapter), adapter, image_seeds(req), init)
