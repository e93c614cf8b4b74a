"""What keeps a fine-tune job on one trainer at a time, and its events in order (used by trainer/worker.py).

- **The revoke stop**: a job whose partition moved (`job.abandoned`) stops at its next step boundary with a
  checkpoint of every step done (REVOKED) and answers nothing: the partition's new owner resumes it.
- **The lease** (`JobLease`: `train-lease:<request id>` in Redis, TTL SKILL_TRAIN_LEASE_S): a trainer trains a job
  only while it holds the job's lease, so a new owner waits until the old one has written its checkpoint and let
  go. It is renewed every third of its TTL only while the job shows signs of life (`Running.beats`: each step), so
  a trainer that died or hangs lets go within the TTL. A run whose lease lapsed and was taken by another trainer
  stops without writing its checkpoint (LEASE_LOST, a `trainer.lora.Unsaved` reason) and waits for it again.
  Without Redis every lease is granted (WithoutRedis.GRANTED: no job is ever left undone): the revoke stop still
  holds, but a new owner may then start before the old one has written its checkpoint.
- **Progress before the end**: progress events, sent from the training thread, are kept until acknowledged, and
  `Running.settle()` waits for them (dropping any still failing after PROGRESS_SETTLE_S) before the job's
  terminal event is produced, so no progress event of a job follows its terminal one.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable, Coroutine
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

from schemas.messages import FineTuneRequest
from skillgen.runtime.logs import job as log_ctx
from skillgen.runtime.redis import Lease, Store, WithoutRedis
from skillgen.runtime.service import Job

log = logging.getLogger("skillgen.trainer")

REVOKED = "its partition moved to another trainer"
LEASE_LOST = "another trainer took over the job's lease"
LEASE_POLL_S = 1.0  # how often a trainer waiting for a job's lease asks again
PROGRESS_SETTLE_S = 10.0  # how long a terminal event waits for the job's progress events; later ones are dropped


@dataclass
class Running:
    """The job a trainer is running."""

    req: FineTuneRequest
    job: Job | None = None  # the service's (None: handled directly): job.abandoned says its partition moved
    stop_reason: str | None = None  # a cancel or the shutdown
    beats: int = 0  # signs of life of the training: its lease is renewed only while they move
    lost: bool = False  # the lease lapsed and another trainer holds it now
    sent: set[asyncio.Task] = field(default_factory=set)  # progress events not yet acknowledged

    @property
    def moved(self) -> bool:
        return self.job is not None and self.job.abandoned

    def should_stop(self) -> str | None:
        """Asked by the training thread before every step (and so a sign of life)."""
        self.beats += 1
        if self.lost:  # the checkpoint directory is the new lease holder's: stop without writing it
            from trainer.lora import Unsaved

            return Unsaved(LEASE_LOST)
        return REVOKED if self.moved else self.stop_reason

    def send(self, loop: asyncio.AbstractEventLoop, emit: Callable[[], Coroutine]) -> None:
        """From the training thread: produce a progress event (`emit()`) on `loop`, kept until acknowledged. The
        task is queued on the loop before the thread's return is, so `settle()` after the thread sees it."""

        def start() -> None:
            task = loop.create_task(emit())
            self.sent.add(task)
            task.add_done_callback(self.sent.discard)

        loop.call_soon_threadsafe(start)

    async def settle(self) -> None:
        """Before the job's terminal event: its progress events are acknowledged first, or dropped."""
        if self.sent:
            _, late = await asyncio.wait(set(self.sent), timeout=PROGRESS_SETTLE_S)
            for task in late:
                task.cancel()
            await asyncio.gather(*late, return_exceptions=True)


class JobLease:
    """The lease a trainer holds while it trains one job: `await take(gone)`, then `async with held(running)`."""

    def __init__(self, store: Store, request_id: str, ttl_s: float):
        self.request_id = request_id
        self.lease = Lease(store, f"train-lease:{request_id}", ttl_s, WithoutRedis.GRANTED)

    async def take(self, gone: Callable[[], bool]) -> bool:
        """Wait while another trainer holds it (the partition's previous owner, still stopping, or one that died
        with it: its lease lapses); False once `gone()` (the job moved away, or the trainer stops)."""
        waiting = False
        while not await self.lease.acquire():
            if gone():
                return False
            if not waiting:
                waiting = True
                log.info("waiting for another trainer to let go of this job", extra=log_ctx(self.request_id))
            await asyncio.sleep(LEASE_POLL_S)
        return True

    @asynccontextmanager
    async def held(self, running: Running) -> AsyncIterator[None]:
        """Renewed while `running` shows signs of life; released at the end, unless cancelled (the training
        thread may still be writing its checkpoint then: the lease lapses instead)."""
        renewer = asyncio.create_task(self._renew(running), name=f"renew {self.lease.name}")
        cancelled = False
        try:
            yield
        except asyncio.CancelledError:
            cancelled = True
            raise
        finally:
            renewer.cancel()
            if not cancelled:
                await self.lease.release()

    async def _renew(self, running: Running) -> None:
        seen = -1
        while not running.lost:
            await asyncio.sleep(self.lease.ttl_s / 3)
            if running.beats != seen:  # else it lapses: a hung training lets go
                seen = running.beats
                # Lapsed while idle and free again: taken back. Taken by another trainer: this run stops.
                running.lost = not (await self.lease.renew() or await self.lease.acquire())
                if running.lost:
                    log.warning("lost this job's lease to another trainer", extra=log_ctx(self.request_id))
