"""Never two trainers on one job (trainer/guard.py): a job whose partition moves stops at a step boundary with its
checkpoint and answers nothing; the partition's new owner waits for the job's lease and resumes from that
checkpoint; a dead trainer's lease lapses; no progress event follows its job's terminal event. The real broker and
Redis, the tiny model, trainers in this process (as in test_trainer_e2e.py)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from dataclasses import dataclass, field

import pytest
from aiokafka.coordinator.assignors.abstract import AbstractPartitionAssignor
from aiokafka.coordinator.protocol import (
    ConsumerProtocolMemberAssignment,
    ConsumerProtocolMemberMetadata,
)

from bots.settings import TrainCommandSettings
from bots.train_commands import finetune_key, finetune_request, parse
from schemas.codec import decode
from schemas.messages import EventKind, JobEvent
from skillgen.adapters.recipe import LoraRecipe
from skillgen.adapters.registry import Registry
from skillgen.runtime.redis import Lease, RedisLink, Store, WithoutRedis
from tests.integration.test_trainer_e2e import (
    GUILD,
    Chat,
    attachments,
    running,
    tiny_model,
    trainer_settings,
)
from trainer import lora
from trainer.guard import LEASE_LOST, REVOKED, JobLease, Running
from trainer.worker import TrainerWorker

pytestmark = [pytest.mark.integration, pytest.mark.e2e]
__all__ = ["attachments", "tiny_model"]  # fixtures shared with test_trainer_e2e.py


def newest_takes_all(rank: int) -> type[AbstractPartitionAssignor]:
    """An assignor that gives every partition to the member of the highest `rank`, so the test decides which
    trainer owns the job's partition: the one that joins last takes it from the other."""

    class NewestTakesAll(AbstractPartitionAssignor):
        name = "test-newest-takes-all"
        version = 0

        @classmethod
        def metadata(cls, topics):
            return ConsumerProtocolMemberMetadata(cls.version, sorted(topics), str(rank).encode())

        @classmethod
        def assign(cls, cluster, members):
            newest = max(members, key=lambda m: int(members[m].user_data or b"0"))
            topics = sorted({t for m in members.values() for t in m.subscription})
            every = [(t, sorted(cluster.partitions_for_topic(t) or ())) for t in topics]
            return {m: ConsumerProtocolMemberAssignment(cls.version, every if m == newest else [], b"")
                    for m in members}

        @classmethod
        def on_assignment(cls, assignment):
            pass

    return NewestTakesAll


@dataclass
class Seen:
    """What one trainer did, from inside: its training spans, steps, stops and the event kinds it produced."""

    spans: list[list[float]] = field(default_factory=list)  # [start, end] of each training thread (inf: running)
    steps: list[tuple[int, float]] = field(default_factory=list)  # (step, when it ended)
    stops: list[tuple[lora.Stopped, int | None]] = field(default_factory=list)  # and the checkpoint's step then
    kinds: list[EventKind] = field(default_factory=list)


def watched(trainer: TrainerWorker, step_s: float) -> Seen:
    """Record what `trainer` does; each step takes at least `step_s` (a slow training)."""
    seen, make, train, emit = Seen(), trainer._progress_fn, trainer._train_and_publish, trainer.emit

    def progress_fn(*args):
        inner = make(*args)

        def step(done: int, total: int, loss: float) -> None:
            seen.steps.append((done, time.monotonic()))
            inner(done, total, loss)
            time.sleep(step_s)

        return step

    def train_and_publish(req, examples, workdir, progress):
        span = [time.monotonic(), float("inf")]
        seen.spans.append(span)
        try:
            return train(req, examples, workdir, progress)
        except lora.Stopped as exc:
            state = workdir / "checkpoint" / "state.json"
            seen.stops.append((exc, json.loads(state.read_text())["step"] if state.exists() else None))
            raise
        finally:
            span[1] = time.monotonic()

    async def emitted(req, kind, *args, **fields):
        seen.kinds.append(kind)
        await emit(req, kind, *args, **fields)

    trainer._progress_fn, trainer._train_and_publish, trainer.emit = progress_fn, train_and_publish, emitted
    return seen


async def read_on(chat: Chat, quiet_s: float) -> list[JobEvent]:
    """Every event so far, read until nothing new came for `quiet_s`."""
    while True:
        before = len(chat.events)
        deadline = time.monotonic() + quiet_s
        while time.monotonic() < deadline:
            for records in (await chat.reader.getmany(timeout_ms=200)).values():
                chat.events += [decode(r.value, JobEvent, r.headers) for r in records]
        if len(chat.events) == before:
            return chat.events


async def idle(*trainers: TrainerWorker, timeout_s: float = 120) -> None:
    async with asyncio.timeout(timeout_s):
        while any(t._running is not None for t in trainers):
            await asyncio.sleep(0.05)


async def test_a_moved_job_stops_checkpointed_and_its_new_owner_resumes_it_alone(
    skill_env, tiny_model, attachments, tmp_path
):
    urls, limits = attachments
    # No periodic checkpoint: what the new owner resumes from is the one written when the job stopped.
    settings = trainer_settings(tiny_model, tmp_path, limits,
                                lora=LoraRecipe(lr=1e-2, batch_size=1, checkpoint_every=1000))
    req = finetune_request(parse("moved --steps 40"), GUILD, urls, TrainCommandSettings(_env_file=None, ingest=limits))
    first, second = TrainerWorker(settings), TrainerWorker(settings)
    for rank, trainer in enumerate((first, second), 1):
        trainer.service.consumer_options = {"partition_assignment_strategy": (newest_takes_all(rank),)}
    a, b = watched(first, step_s=0.3), watched(second, step_s=0.02)

    async with Chat(settings) as chat, running(first):
        await chat.publish(skill_env.topics.finetune, req, finetune_key(req))
        await chat.until(req.request_id, lambda e: e.kind == EventKind.progress and e.step >= 3)
        async with running(second):  # joins the group and takes every partition: the job's moves to it
            await chat.terminal(req.request_id)
            await idle(first, second)
            events = [e for e in await read_on(chat, 1.5) if e.request_id == req.request_id]

    # Never both at once: the first trainer's training ended before the second's began, step by step too.
    assert a.spans and b.spans, (a.spans, b.spans)
    assert max(end for _, end in a.spans) <= min(start for start, _ in b.spans), (a.spans, b.spans)
    assert max(t for _, t in a.steps) < min(t for _, t in b.steps)
    # The first stopped at a step boundary with a checkpoint of that step, and answered nothing.
    [(stopped, checkpoint_step)] = a.stops
    assert stopped.reason == REVOKED and checkpoint_step == stopped.step == a.steps[-1][0], (stopped, a.steps[-1])
    assert set(a.kinds) <= {EventKind.started, EventKind.progress}, a.kinds
    assert first.finished == 0
    # The second resumed from that checkpoint, not from step 0, and answered once.
    assert b.steps[0][0] == stopped.step + 1 and b.steps[-1][0] == 40, (stopped.step, b.steps[:2])
    assert [e.kind for e in events if e.kind.terminal] == [EventKind.succeeded], [e.kind for e in events]
    assert events[-1].kind == EventKind.succeeded and events[-1].adapter == "moved@v1"
    assert Registry(settings.adapter_url).versions(GUILD.team_id, "moved") == [1]
    assert not (settings.work_dir / req.request_id).exists()


async def test_a_job_waits_for_its_lease_and_a_dead_trainers_lease_lapses(skill_env, tiny_model, attachments,
                                                                          tmp_path):
    urls, limits = attachments
    settings = trainer_settings(tiny_model, tmp_path, limits, train_lease_s=3)
    req = finetune_request(parse("held --steps 10"), GUILD, urls, TrainCommandSettings(_env_file=None, ingest=limits))
    store = Store.from_settings(settings)
    dead = Lease(store, f"train-lease:{req.request_id}", settings.train_lease_s, WithoutRedis.MEMORY)
    try:
        assert await dead.acquire()  # a trainer that took the job and died: never renewed, never released
        taken = time.monotonic()
        trainer = TrainerWorker(settings)
        seen = watched(trainer, step_s=0)
        async with Chat(settings) as chat, running(trainer):
            await chat.publish(skill_env.topics.finetune, req, finetune_key(req))
            events = await chat.terminal(req.request_id)
    finally:
        await store.close()
    assert seen.spans[0][0] >= taken + settings.train_lease_s - 0.2, seen.spans[0][0] - taken  # not before it lapsed
    assert events[-1].kind == EventKind.succeeded and events[-1].adapter == "held@v1", events[-1].message
    assert not await Store.from_settings(settings).ttl_s(f"train-lease:{req.request_id}")  # released at the end


async def test_no_progress_event_follows_its_jobs_terminal_event(skill_env, tiny_model, attachments, tmp_path):
    urls, limits = attachments
    settings = trainer_settings(tiny_model, tmp_path, limits)
    req = finetune_request(parse("ordered --steps 10"), GUILD, urls,
                           TrainCommandSettings(_env_file=None, ingest=limits))
    trainer = TrainerWorker(settings)
    emit, terminal_out = trainer.emit, asyncio.Event()

    async def slow_last_progress(r, kind, *args, **fields):
        # The last progress event (step 9 of 10) is slow to go out, as when the broker makes it retry: it waits
        # until the terminal event is out, or 5 s.
        if kind == EventKind.progress and fields.get("step") == r.steps - 1:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(terminal_out.wait(), 5)
        await emit(r, kind, *args, **fields)
        if kind.terminal:
            terminal_out.set()

    trainer.emit = slow_last_progress
    async with Chat(settings) as chat, running(trainer):
        await chat.publish(skill_env.topics.finetune, req, finetune_key(req))
        await chat.terminal(req.request_id)
        events = [e for e in await read_on(chat, 1.5) if e.request_id == req.request_id]

    kinds = [e.kind for e in events]
    end = next(i for i, k in enumerate(kinds) if k.terminal)
    assert EventKind.progress not in kinds[end + 1:], kinds
    assert kinds[end] == EventKind.succeeded and kinds.count(EventKind.succeeded) == 1, kinds
    assert [e.step for e in events if e.kind == EventKind.progress][-1] == 9  # it was sent, before the end


async def test_the_lease_is_renewed_only_while_steps_progress_and_a_lost_one_stops_the_run(redis_server, namespace):
    store = Store(RedisLink(redis_server.url, decode_responses=True), namespace.redis_prefix)
    req = finetune_request(parse("leased --steps 10"), GUILD, ["https://cdn.discordapp.com/x.png"],
                           TrainCommandSettings(_env_file=None))
    mine = JobLease(store, req.request_id, 0.6)
    other = Lease(store, f"train-lease:{req.request_id}", 5, WithoutRedis.MEMORY)  # another trainer's
    running = Running(req)
    try:
        assert await mine.take(lambda: False)
        async with mine.held(running):
            for _ in range(8):  # steps going on for twice the TTL: renewed, so nobody else gets it
                running.should_stop()
                assert not await other.acquire()
                await asyncio.sleep(0.15)
            await asyncio.sleep(1.0)  # no step for longer than the TTL (a hung training): it lets go
            assert await other.acquire()  # ... and another trainer takes the job over
            running.should_stop()  # the hung one comes back to life
            await asyncio.sleep(0.4)
            assert running.lost and running.should_stop() == LEASE_LOST
            assert isinstance(running.should_stop(), lora.Unsaved)  # it stops without writing the checkpoint
        assert await store.get(f"train-lease:{req.request_id}") == other.token  # not released: not its own
    finally:
        await store.close()
