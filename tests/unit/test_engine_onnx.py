"""The ONNX Runtime backend on the tiny model: parity with torch, seed-exact batches, LoRA without eager fall-back,
fp16/int8 exports that load and run, and an export cache that rebuilds what is stale or corrupt."""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("onnxruntime")
pytest.importorskip("diffusers")

from bench.pipeline import psnr_db, write_random_lora  # noqa: E402
from skillgen.inference import AdapterError, ExportError, load_engine  # noqa: E402
from skillgen.inference import export as export_mod  # noqa: E402
from skillgen.inference.engine import BatchSpec, Sample  # noqa: E402
from skillgen.inference.export import ExportOptions, ensure_export  # noqa: E402
from skillgen.tools.tiny import build_tiny  # noqa: E402

SPEC = BatchSpec(width=64, height=64, steps=4)


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    return build_tiny(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="session")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("onnx-cache")


@pytest.fixture(scope="session")
def lora(tiny, tmp_path_factory):
    return write_random_lora(tiny, tmp_path_factory.mktemp("lora"))


@pytest.fixture(scope="session")
def onnx(tiny, cache):
    return load_engine(tiny, "onnx", "cpu", "fp32", cache_dir=cache, max_cached_adapters=1)


@pytest.fixture(scope="session")
def torch_ref(tiny):
    return load_engine(tiny, "torch", "cpu", "fp32")


def samples(n: int) -> list[Sample]:
    return [Sample(f"a juggler's cascade {i}", negative_prompt="blurry", seed=40 + i) for i in range(n)]


@pytest.mark.parametrize("width,height", [(64, 64), (72, 104)])
def test_onnx_fp32_matches_torch_from_the_same_latents(onnx, torch_ref, width, height):
    import torch

    spec = BatchSpec(width=width, height=height, steps=4)
    latents = torch.randn(2, 4, height // 8, width // 8, generator=torch.Generator().manual_seed(3))
    ours = onnx.generate(spec, samples(2), latents=latents)
    ref = torch_ref.generate(spec, samples(2), latents=latents)
    assert [im.size for im in ours] == [(width, height)] * 2
    assert min(psnr_db(a, b) for a, b in zip(ours, ref)) >= 60


def test_onnx_image_is_the_same_alone_or_in_a_batch_of_8(onnx):
    batch = onnx.generate(SPEC, samples(8))
    for i in (0, 5):
        assert psnr_db(onnx.generate(SPEC, samples(8)[i : i + 1])[0], batch[i]) >= 60


def test_lora_on_onnx_matches_torch_and_switching_back_is_exact(onnx, torch_ref, lora, tiny, tmp_path):
    assert onnx.backend.manifest.fused_attention["unet"] > 0  # LoRA through fed weights beside fused attention
    styled_spec = BatchSpec(width=64, height=64, steps=4, adapter="style")
    other = write_random_lora(tiny, tmp_path / "other", seed=1)
    for engine in (onnx, torch_ref):
        engine.backend.load_adapter("style", lora)
    onnx.backend.load_adapter("other", other)
    base = onnx.generate(SPEC, samples(2))
    styled = onnx.generate(styled_spec, samples(2))
    assert psnr_db(base[0], styled[0]) < 45
    assert min(psnr_db(a, b) for a, b in zip(styled, torch_ref.generate(styled_spec, samples(2)))) >= 60
    # The LRU holds one fused set here: "other" evicts "style", which must be fused again, identically.
    onnx.generate(BatchSpec(width=64, height=64, steps=4, adapter="other"), samples(1))
    assert "style" not in onnx.backend._fused
    styled_again = onnx.generate(styled_spec, samples(2))
    base_again = onnx.generate(SPEC, samples(2))
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(styled, styled_again))
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(base, base_again))


def test_cpu_graphs_fuse_every_unet_and_vae_attention_and_keep_lora_weights_as_inputs(onnx, tiny, cache):
    import onnx as onnx_lib
    from diffusers import UNet2DConditionModel
    from diffusers.models.attention_processor import Attention

    be = onnx.backend
    assert be.manifest.options.fused_attention is True
    unet = UNet2DConditionModel.from_pretrained(tiny / "unet")
    attentions = sum(isinstance(m, Attention) for m in unet.modules())
    assert attentions > 0 and be.manifest.fused_attention["unet"] == attentions
    assert be.manifest.fused_attention["text_encoder"] == 0  # CLIP's causal mask: left plain
    assert be.manifest.fused_attention["vae_decoder"] == be.manifest.fused_attention["vae_encoder"] == 1
    graph = onnx_lib.load(str(be.export_dir / "unet.onnx"), load_external_data=False).graph
    ops = [n.op_type for n in graph.node]
    assert ops.count("MultiHeadAttention") == attentions and "Softmax" not in ops
    inputs = {i.name for i in graph.input}
    assert {f"{m}.weight" for m in be.manifest.weight_inputs["unet"]} <= inputs
    assert any(m.endswith("attn1.to_q") for m in be.manifest.weight_inputs["unet"])
    # Plain attention on request, in its own directory: the same pictures.
    plain = load_engine(tiny, "onnx", "cpu", "fp32", cache_dir=cache, fused_attention=False)
    assert plain.backend.export_dir != be.export_dir and plain.backend.manifest.fused_attention["unet"] == 0
    assert min(psnr_db(a, b) for a, b in zip(plain.generate(SPEC, samples(2)), onnx.generate(SPEC, samples(2)))) >= 60


@pytest.mark.security
def test_onnx_adapters_past_capacity_are_dropped_never_the_active_one(tiny, cache, lora, tmp_path):
    engine = load_engine(tiny, "onnx", "cpu", "fp32", cache_dir=cache, max_cached_adapters=2, max_loaded_adapters=2)
    be = engine.backend
    others = [write_random_lora(tiny, tmp_path / f"o{i}", seed=20 + i) for i in range(2)]
    styled_spec = BatchSpec(width=64, height=64, steps=2, adapter="a")
    be.load_adapter("a", lora)
    first = engine.generate(styled_spec, samples(1))
    be.load_adapter("b", others[0])
    be.use_adapter("b")
    be.use_adapter("a")
    assert "b" in be._fused
    be.load_adapter("c", others[1])  # "a" is active: "b" goes, with its fused set
    assert be.loaded_adapters == ["a", "c"] and "b" not in be._fused
    with pytest.raises(AdapterError, match="not loaded"):
        be.use_adapter("b")
    be.use_adapter("c")
    be.load_adapter("b", others[0])  # now "a" is the idle one
    assert be.loaded_adapters == ["c", "b"] and "a" not in be._fused
    be.load_adapter("a", lora)
    assert np.array_equal(np.asarray(engine.generate(styled_spec, samples(1))[0]), np.asarray(first[0]))


def test_adapter_on_a_module_the_export_keeps_fixed_takes_a_merged_export_and_loads_nothing_when_that_fails(
    onnx, tiny, tmp_path, monkeypatch
):
    from skillgen.inference import merged

    def merge_lora(model_dir, weights, components, out):
        assert list(components) == ["unet"]
        raise AdapterError(f"cannot merge the LoRA at {weights}")

    monkeypatch.setattr(merged, "merge_lora", merge_lora)
    ff = write_random_lora(tiny, tmp_path / "ff", unet_targets=("ff.net.2",), text_targets=())
    with pytest.raises(AdapterError, match="cannot merge"):
        onnx.backend.load_adapter("ff", ff)
    with pytest.raises(AdapterError, match="not loaded"):
        onnx.backend.use_adapter("ff")


def test_export_is_reused_then_rebuilt_when_corrupt_or_stale(tiny, onnx, tmp_path, monkeypatch):
    out = Path(shutil.copytree(onnx.backend.export_dir, tmp_path / "export"))
    options = onnx.backend.manifest.options
    current, built = ensure_export(tiny, out, options)
    assert not built and current.key == onnx.backend.manifest.key
    data = out / "unet.onnx.data"
    blob = bytearray(data.read_bytes())
    blob[len(blob) // 2] ^= 0xFF  # one flipped byte still loads in ONNX Runtime: only the digest notices
    data.write_bytes(bytes(blob))
    _, built = ensure_export(tiny, out, options)
    assert built and export_mod._sha256(data) == current.files["unet.onnx.data"]

    model = Path(shutil.copytree(tiny, tmp_path / "model"))  # same weights, one edited config: a stale key
    config = model / "unet" / "config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "_note": "edited"}))

    class Rebuilt(Exception):
        pass

    def build_export(model_dir, out, options, key, progress=False):
        raise Rebuilt(key)

    monkeypatch.setattr(export_mod, "build_export", build_export)
    with pytest.raises(Rebuilt) as rebuilt:
        ensure_export(model, out, options)
    assert rebuilt.value.args[0] != current.key
    assert (out / "manifest.json").exists()  # a failed rebuild leaves the old export where it was


def test_export_refuses_a_directory_that_is_not_an_export(tiny, tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(ExportError, match="not an ONNX export"):
        ensure_export(tiny, tmp_path, ExportOptions())


@pytest.mark.parametrize("precision,min_db", [("fp16", 45), ("int8", 35)])
def test_reduced_precision_exports_load_and_run(tiny, cache, onnx, precision, min_db, capsys):
    engine = load_engine(tiny, "onnx", "cpu", precision, cache_dir=cache)
    got = engine.generate(SPEC, samples(2))
    ref = onnx.generate(SPEC, samples(2))
    db = min(psnr_db(a, b) for a, b in zip(got, ref))
    with capsys.disabled():
        print(f"\n{precision} vs fp32 on the tiny model: {db:.1f} dB")
    assert db >= min_db


def test_export_cli_reuses_the_engine_export(tiny, onnx, capsys):
    parser = argparse.ArgumentParser()
    export_mod.add_arguments(parser)
    args = parser.parse_args(["--model", str(tiny), "--out", str(onnx.backend.export_dir)])
    assert export_mod.run(args) == 0
    out = capsys.readouterr().out
    assert "already current (fp32, cpu)" in out and "unet.onnx.data" in out


def test_provider_order_never_falls_back_to_the_cpu_when_cuda_was_asked_for():
    import onnxruntime as ort

    from skillgen.inference import ModelLoadError
    from skillgen.inference.onnx_backend import provider_order

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this onnxruntime build has CUDA")
    assert provider_order("auto", "auto") == ["cpu"]
    with pytest.raises(ModelLoadError, match="no CUDA or TensorRT"):
        provider_order("cuda", "auto")


def test_tensorrt_profile_covers_guidance_and_its_absence():
    from skillgen.inference.onnx_backend import TrtProfile

    shapes = TrtProfile(min_side_px=256, opt_side_px=512, max_side_px=768, max_batch=4).shapes("unet", 4, 768, 8)
    assert shapes["min"].startswith("sample:1x4x32x32,")
    assert shapes["opt"] == "sample:8x4x64x64,encoder_hidden_states:8x77x768"
    assert shapes["max"].startswith("sample:8x4x96x96,")
