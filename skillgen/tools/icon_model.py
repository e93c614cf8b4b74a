"""The embedded default model, trained from scratch on procedural skill icons (`skillgen model train-icons`).

The recipe: draw the icon dataset (`skillgen.tools.icons`); train the VAE alone on it (colour-weighted reconstruction
and a light KL term); encode every icon once; train the UNet and the text encoder together on those latents with
the shared noise-prediction loss (`trainer.diffusion`), keeping an EMA of their weights; save everything as fp16
safetensors in diffusers format. The architecture is `skillgen.tools.tiny`'s geometry, the same diffusers
classes and the real CLIP tokenizer (`untrained_pipeline` says what differs), so the model loads wherever the
random tiny one did. The defaults take about 17 minutes on one core of a shared 2-core CPU.
"""

from __future__ import annotations

import platform
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from pydantic import BaseModel, Field
from tqdm.auto import tqdm

from skillgen.tools.icons import IconDataset
from trainer.diffusion import (
    LossOptions,
    TextImageBatch,
    TrainSchedule,
    noise_prediction_loss,
    train,
)

LOG_NAME = "training_log.txt"
TEXT_WIDTH = 32


class IconRecipe(BaseModel):
    seed: int = 0
    images: int = Field(2688, gt=0, description="icons drawn (16 of each skill x colour x background)")
    size_px: int = 64
    vae: TrainSchedule = TrainSchedule(steps=1000, lr=1.5e-3, warmup_steps=50)
    vae_batch: int = 16
    chroma_weight: float = 4.0
    kl_weight: float = 1e-6
    denoiser: TrainSchedule = TrainSchedule(steps=2500, lr=1e-3, warmup_steps=100)
    denoiser_batch: int = 64
    loss: LossOptions = LossOptions(caption_dropout=0.1, noise_offset=0.05, snr_gamma=5.0)
    ema_decay: float = 0.999


def _draw(recipe: IconRecipe) -> tuple[torch.Tensor, list[str]]:
    dataset = IconDataset(recipe.images, seed=recipe.seed, size_px=recipe.size_px)
    pixels = np.stack([np.asarray(image) for image, _ in tqdm(dataset, desc="icons", unit="img")])
    captions = [spec.caption for spec in dataset.specs]
    return torch.from_numpy(pixels).permute(0, 3, 1, 2).contiguous(), captions


def _as_unit_range(pixels_u8: torch.Tensor) -> torch.Tensor:
    return pixels_u8.float() / 127.5 - 1.0


def _reconstruction_loss(recon: torch.Tensor, x: torch.Tensor, chroma_weight: float) -> torch.Tensor:
    """Squared error in luma and two colour-difference channels, the colour ones weighted up.

    With plain RGB error the VAE learns shapes (luma) first and colours only after thousands of steps;
    weighting the chroma error puts the icon's colour, the thing prompts ask for, first.
    """
    d = recon - x
    luma = 0.299 * d[:, 0] + 0.587 * d[:, 1] + 0.114 * d[:, 2]
    chroma = (d[:, 0] - luma).pow(2).mean() + (d[:, 2] - luma).pow(2).mean()
    return luma.pow(2).mean() + chroma_weight * chroma


def _train_vae(vae, pixels_u8: torch.Tensor, recipe: IconRecipe, gen: torch.Generator, log) -> None:
    vae.train()

    def step_loss(step: int) -> torch.Tensor:
        idx = torch.randint(0, len(pixels_u8), (recipe.vae_batch,), generator=gen)
        x = _as_unit_range(pixels_u8[idx])
        posterior = vae.encode(x).latent_dist
        z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=gen)
        recon = vae.decode(z).sample
        return _reconstruction_loss(recon, x, recipe.chroma_weight) + recipe.kl_weight * posterior.kl().mean()

    train(vae.parameters(), step_loss, recipe.vae, "vae", log)
    vae.eval()


@torch.no_grad()
def _encode_all(vae, pixels_u8: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    means, stds = [], []
    for chunk in pixels_u8.split(256):
        posterior = vae.encode(_as_unit_range(chunk)).latent_dist
        means.append(posterior.mean)
        stds.append(posterior.std)
    return torch.cat(means), torch.cat(stds)


def icon_shape(size_px: int):
    """The icon model's sizes. `skillgen.tools.tiny.TINY` with these changes: a 32-wide text encoder (its
    49408-token embedding is most of the model's bytes; 64 wide the shipped model would not fit in 15 MB);
    GroupNorm groups of four to sixteen channels where TINY has one or two, since a one-channel group normalises
    away the channel ratios that carry an icon's colour; and a VAE whose full-resolution level is 16 channels
    wide, which about halves the cost of its training. Every size is spelled out here rather than derived from
    TINY, so that a change to the random test model never changes what this recipe trains."""
    from skillgen.tools.tiny import SDShape

    return SDShape(sample_px=size_px, text_width=TEXT_WIDTH, text_layers=2, unet_channels=(32, 64, 64),
                   unet_layers=1, unet_groups=8, vae_channels=(16, 32, 64, 64), vae_layers=1, vae_groups=4)


def untrained_pipeline(seed: int, size_px: int):
    """The icon model's architecture (`icon_shape`) with random weights, the real CLIP tokenizer, and a VAE
    posterior that starts narrow."""
    from transformers import CLIPTokenizer

    from skillgen.tools.tiny import random_pipeline, write_clip_tokenizer

    torch.manual_seed(seed)
    with tempfile.TemporaryDirectory() as tmp:
        write_clip_tokenizer(Path(tmp))
        tokenizer = CLIPTokenizer.from_pretrained(tmp)
    pipe = random_pipeline(icon_shape(size_px), tokenizer)
    with torch.no_grad():
        # Start the posterior narrow (std ~0.05): the decoder then learns from clean latents from the first step.
        vae = pipe.vae
        vae.quant_conv.bias[vae.config.latent_channels :] = -6.0
    return pipe


def train_icon_model(recipe: IconRecipe, out: Path, log: Callable[[str], None]) -> Path:
    """Train every network of the tiny SD from scratch on icons and save the fp16 diffusers model under `out`."""
    from diffusers import DDPMScheduler
    from diffusers.training_utils import EMAModel

    started = time.perf_counter()
    log(f"recipe {recipe.model_dump_json()}")
    log(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.processor() or platform.machine()}")
    pipe = untrained_pipeline(recipe.seed, recipe.size_px)
    gen = torch.Generator("cpu").manual_seed(recipe.seed)

    pixels_u8, captions = _draw(recipe)
    log(f"drew {len(captions)} icons at {recipe.size_px}px in {time.perf_counter() - started:.0f}s")

    _train_vae(pipe.vae, pixels_u8, recipe, gen, log)
    pipe.vae.requires_grad_(False)
    mean, std = _encode_all(pipe.vae, pixels_u8)
    sample = mean + std * torch.randn(mean.shape, generator=gen)
    # The UNet expects unit-variance latents; SD 1.5's 0.18215 was its own VAE's version of this number.
    scaling_factor = float(1.0 / sample.std())
    pipe.vae.register_to_config(scaling_factor=scaling_factor)
    log(f"latents {tuple(mean.shape[1:])}: std {float(sample.std()):.3f}, scaling_factor {scaling_factor:.4f}")

    unet, text_encoder = pipe.unet, pipe.text_encoder
    unet.train()
    text_encoder.train()
    weights = list(unet.parameters()) + list(text_encoder.parameters())
    ema = EMAModel(weights, decay=recipe.ema_decay, use_ema_warmup=True, power=3 / 4)
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)

    def step_loss(step: int) -> torch.Tensor:
        idx = torch.randint(0, len(captions), (recipe.denoiser_batch,), generator=gen)
        picked = mean[idx]
        latents = (picked + std[idx] * torch.randn(picked.shape, generator=gen)) * scaling_factor
        batch = TextImageBatch(captions=[captions[i] for i in idx.tolist()], latents=latents)
        return noise_prediction_loss(
            unet, pipe.vae, text_encoder, pipe.tokenizer, noise_scheduler, batch, gen, recipe.loss
        )

    train(weights, step_loss, recipe.denoiser, "unet+text", log, after_step=lambda: ema.step(weights))
    ema.copy_to(weights)
    unet.eval()
    text_encoder.eval()

    pipe.to(torch.float16)
    pipe.save_pretrained(out, safe_serialization=True)
    size_mb = sum(f.stat().st_size for f in out.rglob("*.safetensors")) / 1e6
    log(f"saved fp16 weights ({size_mb:.1f} MB) to {out}; total {time.perf_counter() - started:.0f}s")
    return out


@contextmanager
def training_log(out: Path) -> Iterator[Callable[[str], None]]:
    """A `log(line)` that prints above any progress bar and appends to `out/LOG_NAME` (`out` is created)."""
    out.mkdir(parents=True, exist_ok=True)
    with (out / LOG_NAME).open("w") as log_file:

        def log(line: str) -> None:
            tqdm.write(line)
            log_file.write(line + "\n")
            log_file.flush()

        yield log


def add_arguments(parser) -> None:
    d = IconRecipe()
    parser.add_argument("--out", type=Path, required=True, help="directory to write the diffusers model to")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads (default 1: on a shared 2-core machine two threads that lose a core to another "
        "process run many times slower than one)",
    )
    parser.add_argument(
        "--seed", type=int, default=d.seed, help=f"seeds the data, the weights and training (default {d.seed})"
    )
    parser.add_argument("--images", type=int, default=d.images, help=f"icons to draw (default {d.images})")
    parser.add_argument("--vae-steps", type=int, default=d.vae.steps, help=f"VAE steps (default {d.vae.steps})")
    parser.add_argument(
        "--unet-steps",
        type=int,
        default=d.denoiser.steps,
        help=f"UNet + text encoder steps (default {d.denoiser.steps})",
    )


def run(args) -> int:
    torch.set_num_threads(args.threads)
    d = IconRecipe()
    recipe = d.model_copy(
        update={
            "seed": args.seed,
            "images": args.images,
            "vae": d.vae.model_copy(update={"steps": args.vae_steps}),
            "denoiser": d.denoiser.model_copy(update={"steps": args.unet_steps}),
        }
    )
    out: Path = args.out
    with training_log(out) as log:
        train_icon_model(recipe, out, log)
    return 0


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser)
    raise SystemExit(run(parser.parse_args()))
