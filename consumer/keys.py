"""What makes two requests the same picture: the seed a request gets when it names none, and the batch key."""

from __future__ import annotations

import hashlib
import json

from schemas.messages import MAX_SEED, GenerateRequest


def _digest(obj) -> bytes:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, ensure_ascii=False).encode()).digest()


def content(req: GenerateRequest) -> dict:
    """Every request field that decides the pixels, except the seed."""
    return {
        "prompt": req.prompt,
        "negative_prompt": req.negative_prompt,
        "width": req.width,
        "height": req.height,
        "steps": req.steps,
        "guidance": req.guidance,
        "scheduler": req.scheduler,
        "adapter": str(req.adapter) if req.adapter else None,
    }


def seed_of(req: GenerateRequest) -> int:
    """The request's seed, or one derived from its content so identical requests make identical pictures;
    a re-roll (reroll > 0) derives a different one."""
    if req.seed is not None:
        return req.seed
    return int.from_bytes(_digest({**content(req), "reroll": req.reroll})[:8], "big") % (MAX_SEED + 1)


def image_seeds(req: GenerateRequest) -> list[int]:
    base = seed_of(req)
    return [(base + i) % (MAX_SEED + 1) for i in range(req.num_images)]
