"""The consumer's scheduling side, beside the record's path in consumer/worker.py: which lane a request runs in
(its team's fast budget), whether it can meet its deadline, the owner's cancels (skill.generate.cancel, read whole
by every consumer: unread, queued and running requests), and this consumer's queue published to the group view
(skillgen/runtime/groupview.py) with the scheduling gauges. The fair queue itself is consumer/batcher.py."""

from __future__ import annotations

import asyncio
import logging
import math
import os
import socket
import time
import uuid
from collections import OrderedDict
from datetime import datetime, timezone
from typing import TYPE_CHECKING

from consumer.flight import Flight
from schemas.codec import CodecError, decode
from schemas.messages import EventKind, GenerateCancel, GenerateRequest, Origin
from skillgen.runtime import groupview
from skillgen.runtime.logs import job as job_fields
from skillgen.runtime.redis import RedisLink, Store

if TYPE_CHECKING:
    from consumer.worker import Worker

log = logging.getLogger("skillgen.consumer")

CANCELLED = "cancelled by the person who asked"
CANCEL_MEMORY = 100_000  # cancels remembered for requests not read yet (oldest forgotten first)


def busy(eta_s: float, left_s: float) -> str:
    """The refusal for a request that cannot be ready by its deadline."""
    wait_min = max(1, math.ceil((eta_s - max(left_s, 0.0)) / 60))
    return (f"busy: the image service has about {max(1, round(eta_s / 60))} min of work queued ahead of this "
            f"request, more than it may wait; try again in about {wait_min} min")


def same_person(a: Origin, b: Origin) -> bool:
    return (a.platform, a.team_id, a.user_id) == (b.platform, b.team_id, b.user_id)


class Scheduling:
    def __init__(self, worker: Worker):
        self.w = worker
        self.settings = worker.settings
        self.consumer_id = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self._cancels: OrderedDict[str, GenerateCancel] = OrderedDict()  # request id -> its owner's cancel
        key = self.settings.signing_key
        self._seal_key = key.get_secret_value().encode() if key else None
        self._link: RedisLink | None = None
        self.budget = Store(None, self.settings.redis_prefix + "fast:")

    @property
    def link(self) -> RedisLink | None:
        return self._link

    @link.setter
    def link(self, link: RedisLink | None) -> None:
        """The correctness Redis (set in Worker.run): fast budgets and the group view live there."""
        self._link = link
        self.budget = Store(link, self.settings.redis_prefix + "fast:")

    # -- lanes and deadlines -------------------------------------------------------------------------------
    async def lane(self, req: GenerateRequest, cost: float) -> str:
        """The lane the request runs in: what it asked for, except that a team past its fast budget for the day
        (SKILL_FAST_UNITS_PER_DAY, counted in Redis across the group) runs in relax."""
        budget = self.settings.fast_units_per_day
        if req.lane != "fast" or budget <= 0:
            return req.lane
        day = datetime.now(timezone.utc).strftime("%Y%m%d")
        used = await self.budget.incr(f"{req.origin.platform.value}:{req.origin.team_id}:{day}", cost, 2 * 86400)
        return "fast" if used <= budget else "relax"

    def late(self, flight: Flight, eta_s: float) -> str | None:
        """The "busy" refusal when the flight cannot be ready by its deadline (the request's own, or its lane's);
        None when it can. A record taken up again after a crash (attempt above 1) is never refused: it was
        accepted once, and its requester was told so."""
        req = flight.request
        if any(j.attempt > 1 for j in flight.waiters):
            return None
        lane_s = self.settings.lane_deadline_s.get(flight.lane)
        # A request may ask for a shorter deadline than its lane's, never a longer one.
        asked = [d for d in (req.deadline_s, lane_s) if d is not None]
        if not asked:
            return None
        left_s = min(asked) - (time.time() - req.created_at.timestamp())
        if eta_s <= left_s:
            return None
        return busy(eta_s, left_s)

    # -- the group view --------------------------------------------------------------------------------------
    def view(self) -> groupview.ConsumerView:
        """This consumer's queue and speed, as the group view publishes it."""
        gpu, service = self.w.gpu, self.w.service
        # Records of our partitions not fetched yet: work nobody has sized (the readers count it at an average).
        lag = sum(service.lag().values()) - len(service.offsets)
        return groupview.ConsumerView(
            consumer=self.consumer_id, at=time.time(), s_per_unit=gpu.s_per_unit(),
            running_s=gpu.running_left_s(),
            lag=max(0, lag), queued=gpu.batcher.backlog(), team_weights=dict(gpu.policy.team_weights),
            lane_weights=dict(gpu.policy.lane_weights))

    async def publish_view(self) -> None:
        """The group view (Redis) and the scheduling gauges, every SKILL_VIEW_INTERVAL_S."""
        metrics = self.w.metrics
        shown: set[tuple[str, str]] = set()
        while True:
            view = self.view()
            now_shown = set()
            for name, q in view.queued.items():
                lane, team = groupview.split_flow(name)
                metrics.sched_queued.labels(team, lane).set(q.requests)
                metrics.sched_queued_units.labels(team, lane).set(q.units)
                now_shown.add((team, lane))
            for team, lane in shown - now_shown:
                metrics.sched_queued.labels(team, lane).set(0)
                metrics.sched_queued_units.labels(team, lane).set(0)
            shown = now_shown | shown
            await groupview.publish(self._link, self.settings.redis_prefix, view)
            await asyncio.sleep(self.settings.view_interval_s)

    # -- cancels (skill.generate.cancel, read whole by every consumer) ---------------------------------------
    def read_cancel(self, record) -> None:
        try:
            msg = decode(record.value, GenerateCancel, record.headers)
        except CodecError as exc:
            log.warning("ignoring an undecodable cancel at %d: %s", record.offset, exc)
            return
        if self._seal_key is not None and not msg.origin.verify(msg.request_id, self._seal_key):
            log.warning("ignoring a cancel whose origin is not sealed for it", extra=job_fields(msg.request_id))
            return
        if len(self._cancels) >= CANCEL_MEMORY:
            self._cancels.popitem(last=False)
        self._cancels[msg.request_id] = msg
        if self.w.service.state == "running":
            self.w.spawn(self.cancel(msg))

    def cancelled(self, req: GenerateRequest) -> bool:
        """Whether the request's owner cancelled it (someone else's cancel is ignored, and said so in the log)."""
        msg = self._cancels.get(req.request_id)
        if msg is None:
            return False
        if not same_person(msg.origin, req.origin):
            log.warning("ignoring a cancel from %s:%s, who did not ask for this request", msg.origin.platform.value,
                        msg.origin.user_id, extra=job_fields(req.request_id))
            return False
        return True

    async def cancel(self, msg: GenerateCancel) -> None:
        """Take the owner's request out wherever it is here: waiting for a lease, queued, or running (its
        samples leave the batch at the next denoising step). A flight others still wait for goes on."""
        w = self.w
        for flight in list(w._flights.values()) + [f for f in w.gpu.running if f.key not in w._flights]:
            mine = [j for j in flight.waiters if j.message.request_id == msg.request_id and self.cancelled(j.message)]
            if not mine:
                continue
            flight.waiters = [j for j in flight.waiters if j not in mine]
            where = "queued"
            if not flight.waiters:
                if w.gpu.batcher.remove(flight):
                    await w.close(flight)
                elif w.gpu.cancel_running(flight):
                    where = "running"
            w.metrics.cancelled.labels(where).inc(len(mine))
            for job in mine:
                job.waiting = False
                await w._answer(job, EventKind.cancelled, message=CANCELLED)
