"""The consumer's cost model (consumer/speed.py) and its warm-up (consumer/engine.py): a batch takes
a x steps / 20 + b x units, fitted over batches of every size, so a lone image's timing predicts a full batch (and
the reverse) instead of being taken per unit as it is."""

from __future__ import annotations

import json
import time

import pytest

from consumer.engine import native_px
from consumer.speed import Fit, Pace, ServiceRatio, Slowdown, Speed, SpeedMemory, fit, live_ratio

pytestmark = pytest.mark.unit


def test_partial_and_full_batches_predict_each_other():
    speed = Speed()
    assert speed.fit is None and speed.batch_s(1.0, 20) is None
    for _ in range(3):  # 20 steps: a lone image 0.3 s, a batch of 8 1.0 s
        speed.observe(1.0, 20, 0.3)
        speed.observe(8.0, 20, 1.0)
    assert speed.fit.a == pytest.approx(0.2)
    assert speed.fit.b == pytest.approx(0.1)
    assert speed.batch_s(4.0, 20) == pytest.approx(0.6)  # a batch of 4, never timed
    # a deep queue is served in full batches: 1.0 s per 8 units, not a lone image's 0.3 s per unit
    assert speed.fit.s_per_unit(8.0, 20) == pytest.approx(1.0 / 8)


def test_the_fixed_cost_is_per_step_so_other_step_counts_are_predicted_too():
    speed = Speed()
    speed.observe(1.0, 20, 0.3)
    speed.observe(8.0, 20, 1.0)
    # 8 steps: the units count the steps already (0.4 x), and the fixed part is 0.4 x too
    assert speed.batch_s(0.4, 8) == pytest.approx(0.4 * 0.3)
    assert speed.batch_s(3.2, 8) == pytest.approx(0.4 * 1.0)
    speed.observe(0.4, 8, 0.12)  # a lone 8-step image as predicted: the same width class, the fit unchanged
    assert speed.fit.a == pytest.approx(0.2) and speed.fit.b == pytest.approx(0.1)


def test_with_two_step_counts_a_cost_per_batch_is_told_from_a_cost_per_step():
    speed = Speed()
    c, a, b = 0.1, 0.15, 0.1  # per batch, per 20 steps, per unit
    for units, steps in ((1.0, 20), (8.0, 20), (0.4, 8)):  # the warm-up's two batches, then a lone 8-step one
        speed.observe(units, steps, c + a * steps / 20 + b * units)
    assert (speed.fit.c, speed.fit.a, speed.fit.b) == pytest.approx((c, a, b))
    assert speed.batch_s(3.2, 8) == pytest.approx(0.1 + 0.06 + 0.32)  # a full 8-step batch, never timed
    assert speed.fit.s_per_unit(3.2, 8) == pytest.approx(0.48 / 3.2)


def test_one_size_only_is_proportional():
    speed = Speed()
    speed.observe(2.0, 20, 1.0)
    speed.observe(2.1, 20, 1.1)  # the same width class (within a quarter octave)
    assert speed.fit.a == 0.0
    assert speed.fit.b == pytest.approx(1.05 / 2.05)  # the class's median batch


def test_a_batch_slowed_by_a_neighbour_moves_the_fit_little():
    speed = Speed()
    for seconds in (1.0, 1.0, 1.0, 1.0, 9.0):
        speed.observe(8.0, 20, seconds)
    for _ in range(3):
        speed.observe(1.0, 20, 0.3)
    assert speed.batch_s(8.0, 20) == pytest.approx(1.0)
    assert speed.batch_s(1.0, 20) == pytest.approx(0.3)


def test_a_long_flood_of_full_batches_keeps_what_a_lone_image_costs_until_it_is_stale():
    speed = Speed(forget_after=50)
    speed.observe(1.0, 20, 0.3)
    for _ in range(40):
        speed.observe(8.0, 20, 1.0)
    assert speed.batch_s(1.0, 20) == pytest.approx(0.3)  # remembered though 40 full batches came after it
    for _ in range(20):
        speed.observe(8.0, 20, 1.0)
    assert speed.fit.a == 0.0  # 60 batches on: the lone image's class was dropped, only full batches are known
    assert speed.batch_s(8.0, 20) == pytest.approx(1.0)


def test_noise_that_makes_a_negative_fixed_cost_or_slope_falls_back_to_proportional():
    assert fit([(1.0, 1.0), (2.0, 0.5)]) == Fit(0.0, 0.625)  # bigger batch faster: the median s/unit
    assert fit([(1.0, 0.1), (2.0, 1.0)]).a == 0.0  # the line would cross zero below one unit
    assert fit([]) is None


def test_bad_timings_are_refused():
    with pytest.raises(ValueError, match="positive and finite"):
        Speed().observe(0.0, 20, 1.0)
    with pytest.raises(ValueError, match="positive and finite"):
        Speed().observe(1.0, 20, float("nan"))
    with pytest.raises(ValueError, match="positive and finite"):
        Speed().observe(1.0, 0, 1.0)


def test_the_warm_up_size_is_the_models_own(tmp_path):
    (tmp_path / "unet").mkdir()
    (tmp_path / "unet" / "config.json").write_text(json.dumps({"sample_size": 8}))
    assert native_px(str(tmp_path), 8) == 64
    assert native_px("runwayml/stable-diffusion-v1-5", 8) == 512  # a hub id: the common size
    (tmp_path / "unet" / "config.json").write_text("not json")
    assert native_px(str(tmp_path), 8) == 512


async def test_the_warm_up_times_a_full_batch_beside_post_processing_and_a_lone_image_at_two_step_counts(tmp_path):
    from PIL import Image

    from consumer.engine import warm_up
    from consumer.post import PostQueue
    from skillgen.safety.decision import Decision

    (tmp_path / "unet").mkdir()
    (tmp_path / "unet" / "config.json").write_text(json.dumps({"sample_size": 8}))
    calls, checked = [], []

    class Engine:
        class backend:  # noqa: N801
            vae_scale_factor = 8

        def generate(self, spec, samples):
            calls.append((spec.width, spec.steps, len(samples)))
            # a real batch's shape: 20 ms per batch, 30 ms per 20 steps, 10 ms per 20-step image
            time.sleep(0.02 + 0.03 * spec.steps / 20 + 0.01 * len(samples) * spec.steps / 20)
            return [Image.new("RGB", (spec.width, spec.height)) for _ in samples]

    class Policy:
        def check(self, images):
            checked.append(len(images))
            return [Decision(allowed=True) for _ in images]

    from concurrent.futures import ThreadPoolExecutor

    speed, post = Speed(), PostQueue()
    with ThreadPoolExecutor(1) as inference:
        try:
            full = await warm_up(Engine(), speed, str(tmp_path), 8, 1024 * 1024, inference, post, Policy())
        finally:
            post.shutdown()
    # the first two are not timed; then a full batch and a lone image at 20 steps and at FEW_STEPS
    assert calls == [(64, 20, 1), (64, 20, 8), (64, 20, 8), (64, 20, 1), (64, 4, 8), (64, 4, 1)]
    # each timed full batch beside the previous full batch's images, post-processed one at a time
    assert checked == [1] * 16
    assert post.run_s > 0
    assert full == pytest.approx(8 * (64 * 64 / (512 * 512)))
    # two step counts: the cost per batch is told from the cost per step (sleep's overshoot aside)
    assert speed.fit.c == pytest.approx(0.02, abs=0.01)
    unit = 64 * 64 / (512 * 512)
    assert speed.batch_s(8 * unit * 8 / 20, 8) == pytest.approx(0.02 + 0.03 * 0.4 + 0.01 * 8 * 0.4, rel=0.25)


def test_the_delivered_pace_counts_only_while_work_waited():
    now = [0.0]
    pace = Pace(window=4, clock=lambda: now[0])
    for _ in range(2):
        now[0] += 1.0
        pace.done(0.5, backlogged=True)
    assert pace.s_per_unit() == pytest.approx(1.0 / 0.5)  # half a window: 1 s between two 0.5-unit flights
    now[0] += 30.0
    pace.done(0.5, backlogged=False)  # the queue had emptied: the 30 s idle gap says nothing of its pace
    assert pace.s_per_unit() is None
    for _ in range(3):
        now[0] += 0.25
        pace.done(0.5, backlogged=True)
    assert pace.s_per_unit() == pytest.approx(0.25 / 0.5)


def test_the_slowdown_is_the_median_of_the_last_batches_and_the_running_one_against_the_model_of_now():
    model = Fit(a=0.2, b=0.1)  # a batch of 1 unit at 20 steps: 0.3 s
    slow = Slowdown(keep=3)
    assert slow.factor(model) == 1.0 and slow.factor(None) == 1.0  # nothing timed yet: the model as it is
    slow.observe(1.0, 20, 0.42)
    assert slow.factor(model) == pytest.approx(1.4)
    slow.observe(1.0, 20, 0.45)
    slow.observe(2.0, 20, 0.6)  # 0.4 s predicted
    assert slow.factor(model) == pytest.approx(1.5)  # median of 1.4, 1.5, 1.5
    # the model took those batches in: judged against it, they are no slowdown any more (nothing counted twice)
    caught_up = Fit(a=0.3, b=0.15)
    assert slow.factor(caught_up) == pytest.approx(1.0)
    assert slow.factor(caught_up, live=2.0) == pytest.approx(1.0)  # one slow running batch among three: an outlier
    slow.observe(0.0, 20, 1.0)  # nothing to judge
    slow.observe(1.0, 20, 0.0)
    assert slow.factor(caught_up) == pytest.approx(1.0)
    assert Slowdown(bounds=(0.5, 2.0)).factor(model, live=10.0) == 2.0  # bounded both ways
    assert Slowdown(bounds=(0.5, 2.0)).factor(model, live=0.01) == 0.5


def test_a_fresh_consumer_learns_the_slowdown_from_its_first_running_batch():
    # a batch predicted at 0.4 s, 3 of 8 steps done after 0.21 s: running 1.4x the model
    assert live_ratio(0.21, 0.4, 3, 8) == pytest.approx(1.4)
    assert Slowdown().factor(None, live=live_ratio(0.21, 0.4, 3, 8)) == pytest.approx(1.4)
    assert live_ratio(0.05, 0.4, 0, 8) is None  # before the first step: text encoding is no measure
    assert live_ratio(0.05, None, 2, 8) is None


def test_the_slowdowns_prior_speaks_until_batches_are_timed():
    model = Fit(a=0.2, b=0.1)
    slow = Slowdown(keep=3)
    slow.prior = 1.4
    assert slow.factor(model) == pytest.approx(1.4)
    assert slow.factor(model, live=1.0) == pytest.approx(1.4)  # three places of the prior against one running batch
    slow.observe(1.0, 20, 0.3)  # as the model says
    slow.observe(1.0, 20, 0.3)
    assert slow.factor(model) == pytest.approx(1.0)  # two timed batches against one place left to the prior
    slow.observe(1.0, 20, 0.3)
    assert slow.factor(model, live=1.3) == pytest.approx(1.0)  # the prior is gone after `keep` batches


def test_the_service_ratio_is_against_the_warm_ups_model_and_needs_a_few_batches():
    ratio = ServiceRatio(Fit(a=0.2, b=0.1), least=3)
    ratio.observe(1.0, 20, 0.42)
    ratio.observe(1.0, 20, 0.45)
    assert ratio.value() is None
    ratio.observe(2.0, 20, 0.52)
    assert ratio.value() == pytest.approx(1.4) and ratio.seen == 3


def test_speed_memory_round_trip_and_what_it_ignores(tmp_path):
    now = [1_000_000.0]
    path = tmp_path / "state" / "speed.json"
    memory = SpeedMemory(path, max_age_s=100, clock=lambda: now[0])
    assert memory.load("m|torch") is None  # no file yet
    memory.save("m|torch", 1.37)
    memory.save("m|onnx", 1.1)
    assert memory.load("m|torch") == pytest.approx(1.37) and memory.load("m|onnx") == pytest.approx(1.1)
    assert [p.name for p in path.parent.iterdir()] == ["speed.json"]  # written by rename, nothing left behind
    now[0] += 101
    assert memory.load("m|torch") is None  # too old to speak for this host now
    memory.save("m|torch", 5.0)
    assert memory.load("m|torch") is None  # outside (1/3, 3): not a slowdown to trust
    path.write_text("{not json")
    assert memory.load("m|torch") is None
    memory.save("m|torch", 1.2)  # a file that cannot be parsed is rewritten
    assert memory.load("m|torch") == pytest.approx(1.2)
    path.write_text(json.dumps({"m|torch": {"ratio": "fast", "at": now[0]}, "x": [1]}))
    assert memory.load("m|torch") is None and memory.load("x") is None


async def test_a_restarted_consumer_starts_from_the_slowdown_its_host_saw_in_service(tmp_path):
    from PIL import Image

    from consumer.gpu import GpuLoop
    from consumer.metrics import ConsumerMetrics
    from consumer.settings import ConsumerSettings

    class Engine:
        class backend:  # noqa: N801
            vae_scale_factor = 8

        def generate(self, spec, samples, progress=None, cancelled=None):
            time.sleep(0.002 + 0.004 * spec.steps / 20 + 0.002 * len(samples) * spec.steps / 20)
            return [Image.new("RGB", (spec.width, spec.height)) for _ in samples]

    (tmp_path / "unet").mkdir()
    (tmp_path / "unet" / "config.json").write_text(json.dumps({"sample_size": 8}))

    def loop(max_batch: int = 4) -> GpuLoop:
        settings = ConsumerSettings(_env_file=None, model=str(tmp_path), max_batch=max_batch,
                                    speed_memory=tmp_path / "speed.json")
        return GpuLoop(Engine(), settings, ConsumerMetrics(), outlet=None)

    first = loop()
    await first.warm_up(str(tmp_path))
    assert first.slowdown.prior is None  # nothing saved on this host yet
    ref = first.service_ratio.reference
    for _ in range(10):  # in service it ran 1.5x what its warm-up predicted
        first.service_ratio.observe(0.5, 8, 1.5 * ref.batch_s(0.5, 8))
    first.shutdown()  # remembers
    second = loop()
    await second.warm_up(str(tmp_path))
    assert second.slowdown.prior == pytest.approx(1.5)
    assert second.factor() == pytest.approx(1.5)  # before its first batch: its ETAs are 1.5x the warm-up model's
    second.shutdown()
    other = loop(max_batch=8)  # another batch size: another key
    await other.warm_up(str(tmp_path))
    assert other.slowdown.prior is None
    other.shutdown()
