"""The denoising loop on the torch reference backend: seed-exact batches, schedulers, LoRA on/off, OOM guards."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")

from bench.pipeline import psnr_db, write_random_lora  # noqa: E402
from skillgen.inference import AdapterError, DoesNotFit, PipelineError, load_engine  # noqa: E402
from skillgen.inference import engine as engine_mod  # noqa: E402
from skillgen.inference.engine import BatchSpec, Engine, Sample  # noqa: E402
from skillgen.inference.memory import (  # noqa: E402
    SLICED,
    TILED,
    Geometry,
    MemoryPolicy,
    estimate_peak_bytes,
    is_out_of_memory,
)
from skillgen.tools.tiny import build_tiny  # noqa: E402

SPEC = BatchSpec(width=64, height=64, steps=4)


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    return build_tiny(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="session")
def lora(tiny, tmp_path_factory):
    return write_random_lora(tiny, tmp_path_factory.mktemp("lora"))


@pytest.fixture(scope="session")
def engine(tiny):
    return load_engine(tiny, "torch", "cpu", "fp32")


def samples(n: int, start: int = 0) -> list[Sample]:
    return [Sample(f"a drummer's paradiddle {i % 3}", seed=start + i) for i in range(n)]


def test_an_image_is_the_same_alone_or_in_a_batch_of_8(engine):
    spec = BatchSpec(width=64, height=64, steps=3)
    batch = engine.generate(spec, samples(8))
    for i in (0, 7):
        alone = engine.generate(spec, samples(8)[i : i + 1])[0]
        # CPU kernels may block differently by batch size: bit-exact or within 60 dB.
        assert psnr_db(alone, batch[i]) >= 60


@pytest.mark.parametrize("scheduler,steps", [("dpmpp", 4), ("euler", 4), ("lcm", 4)])
def test_each_scheduler_is_deterministic_per_seed(engine, scheduler, steps):
    spec = BatchSpec(width=64, height=64, steps=steps, scheduler=scheduler)
    first = engine.generate(spec, samples(2))
    again = engine.generate(spec, samples(2))
    assert [np.asarray(a).tobytes() for a in first] == [np.asarray(b).tobytes() for b in again]
    assert psnr_db(first[0], first[1]) < 40  # different seeds, different pictures


def test_schedulers_differ_and_unknown_one_is_refused(engine):
    dpm = engine.generate(BatchSpec(width=64, height=64, steps=4, scheduler="dpmpp"), samples(1))[0]
    euler = engine.generate(BatchSpec(width=64, height=64, steps=4, scheduler="euler"), samples(1))[0]
    assert psnr_db(dpm, euler) < 60
    with pytest.raises(PipelineError, match="unknown scheduler"):
        engine.generate(BatchSpec(width=64, height=64, steps=4, scheduler="ddim"), samples(1))


def test_size_must_be_a_multiple_of_the_vae_factor(engine):
    with pytest.raises(PipelineError, match="multiples of 8"):
        engine.generate(BatchSpec(width=60, height=64, steps=1), samples(1))


def test_lora_on_then_off_gives_the_base_image_exactly(engine, lora):
    engine.backend.load_adapter("style", lora)
    base = engine.generate(SPEC, samples(2))
    styled = engine.generate(BatchSpec(width=64, height=64, steps=4, adapter="style"), samples(2))
    base_again = engine.generate(SPEC, samples(2))
    assert psnr_db(base[0], styled[0]) < 45
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(base, base_again))


class OomAbove:
    """Makes a backend's UNet raise a CUDA-style OOM whenever it sees more than `max_batch` latents, and records
    the memory-savings levels the engine asks for; undone on exit."""

    def __init__(self, backend, max_batch: int):
        self.backend, self.max_batch = backend, max_batch
        self.seen: list[int] = []
        self.levels: list[int] = []

    def __enter__(self):
        inner, original = self.backend.unet, self.backend.set_memory_savings

        def unet(latents, t, emb):
            self.seen.append(latents.shape[0])
            if latents.shape[0] > self.max_batch:
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
            return inner(latents, t, emb)

        def set_memory_savings(level):
            self.levels.append(level)
            original(level)

        self.backend.unet, self.backend.set_memory_savings = unet, set_memory_savings
        return self

    def __exit__(self, *exc):
        del self.backend.unet, self.backend.set_memory_savings
        self.backend.set_memory_savings(0)


def test_oom_splits_the_batch_and_retries_without_changing_images(engine):
    expected = engine.generate(SPEC, samples(4))
    steps = []
    with OomAbove(engine.backend, max_batch=2) as oom:  # guidance doubles the batch: one image per call fits
        got = engine.generate(SPEC, samples(4), progress=lambda i, n: steps.append((i, n)))
    assert [psnr_db(a, b) >= 60 for a, b in zip(got, expected)] == [True] * 4
    assert SLICED in oom.levels and max(oom.seen) == 8 and oom.seen[-1] == 2
    assert steps == sorted(steps) and steps[-1] == (4, 4)


def test_an_image_that_never_fits_fails_clearly(engine):
    with OomAbove(engine.backend, max_batch=0) as oom, pytest.raises(DoesNotFit, match="64x64 image does not fit"):
        engine.generate(SPEC, samples(2))
    assert oom.levels[-1] == TILED


def test_resolution_cap_refuses_before_any_compute(engine):
    capped = Engine(engine.backend, memory=MemoryPolicy(max_pixels=64 * 64))
    with OomAbove(engine.backend, max_batch=99) as oom, pytest.raises(DoesNotFit, match="cap of 4096 pixels"):
        capped.generate(BatchSpec(width=128, height=64, steps=1), samples(1))
    assert oom.seen == []


def test_low_headroom_switches_savings_on_and_keeps_the_image(engine, monkeypatch):
    expected = engine.generate(SPEC, samples(2))
    monkeypatch.setattr(engine_mod, "headroom_bytes", lambda device: 3_000_000)
    with OomAbove(engine.backend, max_batch=99) as oom:
        got = engine.generate(SPEC, samples(2))
    assert oom.levels == [SLICED]
    assert all(psnr_db(a, b) >= 60 for a, b in zip(got, expected))


def test_estimate_grows_with_batch_and_shrinks_with_savings():
    geo = Geometry(attention_heads=8, vae_channels=128, dtype_bytes=2, materializes_attention=True)
    one = estimate_peak_bytes(geo, 512, 512, 1, True, 0)
    assert estimate_peak_bytes(geo, 512, 512, 8, True, 0) > one
    assert estimate_peak_bytes(geo, 512, 512, 8, True, SLICED) < one
    assert estimate_peak_bytes(geo, 1024, 1024, 1, True, TILED) < estimate_peak_bytes(geo, 1024, 1024, 1, True, SLICED)


def test_out_of_memory_is_recognised_from_every_runtime():
    class Fail(Exception):
        __module__ = "onnxruntime.capi.onnxruntime_pybind11_state"

    assert is_out_of_memory(torch.OutOfMemoryError("CUDA out of memory"))
    assert is_out_of_memory(MemoryError())
    assert is_out_of_memory(RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 9 GB"))
    assert is_out_of_memory(Fail("BFCArena::AllocateRawInternal Failed to allocate memory for requested buffer"))
    assert not is_out_of_memory(RuntimeError("shape mismatch"))
    assert not is_out_of_memory(Fail("Invalid input name"))


# -- adapters past max_loaded_adapters: the least recently used idle one is deleted from the pipeline -----------
LRU_SPEC = BatchSpec(width=64, height=64, steps=2)


@pytest.fixture(scope="module")
def three_loras(tiny, tmp_path_factory):
    return [write_random_lora(tiny, tmp_path_factory.mktemp(f"lru{i}"), seed=10 + i) for i in range(3)]


def lora_params(module) -> int:
    return sum(p.numel() for name, p in module.named_parameters() if "lora_" in name)


def pipeline_adapters(pipe) -> dict[str, set[str]]:
    return {component: set(names) for component, names in pipe.get_list_adapters().items()}


def same_images(a, b) -> bool:
    return all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(a, b, strict=True))


@pytest.mark.security
def test_past_capacity_the_least_recently_used_idle_adapter_is_deleted(tiny, three_loras):
    engine = load_engine(tiny, "torch", "cpu", "fp32", max_loaded_adapters=2)
    be, pipe = engine.backend, engine.backend.pipe
    deleted: list[tuple[list[str], int, int]] = []  # (names, LoRA parameters in the UNet before, after)
    delete = pipe.delete_adapters

    def spy(names):
        before = lora_params(pipe.unet)
        delete(names)
        deleted.append((list(names), before, lora_params(pipe.unet)))

    pipe.delete_adapters = spy
    gen = lambda adapter: engine.generate(replace(LRU_SPEC, adapter=adapter), samples(2))  # noqa: E731

    base = gen(None)
    be.load_adapter("a", three_loras[0])
    first_a = gen("a")
    be.load_adapter("b", three_loras[1])
    be.load_adapter("c", three_loras[2])
    # "a" is the least recently used, but it is the active one: "b" goes instead.
    assert [names for names, _, _ in deleted] == [["b"]]
    assert deleted[0][2] < deleted[0][1]
    assert be.loaded_adapters == ["a", "c"]
    assert pipeline_adapters(pipe) == {"unet": {"a", "c"}, "text_encoder": {"a", "c"}}
    assert same_images(gen("a"), first_a)  # set_adapters still works after a deletion
    assert same_images(gen(None), base)  # and so does disable_lora

    gen("c")
    be.load_adapter("b", three_loras[1])  # "a" is now the least recently used and idle: deleted
    assert deleted[-1][0] == ["a"] and deleted[-1][2] < deleted[-1][1]
    assert be.loaded_adapters == ["c", "b"]
    assert all("a" not in names for names in pipeline_adapters(pipe).values())
    with pytest.raises(AdapterError, match="not loaded"):
        be.use_adapter("a")

    # Asked for again, the evicted adapter loads again and draws what it drew the first time.
    be.load_adapter("a", three_loras[0])
    assert be.loaded_adapters == ["c", "a"]  # "c" is active (the last generation), so "b" went
    assert same_images(gen("a"), first_a)

    for key in be.loaded_adapters:
        be.unload_adapter(key)
    assert be.loaded_adapters == [] and lora_params(pipe.unet) == 0
    assert same_images(gen(None), base)
    # With every adapter deleted (the text encoder's peft config included), loading works as on a fresh pipeline.
    be.load_adapter("a", three_loras[0])
    assert same_images(gen("a"), first_a)
    assert same_images(gen(None), base)


def test_capacity_one_keeps_the_active_adapter_until_the_next_one_is_used(tiny, three_loras):
    engine = load_engine(tiny, "torch", "cpu", "fp32", max_loaded_adapters=1)
    be = engine.backend
    gen = lambda adapter: engine.generate(replace(LRU_SPEC, adapter=adapter), samples(1))  # noqa: E731
    base = gen(None)
    be.load_adapter("a", three_loras[0])
    first_a = gen("a")
    gen(None)
    be.load_adapter("b", three_loras[1])  # "a" is idle (the base model is active): deleted at once
    assert be.loaded_adapters == ["b"]
    assert same_images(gen(None), base)
    assert psnr_db(gen("b")[0], base[0]) < 45
    be.load_adapter("a", three_loras[0])
    assert be.loaded_adapters == ["b", "a"]  # "b" is active: over capacity until another one is used
    assert same_images(gen("a"), first_a)
    assert be.loaded_adapters == ["a"]
    be.load_adapter("a", three_loras[0])  # loaded already: a no-op
    assert be.loaded_adapters == ["a"]
