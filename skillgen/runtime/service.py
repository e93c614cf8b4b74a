"""One Kafka service skeleton for every service that consumes a topic: the consumer, the trainer and delivery.

    service = KafkaService(settings, name="delivery", topic=..., group=..., handle=handle, max_in_hand=50)
    await service.run(ready)            # until service.stop()

The service fetches records and hands each to `handle(job)` in a task of its own (or, with `ordered=True`, one
after another per partition). A handler answers a job with `service.finish(job)` once the job's terminal event
is produced, now or later (the consumer finishes jobs after their batch), or gives it up with
`service.leave(job)` (a trainer stopped for shutdown): a left job is never committed, so its record comes back
to the partition's next owner.

What every service gets the same way:
- **Commit after terminal**: per partition, the offset committed is the first record not yet finished, so a
  crash redelivers what was not answered and nothing that was (at-least-once). A failed commit (a rebalance
  under way: `CommitFailedError`) is logged and left to the next commit or the next owner, never raised.
- **Backpressure without leaving the group**: past `max_in_hand` records in hand every partition is paused and
  polling goes on; a record that arrives anyway (a partition assigned mid-poll) is sought back and read later.
  A revoked job whose handler is still running stays in hand until it returns: it still holds the GPU.
- **Revoke**: finished work is committed, unfinished jobs of the revoked partitions are marked abandoned (their
  handler answers nothing, commits nothing) and `on_revoked(jobs)` lets the service drop them. With `ordered`,
  a partition that comes back is handled only once its abandoned handler has returned.
- **Drain**: on `stop()` fetching stops, open jobs get `drain_timeout_s` to finish, the rest is left for the
  next owner, finished work is committed and the group is left at once.
- **Health** on `/healthz` (with `/metrics`): 503 unless running and the fetch loop turned recently, and (with
  `max_record_age_s`) while a record in hand is older than that: a terminal event that cannot be produced or a
  handler that never returns shows as a failing probe, not as a partition silently stuck.
- **Dead letters** (`dead_letter`) and **emits** (`emit`, produced and acknowledged, retried with backoff).
- **Crash loops** (`count_attempts=True`, skillgen/runtime/attempts.py): each record's attempts are counted in
  Redis, `job.attempt` says which one this is (above 1: a process died holding it; the last one runs alone), and past
  SKILL_RECORD_MAX_ATTEMPTS the record is dead-lettered, `on_poison(job, reason)` tells the requester, and it is
  finished without running the handler.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

from aiokafka import (
    AIOKafkaConsumer,
    ConsumerRebalanceListener,
    ConsumerRecord,
    TopicPartition,
)
from aiokafka.errors import KafkaError
from prometheus_client import CollectorRegistry

from skillgen.runtime.attempts import Attempts, Turns
from skillgen.runtime.jobs import Job, Offsets
from skillgen.runtime.kafka import dead_letter, make_consumer, make_producer
from skillgen.runtime.observability import HealthFn, metrics_server
from skillgen.runtime.redis import Store
from skillgen.runtime.settings import CommonSettings

log = logging.getLogger("skillgen.service")

class _Rebalance(ConsumerRebalanceListener):
    def __init__(self, service: KafkaService):
        self.service = service

    async def on_partitions_revoked(self, revoked) -> None:
        await self.service._on_revoked(set(revoked))

    async def on_partitions_assigned(self, assigned) -> None:
        log.info("%s: assigned %s", self.service.name,
                 ", ".join(f"{tp.topic}[{tp.partition}]" for tp in sorted(assigned)) or "nothing")


class KafkaService:
    def __init__(
        self,
        settings: CommonSettings,
        *,
        name: str,
        topic: str,
        group: str,
        handle: Callable[[Job], Awaitable[None]],
        max_in_hand: int = 64,
        ordered: bool = False,
        drain_timeout_s: float = 60.0,
        registry: CollectorRegistry | None = None,
        health: HealthFn | None = None,
        on_revoked: Callable[[list[Job]], Awaitable[None]] | None = None,
        on_drain: Callable[[], None] | None = None,
        healthy_loop_s: float = 60.0,
        consumer_options: dict | None = None,
        producer_options: dict | None = None,
        count_attempts: bool = False,
        on_poison: Callable[[Job, str], Awaitable[None]] | None = None,
        max_record_age_s: float | None = None,
    ):
        if max_in_hand < 1:
            raise ValueError(f"max_in_hand must be at least 1, got {max_in_hand}")
        self.settings = settings
        self.name = name
        self.topic = topic
        self.group = group
        self._handle = handle
        self.max_in_hand = max_in_hand
        self.ordered = ordered
        self.drain_timeout_s = drain_timeout_s
        self.registry = registry
        self._health_detail = health
        self._on_revoked_hook = on_revoked
        self._on_drain = on_drain
        self.healthy_loop_s = healthy_loop_s
        self.consumer_options = consumer_options or {}
        self.producer_options = producer_options or {}
        self.count_attempts = count_attempts
        self._on_poison = on_poison
        self.max_record_age_s = max_record_age_s
        self.attempts: Attempts | None = None
        self.attempts_store: Store | None = None  # set before run() to count on a link the service already has
        self._turns = Turns()
        self.offsets = Offsets()
        self.finished = 0  # records answered (or dead-lettered) here
        self.commit_failures = 0
        self.state = "starting"
        self.consumer: AIOKafkaConsumer | None = None
        self.producer = None
        self._stop = asyncio.Event()
        self._dirty = asyncio.Event()
        self._commit_lock = asyncio.Lock()
        self._tasks: set[asyncio.Task] = set()
        self._handling: set[Job] = set()  # jobs whose handler is running
        self._queues: dict[TopicPartition, asyncio.Queue[Job | None]] = {}
        self._workers: dict[TopicPartition, asyncio.Task] = {}  # with `ordered`: the partition's handler loop
        self._loop_seen = time.monotonic()

    # -- for the service's own code ---------------------------------------------------------------------------
    def stop(self) -> None:
        self._stop.set()

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    def finish(self, job: Job) -> None:
        """The job is answered (its terminal event is produced): its offset may be committed."""
        if job.abandoned:
            return
        self.offsets.finish(job)
        self.finished += 1
        self._dirty.set()
        self._next_turn(job)
        if job.counted and self.attempts is not None:
            job.counted = False
            self.spawn(self.attempts.end(job.record))

    def leave(self, job: Job) -> None:
        """Give the job up unanswered: it holds its partition's commit point until the partition moves."""
        job.left = True
        self._give_back(job)
        self._next_turn(job)

    def _next_turn(self, job: Job) -> None:
        if self._turns.release(job):
            self.spawn(self._turns.wake())

    def _give_back(self, job: Job) -> None:
        """A job given up on purpose: its attempt did not die with this process, so it is not counted."""
        if job.counted and self.attempts is not None and not self.stopping:  # (the drain gives back the rest)
            job.counted = False
            self.spawn(self.attempts.undo(job.record))

    def spawn(self, coro) -> asyncio.Task:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._reap)
        return task

    async def send(self, topic: str, value: bytes, *, key: bytes | None, headers, job: Job | None = None):
        """Hand a record to the producer, in order per job, and return its delivery future."""
        if job is None:
            return await self.producer.send(topic, value, key=key, headers=headers)
        async with job.emitting:
            return await self.producer.send(topic, value, key=key, headers=headers)

    async def emit(self, topic: str, value: bytes, *, key: bytes | None, headers, job: Job | None = None,
                   max_backoff_s: float = 5.0) -> None:
        """Produce and wait for the broker's acknowledgement; a failure is retried with backoff until it goes
        through or the task is cancelled (the drain's end), so a terminal event is never silently lost."""
        delay_s = 0.1
        while True:
            try:
                await (await self.send(topic, value, key=key, headers=headers, job=job))
                return
            except KafkaError as exc:
                log.warning("%s: producing to %s failed (%s): retrying in %.1fs", self.name, topic, exc, delay_s)
                await asyncio.sleep(delay_s)
                delay_s = min(delay_s * 2, max_backoff_s)

    async def dead_letter(self, record: ConsumerRecord, error: BaseException | str) -> str:
        reason = await dead_letter(self.producer, record, error)
        log.warning("%s: record %s[%d]@%d to the DLQ: %s", self.name, record.topic, record.partition, record.offset,
                    reason)
        return reason

    def lag(self) -> dict[TopicPartition, int]:
        """Records of each assigned partition not yet answered (from the first open one to the high water)."""
        out = {}
        if self.consumer is None:
            return out
        for tp in self.consumer.assignment():
            end = self.consumer.highwater(tp)
            if end is not None:
                point = self.offsets.point(tp)
                out[tp] = max(0, end - (end if point is None else point))
        return out

    def health(self) -> tuple[bool, str]:
        if self.state != "running":
            return False, self.state
        silent_s = time.monotonic() - self._loop_seen
        if silent_s > self.healthy_loop_s:
            return False, f"the fetch loop has been silent for {silent_s:.0f}s"
        if self.max_record_age_s is not None and (age_s := self.oldest_s()) > self.max_record_age_s:
            return False, (f"a record has been in hand unanswered for {age_s:.0f}s (limit {self.max_record_age_s:g}s): "
                           "its terminal event cannot be produced or its handler is stuck")
        if self._health_detail is not None:
            return self._health_detail()
        return True, f"ok: {self.in_hand()} records in hand"

    def oldest_s(self) -> float:
        """Age of the oldest record in hand: open ones, and revoked ones whose handler has not returned yet."""
        now = time.monotonic()
        revoked = (now - j.received for j in self._handling if j.abandoned)
        return max(self.offsets.oldest_s(now), *revoked, 0.0)

    def in_hand(self) -> int:
        """Jobs being worked on here: open ones, and revoked ones whose handler has not returned yet."""
        return len(self.offsets) + sum(1 for j in self._handling if j.abandoned)

    # -- lifecycle --------------------------------------------------------------------------------------------
    async def run(self, ready: Callable[[], None] | None = None) -> None:
        s = self.settings
        options = {
            "session_timeout_ms": s.kafka_session_timeout_ms,
            "heartbeat_interval_ms": s.kafka_heartbeat_interval_ms,
            "rebalance_timeout_ms": s.kafka_rebalance_timeout_ms,
            "fetch_max_wait_ms": s.fetch_max_wait_ms,
            **self.consumer_options,
        }
        self.consumer = consumer = make_consumer(s, group=self.group, **options)
        self.producer = make_producer(s, **self.producer_options)
        own = None if self.attempts_store is not None or not (self.count_attempts and s.redis_url) \
            else Store.from_settings(s)
        if self.count_attempts and (self.attempts_store or own) is not None:
            self.attempts = Attempts(self.attempts_store or own, self.group, s.record_max_attempts)
        background: list[asyncio.Task] = []
        try:
            async with metrics_server(s.metrics_port, self.registry or CollectorRegistry(), self.health):
                await self.producer.start()
                await consumer.start()
                consumer.subscribe([self.topic], listener=_Rebalance(self))
                background.append(asyncio.create_task(self._committer()))
                try:
                    self.state = "running"
                    if ready:
                        ready()
                    await self._fetch()
                    self.state = "draining"
                    await self._drain()
                finally:
                    for task in [*background, *self._tasks]:
                        task.cancel()
                    await asyncio.gather(*background, *self._tasks, return_exceptions=True)
                    await consumer.stop()  # leaves the group, so partitions move at once
        finally:
            self.state = "stopped"
            await self.producer.stop()
            if own is not None:
                await own.close()

    async def _fetch(self) -> None:
        consumer = self.consumer
        while not self._stop.is_set():
            self._loop_seen = time.monotonic()
            in_hand = self.in_hand()
            if in_hand >= self.max_in_hand:
                if unpaused := consumer.assignment() - consumer.paused():
                    consumer.pause(*unpaused)
            elif paused := consumer.paused():
                consumer.resume(*paused)
            batches = await consumer.getmany(timeout_ms=100, max_records=max(1, self.max_in_hand - in_hand))
            for tp, records in batches.items():
                for record in records:
                    if self.in_hand() >= self.max_in_hand:
                        consumer.seek(tp, record.offset)  # over capacity (assigned mid-poll): read it again later
                        break
                    job = Job(record, tp, time.monotonic())
                    self.offsets.add(job)
                    self._dispatch(job)

    def _dispatch(self, job: Job) -> None:
        if not self.ordered:
            self.spawn(self._run_handler(job))
            return
        queue = self._queues.get(job.tp)
        if queue is None:
            queue = self._queues[job.tp] = asyncio.Queue()
            before = self._workers.get(job.tp)
            self._workers[job.tp] = self.spawn(self._partition_worker(queue, before))
        queue.put_nowait(job)

    async def _partition_worker(self, queue: asyncio.Queue[Job | None], before: asyncio.Task | None) -> None:
        if before is not None:  # the partition was revoked and came back: its records stay one after another
            await asyncio.wait({before})
        while (job := await queue.get()) is not None:  # None: the partition was revoked
            if not job.abandoned:
                await self._run_handler(job)

    async def _run_handler(self, job: Job) -> None:
        self._handling.add(job)
        try:
            if self.attempts is not None and not await self._attempt(job):
                return
            await self._handle(job)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a bug in a handler must not strand the partition
            log.exception("%s: the handler failed on %s[%d]@%d", self.name, job.tp.topic, job.tp.partition,
                          job.record.offset)
            if not job.abandoned:
                await self.dead_letter(job.record, exc)
                self.finish(job)
        finally:
            self._handling.discard(job)

    async def _attempt(self, job: Job) -> bool:
        """Wait for the job's turn and count this attempt; False when it is not to run here: revoked or stopping
        meanwhile, or set aside because earlier attempts kept killing their process."""
        job.attempt = await self.attempts.begin(job.record)  # one round trip on the usual path
        # Its last permitted attempt (earlier ones died with their process) runs alone: if it is what kills, it
        # takes nothing else along, and the next attempt sets it aside. Earlier retries run with the rest, so one
        # crash does not turn the recovery of everything that was in hand into a queue of single jobs.
        suspect = job.attempt >= self.attempts.max_attempts
        waits = suspect or not self._turns.free()
        if waits:  # a job is counted only while it runs, never while it waits for its turn
            await self.attempts.undo(job.record)
        if not await self._turns.take(job, alone=suspect, gone=lambda: job.abandoned or self.stopping):
            if not job.abandoned:
                self.leave(job)  # stopping: the next owner takes it up
            return False
        if waits:
            job.attempt = await self.attempts.begin(job.record)
        job.counted = True
        if job.attempt <= self.attempts.max_attempts:
            return True
        reason = (f"set aside after {job.attempt - 1} attempts: every process that took this record up died "
                  "before answering it")
        await self.dead_letter(job.record, reason)
        if self._on_poison is not None:
            try:
                await self._on_poison(job, reason)
            except Exception:  # noqa: BLE001 - the record is set aside either way
                log.exception("%s: telling the requester about a set-aside record failed", self.name)
        self.finish(job)
        return False

    async def _drain(self) -> None:
        log.info("%s stopping: %d records in hand, finishing them within %.0fs", self.name, len(self.offsets),
                 self.drain_timeout_s)
        if self._on_drain is not None:
            self._on_drain()
        await self._turns.wake()  # jobs still waiting for their turn are left to the next owner
        try:
            async with asyncio.timeout(self.drain_timeout_s):
                while len(self.offsets):
                    await asyncio.sleep(0.05)
        except TimeoutError:
            log.warning("%s: drain timed out: %d records unanswered go to the next owner", self.name, len(self.offsets))
        if self.attempts is not None:  # what goes to the next owner unanswered did not die with this process
            for job in self.offsets.jobs():
                if job.counted:
                    job.counted = False
                    await self.attempts.undo(job.record)
        await self._commit()

    def _reap(self, task: asyncio.Task) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("%s: task %s failed", self.name, task.get_name(), exc_info=task.exception())

    # -- offsets ----------------------------------------------------------------------------------------------
    async def _committer(self, retry_s: float = 1.0) -> None:
        while True:
            await self._dirty.wait()
            self._dirty.clear()
            if not await self._commit():
                # Tried again even if nothing else finishes meanwhile; a partition that moved is dropped by then.
                await asyncio.sleep(retry_s)
                self._dirty.set()

    async def _commit(self, tps=None) -> bool:
        """Commit every finished prefix; False when the broker refused (the points stay due)."""
        async with self._commit_lock:
            points = self.offsets.to_commit(self.consumer.assignment() if tps is None else tps)
            if not points:
                return True
            try:
                await self.consumer.commit(points)
            except KafkaError as exc:  # CommitFailedError in a rebalance: the next owner starts from the last commit
                self.commit_failures += 1
                log.warning("%s: commit of %s failed (%s): left to the next commit", self.name,
                            {f"{tp.topic}[{tp.partition}]": p for tp, p in points.items()}, exc)
                return False
            self.offsets.committed(points)
            return True

    async def _on_revoked(self, revoked: set[TopicPartition]) -> None:
        """Commit what is finished; leave what is not to the partitions' next owner."""
        if not revoked:
            return
        await self._commit(revoked)
        dropped: list[Job] = []
        for tp in revoked:
            for job in self.offsets.drop(tp):
                job.abandoned = True
                self._give_back(job)
                self._turns.release(job)
                dropped.append(job)
            if (queue := self._queues.pop(tp, None)) is not None:
                queue.put_nowait(None)
        await self._turns.wake()  # jobs waiting for their turn on these partitions give up
        if self._on_revoked_hook is not None:
            await self._on_revoked_hook(dropped)
        log.info("%s: partitions revoked (%s): %d unfinished records left to their next owner", self.name,
                 ", ".join(f"{tp.topic}[{tp.partition}]" for tp in sorted(revoked)), len(dropped))
