"""The dynamic batcher and fair scheduler: which compatible requests go to the GPU together, and whose go next.

**Batching** (unchanged from the FIFO batcher): requests are grouped by batch key; a key's batch is *ready* when
it holds `max_batch` images or its oldest request has waited `max_wait_ms` (or at once while draining). A request
is never split across batches, and incompatible requests never wait on each other.

**Fairness** (`Policy(fair=True)`, the default): among the ready batches, the next one is the one that starts with
the request the fair schedule serves next: hierarchical start-time fair queuing (SFQ). Lanes (`fast`, `relax`,
`replay`) share the GPU by lane weight; within a lane, teams share it by team weight; within a team, first in,
first out. Each lane and each team carries a virtual start tag; serving a request of cost c advances its team's
tag by c / team weight and its lane's by c / lane weight, and a flow that was idle starts at the level's current
virtual time (an idle team saves no credit, a busy one cannot run ahead of its share). So a team that pastes 500
requests is served at its share, and a team that sends one is served next. The cost is the request's GPU work in
units (skillgen/runtime/groupview.py `units`), so a 4-image 1024x1024 request weighs 16 thumbnails.

A batch is formed from the scheduled head's key: the head first, then compatible requests of the same lane in
the order their teams' tags say (each charged to its own team), up to `max_batch` images. Riders from other
lanes are not taken, so a replay never lengthens a live batch. When the head is a light team's (a batch's worth
queued at most: someone asking) while a team of its lane floods, only light teams ride: the quiet request does not
wait for a full batch of the flood's to be drawn with it (the same batch preemption would run: consumer/gpu.py).

`Policy(fair=False)` is the old first-in-first-out choice (the oldest request among the ready batches goes
first), kept for `SKILL_SCHEDULING=fifo` and as the benchmark's reference row.

The batcher holds the consumer's whole read-ahead window (thousands of records): every operation is linear in
what is queued at worst, and `ready` costs O(flows + keys).
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable, Hashable, Mapping
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from skillgen.runtime.groupview import DEFAULT_LANE_WEIGHTS, Queued, flow

T = TypeVar("T")


@dataclass(frozen=True)
class Policy:
    fair: bool = True
    team_weights: Mapping[str, float] = field(default_factory=dict)
    lane_weights: Mapping[str, float] = field(default_factory=lambda: dict(DEFAULT_LANE_WEIGHTS))

    def team_weight(self, team: str) -> float:
        return self.team_weights.get(team, 1.0)

    def lane_weight(self, lane: str) -> float:
        return self.lane_weights.get(lane, DEFAULT_LANE_WEIGHTS.get(lane, 1.0))


@dataclass(eq=False)
class _Entry(Generic[T]):
    item: T
    key: Hashable
    size: int
    deadline: float
    seq: int
    team: str
    lane: str
    cost: float
    queued_at: float


@dataclass(eq=False)
class _Team:
    start: float = 0.0
    entries: deque = field(default_factory=deque)
    units: float = 0.0  # the queued entries' cost, kept as they come and go


@dataclass(eq=False)
class _Lane:
    start: float = 0.0
    vt: float = 0.0  # the lane's virtual time: the start tag of the team it served last
    teams: dict[str, _Team] = field(default_factory=dict)
    count: int = 0


class Batcher(Generic[T]):
    def __init__(self, max_batch: int, max_wait_ms: int, clock: Callable[[], float] = time.monotonic,
                 policy: Policy | None = None):
        if max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, got {max_batch}")
        self.max_batch = max_batch
        self.max_wait_s = max_wait_ms / 1000
        self.policy = policy or Policy()
        self._clock = clock
        self._keys: dict[Hashable, list[_Entry[T]]] = {}
        self._sizes: dict[Hashable, int] = {}  # images queued per key, kept as entries come and go
        self._lanes: dict[str, _Lane] = {}
        self._vt = 0.0
        self._changed = asyncio.Event()
        self._seq = 0
        self._hurry = False
        self.light_first = False  # whether the last batch `ready` formed was a light team's while a flood waits

    def add(self, key: Hashable, item: T, size: int = 1, wait: bool = True, *, team: str = "",
            lane: str = "fast", cost: float | None = None) -> int:
        """Queue `item` (`size` images, `cost` work units: default `size`) under batch `key` for `team` in `lane`;
        `wait=False` skips the window (a retry that runs alone). Returns how many requests are queued ahead of
        it, all keys together (the fair position is the group view's estimate, not this)."""
        ahead = len(self)
        self._seq += 1
        now = self._clock()
        entry = _Entry(item, key, size, now + (self.max_wait_s if wait else 0.0), self._seq, team, lane,
                       float(size if cost is None else cost), now)
        self._keys.setdefault(key, []).append(entry)
        self._sizes[key] = self._sizes.get(key, 0) + size
        ln = self._lanes.get(lane)
        if ln is None:
            ln = self._lanes[lane] = _Lane(start=self._vt)
        elif ln.count == 0:
            ln.start = max(ln.start, self._vt)
        tm = ln.teams.get(team)
        if tm is None:
            tm = ln.teams[team] = _Team(start=ln.vt)
        elif not tm.entries:
            tm.start = max(tm.start, ln.vt)
        tm.entries.append(entry)
        tm.units += entry.cost
        ln.count += 1
        self._changed.set()
        return ahead

    def remove(self, item: T) -> bool:
        """Take a queued item out (cancelled, or its partition was revoked); False when it is not queued.
        Nothing is charged for it."""
        for entries in self._keys.values():
            for entry in entries:
                if entry.item is item:
                    self._take(entry)
                    self._changed.set()
                    return True
        return False

    def hurry(self) -> None:
        """From now on every queued request is ready at once: the worker is draining."""
        self._hurry = True
        self._changed.set()

    def __len__(self) -> int:
        return sum(len(q) for q in self._keys.values())

    def __contains__(self, item: T) -> bool:
        return any(e.item is item for q in self._keys.values() for e in q)

    @property
    def images(self) -> int:
        return sum(self._sizes.values())

    def backlog(self) -> dict[str, Queued]:
        """What is queued, per flow ("lane/team"): requests and work units."""
        out: dict[str, Queued] = {}
        for lane_name, ln in self._lanes.items():
            for team_name, tm in ln.teams.items():
                if tm.entries:
                    out[flow(lane_name, team_name)] = Queued(requests=len(tm.entries), units=max(0.0, tm.units))
        return out

    def waiting_since(self, item: T) -> float | None:
        for q in self._keys.values():
            for e in q:
                if e.item is item:
                    return e.queued_at
        return None

    # -- choosing ------------------------------------------------------------------------------------------
    def _ready_keys(self, now: float) -> set[Hashable]:
        # A key's entries keep their arrival order and all wait alike (a retry that runs alone has a key of its
        # own), so its first entry has the earliest deadline.
        if self._hurry:
            return set(self._keys)
        return {key for key, q in self._keys.items() if self._sizes[key] >= self.max_batch or q[0].deadline <= now}

    def _head(self, ready: set[Hashable]) -> _Entry[T]:
        if self.policy.fair:
            lanes = sorted((ln for ln in self._lanes.values() if ln.count),
                           key=lambda ln: (ln.start, min(t.entries[0].seq for t in ln.teams.values() if t.entries)))
            for ln in lanes:
                for tm in sorted((t for t in ln.teams.values() if t.entries),
                                 key=lambda t: (t.start, t.entries[0].seq)):
                    if tm.entries[0].key in ready:
                        return tm.entries[0]
        # FIFO, or no flow's head is ready (a retry queued to run alone at once): the oldest ready request.
        return min((self._keys[k][0] for k in ready), key=lambda e: e.seq)

    def ready(self) -> tuple[Hashable, list[T]] | None:
        """The next batch, if one is ready now."""
        ready = self._ready_keys(self._clock())
        if not ready:
            return None
        head = self._head(ready)
        # A light team's turn while a flood waits: its batch takes light teams only, as a preempting one does
        # (consumer/gpu.py), rather than a full batch's worth of the flood's requests riding along.
        self.light_first = self.policy.fair and self.light(head.lane, head.team) and self._flooded(head.lane)
        if self.light_first:
            return self._form(head, riders=lambda e: self.light(e.lane, e.team))
        return self._form(head)

    def _flooded(self, lane: str) -> bool:
        """Whether a team of `lane` has more than a batch's worth queued."""
        ln = self._lanes.get(lane)
        return ln is not None and any(t.entries and not self.light(lane, name) for name, t in ln.teams.items())

    def queued(self, lane: str, team: str) -> int:
        """Requests queued for `team` in `lane`."""
        ln = self._lanes.get(lane)
        tm = ln.teams.get(team) if ln else None
        return len(tm.entries) if tm else 0

    def light(self, lane: str, team: str) -> bool:
        """A team with something queued, and at most one batch's worth: someone asking, not a flood."""
        ln = self._lanes.get(lane)
        tm = ln.teams.get(team) if ln else None
        # (each request holds at least one image: more requests than a batch holds is never light)
        return (tm is not None and 0 < len(tm.entries) <= self.max_batch
                and sum(e.size for e in tm.entries) <= self.max_batch)

    def any_light(self) -> bool:
        """Whether a light team has something queued (a batch that may preempt, once ready)."""
        return any(self.light(lane, team) for lane, ln in self._lanes.items() for team in ln.teams)

    def ready_light(self, exclude: set[tuple[str, str]], adapter=None) -> tuple[Hashable, list[T]] | None:
        """The batch that may preempt a running one (consumer/gpu.py): headed by the first ready request, in fair
        order, of a light team not in `exclude` (the running batch's flooding teams), with the running batch's
        adapter; its riders are light teams' requests only. None when there is none."""
        ready = self._ready_keys(self._clock())
        if not ready or not self.policy.fair:
            return None
        lanes = sorted((ln_name for ln_name, ln in self._lanes.items() if ln.count),
                       key=lambda n: self._lanes[n].start)
        for lane in lanes:
            ln = self._lanes[lane]
            for team, tm in sorted(((n, t) for n, t in ln.teams.items() if t.entries),
                                   key=lambda nt: (nt[1].start, nt[1].entries[0].seq)):
                head = tm.entries[0]
                if ((lane, team) in exclude or head.key not in ready or not self.light(lane, team)
                        or getattr(head.key, "adapter", None) != adapter):
                    continue
                return self._form(head, riders=lambda e: (e.lane, e.team) not in exclude and self.light(e.lane,
                                                                                                        e.team))
        return None

    def _form(self, head: _Entry[T], riders: Callable[[_Entry[T]], bool] | None = None) -> tuple[Hashable, list[T]]:
        key = head.key
        candidates = self._keys[key]
        if self.policy.fair:
            ln = self._lanes[head.lane]
            others = sorted((e for e in candidates if e is not head and e.lane == head.lane
                             and (riders is None or riders(e))),
                            key=lambda e: (ln.teams[e.team].start, e.seq))
            candidates = [head, *others]
            # SFQ's virtual time: the start tags of what is served now.
            self._vt = max(self._vt, ln.start)
            ln.vt = max(ln.vt, ln.teams[head.team].start)
        taken, size = [], 0
        for e in list(candidates):
            if taken and size + e.size > self.max_batch:
                continue
            taken.append(e)
            size += e.size
            if size >= self.max_batch:
                break
        for e in taken:
            self._take(e)
            if self.policy.fair:
                ln = self._lanes[e.lane]
                ln.start += e.cost / self.policy.lane_weight(e.lane)
                tm = ln.teams.get(e.team)
                if tm is not None:
                    tm.start += e.cost / self.policy.team_weight(e.team)
        self._forget_idle()
        return key, [e.item for e in taken]

    def _take(self, entry: _Entry[T]) -> None:
        q = self._keys[entry.key]
        q.remove(entry)
        self._sizes[entry.key] -= entry.size
        if not q:
            del self._keys[entry.key], self._sizes[entry.key]
        ln = self._lanes[entry.lane]
        tm = ln.teams[entry.team]
        tm.entries.remove(entry)
        tm.units -= entry.cost
        ln.count -= 1

    def _forget_idle(self) -> None:
        """Idle teams whose tag is not ahead of their lane's time carry nothing worth keeping: dropped."""
        for ln in self._lanes.values():
            for name in [n for n, t in ln.teams.items() if not t.entries and t.start <= ln.vt]:
                del ln.teams[name]

    async def next_batch(self) -> tuple[Hashable, list[T]]:
        while True:
            batch = self.ready()
            if batch is not None:
                return batch
            self._changed.clear()
            deadlines = [q[0].deadline for q in self._keys.values()]
            timeout = max(0.0, min(deadlines) - self._clock()) if deadlines else None
            try:
                await asyncio.wait_for(self._changed.wait(), timeout)
            except TimeoutError:
                pass
