"""Cancelling samples of a running batch: a cancelled sample leaves at the next denoising step, the others make
the images a batch without it would have made."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")

from bench.pipeline import psnr_db
from skillgen.inference import engine as engine_mod
from skillgen.inference import load_engine
from skillgen.inference.engine import BatchSpec, Sample
from skillgen.tools.tiny import build_tiny

SPEC = BatchSpec(width=64, height=64, steps=4)
SCHEDULERS = ["dpmpp", "euler", "lcm"]
GUIDANCE = [7.5, 1.0]


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    return load_engine(build_tiny(tmp_path_factory.mktemp("tiny")), "torch", "cpu", "fp32")


def samples(n: int) -> list[Sample]:
    return [Sample(f"a drummer's paradiddle {i % 3}", negative_prompt=f"blur {i}", seed=100 + i) for i in range(n)]


class CancelAt:
    """A `cancelled` callable: sample index -> the number of finished denoising steps at which it is cancelled
    (0: before the first step). Counts steps through the progress callback, as a caller would see them."""

    def __init__(self, at: dict[int, int]):
        self.at, self.step, self.calls, self.progress = at, 0, 0, []

    def on_progress(self, i: int, n: int) -> None:
        self.progress.append((i, n))
        self.step = i  # the engine reports every step when the batch is not split

    def __call__(self) -> list[int]:
        self.calls += 1
        return [i for i, s in self.at.items() if self.step >= s]


def assert_same_picture(got, want) -> None:
    # CPU kernels may block differently by batch size: bit-exact or within 60 dB.
    assert psnr_db(got, want) >= 60


def count_unet_rows(engine, monkeypatch) -> list[int]:
    seen: list[int] = []
    inner = engine.backend.unet

    def unet(latents, t, emb):
        assert emb.shape[0] == latents.shape[0]  # the text embeddings lost the same rows as the latents
        seen.append(latents.shape[0])
        return inner(latents, t, emb)

    monkeypatch.setattr(engine.backend, "unet", unet)
    return seen


@pytest.mark.parametrize("guidance", GUIDANCE)
@pytest.mark.parametrize("scheduler", SCHEDULERS)
def test_cancel_in_the_middle_leaves_the_others_as_if_it_never_ran(engine, scheduler, guidance, monkeypatch):
    spec = replace(SPEC, scheduler=scheduler, guidance=guidance)
    keep = [0, 2, 3]
    want = engine.generate(spec, [samples(4)[i] for i in keep])
    cancel = CancelAt({1: 2})
    seen = count_unet_rows(engine, monkeypatch)
    got = engine.generate(spec, samples(4), progress=cancel.on_progress, cancelled=cancel)
    assert got[1] is None
    for g, w in zip([got[i] for i in keep], want, strict=True):
        assert_same_picture(g, w)
    per_row = 2 if guidance > 1.0 else 1
    assert seen == [4 * per_row] * 2 + [3 * per_row] * 2  # the cancelled sample ran no step past the cancel
    assert cancel.calls == 2 + 4  # before the text encoding, before the first step, after every step
    assert [i for i, _ in cancel.progress] == sorted({i for i, _ in cancel.progress})
    assert cancel.progress[-1] == (4, 4)


@pytest.mark.parametrize("guidance", GUIDANCE)
@pytest.mark.parametrize("scheduler", SCHEDULERS)
def test_cancel_before_the_first_step_is_exactly_the_smaller_batch(engine, scheduler, guidance, monkeypatch):
    spec = replace(SPEC, scheduler=scheduler, guidance=guidance)
    want = engine.generate(spec, samples(4)[1:])
    seen = count_unet_rows(engine, monkeypatch)
    got = engine.generate(spec, samples(4), cancelled=lambda: {0})
    assert got[0] is None
    # Left out before its text was encoded, the sample changes nothing at all for the others.
    for g, w in zip(got[1:], want, strict=True):
        assert np.array_equal(np.asarray(g), np.asarray(w))
    assert seen == [3 * (2 if guidance > 1.0 else 1)] * 4


@pytest.mark.parametrize("guidance", GUIDANCE)
@pytest.mark.parametrize("scheduler", SCHEDULERS)
def test_two_of_four_cancelled_at_different_steps(engine, scheduler, guidance):
    spec = replace(SPEC, scheduler=scheduler, guidance=guidance)
    want = engine.generate(spec, [samples(4)[0], samples(4)[2]])
    cancel = CancelAt({3: 1, 1: 3})
    got = engine.generate(spec, samples(4), progress=cancel.on_progress, cancelled=cancel)
    assert got[1] is None and got[3] is None
    assert_same_picture(got[0], want[0])
    assert_same_picture(got[2], want[1])
    assert cancel.progress[-1] == (4, 4)


def test_the_dpm_solver_history_loses_the_cancelled_rows(engine, monkeypatch):
    """The multistep scheduler's saved model outputs are sliced; its schedule is not, even when the number of
    timesteps equals the batch size."""
    made = []
    make = engine.make_scheduler

    def spy(name):
        made.append(make(name))
        return made[-1]

    monkeypatch.setattr(engine, "make_scheduler", spy)
    cancel = CancelAt({2: 2})
    engine.generate(SPEC, samples(4), progress=cancel.on_progress, cancelled=cancel)
    sched = made[-1]
    assert [m.shape[0] for m in sched.model_outputs if m is not None] == [3, 3]
    assert len(sched.timesteps) == 4 and len(sched.sigmas) == 5


def test_scheduler_state_rule_slices_samples_and_leaves_the_schedule():
    class Fake:
        pass

    s = Fake()
    s.timesteps = torch.arange(3)
    s._sigmas = torch.arange(3.0)
    s.alpha_t, s.lambda_t = torch.ones(3), torch.ones(3)
    s.model_outputs = [None, torch.arange(3.0)[:, None]]
    s.timestep_list = [torch.tensor(1), torch.tensor(2)]
    s.last_sample = torch.arange(3.0)[:, None]
    s.other = torch.ones(5)
    s.step_count = 3
    engine_mod._slice_scheduler_state(s, 3, [0, 2])
    assert s.timesteps.tolist() == [0, 1, 2] and s._sigmas.tolist() == [0, 1, 2]
    assert s.alpha_t.shape == (3,) and s.lambda_t.shape == (3,)
    assert s.model_outputs[0] is None and s.model_outputs[1].flatten().tolist() == [0, 2]
    assert s.last_sample.flatten().tolist() == [0, 2]
    assert len(s.timestep_list) == 2 and s.other.shape == (5,) and s.step_count == 3


@pytest.mark.parametrize("when", [0, 2])
def test_all_cancelled_stops_at_once_without_decoding(engine, monkeypatch, when):
    decodes = []
    monkeypatch.setattr(engine.backend, "decode", lambda z: decodes.append(z) or pytest.fail("decoded"))
    seen = count_unet_rows(engine, monkeypatch)
    cancel = CancelAt({0: when, 1: when})
    assert engine.generate(SPEC, samples(2), progress=cancel.on_progress, cancelled=cancel) == [None, None]
    assert decodes == [] and seen == [4] * when


def test_without_cancelled_nothing_changes(engine):
    plain = engine.generate(SPEC, samples(2))
    never = engine.generate(SPEC, samples(2), cancelled=lambda: ())
    assert all(isinstance(im, type(plain[0])) for im in plain)
    for a, b in zip(plain, never, strict=True):
        assert np.array_equal(np.asarray(a), np.asarray(b))


def test_explicit_latents_lose_the_cancelled_rows(engine):
    init, _ = engine.initial_latents(SPEC, samples(3))
    latents = init * 0.5  # not what the seeds would draw, so the rows must follow the samples
    want = engine.generate(SPEC, [samples(3)[0], samples(3)[2]], latents=latents[[0, 2]])
    got = engine.generate(SPEC, samples(3), latents=latents, cancelled=lambda: [1])
    assert got[1] is None
    assert np.array_equal(np.asarray(got[0]), np.asarray(want[0]))
    assert np.array_equal(np.asarray(got[2]), np.asarray(want[1]))


class OomAbove:
    """The UNet raises a CUDA-style OOM whenever it sees more than `max_rows` rows."""

    def __init__(self, max_rows: int):
        self.max_rows = max_rows

    def install(self, engine, monkeypatch) -> list[int]:
        seen: list[int] = []
        inner = engine.backend.unet

        def unet(latents, t, emb):
            seen.append(latents.shape[0])
            if latents.shape[0] > self.max_rows:
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
            return inner(latents, t, emb)

        monkeypatch.setattr(engine.backend, "unet", unet)
        monkeypatch.setattr(engine.backend, "set_memory_savings", lambda level: None)
        return seen


def test_a_split_batch_maps_the_callers_indices_to_each_half(engine, monkeypatch):
    want = engine.generate(SPEC, [samples(4)[i] for i in (0, 1, 3)])
    seen = OomAbove(max_rows=4).install(engine, monkeypatch)  # guidance doubles rows: halves of 2 samples fit
    progress: list[tuple[int, int]] = []

    def cancelled():
        return [2] if len(progress) >= 1 else []  # sample 2 sits in the second half

    got = engine.generate(SPEC, samples(4), progress=lambda i, n: progress.append((i, n)), cancelled=cancelled)
    assert got[2] is None
    for g, w in zip([got[i] for i in (0, 1, 3)], want, strict=True):
        assert_same_picture(g, w)
    # The whole batch fails at once (twice: savings on, then split); the second half starts without sample 2.
    assert seen[:2] == [8, 8] and seen[2:6] == [4] * 4 and seen[6:] == [2] * 4
    assert progress == sorted(progress) and all(i <= n == 4 for i, n in progress) and progress[-1] == (4, 4)


def test_progress_counts_only_what_runs():
    reported: list[tuple[int, int]] = []
    tracker = engine_mod._Progress(lambda i, n: reported.append((i, n)), 2)
    chunk = tracker.chunk(2)
    chunk(1, 4)  # 2 of 8 sample-steps
    chunk.dropped(1, 1, 4)  # 3 sample-steps will never run: 2 of 5
    chunk(2, 4)  # 3 of 5
    chunk(3, 4)  # 4 of 5
    chunk(4, 4)  # 5 of 5
    tracker.finish(chunk)
    assert reported == [(1, 4), (2, 4), (3, 4), (4, 4)]
