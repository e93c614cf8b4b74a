"""The shipped embedded model (models/skill-icons) loads like any diffusers model and draws what it is asked."""

import argparse
import json

import pytest

from bench import quality
from skillgen.inference import load_engine
from skillgen.inference.engine import BatchSpec, Sample
from skillgen.runtime.settings import EMBEDDED_MODEL_DIR
from skillgen.tools.icons import COLORS

pytestmark = [pytest.mark.unit, pytest.mark.usefixtures("one_torch_thread")]


@pytest.fixture(scope="module")
def engine():
    return load_engine(EMBEDDED_MODEL_DIR, backend="torch", device="cpu")


def test_shipped_weights_are_fp16_safetensors_under_15_mb():
    files = [p for p in EMBEDDED_MODEL_DIR.rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in files) < 15e6
    weights = [p for p in files if p.suffix in {".safetensors", ".bin", ".pt", ".ckpt", ".pth"}]
    assert {p.parent.name for p in weights} == {"unet", "vae", "text_encoder"}
    assert all(p.suffix == ".safetensors" for p in weights)
    from safetensors import safe_open

    for path in weights:
        with safe_open(path, "pt") as f:
            dtypes = {f.get_slice(k).get_dtype() for k in f.keys()}
        assert dtypes == {"F16"}, path


@pytest.mark.parametrize(
    ("prompt", "color", "light"),
    [
        ("a red football skill icon on a light background", "red", True),
        ("a blue guitar skill icon on a dark background", "blue", False),
        ("a green laptop skill icon on a dark background", "green", False),
        ("a yellow camera skill icon on a light background", "yellow", True),
    ],
)
def test_follows_colour_and_background(engine, prompt, color, light):
    spec = BatchSpec(
        width=64, height=64, steps=quality.DEFAULT_STEPS, guidance=quality.DEFAULT_GUIDANCE, scheduler="dpmpp"
    )
    images = engine.generate(spec, [Sample(prompt=prompt, seed=seed) for seed in (0, 1)])
    for image in images:
        assert quality.dominant_color(image) == color
        assert quality.background_is_light(image) == light


def test_bench_quality_writes_the_accuracies(tmp_path):
    parser = argparse.ArgumentParser()
    quality.add_arguments(parser)
    out = tmp_path / "quality.json"
    args = parser.parse_args(["--model", str(EMBEDDED_MODEL_DIR), "--seeds", "1", "--steps", "8", "--json", str(out)])
    assert quality.run(args) == 0
    report = json.loads(out.read_text())
    assert report["images"] == len(COLORS) * 2
    assert 0.0 <= report["color_accuracy"] <= 1.0 and 0.0 <= report["background_accuracy"] <= 1.0
    assert set(report["color_accuracy_by_color"]) == set(COLORS)
