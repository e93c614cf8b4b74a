"""Rate limits and quotas per person and per team, shared by every bot replica through Redis.

Each limit is a sliding window: at most `count` units in any `window_s`. A request is admitted only if every
limit has room, and then counts against all of them at once (one Lua script, so two replicas cannot both take
the last slot). When one is full the person is told when the oldest use that blocks them leaves the window (in their language:
the refusal carries its catalogue key, bots/locales).
Without Redis, or while it is down, the same windows are kept in this process.

A person's limits count across every team they use the bot from (`rl:user:<platform>:<user id>:...`): someone in
ten Discord servers gets one allowance, not ten. A team's limits count everyone in it (`rl:team:<platform>:<team
id>:...`). The people in SKILL_ADMINS (`discord:<user id>`, `slack:<user id>`) skip the per-person limits only;
their team's rate and daily quota still count them, so an exempt person cannot spend a team's GPUs beyond what the
team is given. Nobody else is exempt: a Discord server's administrators are limited like everyone in it.

The check runs before a chat command is acknowledged (Discord allows 3 seconds), so Redis gets at most
`time_box_s` (1.5 s) to answer. A Redis that takes longer (stopped, or a socket that accepts and never answers)
trips a small breaker: this process uses its own windows for BREAKER_S (30 s) before it asks Redis again.
"""

from __future__ import annotations

import time
import uuid
from collections import defaultdict, deque
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Literal

from bots.errors import RateLimited, Refusal
from bots.locales import Msg, msg
from bots.timebox import BREAKER_S, TIME_BOX_S, TimeBox
from schemas.messages import Origin
from skillgen.runtime.redis import Store

# KEYS: one sorted set per limit (member = one unit, score = time in ms).
# ARGV: count, window_ms, cost for each key, then a unique id for this call's members.
# Returns {1} when admitted, or {0, wait_ms, index of the limit that waits longest}.
ADMIT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local wait, which = 0, 0
for i, key in ipairs(KEYS) do
  local count, window, cost = tonumber(ARGV[3*i-2]), tonumber(ARGV[3*i-1]), tonumber(ARGV[3*i])
  redis.call('ZREMRANGEBYSCORE', key, '-inf', now - window)
  local used = redis.call('ZCARD', key)
  if used + cost > count then
    local nth = used + cost - count - 1
    local oldest = redis.call('ZRANGE', key, nth, nth, 'WITHSCORES')
    local at = tonumber(oldest[2]) + window
    if at - now > wait then wait, which = at - now, i end
  end
end
if wait > 0 then return {0, wait, which} end
local uid = ARGV[#ARGV]
for i, key in ipairs(KEYS) do
  local window, cost = tonumber(ARGV[3*i-1]), tonumber(ARGV[3*i])
  for j = 1, cost do redis.call('ZADD', key, now, uid .. ':' .. j) end
  redis.call('PEXPIRE', key, window)
end
return {1}
"""


@dataclass(frozen=True)
class Limit:
    scope: Literal["user", "team"]
    count: int
    window_s: int
    unit: Literal["requests", "images"]

    def said(self) -> Msg:
        """"your limit of 3 requests per minute", in whichever language it is said in (bots/locales)."""
        per = {60: msg("per_minute"), 3600: msg("per_hour"), 86400: msg("per_day")}.get(
            self.window_s, msg("per_seconds", seconds=self.window_s))
        return msg(f"limit_{self.scope}", count=self.count, unit=msg(f"unit_{self.unit}"), per=per)

    def describe(self, lang: str = "en") -> str:
        return self.said().say(lang)


def limits_from(settings) -> list[Limit]:
    wanted = [
        Limit("user", settings.rate_user_per_min, 60, "requests"),
        Limit("team", settings.rate_team_per_min, 60, "requests"),
        Limit("user", settings.quota_user_per_day, 86400, "images"),
        Limit("team", settings.quota_team_per_day, 86400, "images"),
    ]
    return [limit for limit in wanted if limit.count > 0]


class RateLimiter:
    def __init__(self, limits: list[Limit], store: Store, admins: set[str] = frozenset(),
                 time_box_s: float = TIME_BOX_S, breaker_s: float = BREAKER_S):
        self.limits = limits
        self.store = store
        self.admins = set(admins)
        self.box = TimeBox("check a rate limit", "this process keeps its own windows", time_box_s, breaker_s)
        self._local: dict[str, deque[float]] = defaultdict(deque)

    @classmethod
    def from_settings(cls, settings, store: Store) -> RateLimiter:
        return cls(limits_from(settings), store, set(settings.admins))

    def is_admin(self, origin: Origin) -> bool:
        """In SKILL_ADMINS: exempt from the per-person limits (never from the team's)."""
        return f"{origin.platform.value}:{origin.user_id}" in self.admins

    @property
    def local_only(self) -> bool:
        """The breaker is open: a slow Redis is left alone for now."""
        return self.box.tripped

    async def admit(self, origin: Origin, images: int, within_s: float | None = None) -> None:
        """Count one request of `images` images against every limit that applies to this person, or raise
        RateLimited and count nothing. Exemptions come from SKILL_ADMINS alone."""
        exempt = self.is_admin(origin)
        limits = [limit for limit in self.limits if not (exempt and limit.scope == "user")]
        if not limits:
            return
        for limit in limits:
            if limit.unit == "images" and images > limit.count:
                raise Refusal.of("n_over_limit", images=images, limit=limit.said(), count=limit.count)
        keys = [self._key(limit, origin) for limit in limits]
        costs = [images if limit.unit == "images" else 1 for limit in limits]
        wait_s, which = await self._admit(limits, keys, costs, within_s)
        if wait_s > 0:
            retry_at = time.time() + wait_s
            at = datetime.fromtimestamp(retry_at, timezone.utc).strftime("%H:%M:%S UTC")
            raise RateLimited.of("rate_limited", retry_at, limit=limits[which].said(), wait=_duration(wait_s), at=at)

    @staticmethod
    def _key(limit: Limit, origin: Origin) -> str:
        # A person's window has no team in its key: it is the same window in every server and workspace.
        who = origin.user_id if limit.scope == "user" else origin.team_id
        return f"rl:{limit.scope}:{origin.platform.value}:{who}:{limit.unit}:{limit.window_s}"

    async def _admit(self, limits: list[Limit], keys: list[str], costs: list[int],
                     within_s: float | None = None) -> tuple[float, int]:
        if self.local_only:
            return self._admit_local(limits, keys, costs)
        argv: list[object] = []
        for limit, cost in zip(limits, costs):
            argv += [limit.count, limit.window_s * 1000, cost]
        names = [self.store.key(k) for k in keys]
        # Without Redis the windows are this process's: each replica admits up to the limit on its own.
        result = await self.box.run(
            lambda: self.store.call(lambda r: r.eval(ADMIT, len(names), *names, *argv, uuid.uuid4().hex),
                                    lambda: None), within_s)
        if result is None:
            return self._admit_local(limits, keys, costs)
        return (0.0, 0) if int(result[0]) == 1 else (int(result[1]) / 1000, int(result[2]) - 1)

    def _admit_local(self, limits: list[Limit], keys: list[str], costs: list[int]) -> tuple[float, int]:
        now = time.monotonic()
        wait, which = 0.0, 0
        for i, (limit, key, cost) in enumerate(zip(limits, keys, costs)):
            uses = self._local[key]
            while uses and uses[0] <= now - limit.window_s:
                uses.popleft()
            if len(uses) + cost > limit.count:
                at = uses[len(uses) + cost - limit.count - 1] + limit.window_s
                if at - now > wait:
                    wait, which = at - now, i
        if wait > 0:
            return wait, which
        for key, cost in zip(keys, costs):
            self._local[key].extend([now] * cost)
        return 0.0, 0


def _duration(seconds: float) -> Msg:
    seconds = max(1, int(seconds + 0.999))
    if seconds < 120:
        return msg("seconds", n=seconds)
    if seconds < 7200:
        return msg("minutes", n=round(seconds / 60))
    return msg("hours", n=f"{seconds / 3600:.1f}")
