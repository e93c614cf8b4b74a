"""`skillgen bench fairness`: fair scheduling, honest ETA and cancel (issue 17) on the real services.

Like `skillgen chaos` (bench/chaos.py, whose broker/Redis stack and event reader it reuses) it starts a real Tansu
broker and a real redis-server, and per scenario one real consumer process (`python -m skillgen.cli consumer`,
configured with SKILL_* variables only, the embedded model on the CPU, torch pinned to one thread) on a fresh topic
prefix. The benchmark plays the chat bots: it seals each request's origin with the test signing key and publishes
it, and reads every event from the events topic. Latencies are measured by this client (publish acknowledged ->
terminal event read), so they include Kafka both ways.

- calibration: a burst of requests from one team measures the consumer's throughput T (images/s), which sizes
  everything below; the same consumer then serves `unloaded`: the quiet team alone, one request every few
  seconds -> its p50 latency (the scheduling policy is moot with one team).
- flood (SKILL_SCHEDULING=fair) and flood_fifo (=fifo): another team publishes at 20 x T while the quiet team keeps
  its pace -> quiet_team_p50_ratio and fifo_quiet_team_p50_ratio (quiet p50 under the flood / unloaded p50).
  The flood is capped to fit the consumer's read-ahead window (SKILL_MAX_PENDING): no scheduler can put a record
  it has not read ahead of anything, and past that bound the bots' backpressure is what should refuse the work.
  A quiet request still unanswered when the scenario ends counts with its wait so far (a lower bound, marked).
  The full run repeats the pair, interleaved (fair, fifo, fair, fifo): the headline ratios are the medians.
- weights: two teams with SKILL_TEAM_WEIGHTS 2:1 both far behind (interleaved on publish, so FIFO would serve
  them 1:1) -> share_error: the largest relative error of a team's served share (succeeded events in the middle
  60 % of the run, both teams still backlogged) against 2/3 and 1/3.
- eta: three teams with 8 s of work queued up front, then at a steady 1.2 x T together, so requests really queue
  (whatever the neighbours' load did to the calibration) -> eta_p90_error: the 90th percentile of
  |eta_s in a request's first queued event - (its terminal event's created_at - that event's created_at)| / the
  latter (both times from the consumer's clock). A first queued event without an ETA counts as a miss (infinite).
- cancel: 30-step requests in batches of four; one of each batch is cancelled (GenerateCancel, sealed by its owner)
  as soon as its started (or first progress) event is read, and one request queued behind the batch as soon as its
  queued event is read -> cancel_steps: the largest bucket of the consumer's `skill_cancel_late_steps` histogram
  (denoising steps a cancelled sample ran after its cancel arrived) that holds an observation; it also checks
  that no cancelled request succeeded and that every batch-mate did.

Requests carry no deadline of their own: the fast lane's default (SKILL_LANE_DEADLINE_S, 30 min) is far past any
backlog here, so early refusal does not stand in for scheduling; refusals would show as `failed` in the outcomes.
Every consumer runs with its defaults (max_batch, the read-ahead window, ...) except what a scenario sets, and one
consumer process serves each scenario.

This module imports `bench.chaos` and `tests.harness`: it runs from a source checkout only.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import platform
import re
import shutil
import statistics
import sys
import tempfile
import time
import urllib.request
import uuid
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Self

from bench.chaos import (
    ASSIGNED_RE,
    ENVIRONMENT_OVERRIDES,
    PARTITIONS,
    EventTail,
    Stack,
    _code_version,
    resolve_model,
)
from bots.keys import partition_key
from consumer.settings import ConsumerSettings
from schemas.codec import encode
from schemas.messages import (
    EventKind,
    GenerateCancel,
    GenerateRequest,
    JobEvent,
    Origin,
    Platform,
)
from skillgen.runtime.kafka import make_producer
from skillgen.runtime.settings import REPO_ROOT, CommonSettings
from skillgen.tools.embedded import free_port
from tests.harness import SIGNING_KEY, Namespace, ServiceProcess, create_topics

DEFAULT_OUT = Path("bench/results/fairness.json")
SIZE_PX, STEPS, GUIDANCE = 64, 8, 2.5
CANCEL_STEPS = 30
THREADS = 1
MAX_BATCH = ConsumerSettings.model_fields["max_batch"].default  # the consumer's default: what every session runs
FLOOD_FACTOR = 20
# The read-ahead window (SKILL_MAX_PENDING): the consumer's default, for the FIFO rows as well.
WINDOW = ConsumerSettings.model_fields["max_pending"].default
WINDOW_SHARE = 0.9  # of the read-ahead window the flood may fill
ETA_LOAD = 1.2  # x throughput
ETA_HEAD_START_S = 8.0  # seconds of work queued before the steady arrivals begin
LONG_WAIT_S = 3.0  # the ETA error is also reported for waits at least this long (fixed overheads matter less)
WEIGHTS = {"2001": 2.0, "2002": 1.0}
QUIET, FLOOD = "1001", "1002"
ETA_TEAMS = ("3001", "3002", "3003")
CALIBRATION_TEAM, CANCEL_TEAM = "4001", "5001"
CHANNEL_ID, USER_ID = "900000000000000001", "800000000000000001"
GOALS = {"quiet_team_p50_ratio": 1.5, "share_error": 0.10, "eta_p90_error": 0.25, "cancel_steps": 1}
BATCH_RE = re.compile(r"batch of (\d+) images \((\d+) requests\) in ([0-9.]+)s")
LATE_STEPS = "skill_cancel_late_steps"
COLOURS = ("red", "blue", "green", "yellow", "purple", "orange")
SKILLS = ("football", "guitar", "violin", "drum", "chess", "climbing", "swimming")


# Where a request's latency goes, from its events' stamps: publish acknowledged -> queued event (read, routed,
# leased, queued), queued -> started (waiting for the GPU: the batching window, the running batch's next step),
# started -> terminal event made (the batch, then post-processing: image check, PNG, blob store),
# terminal event made -> read by this client (Kafka).
PHASES = ("admitted", "to_start", "run_and_post", "delivered")


class ScenarioError(RuntimeError):
    """A scenario could not be run as planned (the consumer did not start); its block says why."""


@dataclass(frozen=True)
class Profile:
    """How long each scenario runs; `quick` keeps the whole run under about three minutes."""

    calibration_batches: int
    unloaded_requests: int
    quiet_interval_s: float
    flood_measure_s: float
    grace_s: float
    weights_s: float
    eta_publish_s: float
    cancel_rounds: int
    flood_rounds: int  # flood and flood_fifo, interleaved

    @classmethod
    def of(cls, quick: bool) -> Profile:
        if quick:
            return cls(calibration_batches=3, unloaded_requests=5, quiet_interval_s=2.0, flood_measure_s=12.0,
                       grace_s=4.0, weights_s=14.0, eta_publish_s=10.0, cancel_rounds=2, flood_rounds=1)
        return cls(calibration_batches=8, unloaded_requests=12, quiet_interval_s=2.5, flood_measure_s=35.0,
                   grace_s=8.0, weights_s=90.0, eta_publish_s=45.0, cancel_rounds=4, flood_rounds=2)


# ------------------------------------------------------------------------------------------ pure arithmetic


def percentile(values: Iterable[float], q: float) -> float | None:
    """Nearest-rank percentile (q in [0, 1]); None for no values. An infinite value stays infinite."""
    ordered = sorted(values)
    if not ordered:
        return None
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


def censored_p50(samples: Sequence[tuple[float, bool]]) -> tuple[float | None, bool]:
    """p50 of (value, censored) samples, where a censored value is a lower bound (a wait cut short); returns
    (p50, whether the p50 is itself only a lower bound)."""
    p50 = percentile((v for v, _ in samples), 0.5)
    if p50 is None:
        return None, False
    return p50, any(c and v <= p50 for v, c in samples)


def runs(items: Iterable[str]) -> list[list]:
    """Run-length encoding: ["a", "a", "b"] -> [["a", 2], ["b", 1]]."""
    out: list[list] = []
    for item in items:
        if out and out[-1][0] == item:
            out[-1][1] += 1
        else:
            out.append([item, 1])
    return out


def shares(counts: dict[str, int]) -> dict[str, float]:
    total = sum(counts.values())
    return {k: (n / total if total else 0.0) for k, n in counts.items()}


def share_error(counts: dict[str, int], weights: dict[str, float]) -> float | None:
    """Largest relative error of each team's served share against its weight's share; None when nothing served."""
    if not sum(counts.get(t, 0) for t in weights):
        return None
    got = shares({t: counts.get(t, 0) for t in weights})
    total_w = sum(weights.values())
    return max(abs(got[t] - w / total_w) / (w / total_w) for t, w in weights.items())


def eta_error(eta_s: float | None, actual_s: float) -> float:
    """|ETA - actual| / actual; a missing ETA is an infinite error (nothing honest was shown)."""
    if eta_s is None or actual_s <= 0:
        return math.inf
    return abs(eta_s - actual_s) / actual_s


def parse_histogram(metrics_text: str, name: str) -> dict | None:
    """A Prometheus histogram from /metrics text: {"buckets": [(le, cumulative count)], "count", "sum"} (labels
    other than `le` summed); None when the metric is not there."""
    buckets: dict[float, float] = {}
    count = total = None
    for line in metrics_text.splitlines():
        if line.startswith("#") or not line.startswith(name):
            continue
        metric, _, value = line.rpartition(" ")
        if metric.startswith(f"{name}_bucket"):
            le = re.search(r'le="([^"]+)"', metric).group(1)
            bound = math.inf if le == "+Inf" else float(le)
            buckets[bound] = buckets.get(bound, 0.0) + float(value)
        elif metric.split("{")[0] == f"{name}_count":
            count = (count or 0.0) + float(value)
        elif metric.split("{")[0] == f"{name}_sum":
            total = (total or 0.0) + float(value)
    if count is None:
        return None
    return {"buckets": sorted(buckets.items()), "count": count, "sum": total}


def histogram_max(histogram: dict | None) -> float | None:
    """The smallest bucket bound that holds every observation (an upper bound of the largest); None when empty."""
    if not histogram or not histogram["count"]:
        return None
    return next(le for le, cumulative in histogram["buckets"] if cumulative >= histogram["count"])


def ratio_floor(full_s: float | None, alone_s: float | None, unloaded_s: float | None) -> float | None:
    """The quiet team's p50 ratio a perfect fair scheduler would get: under a flood the quiet request waits for
    half the running full batch (`full_s`) on average and then rides in a full batch; unloaded (`unloaded_s`) it
    rides alone (`alone_s`). Everything else (Kafka, events, post-processing) is taken as the same."""
    if not unloaded_s or alone_s is None or full_s is None:
        return None
    return round((1.5 * full_s + unloaded_s - alone_s) / unloaded_s, 2)


def met(result: dict) -> dict[str, bool]:
    """Each goal: met when measured and at or under its bound."""
    return {k: result.get(k) is not None and result[k] <= bound for k, bound in GOALS.items()}


def _round(value: float | None, digits: int) -> float | None:
    return None if value is None else round(value, digits)


def _finite(value: float | None) -> float | None:
    """JSON has no infinity: None instead (the block says why)."""
    return None if value is None or math.isinf(value) else value


def _fmt(value, digits: int = 2) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return "inf" if math.isinf(value) else f"{value:.{digits}f}"
    return str(value)


def format_table(result: dict) -> str:
    """The headline figures against the goals, then one line per scenario."""
    rows = [("figure", "measured", "goal", "met")]
    marks = result.get("met", {})
    for key, goal in GOALS.items():
        value = result.get(key)
        note = " (lower bound)" if result.get(f"{key}_is_lower_bound") else ""
        rows.append((key, _fmt(value) + note, f"<= {goal:g}", "yes" if marks.get(key) else "no"))
    fifo = result.get("fifo_quiet_team_p50_ratio")
    if fifo is not None or "fifo_quiet_team_p50_ratio" in result:
        note = " (lower bound)" if result.get("fifo_quiet_team_p50_ratio_is_lower_bound") else ""
        rows.append(("fifo_quiet_team_p50_ratio", _fmt(fifo) + note, "(comparison)", ""))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "-" * len(lines[0]))
    for name, block in result.get("scenarios", {}).items():
        lines.append(f"{name}: {block.get('error') or block.get('summary', '')}")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------ one consumer


class Session:
    """One scenario: a fresh namespace, one consumer process with the scheduling it needs, a producer, the event
    tail, and what was published when."""

    def __init__(self, stack: Stack, name: str, scheduling: str, extra_env: dict[str, str] | None = None):
        self.stack, self.name, self.scheduling = stack, name, scheduling
        self.ns = Namespace.new()
        self.topics = self.ns.topics
        self.tag = self.ns.topic_prefix[1:7]
        self.dir = stack.workdir / f"{name}-{self.tag}"
        self.dir.mkdir(parents=True)
        self.metrics_port = free_port()
        self.settings = CommonSettings(_env_file=None, kafka_bootstrap=stack.broker.bootstrap, kafka_idempotence=False,
                                       topic_prefix=self.ns.topic_prefix, redis_url=stack.redis.url,
                                       redis_prefix=self.ns.redis_prefix)
        self.extra_env = extra_env or {}
        self.consumer: ServiceProcess | None = None
        self.tail: EventTail | None = None
        self.producer = None
        self.count = 0
        self.sent_at: dict[str, float] = {}
        self.sent_wall: dict[str, float] = {}  # the same moment on the wall clock, which events are stamped with
        self.wall_offset = time.time() - time.monotonic()  # monotonic (when an event was read) -> wall clock
        self.team: dict[str, str] = {}
        self.requests: dict[str, GenerateRequest] = {}
        # the events, indexed as they are read
        self._indexed = 0
        self.kinds: dict[str, list[EventKind]] = {}
        self.first: dict[tuple[str, EventKind], tuple[float, JobEvent]] = {}
        self.terminal: dict[str, tuple[float, JobEvent]] = {}
        self.load_before = os.getloadavg()

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("SKILL_")}
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
        threads = str(THREADS)
        env.update({
            # the consumer sets no thread count of its own: torch's intra-op pool follows OMP_NUM_THREADS
            "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads,
            "SKILL_KAFKA_BOOTSTRAP": self.stack.broker.bootstrap,
            "SKILL_TOPIC_PREFIX": self.ns.topic_prefix,
            "SKILL_REDIS_URL": self.stack.redis.url,
            "SKILL_REDIS_PREFIX": self.ns.redis_prefix,
            "SKILL_BLOB_URL": (self.dir / "blobs").as_uri(),
            # one per run, shared by its scenarios' consumers: each later one starts as a restarted consumer would
            "SKILL_SPEED_MEMORY": str(self.stack.workdir / "speed.json"),
            "SKILL_SIGNING_KEY": SIGNING_KEY,
            "SKILL_ALLOWED_TEAMS": "*",
            "SKILL_LOG_FORMAT": "text",
            "SKILL_LOG_LEVEL": "INFO",
            "SKILL_METRICS_PORT": str(self.metrics_port),
            "SKILL_MODEL": self.stack.model, "SKILL_DEVICE": "cpu", "SKILL_PRECISION": "fp32",
            "SKILL_SCHEDULING": self.scheduling,
            **ENVIRONMENT_OVERRIDES,
            **self.extra_env,
        })
        return env

    async def __aenter__(self) -> Self:
        await create_topics(self.stack.broker.bootstrap, self.topics.all(), PARTITIONS)
        self.tail = EventTail(self.stack.broker.bootstrap, self.topics.events).start()
        self.producer = make_producer(self.settings, linger_ms=5)
        await self.producer.start()
        self.consumer = ServiceProcess([sys.executable, "-m", "skillgen.cli", "consumer"], self.dir / "consumer.log",
                                       env=self.env())
        self.consumer.start()
        await self._assigned()
        return self

    async def __aexit__(self, *exc) -> None:
        if self.consumer is not None and self.consumer.running():  # its backlog is of no interest: no drain
            self.consumer.proc.kill()
            await asyncio.to_thread(self.consumer.proc.wait)
        if self.producer is not None:
            await self.producer.stop()
        if self.tail is not None:
            await self.tail.stop()

    async def _assigned(self, timeout_s: float = 180) -> None:
        deadline = time.monotonic() + timeout_s
        topic = self.topics.generate
        while True:
            if not self.consumer.running():
                raise ScenarioError(f"the consumer exited with {self.consumer.proc.returncode} before it was "
                                    f"assigned {topic}:\n{self.consumer.log_tail(1500)}")
            try:
                lines = ASSIGNED_RE.findall(self.consumer.log_path.read_text(errors="replace"))
            except OSError:
                lines = []
            if lines and len(re.findall(re.escape(topic) + r"\[\d+\]", lines[-1])) == PARTITIONS:
                return
            if time.monotonic() > deadline:
                raise ScenarioError(f"the consumer was not assigned {topic} within {timeout_s:.0f}s")
            await asyncio.sleep(0.2)

    def alive(self) -> None:
        if not self.consumer.running():
            raise ScenarioError(f"the consumer exited with {self.consumer.proc.returncode}:\n"
                                f"{self.consumer.log_tail(1500)}")

    # -- requests --------------------------------------------------------------------------------------------
    def request(self, team: str, steps: int = STEPS) -> GenerateRequest:
        """A distinct request (its own seed: never a cache hit) from `team`, origin sealed as the bots do."""
        self.count += 1
        i = self.count
        rid = f"{self.tag}{i:06d}{uuid.uuid4().hex[:20]}"
        origin = Origin(platform=Platform.discord, team_id=team, channel_id=CHANNEL_ID, user_id=USER_ID)
        req = GenerateRequest(
            request_id=rid, origin=origin.sealed(rid, SIGNING_KEY.encode()),
            prompt=f"a {COLOURS[i % len(COLOURS)]} {SKILLS[i % len(SKILLS)]} skill icon on a light background",
            width=SIZE_PX, height=SIZE_PX, steps=steps, guidance=GUIDANCE, seed=i)
        self.team[rid] = team
        self.requests[rid] = req
        return req

    async def send(self, reqs: Sequence[GenerateRequest]) -> None:
        """Publish and wait for every acknowledgement; a request's publish time is its acknowledgement."""
        futures = []
        for req in reqs:
            value, headers = encode(req)
            futures.append((req.request_id, await self.producer.send(self.topics.generate, value,
                                                                     key=partition_key(req), headers=headers)))
        for rid, fut in futures:
            await fut
            self.sent_at[rid] = time.monotonic()
            self.sent_wall[rid] = time.time()

    async def cancel(self, rid: str) -> float:
        """The owner's cancel (origin sealed for the request id, as the bot does); when it was acknowledged."""
        owner = self.requests[rid].origin
        origin = Origin(platform=owner.platform, team_id=owner.team_id, channel_id=owner.channel_id,
                        user_id=owner.user_id).sealed(rid, SIGNING_KEY.encode())
        value, headers = encode(GenerateCancel(request_id=rid, origin=origin))
        await self.producer.send_and_wait(self.topics.generate_cancel, value, key=rid.encode(), headers=headers)
        return time.monotonic()

    async def paced(self, teams: Sequence[str], rate: float, duration_s: float, tick_s: float = 0.05) -> int:
        """Publish at `rate` requests/s for `duration_s`, the teams in turn; how many were published."""
        t0, sent = time.monotonic(), 0
        while (elapsed := time.monotonic() - t0) < duration_s:
            due = int(rate * elapsed) + 1 - sent
            if due > 0:
                await self.send([self.request(teams[(sent + k) % len(teams)]) for k in range(due)])
                sent += due
            await asyncio.sleep(tick_s)
        return sent

    async def every(self, team: str, interval_s: float, count: int, after_s: float = 0.0) -> list[str]:
        """One request from `team` every `interval_s`, `count` times, the first after `after_s`."""
        t0, rids = time.monotonic() + after_s, []
        for k in range(count):
            await asyncio.sleep(max(0.0, t0 + k * interval_s - time.monotonic()))
            req = self.request(team)
            await self.send([req])
            rids.append(req.request_id)
        return rids

    # -- events ----------------------------------------------------------------------------------------------
    def index(self) -> None:
        events = self.tail.events
        for at, e in events[self._indexed:]:
            self.kinds.setdefault(e.request_id, []).append(e.kind)
            self.first.setdefault((e.request_id, e.kind), (at, e))
            if e.kind.terminal:
                self.terminal.setdefault(e.request_id, (at, e))
        self._indexed = len(events)

    async def until(self, done: Callable[[], bool], timeout_s: float, poll_s: float = 0.05) -> bool:
        deadline = time.monotonic() + timeout_s
        while True:
            self.index()
            if done():
                return True
            self.alive()
            if time.monotonic() > deadline:
                return False
            await asyncio.sleep(poll_s)

    async def answered(self, rids: Iterable[str], timeout_s: float) -> bool:
        rids = list(rids)
        return await self.until(lambda: all(r in self.terminal for r in rids), timeout_s)

    def latency(self, rid: str, now: float) -> tuple[float, bool]:
        """Publish -> terminal event read (seconds), or the wait so far and True when it has none yet."""
        if rid in self.terminal:
            return self.terminal[rid][0] - self.sent_at[rid], False
        return now - self.sent_at[rid], True

    def phases(self, rids: Iterable[str]) -> dict[str, float | None]:
        """Where answered requests' time went, p50 of each phase in seconds (see PHASES), from the events'
        stamps (the consumer's clock, the same machine's as this client's)."""
        spans: dict[str, list[float]] = {name: [] for name in PHASES}
        for r in rids:
            queued, started = self.first.get((r, EventKind.queued)), self.first.get((r, EventKind.started))
            if queued is None or started is None or r not in self.terminal:
                continue
            read_at, end = self.terminal[r]
            q, st, t = (e.created_at.timestamp() for e in (queued[1], started[1], end))
            for name, value in zip(PHASES, (q - self.sent_wall[r], st - q, t - st,
                                            read_at + self.wall_offset - t)):
                spans[name].append(value)
        return {name: _round(percentile(v, 0.5), 3) for name, v in spans.items()}

    def outcome(self, rids: Iterable[str]) -> dict[str, int]:
        """Terminal kinds of `rids` (and `none`: no terminal event yet)."""
        out: dict[str, int] = {}
        for r in rids:
            kind = self.terminal[r][1].kind.value if r in self.terminal else "none"
            out[kind] = out.get(kind, 0) + 1
        return out

    def batches(self) -> dict[int, list[float]]:
        """Images per batch -> the seconds each such batch took, from the consumer's log."""
        out: dict[int, list[float]] = {}
        for images, _, seconds in BATCH_RE.findall(self.consumer.log_path.read_text(errors="replace")):
            out.setdefault(int(images), []).append(float(seconds))
        return out

    def metrics_text(self) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5) as resp:
            return resp.read().decode()

    async def warm_up(self) -> None:
        """One request through the whole service first, as a running consumer would be: torch's first call and
        the consumer's first timing are not what a scenario measures."""
        req = self.request(CALIBRATION_TEAM)
        await self.send([req])
        if not await self.answered([req.request_id], 120):
            raise ScenarioError("the warm-up request got no terminal event within 120 s")

    def close_block(self, block: dict) -> dict:
        block["load_avg_before"] = [round(x, 2) for x in self.load_before]
        block["load_avg_after"] = [round(x, 2) for x in os.getloadavg()]
        block["scheduling"] = self.scheduling
        block["log"] = str(self.consumer.log_path) if self.consumer else None
        if self.consumer is not None:
            text = self.consumer.log_path.read_text(errors="replace")
            block["consumer_log_warnings"] = len(re.findall(r" (?:WARNING|ERROR) ", text))
            block["consumer_redis_outages_logged"] = text.count("Redis unavailable")
            # consumer/speed.py SpeedMemory: what the consumers before it in this run saved (None: a cold start)
            prior = re.search(r"this host last ran ([0-9.]+)x slower", text)
            block["speed_prior"] = float(prior.group(1)) if prior else None
        return block


# ------------------------------------------------------------------------------------------ scenarios


@dataclass
class Context:
    """What scenarios share: the stack, the profile and the calibration."""

    stack: Stack
    profile: Profile
    throughput: float | None = None  # images/s
    unloaded_p50_s: float | None = None
    window: int = WINDOW
    batch_s: dict[int, float] = field(default_factory=dict)  # images -> median seconds


async def calibration(ctx: Context) -> dict:
    """Throughput from a burst of one team, then the quiet team alone (`unloaded`), on one consumer."""
    p = ctx.profile
    async with Session(ctx.stack, "calibration", "fair") as s:
        await s.warm_up()
        burst = [s.request(CALIBRATION_TEAM) for _ in range(MAX_BATCH * p.calibration_batches)]
        await s.send(burst)
        rids = [r.request_id for r in burst]
        if not await s.answered(rids, 180):
            raise ScenarioError(f"calibration: {s.outcome(rids)} of {len(rids)} after 180 s")
        first_start = min(s.first[(r, EventKind.started)][0] for r in rids if (r, EventKind.started) in s.first)
        last = max(s.terminal[r][0] for r in rids)
        ctx.throughput = len(rids) / (last - first_start)
        quiet = await s.every(QUIET, p.quiet_interval_s, p.unloaded_requests)
        await s.answered(quiet, 60)
        now = time.monotonic()
        samples = [s.latency(r, now) for r in quiet]
        ctx.unloaded_p50_s, _ = censored_p50(samples)
        ctx.batch_s = {n: statistics.median(v) for n, v in sorted(s.batches().items())}
        return s.close_block({
            "summary": f"throughput {ctx.throughput:.2f} images/s ({len(rids)} requests, batches of up to "
                       f"{MAX_BATCH}); unloaded quiet p50 {_fmt(ctx.unloaded_p50_s, 3)} s over {len(quiet)}",
            "throughput_images_per_s": round(ctx.throughput, 3),
            "burst_requests": len(rids),
            "unloaded_p50_s": ctx.unloaded_p50_s and round(ctx.unloaded_p50_s, 4),
            "unloaded_latencies_s": [round(v, 4) for v, _ in samples],
            "unloaded_outcome": s.outcome(quiet),
            "unloaded_phases_p50_s": s.phases(quiet),
            "batch_s_median_by_images": {str(n): round(v, 4) for n, v in ctx.batch_s.items()},
        })


async def flood(ctx: Context, scheduling: str, name: str) -> dict:
    """The quiet team at its pace while another team publishes at FLOOD_FACTOR x throughput."""
    p = ctx.profile
    rate = FLOOD_FACTOR * ctx.throughput
    flood_s = min(p.flood_measure_s, WINDOW_SHARE * ctx.window / rate)
    quiet_n = max(3, int(p.flood_measure_s / p.quiet_interval_s))
    async with Session(ctx.stack, name, scheduling) as s:
        await s.warm_up()
        t0 = time.monotonic()
        async def flood_until_published() -> tuple[int, float]:
            return await s.paced([FLOOD], rate, flood_s), time.monotonic()

        flooding = asyncio.create_task(flood_until_published())
        quiet = await s.every(QUIET, p.quiet_interval_s, quiet_n, after_s=min(1.0, flood_s / 2))
        flooded, published_at = await flooding
        await s.answered(quiet, max(0.0, p.flood_measure_s + p.grace_s - (time.monotonic() - t0)))
        now = time.monotonic()
        samples = [s.latency(r, now) for r in quiet]
        p50, lower = censored_p50(samples)
        ratio = p50 / ctx.unloaded_p50_s if p50 is not None and ctx.unloaded_p50_s else None
        # while the flood is still being published the consumer also reads (routes, leases, queues) hundreds of
        # records a second; after that, only the backlog is served
        after = [s.latency(r, now) for r in quiet if s.sent_at[r] >= published_at]
        after_p50, _ = censored_p50(after)
        flood_rids = [r for r, t in s.team.items() if t == FLOOD]
        served = s.outcome(flood_rids)
        positions = [s.first[(r, EventKind.queued)][1].queue_position for r in quiet
                     if (r, EventKind.queued) in s.first]
        # where the quiet team's time went: waiting for the GPU (publish -> started) and riding its batch
        wait = [s.first[(r, EventKind.started)][0] - s.sent_at[r] for r in quiet if (r, EventKind.started) in s.first]
        ride = [s.terminal[r][0] - s.first[(r, EventKind.started)][0] for r in quiet
                if (r, EventKind.started) in s.first and r in s.terminal]
        backlog_left = flooded - served.get("succeeded", 0)
        batch_s = {n: statistics.median(v) for n, v in sorted(s.batches().items())}
        return s.close_block({
            "summary": f"quiet p50 {_fmt(p50, 3)} s{' (lower bound)' if lower else ''} = {_fmt(ratio)} x unloaded; "
                       f"flood {flooded} requests in {flood_s:.1f}s ({rate:.0f}/s), {backlog_left} still queued "
                       f"at the end; quiet {s.outcome(quiet)}",
            "quiet_p50_s": p50 and round(p50, 4),
            "quiet_p50_is_lower_bound": lower,
            "ratio": ratio and round(ratio, 3),
            "quiet_latencies_s": [round(v, 3) for v, _ in samples],
            "quiet_censored": [c for _, c in samples],
            "quiet_outcome": s.outcome(quiet),
            "quiet_first_queue_positions": positions,
            "quiet_wait_to_start_p50_s": _round(percentile(wait, 0.5), 3),
            "quiet_start_to_terminal_p50_s": _round(percentile(ride, 0.5), 3),
            "quiet_phases_p50_s": s.phases(quiet),
            "quiet_sent_after_flood_published": len(after),
            "quiet_p50_after_flood_published_s": _round(after_p50, 4),
            "ratio_after_flood_published": _round(after_p50 and ctx.unloaded_p50_s and after_p50 / ctx.unloaded_p50_s,
                                                  3),
            "batch_s_median_by_images": {str(n): round(v, 3) for n, v in batch_s.items()},
            "ratio_floor_estimate": ratio_floor(batch_s.get(MAX_BATCH), ctx.batch_s.get(1), ctx.unloaded_p50_s),
            "flood_rate_per_s": round(rate, 1),
            "flood_published_s": round(flood_s, 2),
            "flood_requests": flooded,
            "flood_outcome": served,
            "flood_backlogged_to_the_end": backlog_left > 0,
            "measured_s": round(now - t0, 1),
        })


async def weights(ctx: Context) -> dict:
    """Two teams far behind, weights 2:1: each one's share of what was served while both stayed backlogged."""
    p = ctx.profile
    per_team = min(int(math.ceil(ctx.throughput * p.weights_s)), int(WINDOW_SHARE * ctx.window / 2))
    heavy, light = WEIGHTS
    env = {"SKILL_TEAM_WEIGHTS": json.dumps(WEIGHTS)}
    async with Session(ctx.stack, "weights", "fair", env) as s:
        await s.warm_up()
        reqs = [s.request(team) for _ in range(per_team) for team in (heavy, light)]  # interleaved: FIFO is 1:1
        await s.send(reqs)
        t0 = time.monotonic()
        rids = [r.request_id for r in reqs]
        await s.until(lambda: False, p.weights_s)  # (an alive check and the index, every poll)
        done = [(s.terminal[r][1].created_at.timestamp(), s.team[r]) for r in rids
                if r in s.terminal and s.terminal[r][1].kind == EventKind.succeeded]
        done.sort()
        if len(done) < 10:
            raise ScenarioError(f"weights: only {len(done)} succeeded in {p.weights_s:.0f}s")
        start, end = done[0][0], done[-1][0]
        lo, hi = start + 0.2 * (end - start), start + 0.8 * (end - start)
        # Shares count only while both were backlogged: the window ends before a team's last request is served.
        served = {t: [at for at, tm in done if tm == t] for t in WEIGHTS}
        exhausted = [max(ats) for ats in served.values() if len(ats) >= per_team]
        if exhausted:
            hi = min(hi, min(exhausted) - 1e-6)
        counts = {t: sum(1 for at, tm in done if lo <= at <= hi and tm == t) for t in WEIGHTS}
        served_by_hi = {t: sum(1 for at, tm in done if at <= hi and tm == t) for t in WEIGHTS}
        backlogged = all(served_by_hi[t] < per_team for t in WEIGHTS)
        err = share_error(counts, WEIGHTS)
        got = shares(counts)
        batches_in_window = sum(counts.values()) / MAX_BATCH
        # the order the GPU took them in (by started event): which teams each batch held
        started = sorted((s.first[(r, EventKind.started)][1].created_at, s.team[r]) for r in rids
                         if (r, EventKind.started) in s.first)
        return s.close_block({
            "summary": f"shares {', '.join(f'{t}: {got[t]:.3f} (w {w:g})' for t, w in WEIGHTS.items())} over "
                       f"{sum(counts.values())} images in {hi - lo:.1f}s -> error {_fmt(err, 3)}; both backlogged: "
                       f"{backlogged}",
            "share_error": err and round(err, 4),
            "weights": WEIGHTS,
            "window_counts": counts,
            "window_s": round(hi - lo, 2),
            "shares": {t: round(v, 4) for t, v in got.items()},
            "requests_per_team": per_team,
            "both_backlogged": backlogged,
            # shares move by whole batches: about one batch either way over the window
            "batches_in_window": round(batches_in_window, 1),
            "succeeded_in_run": len(done),
            "served_order_runs": runs(team for _, team in started)[:80],
            "measured_s": round(time.monotonic() - t0, 1),
        })


async def eta(ctx: Context) -> dict:
    """Three teams with a backlog to start with, then together at ETA_LOAD x throughput: the first queued event's
    ETA against what happened."""
    p = ctx.profile
    rate = ETA_LOAD * ctx.throughput
    async with Session(ctx.stack, "eta", "fair") as s:
        await s.warm_up()
        # The calibration's throughput is only as good as the neighbours' load was then: a head start of queued
        # work makes the requests really queue even if the consumer runs faster now.
        head = [s.request(ETA_TEAMS[k % len(ETA_TEAMS)]) for k in range(int(ETA_HEAD_START_S * ctx.throughput))]
        await s.send(head)
        published = len(head) + await s.paced(ETA_TEAMS, rate, p.eta_publish_s, tick_s=0.1)
        rids = [r for r, t in s.team.items() if t in ETA_TEAMS]
        backlog_s = published / ctx.throughput - p.eta_publish_s
        await s.answered(rids, max(20.0, 3 * backlog_s + 20))
        errors, signed, missing, rows, long_waits = [], [], 0, [], []
        head_ids, head_errors, steady_errors = {r.request_id for r in head}, [], []
        for r in rids:
            if (r, EventKind.queued) not in s.first or r not in s.terminal:
                continue
            q = s.first[(r, EventKind.queued)][1]
            actual = (s.terminal[r][1].created_at - q.created_at).total_seconds()
            e = eta_error(q.eta_s, actual)
            missing += q.eta_s is None
            errors.append(e)
            (head_errors if r in head_ids else steady_errors).append(e)
            if actual >= LONG_WAIT_S:
                long_waits.append(e)
            if q.eta_s is not None and actual > 0:
                signed.append((q.eta_s - actual) / actual)
            rows.append((q.eta_s, round(actual, 3), q.queue_position))
        p90 = percentile(errors, 0.9)
        p50 = percentile(errors, 0.5)
        finite = [e for e in errors if math.isfinite(e)]
        return s.close_block({
            "summary": f"{len(errors)} queued requests ({missing} without an ETA): error p50 {_fmt(p50)}, "
                       f"p90 {_fmt(p90)}; outcome {s.outcome(rids)}",
            "eta_p90_error": _finite(p90),
            "eta_p90_error_is_infinite": p90 is not None and math.isinf(p90),
            "eta_p50_error": _finite(p50),
            "finite_error_p90": percentile(finite, 0.9),
            f"error_p90_waits_over_{LONG_WAIT_S:g}s": _finite(percentile(long_waits, 0.9)),
            f"waits_over_{LONG_WAIT_S:g}s": len(long_waits),
            "head_start_requests": len(head),
            # queued before any batch of theirs was timed (the cold start), and the steady arrivals after them
            "head_start_error_p50_p90": [_round(_finite(percentile(head_errors, q)), 3) for q in (0.5, 0.9)],
            "steady_error_p50_p90": [_round(_finite(percentile(steady_errors, q)), 3) for q in (0.5, 0.9)],
            # below 0: the ETA promised sooner than it happened
            "signed_error_p10_p50_p90": [_round(percentile(signed, q), 3) for q in (0.1, 0.5, 0.9)],
            "requests": published,
            "judged": len(errors),
            "without_eta": missing,
            "no_queued_event": sum(1 for r in rids if (r, EventKind.queued) not in s.first),
            "arrival_per_s": round(rate, 2),
            "outcome": s.outcome(rids),
            "eta_actual_position_sample": rows[:: max(1, len(rows) // 25)],
        })


async def cancel(ctx: Context) -> dict:
    """Batches of four 30-step requests: one cancelled once running, one cancelled while queued behind them."""
    p = ctx.profile
    env = {"SKILL_PROGRESS_INTERVAL_S": "0.2"}
    running, queued, mates, cancelled_at = [], [], [], {}
    async with Session(ctx.stack, "cancel", "fair", env) as s:
        await s.warm_up()
        for round_ in range(p.cancel_rounds):
            batch = [s.request(CANCEL_TEAM, CANCEL_STEPS) for _ in range(4)]
            await s.send(batch)
            victim = batch[1].request_id
            trigger = EventKind.started if round_ % 2 == 0 else EventKind.progress
            if not await s.until(lambda: (victim, trigger) in s.first or victim in s.terminal, 60, poll_s=0.005):
                raise ScenarioError(f"cancel: no {trigger.value} event for a running request within 60 s")
            cancelled_at[victim] = await s.cancel(victim)
            late = s.request(CANCEL_TEAM, CANCEL_STEPS)
            await s.send([late])
            lid = late.request_id
            await s.until(lambda: (lid, EventKind.queued) in s.first or lid in s.terminal, 30, poll_s=0.005)
            cancelled_at[lid] = await s.cancel(lid)
            running.append(victim)
            queued.append(lid)
            mates += [r.request_id for r in batch if r.request_id != victim]
            await s.answered([r.request_id for r in batch] + [lid], 120)
        await asyncio.sleep(1.0)  # the histogram is observed when the sample leaves its batch
        s.index()
        try:
            text = s.metrics_text()
        except OSError as exc:
            text = ""
            metrics_error = f"{type(exc).__name__}: {exc}"
        else:
            metrics_error = None
        hist = parse_histogram(text, LATE_STEPS)
        steps = histogram_max(hist)
        victims = running + queued
        succeeded_victims = [r for r in victims if EventKind.succeeded in s.kinds.get(r, [])]
        queued_started = [r for r in queued if EventKind.started in s.kinds.get(r, [])]
        cancel_latency = [s.terminal[r][0] - cancelled_at[r] for r in victims
                          if r in s.terminal and s.terminal[r][1].kind == EventKind.cancelled]
        return s.close_block({
            "summary": f"late steps (max bucket) {_fmt(steps)} over {hist and int(hist['count'])} observations; "
                       f"running victims {s.outcome(running)}, queued victims {s.outcome(queued)}, "
                       f"batch-mates {s.outcome(mates)}",
            "cancel_steps": steps,
            "histogram": hist and {"buckets": [[("+Inf" if math.isinf(le) else le), c] for le, c in hist["buckets"]],
                                   "count": hist["count"], "sum": hist["sum"]},
            "metrics_error": metrics_error,
            "running_cancelled": s.outcome(running),
            "queued_cancelled": s.outcome(queued),
            "batch_mates": s.outcome(mates),
            "cancelled_but_succeeded": len(succeeded_victims),
            "queued_victims_started": len(queued_started),
            # publish (acknowledged) -> cancelled event read, as the person sees it
            "cancel_to_terminal_s_p50_max": [_round(percentile(cancel_latency, q), 3) for q in (0.5, 1.0)],
            "steps": CANCEL_STEPS,
        })


# ------------------------------------------------------------------------------------------ the run

SCENARIOS = ("flood", "flood_fifo", "weights", "eta", "cancel")


def run_order(names: Sequence[str], flood_rounds: int) -> list[tuple[str, str]]:
    """(block name, scenario) in the order they run: the flood rows first, fair and FIFO interleaved round after
    round (`flood`, `flood_fifo`, `flood.2`, `flood_fifo.2`, ...), then the rest as given."""
    floods = [n for n in ("flood", "flood_fifo") if n in names]
    order = [(n if r == 1 else f"{n}.{r}", n) for r in range(1, flood_rounds + 1) for n in floods]
    return order + [(n, n) for n in names if n not in floods]


def rounds_of(blocks: dict[str, dict], scenario: str) -> list[dict]:
    return [b for name, b in blocks.items() if name.split(".")[0] == scenario]


def median_ratio(blocks: dict[str, dict], scenario: str) -> tuple[float | None, bool, list]:
    """The median over rounds of a flood row's ratio, whether any round's was only a lower bound, and each."""
    rounds = rounds_of(blocks, scenario)
    ratios = [b.get("ratio") for b in rounds]
    known = [r for r in ratios if r is not None]
    return (round(statistics.median(known), 3) if known else None,
            any(b.get("quiet_p50_is_lower_bound") for b in rounds), ratios)


def scheduler_present() -> bool:
    """Whether this checkout's consumer has the scheduling setting (before it lands, every row runs FIFO)."""
    return "scheduling" in ConsumerSettings.model_fields


async def run_all(stack: Stack, profile: Profile, names: Sequence[str], echo: Callable[[str], None]) -> dict:
    ctx = Context(stack, profile)
    blocks: dict[str, dict] = {}

    async def step(name: str, what: Callable[[], Awaitable[dict]]) -> None:
        echo(f"fairness: {name} ...")
        t0 = time.monotonic()
        try:
            blocks[name] = await what()
        except Exception as exc:  # noqa: BLE001 - one scenario's failure is its block, not the run's end
            blocks[name] = {"error": f"{type(exc).__name__}: {str(exc)[:1500]}"}
        blocks[name]["duration_s"] = round(time.monotonic() - t0, 1)
        echo(f"fairness: {name}: {blocks[name].get('error') or blocks[name].get('summary')} "
             f"({blocks[name]['duration_s']:.0f}s)")

    await step("calibration", lambda: calibration(ctx))
    if ctx.throughput is None:
        return {"scenarios": blocks, "window": ctx.window}
    table = {
        "flood": lambda name: flood(ctx, "fair", name),
        "flood_fifo": lambda name: flood(ctx, "fifo", name),
        "weights": lambda _: weights(ctx),
        "eta": lambda _: eta(ctx),
        "cancel": lambda _: cancel(ctx),
    }
    for name, scenario in run_order(names, profile.flood_rounds):
        await step(name, lambda: table[scenario](name))
    return {"scenarios": blocks, "window": ctx.window, "throughput": ctx.throughput,
            "unloaded_p50_s": ctx.unloaded_p50_s, "batch_s": ctx.batch_s}


def summarise(raw: dict, profile: Profile, quick: bool, model: str, load: tuple, landed: bool) -> dict:
    blocks = raw["scenarios"]
    get = lambda name, key: blocks.get(name, {}).get(key)  # noqa: E731
    fair, fair_lower, fair_rounds = median_ratio(blocks, "flood")
    fifo, fifo_lower, fifo_rounds = median_ratio(blocks, "flood_fifo")
    result = {
        "quiet_team_p50_ratio": fair,
        "quiet_team_p50_ratio_is_lower_bound": fair_lower,
        "quiet_team_p50_ratio_rounds": fair_rounds,
        "fifo_quiet_team_p50_ratio": fifo,
        "fifo_quiet_team_p50_ratio_is_lower_bound": fifo_lower,
        "fifo_quiet_team_p50_ratio_rounds": fifo_rounds,
        "share_error": get("weights", "share_error"),
        "eta_p90_error": get("eta", "eta_p90_error"),
        "cancel_steps": get("cancel", "cancel_steps"),
    }
    result["goals"] = GOALS
    result["met"] = met(result)
    batch_s = raw.get("batch_s") or {}
    unloaded = raw.get("unloaded_p50_s")
    result["quiet_ratio_floor_estimate"] = {
        "calibration_batches": ratio_floor(batch_s.get(MAX_BATCH), batch_s.get(1), unloaded),
        "flood_batches": [b.get("ratio_floor_estimate") for b in rounds_of(blocks, "flood")],
        "how": "a perfect fair scheduler with full batches: (1.5 x full batch s + unloaded p50 - "
               "batch-of-1 s) / unloaded p50 (half a running batch to wait on average, then a full batch to ride "
               "in, instead of riding alone)",
    }
    result.update({
        "scheduler": ("fair scheduler present (SKILL_SCHEDULING in consumer/settings.py)" if landed else
                      "FIFO ONLY: consumer/settings.py has no `scheduling` setting in this checkout, so every row "
                      "ran the old first-in-first-out consumer (SKILL_SCHEDULING, SKILL_TEAM_WEIGHTS ignored)"),
        "quick": quick,
        "consumers": 1,
        "threads": THREADS,
        "threads_how": "OMP_NUM_THREADS=MKL_NUM_THREADS=1 in the consumer's environment (it has no thread setting of "
                       "its own): one thread per torch op; its inference thread and its post-processing thread "
                       "(image check, PNG) can still use a core each",
        "machine": {"cpu_count": os.cpu_count(), "arch": platform.machine(), "platform": platform.platform(),
                    "python": platform.python_version()},
        "model": os.path.relpath(model, REPO_ROOT) if model.startswith(str(REPO_ROOT)) else model,
        "params": {
            "size_px": SIZE_PX, "steps": STEPS, "guidance": GUIDANCE, "cancel_steps": CANCEL_STEPS,
            "max_batch": MAX_BATCH, "read_ahead_window": raw.get("window"),
            "throughput_images_per_s": raw.get("throughput") and round(raw["throughput"], 3),
            "unloaded_p50_s": unloaded and round(unloaded, 4),
            "flood_factor": FLOOD_FACTOR, "flood_window_share": WINDOW_SHARE, "eta_load": ETA_LOAD,
            "team_weights": WEIGHTS, "profile": profile.__dict__,
            "broker": "Tansu (memory storage)", "redis": "redis-server", "overrides": ENVIRONMENT_OVERRIDES,
        },
        "load_avg": {"before": [round(x, 2) for x in load[0]], "after": [round(x, 2) for x in load[1]]},
        "git": _code_version(),
        "measured_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "scenarios": blocks,
    })
    return result


def add_arguments(parser) -> None:
    parser.description = __doc__.splitlines()[0].strip("`").replace("`", "")
    parser.add_argument("--quick", action="store_true", help="shorter scenarios: the whole run in about 3 minutes")
    parser.add_argument("--json", type=Path, default=DEFAULT_OUT, help=f"JSON results (default {DEFAULT_OUT})")
    parser.add_argument("--scenarios", default=",".join(SCENARIOS),
                        help=f"comma-separated, after the calibration (default: {','.join(SCENARIOS)})")
    parser.add_argument("--model", help="diffusers model directory (default: the embedded model)")
    parser.add_argument("--workdir", type=Path, help="keep the consumers' logs here (default: a temporary directory)")


def run(args) -> int:
    names = [n.strip() for n in args.scenarios.split(",") if n.strip()]
    unknown = [n for n in names if n not in SCENARIOS]
    if unknown:
        raise SystemExit(f"skillgen bench fairness: unknown scenario(s) {', '.join(unknown)}; "
                         f"known: {', '.join(SCENARIOS)}")
    profile = Profile.of(args.quick)
    model = resolve_model(args.model)
    landed = scheduler_present()
    if not landed:
        print("fairness: the consumer has no SKILL_SCHEDULING yet: every row runs FIFO (labelled in the JSON)")
    quiet = logging.getLogger("aiokafka")
    level = quiet.level
    quiet.setLevel(logging.CRITICAL)
    keep = args.workdir is not None
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="skillgen-fairness-"))
    workdir.mkdir(parents=True, exist_ok=True)
    stack = Stack(workdir, model)
    load_before = os.getloadavg()
    try:
        stack.start()
        raw = asyncio.run(run_all(stack, profile, names, print))
    finally:
        quiet.setLevel(level)
        stack.stop()
        if not keep:
            shutil.rmtree(workdir, ignore_errors=True)
    result = summarise(raw, profile, args.quick, model, (load_before, os.getloadavg()), landed)
    print()
    print(format_table(result))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2, ensure_ascii=False, default=str) + "\n")
    print(f"\nresults written to {args.json}")
    if keep:
        print(f"consumer logs in {workdir}")
    return 0


if __name__ == "__main__":
    import argparse

    _parser = argparse.ArgumentParser(prog="python -m bench.fairness")
    add_arguments(_parser)
    raise SystemExit(run(_parser.parse_args()))
