"""LoRA training on the tiny model, a handful of steps: the file loads in the consumer's engine and changes its
output, unloading restores the base exactly, targets are configurable, and a stopped run resumes bit-for-bit."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw
from safetensors import safe_open
from safetensors.torch import load

import skillgen.tools.tiny as tiny_module
from skillgen.adapters.recipe import LoraRecipe
from skillgen.inference.engine import BatchSpec, Engine, Sample
from skillgen.inference.torch_backend import TorchBackend
from skillgen.runtime.fetch import IngestError
from trainer.ingest import Example
from trainer.lora import Stopped, fingerprint, load_components, sample_grid, train_lora

pytestmark = pytest.mark.unit

CPU = torch.device("cpu")
FAST = LoraRecipe(lr=1e-2, batch_size=1, checkpoint_every=3)


@pytest.fixture(scope="session")
def tiny(request, tmp_path_factory) -> Path:
    """The tiny random SD, kept in pytest's cache until skillgen/tools/tiny.py changes."""
    version = hashlib.sha256(Path(tiny_module.__file__).read_bytes()).hexdigest()[:12]
    cache = getattr(request.config, "cache", None)  # None under -p no:cacheprovider
    path = Path(cache.mkdir(f"skillgen-tiny-{version}")) if cache else tmp_path_factory.mktemp("tiny")
    if not (path / "model_index.json").exists():
        tiny_module.build_tiny(path)
    return path


def red_circles(n: int = 3) -> list[Example]:
    out = []
    for i in range(n):
        image = Image.new("RGB", (72, 64), (15, 15, 15))
        ImageDraw.Draw(image).ellipse((8 + 2 * i, 8, 60, 56), fill=(220, 30, 30))
        out.append(Example(f"{i}.png", image, f"{i:064x}", "a zq picture"))
    return out


def train(tiny: Path, tmp: Path, steps: int, recipe: LoraRecipe = FAST, **kw):
    parts = load_components(tiny, CPU)
    return train_lora(parts, red_circles(), recipe, steps, tmp / "ckpt", fingerprint(recipe, steps, "d", "b"), **kw)


def pixels(image) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)


@pytest.fixture(scope="module")
def trained(tiny, tmp_path_factory):
    """A 3-step adapter, the steps its callback saw, and its file."""
    seen = []
    tmp = tmp_path_factory.mktemp("trained")
    result = train(tiny, tmp, 3, on_step=lambda step, total, loss: seen.append((step, total)))
    weights = tmp / "adapter.safetensors"
    weights.write_bytes(result.weights)
    return result, seen, weights


@pytest.fixture(scope="module")
def engine(tiny) -> Engine:
    return Engine(TorchBackend(tiny, device="cpu", precision="fp32"))


def test_the_adapter_loads_in_the_consumer_engine_and_unloading_restores_the_base(trained, engine):
    result, seen, weights = trained
    assert seen == [(1, 3), (2, 3), (3, 3)]
    assert [step for step, _ in result.loss_curve] == [1, 2, 3]
    with safe_open(str(weights), "pt") as f:
        keys = list(f.keys())
    assert any(k.startswith("unet.") and ".to_q." in k for k in keys)
    assert any(k.startswith("text_encoder.") and "q_proj" in k for k in keys)

    samples = [Sample("a zq picture", "", 7)]
    spec = BatchSpec(64, 64, 4)
    base = pixels(engine.generate(spec, samples)[0])
    engine.backend.load_adapter("g1/circles@v1", weights)
    adapted = pixels(engine.generate(BatchSpec(64, 64, 4, adapter="g1/circles@v1"), samples)[0])
    again = pixels(engine.generate(spec, samples)[0])
    assert np.abs(adapted - base).mean() > 0.5
    assert np.array_equal(again, base)


def test_targets_and_ranks_are_configurable(tiny, tmp_path):
    recipe = LoraRecipe(unet_rank=2, unet_targets=["conv1", "conv2"], text_rank=0, batch_size=1,
                        gradient_checkpointing=True)
    result = train(tiny, tmp_path, 1, recipe)
    weights = tmp_path / "b.safetensors"
    weights.write_bytes(result.weights)
    with safe_open(str(weights), "pt") as f:
        shapes = {k: f.get_slice(k).get_shape() for k in f.keys()}
    assert shapes and all(k.startswith("unet.") and (".conv1." in k or ".conv2." in k) for k in shapes)
    assert all(2 in shape for shape in shapes.values())


def test_every_targeted_layer_loads_when_attention_and_other_targets_are_mixed(tiny, tmp_path):
    """diffusers' convert_state_dict_to_diffusers renamed only some keys of such a list, and load_lora_weights then
    skipped the attention layers with a warning: the file keeps peft's key names."""
    from peft.tuners.lora import LoraLayer

    targets = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "time_emb_proj"]
    result = train(tiny, tmp_path, 1, LoraRecipe(unet_rank=2, unet_targets=targets, text_rank=0, batch_size=1))
    weights = tmp_path / "mixed.safetensors"
    weights.write_bytes(result.weights)
    with safe_open(str(weights), "pt") as f:
        written = {k.removeprefix("unet.").split(".lora_A.")[0] for k in f.keys() if ".lora_A." in k}
    backend = TorchBackend(tiny, device="cpu", precision="fp32")
    backend.load_adapter("mixed", weights)
    loaded = {name for name, mod in backend.pipe.unet.named_modules() if isinstance(mod, LoraLayer)}
    assert loaded == written
    assert any(name.endswith("attn1.to_q") for name in loaded) and any("proj_in" in n for n in loaded)


def test_a_stopped_run_resumes_to_exactly_the_uninterrupted_result(tiny, tmp_path):
    whole = train(tiny, tmp_path / "whole", 3)
    with pytest.raises(Stopped) as stopped:
        train(tiny, tmp_path / "split", 3, should_stop=stop_before_call(3, "trainer shutting down"))
    assert (stopped.value.step, stopped.value.reason) == (2, "trainer shutting down")
    resumed = train(tiny, tmp_path / "split", 3)
    assert resumed.resumed_from == 2
    resumed_tensors, whole_tensors = load(resumed.weights), load(whole.weights)
    assert resumed_tensors.keys() == whole_tensors.keys()
    assert all(torch.equal(resumed_tensors[k], whole_tensors[k]) for k in whole_tensors)
    assert resumed.loss_curve == whole.loss_curve


def stop_before_call(n: int, reason: str):
    calls = []

    def should_stop() -> str | None:
        calls.append(1)  # asked before each step
        return reason if len(calls) == n else None

    return should_stop


def test_a_checkpoint_of_another_run_is_not_resumed(tiny, tmp_path):
    with pytest.raises(Stopped):
        train(tiny, tmp_path, 3, should_stop=stop_before_call(2, "cancelled"))
    other = LoraRecipe(lr=5e-3, batch_size=1, checkpoint_every=3)
    assert train(tiny, tmp_path, 2, other).resumed_from == 0


def test_a_caption_longer_than_the_model_reads_is_refused(tiny):
    long = [Example("long.png", red_circles(1)[0].image, "0" * 64, "zq " + "very " * 80)]
    parts = load_components(tiny, CPU)
    with pytest.raises(IngestError, match="caption of image 1 is .* tokens; the model reads 77"):
        train_lora(parts, long, FAST, 2, Path("/nonexistent"), "f")


def test_the_sample_grid_has_a_base_row_and_an_adapter_row(trained, engine):
    _, _, weights = trained
    cells = sample_grid(engine, "k@v1", weights, "a zq picture", [1, 2, 3], 64, 2)
    assert [image.size for image in cells.cells] == [(64, 64)] * 6  # what the image check sees, one by one
    grid = cells.compose()
    assert grid.size == (192, 128)
    top, bottom = pixels(grid.crop((0, 0, 192, 64))), pixels(grid.crop((0, 64, 192, 128)))
    assert not np.array_equal(top, bottom)


def test_the_bench_concept_is_measurable_from_pixels():
    from bench.trainer import concept_score, red_circles

    assert concept_score(e.image for e in red_circles(4, 64)) > 40
    assert abs(concept_score([Image.new("RGB", (64, 64), (90, 90, 90))])) < 1e-6
    assert concept_score([Image.new("RGB", (8, 8), (0, 200, 200))]) < -100
