"""The training core: the noise-prediction loss of a text-conditioned diffusers UNet, and the loop that lowers it.

The from-scratch recipe (`skillgen.tools.icon_model`) and the LoRA trainer share both: a LoRA run hands `train` only
the adapter's parameters. All randomness (noise, timesteps, caption dropout, VAE posterior samples) comes from
the caller's `torch.Generator`, drawn on the CPU, so a seed means the same run on every device.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from pydantic import BaseModel, Field
from tqdm.auto import tqdm


@dataclass(frozen=True)
class TextImageBatch:
    """Captions with either their images (encoded with the VAE on the fly) or latents already encoded and scaled."""

    captions: Sequence[str]
    pixels: torch.Tensor | None = None  # (B, 3, H, W) in [-1, 1]
    latents: torch.Tensor | None = None  # (B, C, H/8, W/8), already multiplied by the VAE's scaling_factor

    def __post_init__(self) -> None:
        if (self.pixels is None) == (self.latents is None):
            raise ValueError("a TextImageBatch needs exactly one of pixels or latents")
        images = self.pixels if self.pixels is not None else self.latents
        if images.shape[0] != len(self.captions):
            raise ValueError(f"{len(self.captions)} captions for {images.shape[0]} images")


class LossOptions(BaseModel):
    caption_dropout: float = Field(0.0, ge=0.0, le=1.0, description="share of captions replaced by '' (for CFG)")
    noise_offset: float = Field(
        0.0, ge=0.0, description="per-channel constant noise: lets images get very light or dark"
    )
    snr_gamma: float | None = Field(None, gt=0.0, description="min-SNR loss weighting; None weighs every step alike")


def tokenize(tokenizer, captions: Sequence[str]) -> torch.Tensor:
    """Token ids exactly as the inference backends make them: padded to the tokenizer's full length."""
    return tokenizer(
        list(captions),
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids


@torch.no_grad()
def encode_pixels(vae, pixels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    posterior = vae.encode(pixels.to(vae.device, vae.dtype)).latent_dist
    noise = torch.randn(posterior.mean.shape, generator=generator).to(posterior.mean)
    return (posterior.mean + posterior.std * noise) * vae.config.scaling_factor


def noise_prediction_loss(
    unet,
    vae,
    text_encoder,
    tokenizer,
    noise_scheduler,
    batch: TextImageBatch,
    generator: torch.Generator,
    options: LossOptions = LossOptions(),
) -> torch.Tensor:
    """The denoising loss of one batch: noise the latents at random timesteps, predict the noise (or velocity)."""
    device = unet.device
    latents = batch.latents if batch.latents is not None else encode_pixels(vae, batch.pixels, generator)
    latents = latents.to(device, torch.float32)
    n = latents.shape[0]

    captions = list(batch.captions)
    if options.caption_dropout > 0:
        dropped = (torch.rand(n, generator=generator) < options.caption_dropout).tolist()
        captions = ["" if d else c for c, d in zip(captions, dropped)]
    text_emb = text_encoder(tokenize(tokenizer, captions).to(device))[0]

    noise = torch.randn(latents.shape, generator=generator)
    if options.noise_offset > 0:
        noise += options.noise_offset * torch.randn((n, latents.shape[1], 1, 1), generator=generator)
    noise = noise.to(device)
    timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (n,), generator=generator).to(device)
    noisy = noise_scheduler.add_noise(latents, noise, timesteps)
    prediction_type = noise_scheduler.config.prediction_type
    if prediction_type == "epsilon":
        target = noise
    elif prediction_type == "v_prediction":
        target = noise_scheduler.get_velocity(latents, noise, timesteps)
    else:
        raise ValueError(f"cannot train prediction_type {prediction_type!r}; use epsilon or v_prediction")

    pred = unet(noisy.to(unet.dtype), timesteps, encoder_hidden_states=text_emb.to(unet.dtype)).sample.float()
    if options.snr_gamma is None:
        return F.mse_loss(pred, target)
    from diffusers.training_utils import compute_snr

    snr = compute_snr(noise_scheduler, timesteps)
    weight = snr.clamp(max=options.snr_gamma) / (snr if prediction_type == "epsilon" else snr + 1)
    per_sample = F.mse_loss(pred, target, reduction="none").mean(dim=(1, 2, 3))
    return (per_sample * weight).mean()


class TrainSchedule(BaseModel):
    steps: int = Field(gt=0)
    lr: float = Field(gt=0.0)
    warmup_steps: int = Field(0, ge=0)
    weight_decay: float = Field(0.0, ge=0.0)
    max_grad_norm: float = Field(1.0, gt=0.0)
    log_every: int = Field(100, gt=0)


def train(
    parameters: Iterable[torch.nn.Parameter],
    step_loss: Callable[[int], torch.Tensor],
    schedule: TrainSchedule,
    name: str,
    log: Callable[[str], None] = print,
    after_step: Callable[[], None] | None = None,
) -> list[float]:
    """AdamW with warmup then cosine decay over `schedule.steps` calls of `step_loss(step)`, with a progress bar.

    Every `log_every` steps one line goes to `log` with the mean loss since the last line; those means are returned.
    """
    params = [p for p in parameters if p.requires_grad]
    if not params:
        raise ValueError(f"{name}: nothing to train, no parameter requires grad")
    from diffusers.optimization import get_scheduler

    optimizer = torch.optim.AdamW(params, lr=schedule.lr, weight_decay=schedule.weight_decay)
    lr_schedule = get_scheduler(
        "cosine", optimizer, num_warmup_steps=schedule.warmup_steps, num_training_steps=schedule.steps
    )
    means: list[float] = []
    window: list[float] = []
    start = time.perf_counter()
    with tqdm(total=schedule.steps, desc=name, unit="step", dynamic_ncols=True) as bar:
        for step in range(schedule.steps):
            loss = step_loss(step)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, schedule.max_grad_norm)
            optimizer.step()
            lr_schedule.step()
            optimizer.zero_grad(set_to_none=True)
            if after_step is not None:
                after_step()
            window.append(loss.item())
            bar.set_postfix(loss=f"{window[-1]:.4f}", refresh=False)
            bar.update()
            if len(window) == schedule.log_every or step + 1 == schedule.steps:
                means.append(sum(window) / len(window))
                window.clear()
                log(
                    f"{name} step {step + 1}/{schedule.steps} loss {means[-1]:.4f} "
                    f"lr {lr_schedule.get_last_lr()[0]:.2e} {time.perf_counter() - start:.0f}s"
                )
    return means
