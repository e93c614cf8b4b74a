"""`skillgen bench quality`: does the model draw the colour and the background a prompt asks for?

For every colour and background word of the icon captions, over several seeds, it generates through the same
engine the service uses (`skillgen.inference.load_engine`) and judges each picture from its pixels: the dominant
hue of its saturated pixels names a colour, the luminance of its border says light or dark.
`dominant_color` and `background_is_light` are the judges; the end-to-end tests call them too.
"""

from __future__ import annotations

import colorsys
import itertools
import json
import os
import time
from pathlib import Path

import numpy as np
from PIL import Image
from pydantic import BaseModel

from skillgen.tools.icons import BACKGROUNDS, COLORS, SKILLS, caption

# Pixels under these are greys or near-blacks: background, shading, or noise, never an icon's colour.
MIN_SATURATION = 0.35
MIN_VALUE = 0.3
# Fewer coloured pixels than this share of the image means no colour was drawn at all.
MIN_COLOR_SHARE = 0.02
BORDER_PX = 3

_HUES = np.array([colorsys.rgb_to_hsv(*(x / 255 for x in rgb))[0] for rgb in COLORS.values()])
_NAMES = list(COLORS)


def dominant_color(image: Image.Image) -> str | None:
    """The `COLORS` name nearest in hue to most of the image's saturated pixels; None if too few are."""
    hsv = np.asarray(image.convert("RGB").convert("HSV"), dtype=np.float32) / 255.0
    coloured = (hsv[..., 1] >= MIN_SATURATION) & (hsv[..., 2] >= MIN_VALUE)
    if coloured.mean() < MIN_COLOR_SHARE:
        return None
    hues = hsv[..., 0][coloured]
    # Hue is circular: red sits at both ends.
    distance = np.abs(hues[:, None] - _HUES[None, :])
    distance = np.minimum(distance, 1.0 - distance)
    votes = np.bincount(distance.argmin(axis=1), minlength=len(_NAMES))
    return _NAMES[int(votes.argmax())]


def background_is_light(image: Image.Image) -> bool:
    """Whether the image's border (where icons never reach) is lighter than mid-grey."""
    luma = np.asarray(image.convert("L"), dtype=np.float32)
    b = BORDER_PX
    border = np.concatenate([luma[:b].ravel(), luma[-b:].ravel(), luma[b:-b, :b].ravel(), luma[b:-b, -b:].ravel()])
    return float(np.median(border)) > 127.5


class Judged(BaseModel):
    prompt: str
    seed: int
    color: str
    background: str
    seen_color: str | None
    seen_background: str


class QualityReport(BaseModel):
    model: str
    size_px: int
    steps: int
    guidance: float
    seeds: int
    images: int
    color_accuracy: float
    background_accuracy: float
    both_accuracy: float
    color_accuracy_by_color: dict[str, float]
    background_accuracy_by_background: dict[str, float]
    seconds: float
    misses: list[Judged]


def judge(image: Image.Image, prompt: str, seed: int, color: str, background: str) -> Judged:
    return Judged(
        prompt=prompt,
        seed=seed,
        color=color,
        background=background,
        seen_color=dominant_color(image),
        seen_background="light" if background_is_light(image) else "dark",
    )


# What the embedded model is measured (and served) at; see models/skill-icons/TRAINING.md.
DEFAULT_STEPS = 20
DEFAULT_GUIDANCE = 2.5


def measure(
    model: str | Path,
    seeds: int = 8,
    steps: int = DEFAULT_STEPS,
    guidance: float = DEFAULT_GUIDANCE,
    size_px: int = 64,
    grid: Path | None = None,
) -> QualityReport:
    """Generate every colour x background over `seeds` seeds (skills taken in turn) and judge each picture."""
    from skillgen.inference import load_engine
    from skillgen.inference.engine import BatchSpec, Sample

    engine = load_engine(model, backend="torch", device="cpu")
    spec = BatchSpec(width=size_px, height=size_px, steps=steps, guidance=guidance, scheduler="dpmpp")
    cases = [
        (caption(color, SKILLS[i % len(SKILLS)], background), seed, color, background)
        for i, (color, background, seed) in enumerate(itertools.product(COLORS, BACKGROUNDS, range(seeds)))
    ]
    start = time.perf_counter()
    images = engine.generate(spec, [Sample(prompt=p, seed=s) for p, s, _, _ in cases])
    seconds = time.perf_counter() - start
    judged = [judge(image, *case) for image, case in zip(images, cases)]
    if grid is not None:
        save_grid(images, columns=seeds * len(BACKGROUNDS), path=grid)

    def accuracy(hits: list[bool]) -> float:
        return round(sum(hits) / len(hits), 4)

    return QualityReport(
        # A local model is named relative to where the bench ran, so a committed report names no one's home.
        model=os.path.relpath(model) if Path(model).exists() else str(model),
        size_px=size_px,
        steps=steps,
        guidance=guidance,
        seeds=seeds,
        images=len(judged),
        color_accuracy=accuracy([j.seen_color == j.color for j in judged]),
        background_accuracy=accuracy([j.seen_background == j.background for j in judged]),
        both_accuracy=accuracy([j.seen_color == j.color and j.seen_background == j.background for j in judged]),
        color_accuracy_by_color={
            c: accuracy([j.seen_color == c for j in judged if j.color == c]) for c in COLORS
        },
        background_accuracy_by_background={
            b: accuracy([j.seen_background == b for j in judged if j.background == b]) for b in BACKGROUNDS
        },
        seconds=round(seconds, 2),
        misses=[j for j in judged if j.seen_color != j.color or j.seen_background != j.background],
    )


def save_grid(images: list[Image.Image], columns: int, path: Path) -> None:
    w, h = images[0].size
    rows = -(-len(images) // columns)
    sheet = Image.new("RGB", (columns * w, rows * h), (128, 128, 128))
    for i, image in enumerate(images):
        sheet.paste(image, ((i % columns) * w, (i // columns) * h))
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path, optimize=True)


def add_arguments(parser) -> None:
    from skillgen.runtime.settings import default_model

    parser.add_argument("--model", default=default_model(), help="diffusers model dir (default: the embedded one)")
    parser.add_argument("--seeds", type=int, default=8, help="seeds per colour x background (default 8)")
    parser.add_argument("--steps", type=int, default=DEFAULT_STEPS, help=f"denoising steps (default {DEFAULT_STEPS})")
    parser.add_argument(
        "--guidance", type=float, default=DEFAULT_GUIDANCE, help=f"guidance scale (default {DEFAULT_GUIDANCE})"
    )
    parser.add_argument("--size", type=int, default=64, help="image side in pixels (default 64)")
    parser.add_argument("--json", type=Path, help="write the report here as JSON")
    parser.add_argument("--grid", type=Path, help="also save every image on one PNG contact sheet here")


def run(args) -> int:
    report = measure(args.model, args.seeds, args.steps, args.guidance, args.size, args.grid)
    text = report.model_dump_json(indent=2)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(text + "\n")
    summary = {k: v for k, v in json.loads(text).items() if k != "misses"}
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser)
    raise SystemExit(run(parser.parse_args()))
