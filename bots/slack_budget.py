"""Slack's chat.update budget per workspace, shared by every delivery replica through Redis.

chat.update is Tier 3: about 50 calls a minute per workspace, whichever process makes them. Each workspace has one
sliding window in Redis (`slack:edits:<team id>`, the rate limiter's script, bots/ratelimit.ADMIT): every
chat.update counts in it; a progress edit is made only while fewer than PROGRESS_EDITS_PER_MIN went out in the
last minute, so the rest of the minute is kept for final results, which are counted but never refused. Without
Redis (unset or down) each process keeps the window for itself, as before: replicas then share Slack's budget
only as far as their own windows allow.
"""

from __future__ import annotations

import time
import uuid
from collections import deque

from bots.ratelimit import ADMIT
from skillgen.runtime.redis import Store

PROGRESS_EDITS_PER_MIN = 40  # of Slack's ~50 chat.update a minute per workspace; the rest is for final results
WINDOW_S = 60
_ALWAYS = 1_000_000_000  # a final result's "limit": counted in the window, never refused


class EditBudget:
    def __init__(self, store: Store | None, progress_per_min: int = PROGRESS_EDITS_PER_MIN):
        self.store = store
        self.progress_per_min = progress_per_min
        self._local: dict[str, deque[float]] = {}  # workspace -> when each of its chat.updates of the minute went

    async def spend(self, team_id: str, progress: bool) -> bool:
        """Count one chat.update to `team_id`'s workspace; False (and nothing counted) for a progress edit past
        its share of the minute."""
        if self.store is None:
            return self._spend_local(team_id, progress)
        name = self.store.key(f"slack:edits:{team_id}")
        limit = self.progress_per_min if progress else _ALWAYS
        result = await self.store.call(
            lambda r: r.eval(ADMIT, 1, name, limit, WINDOW_S * 1000, 1, uuid.uuid4().hex), lambda: None)
        return self._spend_local(team_id, progress) if result is None else int(result[0]) == 1

    def _spend_local(self, team_id: str, progress: bool) -> bool:
        sent, now = self._local.setdefault(team_id, deque()), time.monotonic()
        while sent and now - sent[0] >= WINDOW_S:
            sent.popleft()
        if progress and len(sent) >= self.progress_per_min:
            return False
        sent.append(now)
        return True
