"""GPU benchmark of LoRA training: SD 1.5 architecture (random weights) at 512x512, the article's recipe (rank 8
on the UNet's attention, rank 4 on the text encoder), fp16 mixed precision, through `trainer.lora.train_lora`
exactly as the trainer service runs it. Speed and memory do not depend on weight values.

    python -m bench.gpu_trainer --json bench/results/gpu_trainer.json    # on a GPU machine, about 2 minutes
    python -m bench.gpu_trainer --smoke                                  # CPU path: tiny model, a few steps

One row per (batch size, gradient checkpointing): steps/s after warm-up and peak GPU memory (torch allocator).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROWS = [(1, True), (4, True), (4, False)]


def sd15_parts(device, dtype, tokenizer_dir: Path):
    """SD 1.5's text encoder (CLIP ViT-L/14 text), UNet, VAE and noise schedule, random weights, in memory."""
    import torch
    from diffusers import DDPMScheduler
    from transformers import CLIPTokenizer

    from skillgen.tools.tiny import (
        SD15,
        SD15_SCHEDULER,
        random_pipeline,
        write_clip_tokenizer,
    )
    from trainer.lora import Components

    if not (tokenizer_dir / "vocab.json").exists():
        write_clip_tokenizer(tokenizer_dir)
    torch.manual_seed(0)
    # Random init of 1.1 B parameters is minutes on a CPU, seconds on a GPU: create them there.
    pipe = random_pipeline(SD15, CLIPTokenizer.from_pretrained(tokenizer_dir), device=device)
    text_encoder, unet, vae = pipe.text_encoder, pipe.unet, pipe.vae
    parts = Components(pipe.tokenizer, text_encoder, unet, vae, DDPMScheduler(**SD15_SCHEDULER))
    for module in (text_encoder, unet, vae):
        module.requires_grad_(False)
        module.to(device, dtype)
    return parts


def measure(make_parts, batch: int, checkpointing: bool, steps: int, warmup: int, size_px: int, device) -> dict:
    import torch

    from bench.trainer import red_circles
    from skillgen.adapters.recipe import LoraRecipe
    from trainer.lora import train_lora

    parts = make_parts()
    recipe = LoraRecipe(batch_size=batch, gradient_checkpointing=checkpointing, resolution_px=size_px,
                        checkpoint_every=10_000)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(device)
    times: list[float] = []
    losses: list[float] = []

    def on_step(step: int, total: int, loss: float) -> None:
        times.append(time.perf_counter())  # loss.item() inside the loop has synchronized the GPU
        losses.append(loss)

    with tempfile.TemporaryDirectory() as tmp:
        train_lora(parts, red_circles(8, size_px), recipe, steps + warmup, Path(tmp) / "ckpt", "gpu-bench", on_step)
    timed = times[warmup - 1 :]
    row = {
        "batch_size": batch,
        "gradient_checkpointing": checkpointing,
        "mixed_precision": "fp16" if device.type == "cuda" else "no",
        "steps_timed": len(timed) - 1,
        "steps_per_s": round((len(timed) - 1) / (timed[-1] - timed[0]), 3),
        "images_per_s": round(batch * (len(timed) - 1) / (timed[-1] - timed[0]), 3),
        "loss_last": round(losses[-1], 4),
    }
    if device.type == "cuda":
        row["peak_mem_mb"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    del parts
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="CPU path on the tiny model, a few steps")
    parser.add_argument("--steps", type=int, default=30, help="timed steps per row (default 30)")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps first (default 5)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)

    import torch

    with tempfile.TemporaryDirectory() as tmp:
        if args.smoke:
            from skillgen.tools.tiny import build_tiny
            from trainer.lora import load_components

            device, size_px, steps, warmup = torch.device("cpu"), 64, 2, 1
            model = build_tiny(Path(tmp) / "tiny")

            def make_parts():
                return load_components(model, device)
        else:
            if not torch.cuda.is_available():
                print("no CUDA device: run with --smoke for the CPU path", file=sys.stderr)
                return 2
            device, size_px, steps, warmup = torch.device("cuda"), 512, args.steps, args.warmup

            def make_parts():
                return sd15_parts(device, torch.float16, Path(tmp) / "tokenizer")

        results = {
            "model": "tiny (smoke)" if args.smoke else "SD 1.5 architecture, random weights",
            "resolution_px": size_px,
            "recipe": "LoRA rank 8 on UNet to_q/to_k/to_v/to_out.0, rank 4 on text encoder q/k/v_proj; AdamW",
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "torch": torch.__version__,
            "rows": [],
        }
        for batch, checkpointing in ROWS[:1] if args.smoke else ROWS:
            row = measure(make_parts, batch, checkpointing, steps, warmup, size_px, device)
            results["rows"].append(row)
            mem = f", peak {row['peak_mem_mb']:.0f} MiB" if "peak_mem_mb" in row else ""
            print(f"batch {batch} checkpointing {checkpointing}: {row['steps_per_s']:.2f} steps/s "
                  f"({row['images_per_s']:.2f} images/s){mem}", flush=True)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
