"""Upscale and Vary of one image of a result (U1-U4, V1-V4): the buttons, what delivery keeps of a result for
them, and the img2img request a click makes.

When delivery posts a succeeded result it keeps the result's images (their BlobRefs: url, sha256, size and seed,
a few hundred bytes) in Redis under `result:<request id>` for SKILL_REMEMBER_S, as the bots keep the request
itself (`req:<request id>`, bots/intake.py), and before the buttons appear. A click is a new request of whoever
clicked, in the channel they clicked in, through intake like a Re-roll (`Intake.from_image`: prompt policy,
backpressure, the per-person cap, rate limits); with either key gone it is refused as forgotten.

- Vary (V<i>): image i redrawn (`init_image`) at VARY_STRENGTH, at its size, with the request's prompt and options,
  one image, from a fresh seed with `reroll` bumped (two clicks are two pictures, not one deduplicated).
- Upscale (U<i>): image i enlarged 2x and redrawn at UPSCALE_STRENGTH with its own seed: width and height are the
  output's, twice the image's. Offered only for an image whose size is known, from MIN_SIDE_PX to half of
  MAX_SIDE_PX (512 px) a side; a click on any other is refused with its size.

A result of several images gets a row of U buttons and a row of V buttons (Discord: two more action rows, five
buttons a row at most; Slack: one more actions block), a single image `Upscale 2x` and `Vary`. Slack's action ids
are `skill_u<i>`, `skill_v<i>` (unique in a message), their values `<request id>:<i>`; Discord's custom ids
`skill:u:<request id>:<i>`.
"""

from __future__ import annotations

import re
import secrets

from pydantic import TypeAdapter, ValidationError

from bots import render
from bots.errors import Refusal
from bots.locales import t
from schemas.codec import describe
from schemas.messages import (
    MAX_IMAGES,
    MAX_SEED,
    MAX_SIDE_PX,
    MIN_SIDE_PX,
    BlobRef,
    GenerateRequest,
    JobEvent,
    Origin,
)
from skillgen.runtime.redis import Store

VARY_STRENGTH = 0.6  # the engine author's choice for a variation: the layout stays, the details change
UPSCALE_STRENGTH = 0.35  # for an upscale: sharper detail, the same picture
UPSCALE_FACTOR = 2
SLACK_ACTION_ID = re.compile(r"^skill_([uv])([1-9])$")
_REFS = TypeAdapter(list[BlobRef])
# What a click's request takes from the remembered one as it is; the rest is the chosen image's.
_NOT_KEPT = {"request_id", "created_at", "origin", "seed", "reroll", "num_images", "width", "height", "upscale",
             "init_image", "strength", "replay_of"}


def result_key(request_id: str) -> str:
    return f"result:{request_id}"


def pictures(event: JobEvent) -> list[BlobRef]:
    """A succeeded image request's pictures, in the order they are posted; none for anything else."""
    if event.job != "generate":
        return []
    return [ref for ref in event.blobs if ref.content_type == "image/png"][:MAX_IMAGES]


def upscalable(width: int, height: int) -> bool:
    return MIN_SIDE_PX <= min(width, height) and max(width, height) * UPSCALE_FACTOR <= MAX_SIDE_PX


def _offers_upscale(ref: BlobRef) -> bool:
    return ref.width is not None and ref.height is not None and upscalable(ref.width, ref.height)


def offered(event: JobEvent, lang: str = "en") -> list[list[tuple[str, int, str]]]:
    """The per-image buttons of a result, a row each: (action, index from 1, label). A single image's `Upscale 2x`
    and `Vary` are in `lang`, the requester's (render.label says why); U1-U4 and V1-V4 are Midjourney's
    convention, the same in every language."""
    refs = pictures(event)
    if len(refs) == 1:
        row = [(render.UPSCALE, 1, t("button_upscale_one", lang))] if _offers_upscale(refs[0]) else []
        return [row + [(render.VARY, 1, t("button_vary_one", lang))]]
    ups = [(render.UPSCALE, i, f"U{i}") for i, ref in enumerate(refs, 1) if _offers_upscale(ref)]
    return [row for row in (ups, [(render.VARY, i, f"V{i}") for i in range(1, len(refs) + 1)]) if row]


def discord_rows(event: JobEvent, lang: str = "en") -> list[dict]:
    """The action rows (grey buttons) under a result's Re-roll row."""
    return [{"type": 1, "components": [{"type": 2, "style": 2, "label": label,
                                        "custom_id": render.custom_id(action, event.request_id, index=i)}
                                       for action, i, label in row]} for row in offered(event, lang)]


def slack_blocks(event: JobEvent, lang: str = "en") -> list[dict]:
    """One actions block with every per-image button of a result (none when it has no picture)."""
    elements = [{"type": "button", "action_id": f"skill_{action}{i}", "text": {"type": "plain_text", "text": label},
                 "value": render.slack_value(action, event.request_id, index=i)}
                for row in offered(event, lang) for action, i, label in row]
    return [{"type": "actions", "elements": elements}] if elements else []


async def remember(store: Store, event: JobEvent, ttl_s: float) -> None:
    """Keep a succeeded result's pictures for its Upscale and Vary buttons."""
    if refs := pictures(event):
        await store.put(result_key(event.request_id), _REFS.dump_json(refs).decode(), ttl_s)


def parse(raw: str) -> list[BlobRef]:
    return _REFS.validate_json(raw)


def request(old: GenerateRequest, refs: list[BlobRef], action: str, index: int, origin: Origin) -> GenerateRequest:
    """The img2img request of a click on `action` (render.UPSCALE or render.VARY) of image `index` (from 1) of the
    result `refs` of `old`, by `origin`. Raises Refusal with what is wrong."""
    if not 1 <= index <= len(refs):
        raise Refusal.of("no_such_image", index=index)
    ref = refs[index - 1]
    width, height = ref.width or old.width, ref.height or old.height  # a result says its size; else the request's
    fields = old.model_dump(exclude=_NOT_KEPT)
    if action == render.UPSCALE:
        if not upscalable(width, height):
            raise Refusal.of("too_large_to_upscale", width=width, height=height, max_px=MAX_SIDE_PX)
        fields.update(width=width * UPSCALE_FACTOR, height=height * UPSCALE_FACTOR, upscale=UPSCALE_FACTOR,
                      strength=UPSCALE_STRENGTH, seed=ref.seed if ref.seed is not None else old.seed)
    else:
        fields.update(width=width, height=height, strength=VARY_STRENGTH, seed=secrets.randbelow(MAX_SEED + 1),
                      reroll=min(old.reroll + 1, 1_000_000))
    try:
        return GenerateRequest(**fields, origin=origin, init_image=ref, num_images=1)
    except ValidationError as exc:  # e.g. too few steps for the strength: said as the contract says it
        raise Refusal(describe(exc)) from None
