"""Fair scheduling, lanes, cancel, deadlines and the group view, on a real broker and a real Redis.

The consumer runs in this process; most tests use FakeEngine (flat images after a fixed delay per batch) so the
order the scheduler chooses is what is measured, and the cancel-while-running test uses the real tiny model."""

from __future__ import annotations

import asyncio
import io

import numpy as np
import pytest
from PIL import Image

from consumer.keys import image_seeds
from schemas.codec import encode
from schemas.messages import EventKind, GenerateCancel, GenerateRequest, Origin
from skillgen.inference.engine import BatchSpec, Sample
from skillgen.runtime import groupview
from skillgen.runtime.redis import RedisLink
from tests.harness import SIGNING_KEY
from tests.integration.test_consumer import (  # noqa: F401 - fixtures
    FakeEngine,
    Kafka,
    RecordingEngine,
    consumer_settings,
    engine,
    image_policy,
    running,
    sample,
    tiny_model,
)

pytestmark = pytest.mark.integration


def origin(team: str, user: str = "u1") -> Origin:
    return Origin(platform="console", team_id=team, channel_id="c1", user_id=user)


def req(team: str, i: int, user: str = "u1", **kw) -> GenerateRequest:
    fields = {"width": 64, "height": 64, "steps": 2, **kw}
    return GenerateRequest(origin=origin(team, user), prompt=f"{team} skill number {i}", **fields)


async def cancel(kafka: Kafka, request_id: str, who: Origin) -> None:
    msg = GenerateCancel(request_id=request_id, origin=who.sealed(request_id, SIGNING_KEY.encode()))
    value, headers = encode(msg)
    await kafka.producer.send_and_wait(kafka.topics.generate_cancel, value, key=request_id.encode(), headers=headers)


def finished_order(kafka: Kafka) -> list[str]:
    return [e.request_id for e in kafka.events if e.kind.terminal]


async def flood_then_quiet(model, image_policy, scheduling: str) -> tuple[int, int]:  # noqa: F811
    settings = consumer_settings(model, max_batch=1, max_wait_ms=0, scheduling=scheduling)
    async with Kafka(settings) as kafka, running(settings, FakeEngine(delay_s=0.03), image_policy=image_policy):
        flood = [await kafka.publish(req("flood", i), partition=i % 4) for i in range(60)]
        await kafka.wait_for(lambda k: any(e.kind == EventKind.started for e in k.events))
        quiet = await kafka.publish(req("quiet", 0), partition=0)
        rids = [r.request_id for r in flood] + [quiet.request_id]
        await kafka.wait_for(lambda k: k.all_final(rids))
    order = finished_order(kafka)
    return order.index(quiet.request_id), len(order)


async def test_a_quiet_team_is_served_next_under_a_flood_and_fifo_makes_it_wait(skill_env, tiny_model,  # noqa: F811
                                                                                   image_policy):  # noqa: F811
    fair_at, _ = await flood_then_quiet(tiny_model, image_policy, "fair")
    fifo_at, total = await flood_then_quiet(tiny_model, image_policy, "fifo")
    # Fair: it goes right after what the GPU holds (a few records already dispatched or in flight).
    assert fair_at <= 6, fair_at
    assert fifo_at >= 40, fifo_at  # FIFO: behind most of the flood


async def test_weights_share_the_gpu(skill_env, tiny_model, image_policy):  # noqa: F811
    settings = consumer_settings(tiny_model, max_batch=1, max_wait_ms=0, team_weights={"heavy": 2.0})
    async with Kafka(settings) as kafka, running(settings, FakeEngine(delay_s=0.02), image_policy=image_policy):
        # Published before the consumer has read anything: both teams' records are in its window together.
        reqs = []
        for i in range(45):
            reqs.append(await kafka.publish(req("heavy", i), partition=i % 4))
            reqs.append(await kafka.publish(req("light", i), partition=i % 4))
        await kafka.wait_for(lambda k: k.all_final([r.request_id for r in reqs]), timeout_s=90)
    team = {r.request_id: r.origin.team_id for r in reqs}
    # Skip the first few: the consumer starts before the window fills.
    middle = [team[rid] for rid in finished_order(kafka)[10:55]]
    share = middle.count("heavy") / len(middle)
    assert abs(share - 2 / 3) <= 0.1, share


async def test_a_team_past_its_fast_budget_runs_in_relax_and_events_say_so(skill_env, tiny_model, image_policy):  # noqa: F811
    cost = groupview.units(1, 64, 64, 2, 7.5)
    settings = consumer_settings(tiny_model, max_batch=1, max_wait_ms=0, fast_units_per_day=cost * 2.5)
    async with Kafka(settings) as kafka, running(settings, FakeEngine(), image_policy=image_policy):
        reqs = [await kafka.publish(req("budget", i), partition=0) for i in range(4)]
        asked_relax = await kafka.publish(req("other", 0, lane="relax"), partition=1)
        rids = [r.request_id for r in [*reqs, asked_relax]]
        await kafka.wait_for(lambda k: k.all_final(rids))
    lanes = [next(e.lane for e in kafka.of(r.request_id) if e.kind == EventKind.queued) for r in reqs]
    assert sorted(lanes) == ["fast", "fast", "relax", "relax"]  # (records are admitted concurrently)
    assert next(e.lane for e in kafka.of(asked_relax.request_id) if e.kind == EventKind.queued) == "relax"
    assert all(kafka.final(r).kind == EventKind.succeeded for r in rids)


async def test_queued_events_carry_a_position_and_an_eta_once_a_batch_is_timed(skill_env, tiny_model, image_policy):  # noqa: F811
    settings = consumer_settings(tiny_model, max_batch=1, max_wait_ms=0)
    # 0.4 s a batch: the six publishes below (tens of ms each) stay well ahead of the GPU loop draining them
    async with Kafka(settings) as kafka, running(settings, FakeEngine(delay_s=0.4), image_policy=image_policy):
        first = await kafka.publish(req("t1", 0), partition=0)
        await kafka.wait_for(lambda k: k.final(first.request_id) is not None)
        reqs = []
        for i in range(1, 7):  # each queued before the next is published: positions then follow publish order
            reqs.append(r := await kafka.publish(req("t1", i), partition=0))
            await kafka.wait_for(lambda k, rid=r.request_id: any(e.kind == EventKind.queued for e in k.of(rid)))
        await kafka.wait_for(lambda k: k.all_final([r.request_id for r in reqs]))
    queued = [next(e for e in kafka.of(r.request_id) if e.kind == EventKind.queued) for r in reqs]
    assert [e.queue_position for e in queued][-1] >= 3, [(e.queue_position, e.eta_s) for e in queued]  # the last waits behind several
    etas = [e.eta_s for e in queued]
    assert all(eta is not None and eta > 0 for eta in etas)
    assert etas[-1] > etas[1]  # later in the queue, later ready


async def test_cancel_of_a_queued_request_by_its_owner_only(skill_env, tiny_model, image_policy):  # noqa: F811
    settings = consumer_settings(tiny_model, max_batch=1, max_wait_ms=0)
    async with Kafka(settings) as kafka, running(settings, FakeEngine(delay_s=0.4), image_policy=image_policy) as w:
        busy = [await kafka.publish(req("t1", i), partition=0) for i in range(3)]
        victim = await kafka.publish(req("t1", 99, user="owner"), partition=0)
        await kafka.wait_for(lambda k: any(e.kind == EventKind.queued for e in k.of(victim.request_id)))
        await cancel(kafka, victim.request_id, origin("t1", "someone-else"))  # ignored
        await cancel(kafka, victim.request_id, origin("t1", "owner"))
        rids = [r.request_id for r in [*busy, victim]]
        await kafka.wait_for(lambda k: k.all_final(rids))
        await asyncio.sleep(0.5)
    final = kafka.final(victim.request_id)
    assert final.kind == EventKind.cancelled
    assert [e.kind for e in kafka.of(victim.request_id)].count(EventKind.succeeded) == 0
    assert all(kafka.final(r.request_id).kind == EventKind.succeeded for r in busy)
    assert sample(w, "skill_cancelled_total", where="queued") == 1


@pytest.mark.security
async def test_a_cancel_from_someone_else_or_unsealed_is_ignored(skill_env, tiny_model, image_policy):  # noqa: F811
    settings = consumer_settings(tiny_model, max_batch=1, max_wait_ms=0)
    async with Kafka(settings) as kafka, running(settings, FakeEngine(delay_s=0.3), image_policy=image_policy):
        first = await kafka.publish(req("t1", 0), partition=0)
        target = await kafka.publish(req("t1", 1, user="owner"), partition=0)
        await kafka.wait_for(lambda k: any(e.kind == EventKind.queued for e in k.of(target.request_id)))
        await cancel(kafka, target.request_id, origin("t1", "intruder"))
        unsealed = GenerateCancel(request_id=target.request_id, origin=origin("t1", "owner"))
        value, headers = encode(unsealed)
        await kafka.producer.send_and_wait(kafka.topics.generate_cancel, value, key=b"x", headers=headers)
        await kafka.wait_for(lambda k: k.all_final([first.request_id, target.request_id]))
    assert kafka.final(target.request_id).kind == EventKind.succeeded


async def test_a_cancel_sent_before_the_request_is_read_answers_it_cancelled(skill_env, tiny_model, image_policy):  # noqa: F811
    settings = consumer_settings(tiny_model, max_batch=1, max_wait_ms=0)
    async with Kafka(settings) as kafka:
        victim = req("t1", 5, user="owner")
        await cancel(kafka, victim.request_id, origin("t1", "owner"))  # before the consumer even runs
        await kafka.publish(victim, partition=2)
        async with running(settings, FakeEngine(), image_policy=image_policy):
            await kafka.wait_for(lambda k: k.final(victim.request_id) is not None)
    assert kafka.final(victim.request_id).kind == EventKind.cancelled


async def test_a_request_that_cannot_meet_its_deadline_is_refused_early(skill_env, tiny_model, image_policy):  # noqa: F811
    settings = consumer_settings(tiny_model, max_batch=1, max_wait_ms=0)
    async with Kafka(settings) as kafka, running(settings, FakeEngine(delay_s=0.15), image_policy=image_policy) as w:
        first = await kafka.publish(req("t1", 0), partition=0)
        await kafka.wait_for(lambda k: k.final(first.request_id) is not None)  # the speed is known now
        queue = [await kafka.publish(req("t1", i), partition=1) for i in range(1, 121)]
        await kafka.wait_for(lambda k: sum(e.kind == EventKind.queued for e in k.events) >= 60)
        hurried = await kafka.publish(req("t2", 0, deadline_s=10), partition=2)
        relaxed = await kafka.publish(req("t2", 1), partition=2)  # the fast lane's default: 30 min
        await kafka.wait_for(lambda k: k.all_final([hurried.request_id, relaxed.request_id]), timeout_s=90)
        refused = kafka.final(hurried.request_id)
        # Fair: t2's own request does not wait behind t1's queue, so even 10 s may be enough: the deadline
        # counts what is ahead of it under the schedule. Make t2 wait behind its own queue instead.
        assert refused.kind == EventKind.succeeded
        own = [await kafka.publish(req("t2", i), partition=2) for i in range(2, 122)]
        await kafka.wait_for(lambda k: sum(e.kind == EventKind.queued for e in k.events) >= 200, timeout_s=60)
        late = await kafka.publish(req("t2", 999, deadline_s=10), partition=3)
        await kafka.wait_for(lambda k: k.final(late.request_id) is not None, timeout_s=60)
        assert kafka.final(late.request_id).kind == EventKind.failed
        assert kafka.final(late.request_id).message.startswith("busy: ")
        assert "try again in about" in kafka.final(late.request_id).message
        assert sample(w, "skill_sched_refused_total", lane="fast") == 1
        w.stop()
    del queue, own


async def test_the_group_view_is_published_to_redis(skill_env, tiny_model, image_policy):  # noqa: F811
    settings = consumer_settings(tiny_model, max_batch=1, max_wait_ms=0, view_interval_s=0.2)
    link = RedisLink(settings.redis_url)
    try:
        async with Kafka(settings) as kafka, running(settings, FakeEngine(delay_s=0.2), image_policy=image_policy):
            first = await kafka.publish(req("t1", 0), partition=0)
            await kafka.wait_for(lambda k: k.final(first.request_id) is not None)
            for i in range(1, 30):
                await kafka.publish(req("t1", i), partition=i % 4)
            await kafka.wait_for(lambda k: sum(e.kind == EventKind.queued for e in k.events) >= 20)
            await asyncio.sleep(0.5)
            view = await groupview.read(link, settings.redis_prefix)
        assert view is not None and len(view.consumers) == 1
        assert view.consumers[0].s_per_unit is not None
        assert view.queued["fast/t1"].requests >= 5
        est = view.estimate("fast", "t2", groupview.units(1, 64, 64, 2, 7.5))
        assert est.position <= 1  # a new team goes (nearly) first under fair scheduling
        assert view.backlog_s is not None and view.backlog_s > 1.0
    finally:
        await link.close()


def psnr(a: Image.Image, b: Image.Image) -> float:
    x, y = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    mse = float(((x - y) ** 2).mean())
    return float("inf") if mse == 0 else 10 * np.log10(255**2 / mse)


async def test_cancel_of_a_running_sample_leaves_its_batch_mates_unchanged(skill_env, tiny_model, engine,  # noqa: F811
                                                                           image_policy):  # noqa: F811
    settings = consumer_settings(tiny_model, max_batch=2, max_wait_ms=2000, progress_interval_s=0)
    recording = RecordingEngine(engine)
    async with Kafka(settings) as kafka, running(settings, recording, image_policy=image_policy) as w:
        mate = await kafka.publish(req("t1", 1, steps=30), partition=0)
        victim = await kafka.publish(req("t1", 2, user="owner", steps=30), partition=0)
        await kafka.wait_for(lambda k: any(e.kind == EventKind.progress for e in k.of(victim.request_id)))
        await cancel(kafka, victim.request_id, origin("t1", "owner"))
        await kafka.wait_for(lambda k: k.all_final([mate.request_id, victim.request_id]))
        await asyncio.sleep(0.3)
    assert [n for n, _, _ in recording.batches] == [2]  # they ran together
    assert kafka.final(victim.request_id).kind == EventKind.cancelled
    done = kafka.final(mate.request_id)
    assert done.kind == EventKind.succeeded
    got = Image.open(io.BytesIO(w.blobs.get(done.blobs[0]))).convert("RGB")
    spec = BatchSpec(64, 64, 30)
    alone = engine.generate(spec, [Sample(mate.prompt, "", image_seeds(mate)[0])])[0]
    assert psnr(got, alone) >= 60
    assert sample(w, "skill_cancel_late_steps_count") == 1
    assert sample(w, "skill_cancel_late_steps_sum") <= 1  # at most the step in progress
    assert sample(w, "skill_cancelled_total", where="running") == 1


async def test_a_republish_under_live_load_keeps_live_latency_within_the_replay_lanes_share(  # issue 20
        skill_env, tiny_model, image_policy, tmp_path):  # noqa: F811
    """Yesterday's requests are republished after a model upgrade while people keep asking. Each request's wait in
    the GPU queue is read from its own events (queued -> started, both stamped by the consumer), so the test
    reader's pace does not count: a live request waits at most about the replay batch in progress, while the
    replay waits for seconds. Under FIFO each live request would wait behind the whole replay (15 s)."""
    import argparse
    import statistics

    from consumer.replay import Selection, main

    settings = consumer_settings(tiny_model, max_batch=1, max_wait_ms=0)
    fake = FakeEngine()
    batch_s, n = 0.05, 300  # the replay is 15 s of GPU work

    def waits(kafka: Kafka, rids) -> list[float]:
        out = []
        for rid in rids:
            events = kafka.of(rid)
            queued = next(e for e in events if e.kind == EventKind.queued)
            started = next(e for e in events if e.kind == EventKind.started)
            out.append((started.created_at - queued.created_at).total_seconds())
        return out

    async def live(kafka: Kafka, tag: str) -> list[str]:
        rids = []
        for i in range(8):
            r = await kafka.publish(GenerateRequest(origin=origin(tag), prompt=f"{tag} {i}", width=64, height=64,
                                                    steps=2), partition=i % 4)
            rids.append(r.request_id)
            await kafka.wait_for(lambda k: k.final(r.request_id) is not None)
            await asyncio.sleep(0.1)
        return rids

    async with Kafka(settings) as kafka:
        originals = []
        async with running(settings, FakeEngine(), image_policy=image_policy, model_id="model-v1"):
            for i in range(n):
                rid = f"orig{i:03d}"
                originals.append(await kafka.publish(GenerateRequest(
                    request_id=rid, origin=origin("old").sealed(rid, SIGNING_KEY.encode()), prompt=f"yesterday {i}",
                    width=64, height=64, steps=2), partition=i % 4))
            await kafka.wait_for(lambda k: k.all_final([r.request_id for r in originals]), timeout_s=120)
        # The model was upgraded (a new model id: every cache key changes): yesterday's requests are re-run.
        fake.delay_s = batch_s
        async with running(settings, fake, image_policy=image_policy, model_id="model-v2"):
            quiet = await live(kafka, "live-alone")
            ns = argparse.Namespace(mode="republish", sink=None, channel=None, deliver=False, force=False,
                                    reason=None, rate=None, max_attempts=3, json=True, report=tmp_path / "r.json")
            assert await main(settings, Selection(request_ids=frozenset(r.request_id for r in originals)), ns) == 0
            await kafka.wait_for(lambda k: sum(e.lane == "replay" for e in k.events if e.kind == EventKind.queued) >= 30)
            loaded = await live(kafka, "live-beside-replay")
            await kafka.wait_for(lambda k: len({e.request_id for e in k.events if e.replay_of and e.kind.terminal})
                                 == n, timeout_s=120)
    copies = {e.request_id for e in kafka.events if e.replay_of is not None}
    assert len(copies) == n and all(kafka.final(rid).kind == EventKind.succeeded for rid in copies)
    assert {e.lane for e in kafka.events if e.replay_of and e.kind == EventKind.queued} == {"replay"}
    alone, beside, replay = (statistics.median(waits(kafka, rids)) for rids in (quiet, loaded, copies))
    assert replay > 1.0, replay  # the replay really queued
    assert beside <= alone + 2 * batch_s + 0.1, (alone, beside)


async def test_a_light_teams_batch_preempts_a_flood_batch_between_steps_which_resumes_unchanged(  # noqa: F811
        skill_env, tiny_model, engine, image_policy):  # noqa: F811
    """The quiet request does not wait for the running flood batch to end: it runs between two of its denoising
    steps (nested in the same inference thread) and the flood batch resumes where it stopped, its images as if
    nothing had happened (≥60 dB against drawing them alone). With preemption off it waits for the batch."""
    settings = consumer_settings(tiny_model, max_batch=2, max_wait_ms=0, progress_interval_s=0)
    recording = RecordingEngine(engine)
    async with Kafka(settings) as kafka, running(settings, recording, image_policy=image_policy) as w:
        flood = [await kafka.publish(req("flood", i, steps=25), partition=0) for i in range(4)]
        await kafka.wait_for(lambda k: any(e.kind == EventKind.progress for e in k.of(flood[0].request_id)))
        quiet = await kafka.publish(req("quiet", 0, steps=25), partition=1)
        rids = [r.request_id for r in [*flood, quiet]]
        await kafka.wait_for(lambda k: k.all_final(rids), timeout_s=120)
    order = finished_order(kafka)
    assert order.index(quiet.request_id) < order.index(flood[0].request_id), order  # it was running already
    # A batch ran inside another's interval (RecordingEngine notes each generate call as it returns).
    spans = [(start, end) for _, start, end in recording.batches]
    assert any(o[0] < i[0] and i[1] < o[1] for o in spans for i in spans if o != i), spans
    assert sample(w, "skill_sched_preempted_total") >= 1
    for r in flood:
        got = Image.open(io.BytesIO(w.blobs.get(kafka.final(r.request_id).blobs[0]))).convert("RGB")
        alone = engine.generate(BatchSpec(64, 64, 25), [Sample(r.prompt, "", image_seeds(r)[0])])[0]
        assert psnr(got, alone) >= 60


async def test_after_the_warm_up_even_the_first_requests_queued_events_carry_an_eta(  # noqa: F811
        skill_env, tiny_model, engine, image_policy):  # noqa: F811
    """The warm-up (serve() turns it on) times a full batch and a lone image before the consumer joins the group,
    so a burst that arrives first is told an ETA from the cost model (consumer/speed.py), not none (nothing timed
    yet) nor a lone image's speed per unit."""
    settings = consumer_settings(tiny_model, max_batch=4, max_wait_ms=20)
    async with Kafka(settings) as kafka, running(settings, engine, image_policy=image_policy, warm_up=True) as w:
        assert w.gpu.speed.fit is not None and w.gpu.full_batch is not None  # timed before the first request
        reqs = [await kafka.publish(req("t1", i), partition=i % 4) for i in range(8)]
        rids = [r.request_id for r in reqs]
        await kafka.wait_for(lambda k: k.all_final(rids), timeout_s=120)
    etas = [next(e.eta_s for e in kafka.of(r) if e.kind == EventKind.queued) for r in rids]
    assert all(eta is not None and eta >= 0 for eta in etas), etas
    assert all(kafka.final(r).kind == EventKind.succeeded for r in rids)
