"""The consumer group's queue, seen from anywhere: what every consumer has queued (per lane and team, in work
units), how fast it serves, and the estimate of a new request's queue position and ETA under the fair schedule.

Every consumer publishes a `ConsumerView` about once a second into one Redis hash (`<prefix>sched:view`, one
field per consumer, each stamped with its time; a field older than STALE_S is ignored and swept). The bots read
the hash to answer at once ("position ~12, ready in about 3 min") and to refuse new work when the group's
backlog is past SKILL_MAX_BACKLOG_S; the consumer uses the same arithmetic on its own queue for the queued event.

**Work units**: one unit is one 512x512 image, 20 denoising steps, with classifier-free guidance: `units(...)`.
The fast-lane budget, the fair shares and the ETA all count in units, so a 4-image 1024x1024 request weighs what
it costs the GPU (16 units), not what a 1-image thumbnail does.

**The estimate** is the fluid (GPS) model of the hierarchical fair queue in consumer/batcher.py: lanes share
the GPU by lane weight, teams share a lane by team weight. When a new request of cost c joins team T, which has
B_T queued, the lane's work done before it finishes is W = (B_T + c) + sum over the lane's other teams f of
min(B_f, (B_T + c) w_f / w_T) (a team with less queued than its share finishes first and its share goes to the
others); across lanes the same with lane weights. Arrivals after it are not foreseen: a quiet team joining later
may pass it, which is the point of fairness.

Values read from Redis are treated as hostile: parsed with pydantic, bounded, and a bad field is skipped.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Iterable, Mapping

from pydantic import BaseModel, Field, ValidationError

from skillgen.runtime.redis import RedisLink

log = logging.getLogger("skillgen.groupview")

VIEW_KEY = "sched:view"
STALE_S = 5.0
# Lane weights (the lane's share when every lane has work). Relax is served when fast leaves room; replay gets
# at most about a tenth of the GPU while live work waits.
DEFAULT_LANE_WEIGHTS: dict[str, float] = {"fast": 1.0, "relax": 0.25, "replay": 0.1}
BASE_PIXELS = 512 * 512
BASE_STEPS = 20


def units(num_images: int, width: int, height: int, steps: int, guidance: float) -> float:
    """A request's GPU work in units (one 512x512 image, 20 steps, with guidance)."""
    cfg = 1.0 if guidance > 1.0 else 0.5
    return num_images * (width * height / BASE_PIXELS) * (steps / BASE_STEPS) * cfg


def flow(lane: str, team: str) -> str:
    return f"{lane}/{team}"


def split_flow(name: str) -> tuple[str, str]:
    lane, _, team = name.partition("/")
    return lane, team


class Queued(BaseModel):
    requests: int = Field(ge=0, le=10_000_000)
    units: float = Field(ge=0, le=1e9)


class ConsumerView(BaseModel):
    """One consumer's queue and speed, as published."""

    consumer: str = Field(max_length=200)
    at: float  # time.time() when published
    # Seconds of GPU time per work unit (moving average over recent batches); None before the first batch.
    s_per_unit: float | None = Field(default=None, gt=0, le=1e6)
    # Seconds left in the running batch (0 when idle).
    running_s: float = Field(default=0.0, ge=0, le=1e7)
    # Records fetched from Kafka by nobody yet: the consumer's lag (not in `queued`).
    lag: int = Field(default=0, ge=0, le=10**12)
    queued: dict[str, Queued] = Field(default_factory=dict, max_length=10_000)  # flow("fast", team) -> backlog
    team_weights: dict[str, float] = Field(default_factory=dict, max_length=10_000)
    lane_weights: dict[str, float] = Field(default_factory=lambda: dict(DEFAULT_LANE_WEIGHTS), max_length=16)


class Estimate(BaseModel):
    position: int  # requests ahead of this one under the fair schedule
    units_ahead: float  # work done before this one is finished, itself included
    eta_s: float | None  # seconds until it is expected to be finished; None while nothing has been timed


def _share(own: float, own_weight: float, others: Iterable[tuple[float, int, float]]) -> tuple[float, float]:
    """GPS water-filling: (work done before `own` is served, requests ahead) given the other flows'
    (units, requests, weight)."""
    work, ahead = own, 0.0
    for b, n, w in others:
        if b <= 0:
            continue
        served = min(b, own * w / own_weight)
        work += served
        ahead += n * served / b
    return work, ahead


def estimate(queued: Mapping[str, Queued], lane: str, team: str, cost: float, *,
             team_weights: Mapping[str, float] | None = None, lane_weights: Mapping[str, float] | None = None,
             s_per_unit: float | None = None, running_s: float = 0.0, already_queued: bool = False,
             s_per_batch: float = 0.0, units_per_batch: float | None = None) -> Estimate:
    """Where a request of `cost` units from `team` in `lane` stands among `queued` (flow -> backlog).
    `already_queued`: `queued` counts it already (its own backlog includes it). The time is `running_s`, then
    `s_per_unit` per unit of the work done before it is finished, and, with `units_per_batch` (a full batch's
    work), `s_per_batch` for each batch that work is served in (consumer/speed.py: a batch's fixed cost)."""
    tw = team_weights or {}
    lw = {**DEFAULT_LANE_WEIGHTS, **(lane_weights or {})}
    lanes: dict[str, dict[str, Queued]] = {}
    for name, q in queued.items():
        ln, tm = split_flow(name)
        lanes.setdefault(ln, {})[tm] = q
    mine = lanes.get(lane, {}).get(team, Queued(requests=0, units=0.0))
    own_units = mine.units + (0.0 if already_queued else cost)
    own_requests = mine.requests - (1 if already_queued else 0)
    w_team = tw.get(team, 1.0)
    others = [(q.units, q.requests, tw.get(t, 1.0)) for t, q in lanes.get(lane, {}).items() if t != team]
    lane_work, ahead = _share(own_units, w_team, others)
    ahead += max(0, own_requests)
    lane_totals = []
    for ln, teams in lanes.items():
        if ln != lane:
            lane_totals.append((sum(q.units for q in teams.values()), sum(q.requests for q in teams.values()),
                                lw.get(ln, 1.0)))
    work, more = _share(lane_work, lw.get(lane, 1.0), lane_totals)
    eta = None
    if s_per_unit is not None:
        batches = math.ceil(work / units_per_batch - 1e-9) if units_per_batch else 0
        eta = round(running_s + work * s_per_unit + batches * s_per_batch, 1)
    return Estimate(position=int(round(ahead + more)), units_ahead=round(work, 3), eta_s=eta)


class GroupView(BaseModel):
    """Every live consumer's view, merged."""

    consumers: list[ConsumerView] = Field(default_factory=list)

    @property
    def queued(self) -> dict[str, Queued]:
        merged: dict[str, Queued] = {}
        for c in self.consumers:
            for name, q in c.queued.items():
                m = merged.setdefault(name, Queued(requests=0, units=0.0))
                m.requests += q.requests
                m.units += q.units
        return merged

    @property
    def units_per_s(self) -> float | None:
        """The group's speed: the sum of every timed consumer's."""
        speeds = [1.0 / c.s_per_unit for c in self.consumers if c.s_per_unit]
        return sum(speeds) if speeds else None

    @property
    def backlog_units(self) -> float:
        """Everything queued, and the lag (each unread record counted at the queued average, at least 1 unit)."""
        queued = self.queued
        total = sum(q.units for q in queued.values())
        requests = sum(q.requests for q in queued.values())
        per_record = max(1.0, total / requests) if requests else 1.0
        return total + sum(c.lag for c in self.consumers) * per_record

    @property
    def backlog_s(self) -> float | None:
        """Seconds the group needs to serve its backlog; None while no consumer has timed a batch."""
        speed = self.units_per_s
        if speed is None:
            return None
        return self.backlog_units / speed + max((c.running_s for c in self.consumers), default=0.0)

    def estimate(self, lane: str, team: str, cost: float) -> Estimate:
        first = self.consumers[0] if self.consumers else ConsumerView(consumer="", at=0)
        speed = self.units_per_s
        # The lag is work ahead of everyone, in no known lane: counted ahead of the new request.
        est = estimate(self.queued, lane, team, cost, team_weights=first.team_weights,
                       lane_weights=first.lane_weights)
        lag_units = self.backlog_units - sum(q.units for q in self.queued.values())
        lag_records = sum(c.lag for c in self.consumers)
        work = est.units_ahead + lag_units
        running = max((c.running_s for c in self.consumers), default=0.0)
        eta = None if speed is None else round(running + work / speed, 1)
        return Estimate(position=est.position + lag_records, units_ahead=round(work, 3), eta_s=eta)


async def publish(link: RedisLink | None, prefix: str, view: ConsumerView) -> None:
    if link is None:
        return
    key = prefix + VIEW_KEY
    now = time.time()

    async def write(r):
        fields = await r.hgetall(key)
        stale = [f for f, v in fields.items() if _age(v, now) > 10 * STALE_S]
        async with r.pipeline(transaction=False) as p:
            p.hset(key, view.consumer, view.model_dump_json())
            if stale:
                p.hdel(key, *stale)
            p.expire(key, int(10 * STALE_S))
            await p.execute()

    await link.call(write, None)


def _age(raw, now: float) -> float:
    try:
        return now - float(json.loads(raw)["at"])
    except (ValueError, TypeError, KeyError, RecursionError):
        return math.inf


async def read(link: RedisLink | None, prefix: str, *, stale_s: float = STALE_S) -> GroupView | None:
    """The group's view, or None when Redis is unset or down (the caller then decides without it)."""
    if link is None:
        return None
    raw = await link.call(lambda r: r.hgetall(prefix + VIEW_KEY), None)
    if raw is None:
        return None
    now = time.time()
    views = []
    for value in raw.values():
        try:
            view = ConsumerView.model_validate_json(value)
        except (ValidationError, ValueError):
            log.warning("ignoring an unreadable consumer view in Redis")
            continue
        if now - view.at <= stale_s:
            views.append(view)
    return GroupView(consumers=views)
