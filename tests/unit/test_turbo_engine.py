"""The turbo lane in the engine (LCM scheduler, 4 steps, guidance 1, an LCM-LoRA-like adapter that changes
convolutions, feed-forwards and the time embedding) on both backends: torch and ONNX agree, seed-exact,
batch-independent, an OOM split changes nothing, img2img; on ONNX such an adapter runs on a merged export, which
switches back to the base exactly, is bounded, and is rebuilt when corrupt."""

from __future__ import annotations

import hashlib
import logging
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("onnxruntime")
pytest.importorskip("diffusers")

from bench.pipeline import psnr_db, write_random_lora  # noqa: E402
from skillgen.inference import AdapterError, load_engine  # noqa: E402
from skillgen.inference.engine import BatchSpec, Sample  # noqa: E402
from skillgen.inference.lora import read_lora  # noqa: E402
from skillgen.inference.onnx_backend import OnnxBackend  # noqa: E402
from skillgen.tools.tiny import build_tiny  # noqa: E402
from tests.unit.test_engine import OomAbove  # noqa: E402

TURBO = BatchSpec(width=64, height=64, steps=4, guidance=1.0, scheduler="lcm", adapter="turbo")
BASE = replace(TURBO, adapter=None)
# What a real LCM-LoRA (latent-consistency/lcm-lora-sdv1-5) touches, UNet only; the feed-forward, proj_in/out,
# convolutions and time embedding are all outside the ONNX export's fed weights.
LCM_TARGETS = (
    "to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2",
    "time_emb_proj",
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return build_tiny(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("onnx-cache")


def write_peft_lora(model_dir: Path, out: Path, seed: int, unet_targets, text_targets=()) -> Path:
    """A LoRA with random (non-zero) up weights in peft's naming, saved by diffusers; not through
    convert_state_dict_to_diffusers, which renames Linear layers' keys but not convolutions' (a mixed file whose
    attention part diffusers then drops)."""
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from peft import LoraConfig, get_peft_model_state_dict
    from transformers import CLIPTextModel

    torch.manual_seed(seed)
    layers = {}
    for name, module, targets in (
        ("unet", UNet2DConditionModel.from_pretrained(model_dir / "unet"), unet_targets),
        ("text_encoder", CLIPTextModel.from_pretrained(model_dir / "text_encoder"), text_targets),
    ):
        if not targets:
            continue
        module.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=list(targets), init_lora_weights="gaussian"))
        with torch.no_grad():
            for param_name, param in module.named_parameters():
                if "lora_B" in param_name:
                    param.normal_(0, 0.05)  # peft starts B at zero, which would make the adapter a no-op
        layers[f"{name}_lora_layers"] = get_peft_model_state_dict(module)
    StableDiffusionPipeline.save_lora_weights(str(out), safe_serialization=True, **layers)
    return out / "pytorch_lora_weights.safetensors"


@pytest.fixture(scope="module")
def lcm_lora(tiny, tmp_path_factory):
    return write_peft_lora(tiny, tmp_path_factory.mktemp("lcm"), seed=3, unet_targets=LCM_TARGETS)


@pytest.fixture(scope="module")
def text_and_conv_lora(tiny, tmp_path_factory):
    """A second adapter for a merged export, this one changing the text encoder too."""
    return write_peft_lora(tiny, tmp_path_factory.mktemp("second"), 4, ("conv1", "to_q"), ("q_proj", "fc1"))


@pytest.fixture(scope="module")
def style_lora(tiny, tmp_path_factory):
    """An adapter the fed-weights path carries (attention projections only)."""
    return write_random_lora(tiny, tmp_path_factory.mktemp("style"), seed=5)


@pytest.fixture(scope="module")
def torch_engine(tiny, lcm_lora):
    engine = load_engine(tiny, "torch", "cpu", "fp32")
    engine.backend.load_adapter("turbo", lcm_lora)
    return engine


@pytest.fixture(scope="module")
def onnx_engine(tiny, cache, lcm_lora):
    engine = load_engine(tiny, "onnx", "cpu", "fp32", cache_dir=cache)
    engine.backend.load_adapter("turbo", lcm_lora)
    return engine


@pytest.fixture(params=["torch", "onnx"])
def engine(request, torch_engine, onnx_engine):
    return torch_engine if request.param == "torch" else onnx_engine


def samples(n: int, start: int = 0, init=None) -> list[Sample]:
    return [Sample(f"a juggler's cascade {i % 3}", seed=start + i, init_image=init) for i in range(n)]


def same_images(a, b) -> bool:
    return all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(a, b, strict=True))


def test_the_lcm_like_lora_is_read_whole_and_its_other_modules_are_reported(tiny, lcm_lora):
    contents = read_lora(lcm_lora, tiny)
    assert contents.components == {"unet"}
    linear, other = contents.factors["unet"], contents.other["unet"]
    for target in ("attn1.to_q", "attn2.to_out.0", "ff.net.0.proj", "ff.net.2", "time_emb_proj"):
        assert any(m.endswith(target) for m in linear), target
    for target in ("conv1", "conv2", "proj_in", "proj_out"):  # the tiny UNet's proj_in/out are 1x1 convolutions
        assert any(m.endswith(target) for m in other), target
    assert not set(linear) & set(other)


def test_turbo_on_onnx_runs_a_merged_unet_matches_torch_and_the_lora_changes_the_image(onnx_engine, torch_engine):
    be = onnx_engine.backend
    ours = onnx_engine.generate(TURBO, samples(2))
    assert be._routes["unet"] is not be.networks["unet"]  # the merged export's UNet ran
    assert be._routes["text_encoder"] is be.networks["text_encoder"]  # a UNet-only LoRA keeps the base one
    ref = torch_engine.generate(TURBO, samples(2))
    assert min(psnr_db(a, b) for a, b in zip(ours, ref, strict=True)) >= 60
    base = onnx_engine.generate(BASE, samples(2))
    assert max(psnr_db(a, b) for a, b in zip(ours, base, strict=True)) < 40


def test_turbo_is_seed_exact(engine):
    first = engine.generate(TURBO, samples(2))
    again = engine.generate(TURBO, samples(2))
    assert same_images(first, again)
    assert psnr_db(first[0], engine.generate(TURBO, samples(1, start=50))[0]) < 40


def test_a_turbo_image_is_the_same_alone_or_in_a_batch_of_3(engine):
    batch = engine.generate(TURBO, samples(3))
    for i in (0, 2):
        # CPU kernels may block differently by batch size: bit-exact or within 60 dB.
        assert psnr_db(engine.generate(TURBO, samples(3)[i : i + 1])[0], batch[i]) >= 60


def test_oom_splits_a_turbo_batch_without_changing_its_images(engine):
    expected = engine.generate(TURBO, samples(3))
    steps = []
    with OomAbove(engine.backend, max_batch=1) as oom:  # guidance 1: no unconditional half, one image per call
        got = engine.generate(TURBO, samples(3), progress=lambda i, n: steps.append((i, n)))
    assert all(psnr_db(a, b) >= 60 for a, b in zip(got, expected, strict=True))
    assert max(oom.seen) == 3 and oom.seen[-1] == 1 and steps[-1] == (4, 4)


def test_turbo_img2img_matches_across_backends_and_differs_from_the_base(onnx_engine, torch_engine):
    init = torch_engine.generate(BatchSpec(64, 64, 3), samples(1, start=9))[0]
    spec = replace(TURBO, strength=0.5)
    got = onnx_engine.generate(spec, samples(2, init=init))
    want = torch_engine.generate(spec, samples(2, init=init))
    assert min(psnr_db(a, b) for a, b in zip(got, want, strict=True)) >= 60
    base = torch_engine.generate(replace(spec, adapter=None), samples(2, init=init))
    assert max(psnr_db(a, b) for a, b in zip(want, base, strict=True)) < 40


def test_switching_base_turbo_fed_adapter_base_on_onnx_gives_each_image_back_exactly(tiny, cache, lcm_lora, style_lora):
    engine = load_engine(tiny, "onnx", "cpu", "fp32", cache_dir=cache)  # the merged export is cached: no rebuild
    be = engine.backend
    gen = lambda adapter: engine.generate(replace(TURBO, adapter=adapter), samples(2))  # noqa: E731
    base = gen(None)
    be.load_adapter("turbo", lcm_lora)
    be.load_adapter("style", style_lora)
    turbo = gen("turbo")
    assert same_images(gen(None), base)
    style = gen("style")
    assert psnr_db(style[0], base[0]) < 45
    # The fed adapter's weights must not leak into the base text encoder that the UNet-only merged adapter keeps.
    assert same_images(gen("turbo"), turbo)
    assert same_images(gen("style"), style)
    assert same_images(gen(None), base)
    be.unload_adapter("turbo")
    assert be.loaded_adapters == ["style"] and be._merged.open_adapters == []


def test_a_second_merged_adapter_closes_the_first_which_reopens_and_is_rebuilt_when_corrupt(
    tiny, cache, lcm_lora, text_and_conv_lora, torch_engine, caplog
):
    engine = load_engine(tiny, "onnx", "cpu", "fp32", cache_dir=cache)
    be = engine.backend
    be.load_adapter("turbo", lcm_lora)
    turbo = engine.generate(TURBO, samples(2))
    be.load_adapter("second", text_and_conv_lora)
    assert be._merged.open_adapters == ["turbo"]  # sessions open on first use
    second = engine.generate(replace(TURBO, adapter="second"), samples(2))
    assert be._merged.open_adapters == ["second"] and be.loaded_adapters == ["turbo", "second"]
    assert be._routes["text_encoder"] is not be.networks["text_encoder"]
    torch_engine.backend.load_adapter("second", text_and_conv_lora)
    want = torch_engine.generate(replace(TURBO, adapter="second"), samples(2))
    assert min(psnr_db(a, b) for a, b in zip(second, want, strict=True)) >= 60

    # While "turbo" is closed, flip one byte of its merged model and of its export: both are rebuilt on reopening.
    digest = hashlib.sha256(Path(lcm_lora).read_bytes()).hexdigest()[:16]
    (export_dir,) = cache.glob(f"*-lora-{digest}")
    (model_dir,) = cache.glob(f"merged/*-{digest}")
    for path in (export_dir / "unet.onnx.data", model_dir / "unet" / "diffusion_pytorch_model.safetensors"):
        blob = bytearray(path.read_bytes())
        blob[len(blob) // 2] ^= 0xFF
        path.unlink()  # the merged model's other parts are hard links to the base model: never write through them
        path.write_bytes(bytes(blob))
    with caplog.at_level(logging.INFO, logger="skillgen.inference.merged"):
        again = engine.generate(TURBO, samples(2))
    assert any("merged export of adapter turbo (opened again) built" in r.message for r in caplog.records)
    assert same_images(again, turbo)
    assert be._merged.open_adapters == ["turbo"]


def test_files_that_are_no_lora_and_a_backend_without_merged_exports_are_refused_clearly(tiny, cache, lcm_lora, tmp_path):
    from safetensors.torch import save_file

    backend = OnnxBackend(tiny, "cpu", "fp32", cache_dir=cache, max_merged_adapters=0)
    with pytest.raises(AdapterError, match="needs a merged export, and this backend keeps none"):
        backend.load_adapter("turbo", lcm_lora)
    assert backend.loaded_adapters == []
    not_lora = tmp_path / "weights.safetensors"
    save_file({"unet.conv_in.weight": torch.zeros(2, 2)}, str(not_lora))
    with pytest.raises(AdapterError, match="weights.safetensors"):
        backend.load_adapter("x", not_lora)
    with pytest.raises(AdapterError, match="expected a .safetensors LoRA file"):
        backend.load_adapter("x", tmp_path / "missing.bin")
    assert backend.loaded_adapters == []
