"""The Kafka key of a request: identical requests share a partition, so one consumer sees and coalesces them."""

from __future__ import annotations

import hashlib
import json

from schemas.messages import GenerateRequest


def partition_key(req: GenerateRequest) -> bytes:
    body = req.model_dump(include={"prompt", "negative_prompt", "width", "height", "steps", "guidance", "scheduler", "seed", "reroll"})
    body["adapter"] = str(req.adapter) if req.adapter else None
    body["team"] = req.origin.team_id  # adapters are per team; the same name means different weights elsewhere
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()[:32].encode()
