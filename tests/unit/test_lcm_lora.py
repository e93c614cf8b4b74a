"""The LCM-LoRA distillation (skillgen.tools.lcm_model) and the shipped LCM-LoRA of the embedded model."""

import argparse
import json
import math

import numpy as np
import pytest
import torch

from bench import quality
from skillgen.inference import load_engine
from skillgen.inference.engine import BatchSpec, Sample
from skillgen.runtime.settings import EMBEDDED_MODEL_DIR, REPO_ROOT
from skillgen.tools import lcm_model
from skillgen.tools.lcm_model import LcmRecipe, boundary_scalings

pytestmark = [pytest.mark.unit, pytest.mark.usefixtures("one_torch_thread")]

SHIPPED_LORA = REPO_ROOT / "models" / "skill-icons-lcm" / lcm_model.WEIGHTS_NAME


def test_boundary_conditions_make_the_consistency_function_the_identity_at_t0():
    c_skip, c_out = boundary_scalings(torch.tensor([0, 999]), scaling=10.0)
    assert c_skip[0].item() == 1.0 and c_out[0].item() == 0.0
    assert c_skip[1].item() < 1e-6 and c_out[1].item() == pytest.approx(1.0, abs=1e-6)


def test_recipe_rejects_an_inverted_guidance_range():
    with pytest.raises(ValueError, match="guidance_max 2.0 is below guidance_min 3.0"):
        LcmRecipe(guidance_min=3.0, guidance_max=2.0)


def test_student_starts_as_the_teacher_and_its_loss_trains_only_the_lora(tiny_model):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(tiny_model, safety_checker=None, requires_safety_checker=False)
    recipe = LcmRecipe(rank=4)
    emb = pipe.text_encoder(lcm_model.tokenize(pipe.tokenizer, ["a red guitar", ""]))[0].detach()
    distiller = lcm_model.Distiller(pipe.unet, dict(pipe.scheduler.config), recipe, emb[1:])
    x, t = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0)), torch.tensor([999, 479])
    with torch.no_grad():
        same = distiller.student(x, t, encoder_hidden_states=emb[:1].expand(2, -1, -1)).sample
        teacher = distiller.teacher(x, t, encoder_hidden_states=emb[:1].expand(2, -1, -1)).sample
    torch.testing.assert_close(same, teacher)

    loss = distiller.loss(x, emb[:1].expand(2, -1, -1), torch.Generator().manual_seed(1))
    loss.backward()
    assert math.isfinite(loss.item()) and loss.item() > 0
    trained = [n for n, p in pipe.unet.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0]
    assert trained and all("lora_" in n for n in trained)
    assert all(p.grad is None for p in distiller.teacher.parameters())


def test_distillation_runs_and_saves_a_lora_the_pipeline_loads(tiny_model, tmp_path):
    from diffusers import StableDiffusionPipeline

    lines: list[str] = []
    recipe = LcmRecipe(images=8, batch=4, rank=4,
                       schedule=LcmRecipe().schedule.model_copy(update={"steps": 3, "warmup_steps": 0}))
    path = lcm_model.distill_lcm_lora(tiny_model, recipe, tmp_path / "lcm", lines.append)
    assert path == tmp_path / "lcm" / "pytorch_lora_weights.safetensors" and path.is_file()
    losses = [float(line.split(" loss ")[1].split()[0]) for line in lines if line.startswith("lcm-lora step")]
    assert losses and all(math.isfinite(v) for v in losses)

    from safetensors import safe_open

    with safe_open(path, "pt") as f:
        keys = list(f.keys())
        metadata = json.loads(f.metadata()["lora_adapter_metadata"])
    assert metadata["unet.target_modules"] == sorted(recipe.targets)  # same bytes whatever the hash seed
    assert keys and all(k.startswith("unet.") and (".lora_A." in k or ".lora_B." in k) for k in keys)
    assert any(".attn1.to_q." in k for k in keys) and any(".conv1." in k for k in keys)
    pipe = StableDiffusionPipeline.from_pretrained(tiny_model, safety_checker=None, requires_safety_checker=False)
    pipe.load_lora_weights(str(path.parent), weight_name=path.name, use_safetensors=True)
    loaded = [n for n, _ in pipe.unet.named_modules() if n.endswith("lora_A")]
    assert len(loaded) == len(keys) // 2


def test_shipped_lcm_lora_is_a_small_safetensors_file():
    assert SHIPPED_LORA.is_file()
    assert SHIPPED_LORA.stat().st_size < 2e6
    assert [p.suffix for p in SHIPPED_LORA.parent.glob("*.safetensors")] == [".safetensors"]
    assert not [p for p in SHIPPED_LORA.parent.iterdir() if p.suffix in {".bin", ".pt", ".ckpt", ".pth"}]


def test_shipped_lcm_lora_changes_the_embedded_models_four_step_image():
    engine = load_engine(EMBEDDED_MODEL_DIR, backend="torch", device="cpu")
    engine.backend.load_adapter("lcm", SHIPPED_LORA)
    sample = [Sample(prompt="a red football skill icon on a light background", seed=0)]
    base_spec = BatchSpec(width=64, height=64, steps=4, guidance=1.0, scheduler="lcm")
    lora_spec = BatchSpec(width=64, height=64, steps=4, guidance=1.0, scheduler="lcm", adapter="lcm")
    base, with_lora, base_again = (engine.generate(s, sample)[0] for s in (base_spec, lora_spec, base_spec))
    as_array = [np.asarray(image, dtype=np.float32) for image in (base, with_lora, base_again)]
    assert np.abs(as_array[0] - as_array[2]).max() == 0  # switching the LoRA off gives the base image back
    assert np.abs(as_array[0] - as_array[1]).mean() > 2.0  # mean change over 0-255 pixels
    assert quality.dominant_color(with_lora) == "red" and quality.background_is_light(with_lora)


def test_bench_quality_measures_a_scheduler_with_an_adapter(tmp_path):
    parser = argparse.ArgumentParser()
    quality.add_arguments(parser)
    out = tmp_path / "q.json"
    args = parser.parse_args(["--model", str(EMBEDDED_MODEL_DIR), "--seeds", "1", "--steps", "2", "--guidance", "1",
                              "--scheduler", "lcm", "--adapter", str(SHIPPED_LORA), "--json", str(out)])
    assert quality.run(args) == 0
    report = json.loads(out.read_text())
    assert report["scheduler"] == "lcm" and report["adapter"].endswith("skill-icons-lcm/pytorch_lora_weights.safetensors")
    assert report["threads"] == 1
    assert report["seconds_per_image"] == pytest.approx(report["seconds"] / report["images"], abs=1e-3)


def test_bench_quality_rejects_a_missing_adapter(tmp_path):
    parser = argparse.ArgumentParser()
    quality.add_arguments(parser)
    args = parser.parse_args(["--model", str(EMBEDDED_MODEL_DIR), "--adapter", str(tmp_path / "none.safetensors")])
    with pytest.raises(FileNotFoundError, match="none.safetensors is not a file"):
        quality.run(args)


def test_turbo_table_interleaves_rows_and_reports_min_and_median():
    rows = (quality.TURBO_ROWS[2], quality.TURBO_ROWS[3])
    report = quality.measure_turbo(EMBEDDED_MODEL_DIR, SHIPPED_LORA, seeds=1, repeats=2, rows=rows)
    assert [r.name for r in report.rows] == [r.name for r in rows]
    assert report.images_per_row == 14 and report.threads == 1 and report.repeats == 2
    for r in report.rows:
        assert 0 < r.seconds_per_image_min <= r.seconds_per_image_median
        assert 0.0 <= r.color_accuracy <= 1.0
    table = quality.turbo_table(report)
    assert table.count("\n") == 3 and "lcm-4 + LCM-LoRA" in table
