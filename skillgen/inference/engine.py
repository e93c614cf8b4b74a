"""One denoising loop for every backend.

A backend only knows how to run three networks (text encoder, UNet, VAE decoder); the scheduler math, the
guidance and the per-sample randomness live here, so the torch reference and the ONNX Runtime backends differ
only in how a tensor goes through a network. Each sample draws its initial latents (and any per-step noise)
from its own generator, so an image depends on its own request and never on its batch-mates.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import torch
from PIL import Image

from schemas.messages import SCHEDULERS, Scheduler
from skillgen.inference.errors import DoesNotFit, PipelineError
from skillgen.inference.memory import (
    SLICED,
    TILED,
    Geometry,
    MemoryPolicy,
    headroom_bytes,
    is_out_of_memory,
    plan_level,
)

log = logging.getLogger(__name__)

# diffusers' class and its settings for each of the contract's schedulers (schemas.messages.SCHEDULERS).
SCHEDULER_CLASSES: dict[Scheduler, tuple[str, dict]] = {
    "dpmpp": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    "euler": ("EulerDiscreteScheduler", {}),
    "lcm": ("LCMScheduler", {}),
}
if set(SCHEDULER_CLASSES) != set(SCHEDULERS):
    raise ImportError(f"the engine's schedulers {sorted(SCHEDULER_CLASSES)} differ from the contract's {SCHEDULERS}")


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

    name: str
    device: torch.device
    dtype: torch.dtype
    scheduler_config: dict
    vae_scale_factor: int
    vae_scaling_factor: float
    latent_channels: int
    geometry: Geometry

    def tokenize(self, texts: Sequence[str]) -> torch.Tensor: ...

    def encode_text(self, input_ids: torch.Tensor) -> torch.Tensor: ...

    def unet(self, latents: torch.Tensor, t: torch.Tensor, text_emb: torch.Tensor) -> torch.Tensor: ...

    def decode(self, latents: torch.Tensor) -> torch.Tensor: ...

    def load_adapter(self, key: str, path) -> None: ...

    def use_adapter(self, adapter: str | None) -> None: ...

    def set_memory_savings(self, level: int) -> None: ...

    @property
    def slices_decode(self) -> bool: ...


ProgressFn = Callable[[int, int], None]


@dataclass
class Engine:
    backend: Backend
    memory: MemoryPolicy = field(default_factory=MemoryPolicy)

    def make_scheduler(self, name: str):
        import diffusers

        try:
            cls_name, extra = SCHEDULER_CLASSES[name]
        except KeyError:
            raise PipelineError(f"unknown scheduler {name!r}; choose one of {', '.join(SCHEDULERS)}") from None
        # A fresh scheduler per batch: multistep schedulers keep state between steps.
        return getattr(diffusers, cls_name).from_config({**self.backend.scheduler_config, **extra})

    def check(self, spec: BatchSpec) -> None:
        f = self.backend.vae_scale_factor
        if spec.width % f or spec.height % f:
            raise PipelineError(f"width and height must be multiples of {f}, got {spec.width}x{spec.height}")
        if spec.width * spec.height > self.memory.max_pixels:
            raise DoesNotFit(
                f"{spec.width}x{spec.height} is above this worker's cap of {self.memory.max_pixels} pixels per image; "
                "ask for a smaller size"
            )

    def generate(
        self,
        spec: BatchSpec,
        samples: Sequence[Sample],
        progress: ProgressFn | None = None,
        latents: torch.Tensor | None = None,
    ) -> list[Image.Image]:
        """Images for `samples`, in order. On an out-of-memory error the batch is retried with memory savings on,
        then split in halves (each sample's randomness is its own, so splitting changes no image); only a single
        image that does not fit with every saving raises DoesNotFit."""
        if not samples:
            return []
        self.check(spec)
        be = self.backend
        be.use_adapter(spec.adapter)
        level = plan_level(
            be.geometry,
            headroom_bytes(be.device),
            self.memory.headroom_fraction,
            spec.width,
            spec.height,
            len(samples),
            spec.guidance > 1.0,
        )
        return self._fit(spec, list(samples), latents, level, _Progress(progress, len(samples)))

    def _fit(self, spec, samples, latents, level, tracker) -> list[Image.Image]:
        try:
            images = self._run(spec, samples, latents, level, tracker.chunk(len(samples)))
            tracker.finish(len(samples))
            return images
        except Exception as exc:
            if not is_out_of_memory(exc):
                raise
            log.warning("out of memory at batch %d, savings level %d: %s", len(samples), level, exc)
        # Retried outside the except block, so the failed attempt's tensors are already freed.
        release_cached_memory(self.backend.device)
        if level < SLICED:
            return self._fit(spec, samples, latents, SLICED, tracker)
        if len(samples) > 1:
            half = len(samples) // 2
            head = None if latents is None else latents[:half]
            tail = None if latents is None else latents[half:]
            return self._fit(spec, samples[:half], head, level, tracker) + self._fit(
                spec, samples[half:], tail, level, tracker
            )
        if level < TILED:
            return self._fit(spec, samples, latents, TILED, tracker)
        raise DoesNotFit(
            f"a {spec.width}x{spec.height} image does not fit in {self.backend.device.type} memory even alone, "
            "with attention slicing and VAE tiling; ask for a smaller size"
        )

    def initial_latents(self, spec: BatchSpec, samples: Sequence[Sample]) -> tuple[torch.Tensor, list[torch.Generator]]:
        f = self.backend.vae_scale_factor
        shape = (1, self.backend.latent_channels, spec.height // f, spec.width // f)
        gens = [torch.Generator("cpu").manual_seed(s.seed) for s in samples]
        # Drawn on the CPU in fp32 so a seed means the same picture on every device and precision.
        latents = torch.cat([torch.randn(shape, generator=g, dtype=torch.float32) for g in gens])
        return latents, gens

    @torch.inference_mode()
    def _run(self, spec, samples, latents, level, progress: ProgressFn) -> list[Image.Image]:
        be = self.backend
        be.set_memory_savings(level)
        scheduler = self.make_scheduler(spec.scheduler)
        scheduler.set_timesteps(spec.steps, device=be.device)

        cfg = spec.guidance > 1.0
        emb = be.encode_text(be.tokenize([s.prompt for s in samples]))
        if cfg:
            neg = be.encode_text(be.tokenize([s.negative_prompt for s in samples]))
            emb = torch.cat([neg, emb])

        # Fresh generators on every attempt: a retry after an OOM repeats exactly the same randomness.
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
            progress(i + 1, n)
        scaled = (latents / be.vae_scaling_factor).to(be.dtype)
        if be.slices_decode:
            images = torch.cat([be.decode(z[None]).float().cpu() for z in scaled])
        else:
            images = be.decode(scaled).float().cpu()
        return to_pil(images)


class _Progress:
    """Reports (step, steps) over the whole request even when the engine splits it into smaller batches."""

    def __init__(self, fn: ProgressFn | None, n_samples: int):
        self.fn, self.n_samples = fn, n_samples
        self.done = 0  # sample-steps of finished chunks
        self.last = 0
        self.steps = 0

    def chunk(self, k: int) -> ProgressFn:
        def report(i: int, n: int) -> None:
            self.steps = n
            step = (self.done + k * i) // self.n_samples
            if self.fn is not None and step > self.last:
                self.last = step
                self.fn(step, n)

        return report

    def finish(self, k: int) -> None:
        self.done += k * self.steps


def release_cached_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    arr = ((images / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)
    return [Image.fromarray(a) for a in arr]
