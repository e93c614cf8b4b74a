"""At-least-once across a crash: `skillgen consumer` is SIGKILLed after producing a terminal event and before
committing its offset; a restarted consumer redelivers, and a deduplicating reader sees one succeeded event
per request, none lost, the same picture every time."""

from __future__ import annotations

import asyncio
import signal
import sys
import time
from pathlib import Path

import pytest

from schemas.messages import EventKind
from tests.harness import FAST_GROUP, ServiceProcess
from tests.integration.test_consumer import (  # noqa: F401 - fixture
    Kafka,
    consumer_settings,
    request,
    tiny_model,
)

pytestmark = pytest.mark.integration

KILL_AFTER = 3


def consumer_process(skill_env, tiny_model, log_path, **extra: str) -> ServiceProcess:
    env = skill_env.environ() | {
        "SKILL_MODEL": str(tiny_model),
        "SKILL_DEVICE": "cpu",
        "SKILL_PRECISION": "fp32",
        "SKILL_MAX_WAIT_MS": "0",
        "SKILL_FETCH_MAX_WAIT_MS": "20",
        "SKILL_KAFKA_SESSION_TIMEOUT_MS": str(FAST_GROUP["session_timeout_ms"]),
        "SKILL_KAFKA_HEARTBEAT_INTERVAL_MS": str(FAST_GROUP["heartbeat_interval_ms"]),
        "SKILL_KAFKA_REBALANCE_TIMEOUT_MS": str(FAST_GROUP["rebalance_timeout_ms"]),
        # (the lease TTL is the default: tests/integration/test_takeover.py times a takeover with it)
        **extra,
    }
    return ServiceProcess([sys.executable, "-m", "skillgen.cli", "consumer"], log_path, env=env)


def doomed_consumer_process(skill_env, tiny_model, log_path, kill_after: int, **extra: str) -> ServiceProcess:
    """The real `skillgen consumer`, SIGKILLed by tests/fakes/kill_after_terminal.py right after its
    `kill_after`-th terminal event is produced and before that record's offset is committed."""
    process = consumer_process(skill_env, tiny_model, log_path, **extra)
    process.argv = [sys.executable, "-m", "tests.fakes.kill_after_terminal", str(kill_after), "consumer"]
    process.env = {**process.env, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    return process


async def wait_exit(process: ServiceProcess, timeout_s: float) -> int:
    deadline = time.monotonic() + timeout_s
    while process.proc.poll() is None:
        assert time.monotonic() < deadline, f"consumer still running after {timeout_s}s:\n{process.log_tail()}"
        await asyncio.sleep(0.1)
    return process.proc.returncode


async def test_a_consumer_killed_before_committing_loses_nothing_and_duplicates_nothing_visible(
    skill_env, tiny_model, tmp_path  # noqa: F811 - the fixture imported above
):
    settings = consumer_settings(tiny_model)
    async with Kafka(settings) as kafka:
        reqs = [await kafka.publish(request(f"a climber's crimp grip {i}"), partition=0) for i in range(6)]

        # the killed consumer's leases on the pictures it was drawing lapse after 2 s, and the next takes over
        doomed = doomed_consumer_process(skill_env, tiny_model, tmp_path / "first.log", KILL_AFTER,
                                         SKILL_LEASE_TTL_S="2")
        doomed.start()
        assert await wait_exit(doomed, 120) == -signal.SIGKILL, doomed.log_tail()
        assert "TEST HOOK: SIGKILL" in doomed.log_tail()
        await kafka.wait_for(lambda k: sum(k.final(r.request_id) is not None for r in reqs) >= KILL_AFTER)
        answered_before = {r.request_id for r in reqs if kafka.final(r.request_id)}

        survivor = consumer_process(skill_env, tiny_model, tmp_path / "second.log", SKILL_LEASE_TTL_S="2")
        survivor.start()
        try:
            await kafka.wait_for(lambda k: k.all_final([r.request_id for r in reqs]), timeout_s=120)
        finally:
            survivor.stop(timeout_s=30)
        assert survivor.proc.returncode == 0, survivor.log_tail()  # SIGTERM: drained, committed, left
        committed = await kafka.committed(0)

    for r in reqs:
        succeeded = [e for e in kafka.of(r.request_id) if e.kind == EventKind.succeeded]
        assert succeeded and all(e.kind != EventKind.failed for e in kafka.of(r.request_id))
        # a redelivered request is answered again, with the very same picture (from the shared cache)
        assert len({tuple(b.sha256 for b in e.blobs) for e in succeeded}) == 1
    redelivered = [r for r in reqs if sum(e.kind == EventKind.succeeded for e in kafka.of(r.request_id)) > 1]
    assert redelivered, "the killed consumer's last answered request should have been redelivered"
    assert {r.request_id for r in redelivered} <= answered_before
    assert all(
        e.cache_level == "l2"
        for r in redelivered
        for e in [e for e in kafka.of(r.request_id) if e.kind == EventKind.succeeded][1:]
    )
    assert committed == len(reqs)
