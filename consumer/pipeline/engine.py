"""One denoising loop for every backend.

A backend only knows how to run three networks (text encoder, UNet, VAE decoder); the scheduler math, the
guidance and the per-sample randomness live here, so the torch reference and the ONNX Runtime backends differ
only in how a tensor goes through a network. Each sample draws its initial latents (and any per-step noise)
from its own generator, so an image depends on its own request and never on its batch-mates.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import torch
from PIL import Image

from consumer.pipeline.errors import PipelineError

SCHEDULERS = {
    "dpmpp": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    "euler": ("EulerDiscreteScheduler", {}),
    "lcm": ("LCMScheduler", {}),
}


@dataclass(frozen=True)
class Sample:
    """One image to make."""

    prompt: str
    negative_prompt: str = ""
    seed: int = 0


@dataclass(frozen=True)
class BatchSpec:
    """What every sample of one batch shares: requests that differ here never share a batch."""

    width: int = 512
    height: int = 512
    steps: int = 20
    guidance: float = 7.5
    scheduler: str = "dpmpp"
    adapter: str | None = None  # a key the backend resolved with `load_adapter`; None is the base model


class Backend(Protocol):
    """The three networks of Stable Diffusion, behind whatever runtime runs them."""

    device: torch.device
    dtype: torch.dtype
    scheduler_config: dict
    vae_scale_factor: int
    vae_scaling_factor: float
    latent_channels: int

    def tokenize(self, texts: Sequence[str]) -> torch.Tensor: ...

    def encode_text(self, input_ids: torch.Tensor) -> torch.Tensor: ...

    def unet(self, latents: torch.Tensor, t: torch.Tensor, text_emb: torch.Tensor) -> torch.Tensor: ...

    def decode(self, latents: torch.Tensor) -> torch.Tensor: ...

    def use_adapter(self, adapter: str | None) -> None: ...


ProgressFn = Callable[[int, int], None]


@dataclass
class Engine:
    backend: Backend
    _scheduler_classes: dict = field(default_factory=dict, init=False, repr=False)

    def make_scheduler(self, name: str):
        import diffusers

        try:
            cls_name, extra = SCHEDULERS[name]
        except KeyError:
            raise PipelineError(f"unknown scheduler {name!r}; choose one of {', '.join(SCHEDULERS)}") from None
        # A fresh scheduler per batch: multistep schedulers keep state between steps.
        return getattr(diffusers, cls_name).from_config({**self.backend.scheduler_config, **extra})

    def initial_latents(self, spec: BatchSpec, samples: Sequence[Sample]) -> tuple[torch.Tensor, list[torch.Generator]]:
        f = self.backend.vae_scale_factor
        shape = (1, self.backend.latent_channels, spec.height // f, spec.width // f)
        gens = [torch.Generator("cpu").manual_seed(s.seed) for s in samples]
        # Drawn on the CPU in fp32 so a seed means the same picture on every device and precision.
        latents = torch.cat([torch.randn(shape, generator=g, dtype=torch.float32) for g in gens])
        return latents, gens

    @torch.inference_mode()
    def generate(
        self,
        spec: BatchSpec,
        samples: Sequence[Sample],
        progress: ProgressFn | None = None,
        latents: torch.Tensor | None = None,
    ) -> list[Image.Image]:
        if not samples:
            return []
        f = self.backend.vae_scale_factor
        if spec.width % f or spec.height % f:
            raise PipelineError(f"width and height must be multiples of {f}, got {spec.width}x{spec.height}")
        be = self.backend
        be.use_adapter(spec.adapter)
        scheduler = self.make_scheduler(spec.scheduler)
        scheduler.set_timesteps(spec.steps, device=be.device)

        cfg = spec.guidance > 1.0
        prompts = [s.prompt for s in samples]
        emb = be.encode_text(be.tokenize(prompts))
        if cfg:
            neg = be.encode_text(be.tokenize([s.negative_prompt for s in samples]))
            emb = torch.cat([neg, emb])

        init, gens = self.initial_latents(spec, samples)
        # The scheduler math runs in fp32 on the backend's device, so latents never leave it between steps.
        latents = (init if latents is None else latents).to(be.device) * scheduler.init_noise_sigma
        n = len(scheduler.timesteps)
        for i, t in enumerate(scheduler.timesteps):
            model_in = torch.cat([latents, latents]) if cfg else latents
            model_in = scheduler.scale_model_input(model_in, t)
            noise = be.unet(model_in.to(be.dtype), t, emb).float()
            if cfg:
                uncond, cond = noise.chunk(2)
                noise = uncond + spec.guidance * (cond - uncond)
            latents = scheduler.step(noise, t, latents, generator=gens, return_dict=True).prev_sample
            if progress is not None:
                progress(i + 1, n)
        images = be.decode((latents / be.vae_scaling_factor).to(be.dtype)).float().cpu()
        return to_pil(images)


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    arr = ((images / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)
    return [Image.fromarray(a) for a in arr]
