"""Faults that must not cost more than seconds: a consumer killed with -9 mid-stream, whose pictures in flight a
second consumer of the group takes over once its leases lapse; and a GPU call that hangs, whose leases stop
being renewed (so a peer draws the picture) while its /healthz turns 503 naming the stall."""

from __future__ import annotations

import asyncio
import re
import signal
import threading
import time

import aiohttp
import pytest
import redis

from consumer.keys import cache_key, model_identity
from schemas.messages import EventKind
from skillgen.runtime.redis import Lease, RedisLink, Store, WithoutRedis
from skillgen.runtime.settings import EMBEDDED_MODEL_DIR
from skillgen.safety import SafetySettings
from skillgen.safety.fingerprint import policy_fingerprint
from skillgen.tools.embedded import free_port
from tests.integration.test_consumer import (  # noqa: F401 - fixtures
    FakeEngine,
    Kafka,
    consumer_settings,
    image_policy,
    request,
    running,
)
from tests.integration.test_consumer_kill import consumer_process

pytestmark = pytest.mark.integration

ANSWERED_WITHIN_S = 15  # issue 14: every request answered within 15 s of a kill -9 (goal 10 s)


def assigned(log_text: str) -> set[int] | None:
    """The partitions a consumer process last said it was assigned (None before it said anything)."""
    lines = re.findall(r"consumer: assigned (.*)", log_text)
    return None if not lines else {int(p) for p in re.findall(r"\[(\d+)\]", lines[-1])}


async def until(condition, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.1)


def icon(i: int):
    """A request the embedded model is made for (64x64, dpmpp, 20 steps, guidance 2.5: models/skill-icons)."""
    colours = ("red", "orange", "yellow", "green", "blue", "purple", "pink")
    return request(f"a {colours[i % 7]} guitar skill icon on a {('light', 'dark')[i // 7 % 2]} background",
                   steps=20, guidance=2.5, scheduler="dpmpp", seed=i)


async def test_a_consumer_killed_mid_stream_has_all_its_requests_answered_within_seconds(skill_env, tmp_path):
    """kill -9 of a consumer holding leases on pictures in flight, with a second one already in the group: the
    group rebalances (session timeout), the leases lapse (SKILL_LEASE_TTL_S, at its default), and every request
    is answered within 15 s of the kill. On the old code (30 s leases) the last answer comes about 30 s after."""
    model = EMBEDDED_MODEL_DIR
    settings = consumer_settings(model)
    # One picture per batch: the doomed consumer still holds leases on what it has queued when it dies.
    doomed = consumer_process(skill_env, model, tmp_path / "doomed.log", SKILL_MAX_BATCH="1")
    survivor = consumer_process(skill_env, model, tmp_path / "survivor.log", SKILL_MAX_BATCH="1")
    model_id = model_identity(str(model), "torch", "fp32")
    policy_id = policy_fingerprint(SafetySettings())
    client = redis.Redis.from_url(settings.redis_url)

    def held(req) -> bool:
        return client.exists(f"{settings.redis_prefix}lease:{cache_key(req, model_id, None, policy_id)}") == 1

    doomed.start()
    survivor.start()
    try:
        async with Kafka(settings) as kafka:
            def split() -> bool:  # both in the group, the four partitions shared out between them
                a, b = assigned(doomed.log_tail(100_000)), assigned(survivor.log_tail(100_000))
                return bool(a and b and not a & b and len(a | b) == 4)

            await until(split, 120, "both consumers to share the partitions")
            mine, theirs = sorted(assigned(doomed.log_tail(100_000))), sorted(assigned(survivor.log_tail(100_000)))
            reqs = [await kafka.publish(icon(i), partition=mine[i % len(mine)]) for i in range(6)]
            reqs += [await kafka.publish(icon(6 + i), partition=theirs[i % len(theirs)]) for i in range(3)]
            doomed_reqs = reqs[:6]

            def mid_stream(k: Kafka) -> bool:
                return sum(k.final(r.request_id) is not None for r in doomed_reqs) >= 1

            await kafka.wait_for(mid_stream, timeout_s=120)
            in_flight = [r for r in doomed_reqs if kafka.final(r.request_id) is None and held(r)]
            doomed.proc.send_signal(signal.SIGKILL)
            killed_at = time.monotonic()
            assert doomed.proc.wait(10) == -signal.SIGKILL
            assert len(in_flight) >= 2, "the consumer should die holding leases on pictures it had not drawn"
            assert any(held(r) for r in in_flight), "a killed consumer cannot release its leases"

            await kafka.wait_for(lambda k: k.all_final([r.request_id for r in reqs]), timeout_s=90)
            last = max(kafka.arrived[kafka.events.index(kafka.final(r.request_id))] for r in reqs)
    finally:
        survivor.stop(timeout_s=30)
        doomed.stop()
        client.close()

    took_s = last - killed_at
    print(f"\nkill -9 to the last answer: {took_s:.1f}s ({len(in_flight)} leases held by the killed consumer)")
    assert all(kafka.final(r.request_id).kind == EventKind.succeeded for r in reqs), survivor.log_tail()
    assert took_s < ANSWERED_WITHIN_S, f"the last request was answered {took_s:.1f}s after the kill"


async def healthz(port: int) -> tuple[int, str]:
    async with aiohttp.ClientSession() as http, http.get(f"http://127.0.0.1:{port}/healthz") as resp:
        return resp.status, await resp.text()


class HangingEngine:
    """FakeEngine whose `generate` blocks (no step, no end) until `release` is set."""

    def __init__(self) -> None:
        self.inner = FakeEngine()
        self.backend = self.inner.backend
        self.entered = threading.Event()
        self.release = threading.Event()

    def generate(self, spec, samples, progress=None, cancelled=None):
        self.entered.set()
        self.release.wait(120)
        return self.inner.generate(spec, samples, progress)


async def test_a_hung_gpu_call_stops_renewing_its_lease_and_fails_health(skill_env, image_policy):  # noqa: F811
    """The hung consumer's lease lapses once its GPU has shown no progress for SKILL_GPU_STALL_S, so the peer
    that holds the same picture's second request draws it; the hung consumer's /healthz answers 503 with the
    stall. On the old code the lease is renewed forever: the peer's request is never answered (wait_for times
    out), and /healthz answers 200."""
    stall_s, port = 1.5, free_port()
    hung_settings = consumer_settings(EMBEDDED_MODEL_DIR, max_wait_ms=0, lease_ttl_s=0.6, lease_poll_ms=50, gpu_stall_s=stall_s,
                                      metrics_port=port, drain_timeout_s=1)
    peer_settings = consumer_settings(EMBEDDED_MODEL_DIR, max_wait_ms=0, lease_ttl_s=0.6, lease_poll_ms=50)
    hanging, peer_engine = HangingEngine(), FakeEngine()
    client = redis.Redis.from_url(hung_settings.redis_url)
    try:
        async with Kafka(hung_settings) as kafka, \
                running(hung_settings, hanging, image_policy=image_policy, model_id="fake") as hung, \
                running(peer_settings, peer_engine, image_policy=image_policy, model_id="fake") as peer:
            def split() -> bool:
                a, b = hung.service.consumer.assignment(), peer.service.consumer.assignment()
                return bool(a and b and not a & b and len(a | b) == 4)

            await until(split, 60, "both consumers to share the partitions")
            first = await kafka.publish(request("a tightrope walker's balance"),
                                        partition=min(tp.partition for tp in hung.service.consumer.assignment()))
            await until(hanging.entered.is_set, 30, "the hung consumer's GPU call")
            hung_at = time.monotonic()
            lease = f"{hung_settings.redis_prefix}lease:{cache_key(first, 'fake', None, hung.policy_id)}"
            assert client.exists(lease) == 1
            await asyncio.sleep(0.8)  # past the lease's own TTL: renewed while the stall limit is not reached
            assert client.exists(lease) == 1
            assert (await healthz(port))[0] == 200  # not stalled yet

            # The same picture asked for again, on a partition of the peer: it waits on the hung lease, then draws.
            second = await kafka.publish(request("a tightrope walker's balance"),
                                         partition=min(tp.partition for tp in peer.service.consumer.assignment()))
            await kafka.wait_for(lambda k: k.all_final([second.request_id]), timeout_s=20)
            took_over_after = time.monotonic() - hung_at
            status, detail = await healthz(port)
            assert not hung.gpu.progressing()
            hanging.release.set()  # let the hung call return, so the consumer stops cleanly
            await kafka.wait_for(lambda k: k.all_final([first.request_id]), timeout_s=20)
    finally:
        hanging.release.set()
        client.close()

    assert kafka.final(second.request_id).kind == EventKind.succeeded
    assert len(peer_engine.batches) == 1  # the peer drew it
    assert took_over_after > stall_s  # the lease was kept while the call was young
    assert status == 503 and "GPU stalled" in detail and "no progress" in detail, detail


@pytest.fixture
async def store(redis_server, namespace):
    made = Store(RedisLink(redis_server.url, decode_responses=True), namespace.redis_prefix)
    yield made
    await made.close()


async def test_a_lease_renews_only_while_its_work_progresses(store):
    progressing = [True]
    held = Lease(store, "job", 0.3, WithoutRedis.MEMORY)
    assert await held.acquire()
    held.keep_renewed(lambda: progressing[0])
    await asyncio.sleep(0.7)
    assert await store.ttl_s("job") is not None  # renewed past its TTL while progressing
    progressing[0] = False
    await asyncio.sleep(0.5)
    assert await store.ttl_s("job") is None  # stuck: not renewed, lapsed
    assert await Lease(store, "job", 5, WithoutRedis.MEMORY).acquire()  # another takes it over
    await held.release()
