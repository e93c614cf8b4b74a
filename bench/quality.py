"""`skillgen bench quality`: does the model draw the colour and the background a prompt asks for?

For every colour and background word of the icon captions, over several seeds, it generates through the same
engine the service uses (`skillgen.inference.load_engine`) and judges each picture from its pixels: the dominant
hue of its saturated pixels names a colour, the luminance of its border says light or dark.
`dominant_color` and `background_is_light` are the judges; the end-to-end tests call them too.

`--scheduler` and `--adapter` (a diffusers LoRA file, loaded through the engine's backend) measure other sampling
paths; `--turbo-table` measures the few-step "turbo" path against the 20-step reference (`TURBO_ROWS`): each row's
accuracies once, and its per-image latency over `--repeats` rounds that interleave the rows (min and median).
"""

from __future__ import annotations

import colorsys
import itertools
import json
import os
import statistics
import time
from pathlib import Path

import numpy as np
from PIL import Image
from pydantic import BaseModel

from schemas.messages import SCHEDULERS
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
    scheduler: str
    adapter: str | None  # the LoRA file the images were drawn with; None is the base model
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
    seconds_per_image: float  # the whole batch's wall time over its images (one generate call, one batch)
    threads: int  # torch CPU threads
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


def _path_name(path: str | Path) -> str:
    # A local file is named relative to where the bench ran, so a committed report names no one's home.
    return os.path.relpath(path) if Path(path).exists() else str(path)


def _engine(model: str | Path):
    from skillgen.inference import load_engine

    return load_engine(model, backend="torch", device="cpu")


ADAPTER_KEY = "measured-adapter"


def _cases(seeds: int) -> list[tuple[str, int, str, str]]:
    return [
        (caption(color, SKILLS[i % len(SKILLS)], background), seed, color, background)
        for i, (color, background, seed) in enumerate(itertools.product(COLORS, BACKGROUNDS, range(seeds)))
    ]


def _generate(engine, spec, seeds: int):
    from skillgen.inference.engine import Sample

    cases = _cases(seeds)
    start = time.perf_counter()
    images = engine.generate(spec, [Sample(prompt=p, seed=s) for p, s, _, _ in cases])
    return cases, images, time.perf_counter() - start


def measure(
    model: str | Path,
    seeds: int = 8,
    steps: int = DEFAULT_STEPS,
    guidance: float = DEFAULT_GUIDANCE,
    size_px: int = 64,
    grid: Path | None = None,
    scheduler: str = "dpmpp",
    adapter: Path | None = None,
    engine=None,
) -> QualityReport:
    """Generate every colour x background over `seeds` seeds (skills taken in turn) and judge each picture.

    `adapter`: a diffusers LoRA file the images are drawn with. `engine`: one already loaded for `model` (the
    turbo table reuses one); by default a torch engine on the CPU is loaded."""
    from skillgen.inference.engine import BatchSpec

    engine = engine or _engine(model)
    if adapter is not None:
        engine.backend.load_adapter(ADAPTER_KEY, adapter)
    spec = BatchSpec(
        width=size_px, height=size_px, steps=steps, guidance=guidance, scheduler=scheduler,
        adapter=ADAPTER_KEY if adapter is not None else None,
    )
    cases, images, seconds = _generate(engine, spec, seeds)
    judged = [judge(image, *case) for image, case in zip(images, cases)]
    if grid is not None:
        save_grid(images, columns=seeds * len(BACKGROUNDS), path=grid)

    def accuracy(hits: list[bool]) -> float:
        return round(sum(hits) / len(hits), 4)

    import torch

    return QualityReport(
        model=_path_name(model),
        size_px=size_px,
        scheduler=scheduler,
        adapter=_path_name(adapter) if adapter is not None else None,
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
        seconds_per_image=round(seconds / len(judged), 4),
        threads=torch.get_num_threads(),
        misses=[j for j in judged if j.seen_color != j.color or j.seen_background != j.background],
    )


class TurboRow(BaseModel):
    name: str
    scheduler: str
    steps: int
    guidance: float
    lora: bool  # drawn with the LCM-LoRA


# The 20-step reference, the same few steps without distillation, and the LCM-LoRA at 2, 4 and 8 steps.
TURBO_ROWS = (
    TurboRow(name="dpmpp-20 (reference)", scheduler="dpmpp", steps=20, guidance=2.5, lora=False),
    TurboRow(name="dpmpp-4", scheduler="dpmpp", steps=4, guidance=2.5, lora=False),
    TurboRow(name="lcm-4, no LoRA", scheduler="lcm", steps=4, guidance=1.0, lora=False),
    TurboRow(name="lcm-4 + LCM-LoRA", scheduler="lcm", steps=4, guidance=1.0, lora=True),
    TurboRow(name="lcm-2 + LCM-LoRA", scheduler="lcm", steps=2, guidance=1.0, lora=True),
    TurboRow(name="lcm-8 + LCM-LoRA", scheduler="lcm", steps=8, guidance=1.0, lora=True),
)


class TurboResult(TurboRow):
    color_accuracy: float
    background_accuracy: float
    both_accuracy: float
    color_accuracy_by_color: dict[str, float]
    seconds_per_image_min: float
    seconds_per_image_median: float


class TurboReport(BaseModel):
    model: str
    adapter: str
    size_px: int
    seeds: int
    images_per_row: int
    threads: int
    repeats: int
    rows: list[TurboResult]


def default_lcm_adapter() -> Path:
    from skillgen.runtime.settings import REPO_ROOT

    return REPO_ROOT / "models" / "skill-icons-lcm" / "pytorch_lora_weights.safetensors"


def measure_turbo(model: str | Path, adapter: Path, seeds: int = 8, size_px: int = 64, repeats: int = 3,
                  rows: tuple[TurboRow, ...] = TURBO_ROWS) -> TurboReport:
    """Every row's accuracies (the images are seed-exact, so once is enough) and its seconds per image over
    `repeats` rounds; each round runs every row once, so a neighbour's load lands on all rows alike."""
    if repeats < 1:
        raise ValueError(f"repeats must be at least 1, got {repeats}")
    if not Path(adapter).is_file():
        raise FileNotFoundError(f"no LCM-LoRA at {adapter}; train one with `skillgen model train-lcm` or pass --adapter")
    engine = _engine(model)
    reports: dict[str, QualityReport] = {}
    per_image: dict[str, list[float]] = {row.name: [] for row in rows}
    for _ in range(repeats):
        for row in rows:
            report = measure(model, seeds, row.steps, row.guidance, size_px, scheduler=row.scheduler,
                             adapter=adapter if row.lora else None, engine=engine)
            reports.setdefault(row.name, report)
            per_image[row.name].append(report.seconds_per_image)
    import torch

    return TurboReport(
        model=_path_name(model), adapter=_path_name(adapter), size_px=size_px, seeds=seeds,
        images_per_row=reports[rows[0].name].images, threads=torch.get_num_threads(), repeats=repeats,
        rows=[
            TurboResult(
                **row.model_dump(),
                **reports[row.name].model_dump(
                    include={"color_accuracy", "background_accuracy", "both_accuracy", "color_accuracy_by_color"}
                ),
                seconds_per_image_min=min(per_image[row.name]),
                seconds_per_image_median=round(statistics.median(per_image[row.name]), 4),
            )
            for row in rows
        ],
    )


def turbo_table(report: TurboReport) -> str:
    lines = [
        "| row | scheduler | steps | guidance | LCM-LoRA | colour | background | s/image min | s/image median |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in report.rows:
        lines.append(
            f"| {r.name} | {r.scheduler} | {r.steps} | {r.guidance:g} | {'yes' if r.lora else 'no'} | "
            f"{r.color_accuracy:.3f} | {r.background_accuracy:.3f} | {r.seconds_per_image_min:.4f} | "
            f"{r.seconds_per_image_median:.4f} |"
        )
    return "\n".join(lines)


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
    parser.add_argument("--scheduler", choices=SCHEDULERS, default="dpmpp", help="sampler (default dpmpp)")
    parser.add_argument("--adapter", type=Path, help="a diffusers LoRA file (safetensors) to draw with; for "
                        "--turbo-table, the LCM-LoRA (default models/skill-icons-lcm/pytorch_lora_weights.safetensors)")
    parser.add_argument("--turbo-table", action="store_true",
                        help="measure the few-step path (dpmpp 20 and 4 steps, lcm 4 steps without and 2/4/8 with the "
                        "LCM-LoRA) instead of one setting; --steps, --guidance, --scheduler and --grid do not apply")
    parser.add_argument("--repeats", type=int, default=3, help="--turbo-table: timed rounds per row (default 3)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads, pinned for the run and reported (default 1)")


def run(args) -> int:
    import torch

    torch.set_num_threads(args.threads)
    if args.turbo_table:
        turbo = measure_turbo(args.model, args.adapter or default_lcm_adapter(), args.seeds, args.size, args.repeats)
        if args.json is not None:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(turbo.model_dump_json(indent=2) + "\n")
        print(f"{turbo.images_per_row} images per row at {turbo.size_px}px, {turbo.threads} torch thread(s), "
              f"{turbo.repeats} interleaved rounds")
        print(turbo_table(turbo))
        return 0
    if args.adapter is not None and not args.adapter.is_file():
        raise FileNotFoundError(f"--adapter {args.adapter} is not a file")
    report = measure(args.model, args.seeds, args.steps, args.guidance, args.size, args.grid,
                     scheduler=args.scheduler, adapter=args.adapter)
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
