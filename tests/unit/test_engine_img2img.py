"""Image-to-image and the 2x upscale in the engine: strength, seed-exact and batch-independent samples, cancel,
the upscale's output size, refusals before any compute, and the ONNX backend's VAE encoder against torch."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("diffusers")

from bench import quality  # noqa: E402
from bench.pipeline import psnr_db  # noqa: E402
from skillgen.inference import PipelineError, load_engine  # noqa: E402
from skillgen.inference.engine import BatchSpec, Sample  # noqa: E402
from skillgen.runtime.settings import EMBEDDED_MODEL_DIR  # noqa: E402
from skillgen.tools.tiny import build_tiny  # noqa: E402
from tests.unit.test_engine import OomAbove  # noqa: E402
from tests.unit.test_engine_cancel import CancelAt  # noqa: E402

SPEC = BatchSpec(width=64, height=64, steps=6, strength=0.5)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return build_tiny(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def engine(tiny):
    return load_engine(tiny, "torch", "cpu", "fp32")


@pytest.fixture(scope="module")
def inits(engine):
    """Two different 64x64 results to start from."""
    return engine.generate(BatchSpec(64, 64, 3), [Sample("a drummer's paradiddle", seed=s) for s in (1, 2)])


def img2img(inits, n: int, start: int = 0) -> list[Sample]:
    return [Sample(f"a violinist's bow hold {i % 3}", seed=start + i, init_image=inits[i % 2]) for i in range(n)]


def same_bytes(a, b) -> bool:
    return np.asarray(a).tobytes() == np.asarray(b).tobytes()


def test_low_strength_stays_close_to_the_init_image_and_high_strength_redraws():
    """On the shipped (trained) model, whose VAE reconstructs: the random tiny model's does not."""
    icons = load_engine(EMBEDDED_MODEL_DIR, backend="torch", device="cpu")
    spec = BatchSpec(64, 64, quality.DEFAULT_STEPS, quality.DEFAULT_GUIDANCE)
    init = icons.generate(spec, [Sample("a red football skill icon on a light background", seed=0)])[0]
    ask = Sample("a blue guitar skill icon on a dark background", seed=5, init_image=init)
    low = icons.generate(BatchSpec(64, 64, spec.steps, spec.guidance, strength=0.3), [ask])[0]
    high = icons.generate(BatchSpec(64, 64, spec.steps, spec.guidance, strength=1.0), [ask])[0]
    assert psnr_db(low, init) > 15
    assert psnr_db(low, init) > psnr_db(high, init) + 8


@pytest.mark.parametrize("scheduler", ["dpmpp", "euler", "lcm"])
def test_img2img_is_deterministic_per_seed(engine, inits, scheduler):
    spec = BatchSpec(64, 64, 6, scheduler=scheduler, strength=0.5)
    first = engine.generate(spec, img2img(inits, 2))
    again = engine.generate(spec, img2img(inits, 2))
    assert all(same_bytes(a, b) for a, b in zip(first, again, strict=True))
    other_seed = engine.generate(spec, [Sample(img2img(inits, 1)[0].prompt, seed=99, init_image=inits[0])])[0]
    assert psnr_db(first[0], other_seed) < 40


def test_an_img2img_image_is_the_same_alone_or_in_a_batch_of_6(engine, inits):
    batch = engine.generate(SPEC, img2img(inits, 6))
    for i in (0, 3, 5):
        alone = engine.generate(SPEC, img2img(inits, 6)[i : i + 1])[0]
        assert psnr_db(alone, batch[i]) >= 60


def test_strength_sets_the_steps_that_run_and_progress_counts_them(engine, inits):
    for strength, runs in ((1.0, 6), (0.5, 3), (0.2, 1)):
        seen = []
        engine.generate(BatchSpec(64, 64, 6, strength=strength), img2img(inits, 1), progress=lambda i, n: seen.append((i, n)))
        assert seen == [(i, runs) for i in range(1, runs + 1)]


def test_cancel_in_the_middle_of_img2img_leaves_the_others_as_if_it_never_ran(engine, inits):
    keep = [0, 2]
    want = engine.generate(SPEC, [img2img(inits, 3)[i] for i in keep])
    cancel = CancelAt({1: 1})
    got = engine.generate(SPEC, img2img(inits, 3), progress=cancel.on_progress, cancelled=cancel)
    assert got[1] is None
    for g, w in zip([got[i] for i in keep], want, strict=True):
        assert psnr_db(g, w) >= 60
    assert cancel.progress[-1] == (3, 3)


def test_all_cancelled_before_the_first_step_encodes_and_decodes_nothing(engine, inits, monkeypatch):
    def boom(*_a):
        raise AssertionError("no VAE call for a cancelled batch")

    monkeypatch.setattr(engine.backend, "encode", boom)
    monkeypatch.setattr(engine.backend, "decode", boom)
    assert engine.generate(SPEC, img2img(inits, 2), cancelled=lambda: {0, 1}) == [None, None]


def test_upscale_draws_twice_the_init_image_size_and_keeps_seeds_apart(engine, inits):
    spec = BatchSpec(128, 128, 6, strength=0.35)
    up = engine.generate(spec, img2img(inits, 2))
    assert [im.size for im in up] == [(128, 128)] * 2
    assert psnr_db(up[0], up[1]) < 40
    alone = engine.generate(spec, img2img(inits, 2)[1:])[0]
    assert psnr_db(alone, up[1]) >= 60


def test_oom_splits_an_img2img_batch_without_changing_its_images(engine, inits):
    expected = engine.generate(SPEC, img2img(inits, 4))
    steps = []
    with OomAbove(engine.backend, max_batch=2) as oom:  # guidance doubles the batch: one image per call fits
        got = engine.generate(SPEC, img2img(inits, 4), progress=lambda i, n: steps.append((i, n)))
    assert all(psnr_db(a, b) >= 60 for a, b in zip(got, expected, strict=True))
    assert oom.seen[-1] == 2 and steps[-1] == (3, 3)


def test_mismatched_inputs_are_refused_before_any_compute(engine, inits):
    with pytest.raises(PipelineError, match="needs an init image"):
        engine.generate(SPEC, [Sample("x", seed=1)])
    with pytest.raises(PipelineError, match="needs a strength"):
        engine.generate(BatchSpec(64, 64, 6), img2img(inits, 1))
    with pytest.raises(PipelineError, match="init image is 64x64; it must be 96x96, or 48x48"):
        engine.generate(BatchSpec(96, 96, 6, strength=0.5), img2img(inits, 1))
    with pytest.raises(PipelineError, match="redraws nothing"):
        engine.generate(BatchSpec(64, 64, 4, strength=0.2), img2img(inits, 1))


def test_onnx_img2img_and_upscale_match_torch(tiny, engine, inits, tmp_path):
    pytest.importorskip("onnxruntime")
    onnx = load_engine(tiny, "onnx", "cpu", "fp32", cache_dir=tmp_path)
    for spec in (SPEC, BatchSpec(128, 128, 6, strength=0.35)):
        want = engine.generate(spec, img2img(inits, 2))
        got = onnx.generate(spec, img2img(inits, 2))
        for g, w in zip(got, want, strict=True):
            assert g.size == (spec.width, spec.height)
            assert psnr_db(g, w) >= 60


def test_the_tensorrt_profile_covers_the_vae_encoder_and_refuses_sides_outside_it():
    pytest.importorskip("onnxruntime")
    from skillgen.inference.onnx_backend import OnnxBackend, TrtProfile

    profile = TrtProfile(min_side_px=256, opt_side_px=512, max_side_px=768, max_batch=4)
    assert profile.shapes("vae_encoder", 4, 768, 8) == {
        "min": "image:1x3x256x256", "opt": "image:1x3x512x512", "max": "image:1x3x768x768"}
    backend = OnnxBackend.__new__(OnnxBackend)  # the check needs no session
    backend.trt_profile = profile
    backend._check_profile(1, 512, 768)
    with pytest.raises(PipelineError, match="128x128 at batch 1 is outside this worker's TensorRT profile"):
        backend._check_profile(1, 128, 128)
