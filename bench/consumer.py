"""`skillgen bench consumer`: the consumer service end to end on this machine, embedded broker and all.

- throughput: a fixed load of distinct requests published at once, for max_batch 1, 2, 4 and 8; images/s from
  the first publish to the last succeeded event (batching, safety checks and PNG encoding included).
- overhead: one request at a time (max_batch 1): publish -> succeeded event as a client reads it, minus the
  engine's own generate() time for that request. The image safety check is service work, so it counts as
  overhead; its share is reported on its own line as well, and the rest is split where the events' created_at
  (the consumer's clock, the same host's) allows: pickup (publish -> the started event is made: Kafka to the
  consumer, its fetch wait, admission), post-processing besides generate() and the check (started -> succeeded
  made: PNG, blob store, cache) and delivery (succeeded made -> read: Kafka back, the reader's fetch wait).
- cache hits: the same request again under a new request id: publish -> succeeded event, from L1, and from L2
  (Redis, L1 turned off) when a Redis is at hand (SKILL_REDIS_URL, or a private redis-server if installed).

Every latency is measured by the client, so it includes Kafka both ways and the event reader.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import tempfile
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from aiokafka import TopicPartition
from pydantic import BaseModel

from consumer.settings import ConsumerSettings
from schemas.codec import decode, encode
from schemas.messages import GenerateRequest, JobEvent, Origin, Platform
from skillgen.runtime.kafka import ensure_topics, make_consumer, make_producer
from skillgen.runtime.settings import RANDOM_TINY_DIR

DEFAULT_JSON = Path("bench/results/consumer.json")
TARGET_OVERHEAD_P50_MS = 15.0
TARGET_CACHE_HIT_P99_MS = 20.0
BATCH_SIZES = (1, 2, 4, 8)
PARTS = ("pickup", "post_processing", "delivery")  # overhead without the check, by the events' created_at
ORIGIN = Origin(platform=Platform.console, team_id="bench", channel_id="bench", user_id="bench")
# Tansu makes a new group's first join wait session_timeout_ms / 2.
FAST_GROUP = {"kafka_session_timeout_ms": 2000, "kafka_heartbeat_interval_ms": 200, "kafka_rebalance_timeout_ms": 2000}


class Stats(BaseModel):
    n: int
    p50_ms: float
    p99_ms: float
    mean_ms: float

    @classmethod
    def of(cls, seconds: list[float]) -> Stats:
        ms = sorted(s * 1000 for s in seconds)
        rank = lambda q: ms[max(0, math.ceil(q * len(ms)) - 1)]  # noqa: E731 - nearest rank
        return cls(n=len(ms), p50_ms=round(rank(0.5), 2), p99_ms=round(rank(0.99), 2), mean_ms=round(statistics.fmean(ms), 2))


class ThroughputRow(BaseModel):
    max_batch: int
    requests: int
    seconds: float
    images_per_s: float
    batches: int


class ConsumerBench(BaseModel):
    machine: str
    model: str
    device: str
    width: int
    height: int
    steps: int
    quick: bool
    throughput: list[ThroughputRow]
    overhead_ms: Stats
    overhead_without_safety_ms: Stats
    # pickup / post-processing / delivery, as the module doc says; empty in results written before they were
    overhead_parts_ms: dict[str, Stats] = {}
    safety_check_ms: Stats
    pipeline_ms: Stats
    cache_hit_l1_ms: Stats
    cache_hit_l2_ms: Stats | None
    target_overhead_p50_ms: float = TARGET_OVERHEAD_P50_MS
    target_cache_hit_p99_ms: float = TARGET_CACHE_HIT_P99_MS
    notes: list[str]


class _Timed:
    """Wraps the engine or the image policy and records how long each call took, on the thread that ran it."""

    def __init__(self, inner, method: str):
        self.inner, self.method, self.seconds = inner, method, []
        self.backend = getattr(inner, "backend", None)

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def _call(self, *args, **kw):
        t0 = time.perf_counter()
        try:
            return getattr(self.inner, self.method)(*args, **kw)
        finally:
            self.seconds.append(time.perf_counter() - t0)

    def generate(self, *args, **kw):
        return self._call(*args, **kw)

    def check(self, *args, **kw):
        return self._call(*args, **kw)


class _Client:
    """Publishes requests and reads their terminal events as soon as the broker hands them out."""

    def __init__(self, settings: ConsumerSettings):
        self.settings = settings
        self._waiting: dict[str, asyncio.Future] = {}
        # request id -> wall-clock seconds: when it was published, when each event was made (created_at)
        self.published: dict[str, float] = {}
        self.made: dict[str, dict[str, float]] = {}
        self.read_at = 0.0  # wall clock: when the latest roundtrip's terminal event was read

    async def __aenter__(self) -> _Client:
        self.producer = make_producer(self.settings, linger_ms=0)
        await self.producer.start()
        self.reader = make_consumer(self.settings, group=None, fetch_max_wait_ms=5)
        await self.reader.start()
        topic = self.settings.topics.events
        tps = [TopicPartition(topic, p) for p in self.reader.partitions_for_topic(topic) or range(4)]
        self.reader.assign(tps)
        await self.reader.seek_to_beginning(*tps)
        self._pump = asyncio.create_task(self._read())
        return self

    async def __aexit__(self, *exc) -> None:
        self._pump.cancel()
        await asyncio.gather(self._pump, return_exceptions=True)
        await self.reader.stop()
        await self.producer.stop()

    async def _read(self) -> None:
        while True:
            for records in (await self.reader.getmany(timeout_ms=100)).values():
                now = time.perf_counter()
                for r in records:
                    event = decode(r.value, JobEvent, r.headers)
                    self.made.setdefault(event.request_id, {}).setdefault(event.kind.value, event.created_at.timestamp())
                    fut = self._waiting.get(event.request_id)
                    if event.kind.terminal and fut is not None and not fut.done():
                        fut.set_result((event, now))

    async def submit(self, req: GenerateRequest) -> tuple[float, asyncio.Future]:
        fut = self._waiting[req.request_id] = asyncio.get_running_loop().create_future()
        value, headers = encode(req)
        self.published[req.request_id] = time.time()
        t0 = time.perf_counter()
        await self.producer.send_and_wait(self.settings.topics.generate, value, key=req.request_id.encode(), headers=headers)
        return t0, fut

    async def roundtrip(self, req: GenerateRequest) -> float:
        t0, fut = await self.submit(req)
        event, t1 = await asyncio.wait_for(fut, 120)
        if event.kind.value != "succeeded":
            raise RuntimeError(f"bench request ended {event.kind.value}: {event.message}")
        self.read_at = self.published[req.request_id] + (t1 - t0)  # wall clock, from the monotonic latency
        return t1 - t0

    def timeline(self, request_id: str) -> tuple[float, float, float] | None:
        """Seconds from publish to the started event's creation, from it to the succeeded event's creation, and
        from that to the read (after the latest `roundtrip` of this request); None without a started event."""
        made = self.made.get(request_id, {})
        if "started" not in made or "succeeded" not in made:
            return None
        published = self.published[request_id]
        return made["started"] - published, made["succeeded"] - made["started"], self.read_at - made["succeeded"]


@asynccontextmanager
async def _worker(settings: ConsumerSettings, engine, image_policy) -> AsyncIterator:
    from consumer.worker import Worker

    await ensure_topics(settings, partitions=4)
    worker = Worker(settings, engine, image_policy=image_policy)
    ready = asyncio.Event()
    task = asyncio.create_task(worker.run(ready.set))
    waiter = asyncio.create_task(ready.wait())
    await asyncio.wait({task, waiter}, return_when=asyncio.FIRST_COMPLETED)
    waiter.cancel()
    if task.done():
        task.result()
    try:
        async with _Client(settings) as client:
            # The first request also waits for the group to assign partitions: not part of any figure.
            await client.roundtrip(_request(0, 64, 1, "warm-up"))
            yield worker, client
    finally:
        worker.stop()
        await task


@asynccontextmanager
async def _private_redis(workdir: Path) -> AsyncIterator[str | None]:
    """SKILL_REDIS_URL when set; else a throwaway redis-server if one is installed; else None (no L2 row)."""
    if os.environ.get("SKILL_REDIS_URL"):
        yield os.environ["SKILL_REDIS_URL"]
        return
    binary = shutil.which("redis-server")
    if binary is None:
        yield None
        return
    from skillgen.tools.embedded import free_port, wait_for_port

    port = free_port()
    proc = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                             "--dir", str(workdir)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_port(port, proc)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        proc.terminate()
        proc.wait(5)


def _request(i: int, size: int, steps: int, tag: str) -> GenerateRequest:
    return GenerateRequest(origin=ORIGIN, prompt=f"a juggler's cascade, pattern {tag}-{i}", width=size, height=size,
                           steps=steps, seed=i)


async def run_bench(quick: bool, model: str, device: str, size: int, steps: int, workdir: Path) -> ConsumerBench:
    from skillgen.inference import load_engine
    from skillgen.inference.engine import BatchSpec, Sample
    from skillgen.safety import ImagePolicy
    from skillgen.tools.embedded import EmbeddedBroker

    load = 16 if quick else 32
    sequential = 15 if quick else 40
    hits = 50 if quick else 200
    engine = _Timed(await asyncio.to_thread(load_engine, model, "torch", device, "fp32"), "generate")
    policy = _Timed(await asyncio.to_thread(ImagePolicy), "check")
    for n in BATCH_SIZES:  # first calls at each batch size pay one-off costs (allocator, kernel choice)
        warm = [Sample("warm-up", "", i) for i in range(n)]
        await asyncio.to_thread(engine.inner.generate, BatchSpec(size, size, steps), warm)
    run_id = uuid.uuid4().hex[:6]
    with EmbeddedBroker() as bootstrap:
        async with _private_redis(workdir) as redis_url:

            def settings(phase: str, **kw) -> ConsumerSettings:
                return ConsumerSettings(
                    kafka_bootstrap=bootstrap, kafka_idempotence=False, topic_prefix=f"bench-{run_id}-{phase}.",
                    redis_url=redis_url, redis_prefix=f"bench-{run_id}-{phase}:", blob_url=f"file://{workdir}/blobs",
                    model=model, device=device, precision="fp32", metrics_port=0, **FAST_GROUP, **kw,
                )

            rows = []
            for max_batch in BATCH_SIZES:
                async with _worker(settings(f"b{max_batch}", max_batch=max_batch), engine, policy) as (worker, client):
                    t0 = time.perf_counter()
                    futs = [await client.submit(_request(i, size, steps, f"b{max_batch}")) for i in range(load)]
                    await asyncio.gather(*(asyncio.wait_for(f, 300) for _, f in futs))
                    seconds = time.perf_counter() - t0
                    batches = int(worker.metrics.registry.get_sample_value("skill_batch_size_count") or 0) - 1
                rows.append(ThroughputRow(max_batch=max_batch, requests=load, seconds=round(seconds, 3),
                                          images_per_s=round(load / seconds, 3), batches=batches))
                print(f"  max_batch {max_batch}: {rows[-1].images_per_s:.2f} images/s ({batches} batches)", flush=True)

            latency, gen_s, check_s, parts = [], [], [], []
            async with _worker(settings("seq", max_batch=1), engine, policy) as (_, client):
                for i in range(sequential):
                    engine.seconds.clear()
                    policy.seconds.clear()
                    req = _request(i, size, steps, "seq")
                    latency.append(await client.roundtrip(req))
                    gen_s.append(sum(engine.seconds))
                    check_s.append(sum(policy.seconds))
                    if (line := client.timeline(req.request_id)) is not None:
                        pickup, between, delivery = line
                        parts.append((pickup, between - gen_s[-1] - check_s[-1], delivery))
                repeat = _request(0, size, steps, "seq")
                l1 = [await client.roundtrip(repeat.model_copy(update={"request_id": uuid.uuid4().hex})) for _ in range(hits)]
            l2 = None
            if redis_url:
                async with _worker(settings("l2", max_batch=1, l1_max_bytes=0), engine, policy) as (_, client):
                    first = _request(0, size, steps, "l2")
                    await client.roundtrip(first)
                    l2 = [await client.roundtrip(first.model_copy(update={"request_id": uuid.uuid4().hex})) for _ in range(hits)]

    overhead = [lat - g for lat, g in zip(latency, gen_s)]
    notes = [
        "latencies are client-side: publish -> terminal event read back, Kafka (embedded Tansu) both ways",
        f"fetch_max_wait_ms {ConsumerSettings.model_fields['fetch_max_wait_ms'].default} on the consumer, 5 on the "
        "reader: Tansu answers a fetch only when that wait runs out",
    ]
    if redis_url is None:
        notes.append("no Redis at hand: no L2 row")
    return ConsumerBench(
        machine=f"{platform.machine()} {os.cpu_count()} cpus, {platform.platform(terse=True)}",
        model=model, device=str(engine.inner.backend.device), width=size, height=size, steps=steps, quick=quick,
        throughput=rows,
        overhead_ms=Stats.of(overhead),
        overhead_without_safety_ms=Stats.of([o - c for o, c in zip(overhead, check_s)]),
        overhead_parts_ms={name: Stats.of([p[k] for p in parts]) for k, name in enumerate(PARTS)} if parts else {},
        safety_check_ms=Stats.of(check_s),
        pipeline_ms=Stats.of(gen_s),
        cache_hit_l1_ms=Stats.of(l1),
        cache_hit_l2_ms=Stats.of(l2) if l2 else None,
        notes=notes,
    )


def format_report(r: ConsumerBench) -> str:
    def line(name: str, s: Stats | None, target: str = "") -> str:
        if s is None:
            return f"{name:<34} -"
        return f"{name:<34} p50 {s.p50_ms:8.2f} ms   p99 {s.p99_ms:8.2f} ms   (n={s.n}){target}"

    out = [f"model {r.model} on {r.device}, {r.width}x{r.height}, {r.steps} steps", "",
           "max_batch  requests  seconds  images/s  batches"]
    out += [f"{t.max_batch:>9}  {t.requests:>8}  {t.seconds:7.2f}  {t.images_per_s:8.2f}  {t.batches:>7}" for t in r.throughput]
    out += [
        "",
        line("overhead (latency - generate)", r.overhead_ms, f"   target p50 <= {r.target_overhead_p50_ms:.0f} ms"),
        line("  of which image safety check", r.safety_check_ms),
        line("  overhead without safety check", r.overhead_without_safety_ms),
        *(line(f"    {name.replace('_', '-')}", r.overhead_parts_ms[name]) for name in PARTS if name in r.overhead_parts_ms),
        line("pipeline generate()", r.pipeline_ms),
        line("cache hit, L1", r.cache_hit_l1_ms, f"   target p99 <= {r.target_cache_hit_p99_ms:.0f} ms"),
        line("cache hit, L2 (Redis)", r.cache_hit_l2_ms),
    ]
    return "\n".join(out)


def add_arguments(parser) -> None:
    parser.add_argument("--quick", action="store_true", help="a smaller load and fewer samples (about a minute)")
    parser.add_argument("--json", type=Path, default=DEFAULT_JSON, help=f"where to write the results (default {DEFAULT_JSON})")
    parser.add_argument("--model", help="diffusers model directory (default: SKILL_MODEL or the embedded model)")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="default auto")
    parser.add_argument("--size", type=int, default=64, help="image side in pixels (default 64)")
    parser.add_argument("--steps", type=int, default=4, help="denoising steps (default 4)")


def run(args) -> int:
    model = args.model or ConsumerSettings().model
    if model == str(RANDOM_TINY_DIR) and not (RANDOM_TINY_DIR / "model_index.json").exists():
        from skillgen.tools.tiny import build_tiny

        build_tiny(RANDOM_TINY_DIR)
    with tempfile.TemporaryDirectory(prefix="skillgen-bench-consumer-") as tmp:
        report = asyncio.run(run_bench(args.quick, model, args.device, args.size, args.steps, Path(tmp)))
    print()
    print(format_report(report))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report.model_dump(mode="json"), indent=2) + "\n")
    print(f"\nresults written to {args.json}")
    return 0
