"""One denoising loop for every backend.

A backend only knows how to run four networks (text encoder, UNet, VAE encoder and decoder); the scheduler math,
the guidance and the per-sample randomness live here, so the torch reference and the ONNX Runtime backends differ
only in how a tensor goes through a network. Each sample draws its initial latents (and any per-step noise)
from its own generator, so an image depends on its own request and never on its batch-mates.

Image-to-image works as diffusers' StableDiffusionImg2ImgPipeline does, with a deterministic encoding: each init
image is VAE-encoded alone (the latent distribution's mean, times the scaling factor), noised with its sample's
own generator to the first of the last `int(steps * strength)` timesteps, and denoised from there. A 2x upscale
("hires fix") is the same on the init image enlarged 2x with Lanczos, at the output size.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection, Sequence
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
    # img2img: the image to start from (RGB), at the batch's size or at half of it (then enlarged 2x first).
    init_image: Image.Image | None = None


@dataclass(frozen=True)
class BatchSpec:
    """What every sample of one batch shares: requests that differ here never share a batch."""

    width: int = 512
    height: int = 512
    steps: int = 20
    guidance: float = 7.5
    scheduler: str = "dpmpp"
    adapter: str | None = None  # a key the backend resolved with `load_adapter`; None is the base model
    # None: text-to-image. A number: image-to-image, every sample carries an init image, and the last
    # int(steps * strength) of the schedule's steps run (1.0 redraws everything, 0.3 keeps most of the image).
    strength: float | None = None


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

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] (b, 3, H, W) -> the mean of their latent distribution, not yet scaled."""
        ...

    def load_adapter(self, key: str, path) -> None: ...

    def use_adapter(self, adapter: str | None) -> None: ...

    def set_memory_savings(self, level: int) -> None: ...

    @property
    def slices_decode(self) -> bool: ...


ProgressFn = Callable[[int, int], None]
CancelledFn = Callable[[], Collection[int]]

# Scheduler attributes that describe the schedule, never a sample: a tensor whose name starts with one of these is
# left alone even when its first dimension happens to equal the batch size (4 timesteps with a batch of 4, 5 sigmas
# with a batch of 5). Leading underscores are ignored when matching.
_SCHEDULE_PREFIXES = ("timestep", "sigma", "alpha", "beta", "lambda", "final_alpha", "init_noise", "num_")


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

    def check(self, spec: BatchSpec, samples: Sequence[Sample] = ()) -> None:
        f = self.backend.vae_scale_factor
        if spec.width % f or spec.height % f:
            raise PipelineError(f"width and height must be multiples of {f}, got {spec.width}x{spec.height}")
        if spec.width * spec.height > self.memory.max_pixels:
            raise DoesNotFit(
                f"{spec.width}x{spec.height} is above this worker's cap of {self.memory.max_pixels} pixels per image; "
                "ask for a smaller size"
            )
        if spec.strength is not None:
            if not 0.0 < spec.strength <= 1.0:
                raise PipelineError(f"strength must be above 0 and at most 1, got {spec.strength:g}")
            if int(spec.steps * spec.strength) < 1:
                raise PipelineError(f"strength {spec.strength:g} at {spec.steps} steps redraws nothing "
                                    "(steps x strength must be at least 1): raise strength or steps")
        sizes = ((spec.width, spec.height), (spec.width // 2, spec.height // 2))
        for i, s in enumerate(samples):
            if (s.init_image is None) != (spec.strength is None):
                raise PipelineError(
                    f"sample {i}: " + ("an init image needs a strength in the batch spec" if spec.strength is None
                                       else f"strength {spec.strength:g} needs an init image")
                )
            if s.init_image is not None and s.init_image.size not in sizes:
                w, h = s.init_image.size
                raise PipelineError(f"sample {i}: the init image is {w}x{h}; it must be {spec.width}x{spec.height}, "
                                    f"or {sizes[1][0]}x{sizes[1][1]} to be upscaled 2x")

    def generate(
        self,
        spec: BatchSpec,
        samples: Sequence[Sample],
        progress: ProgressFn | None = None,
        latents: torch.Tensor | None = None,
        cancelled: CancelledFn | None = None,
    ) -> list[Image.Image | None]:
        """Images for `samples`, in order. On an out-of-memory error the batch is retried with memory savings on,
        then split in halves (each sample's randomness is its own, so splitting changes no image); only a single
        image that does not fit with every saving raises DoesNotFit.

        `cancelled`, when given, is called on this (the inference) thread before the first denoising step (once
        before the text is encoded, once after) and right after every step, after `progress`; it returns indices
        into `samples` that must stop (indices of the caller's list even when an OOM splits the batch). Such a
        sample leaves the batch at once (its latents, text embeddings, generator and scheduler state go) and its
        place in the result is None; the others make the images a batch without it would have made (bit-exact when
        it is cancelled before the first step, otherwise within the batch-size noise of CPU/GPU kernels). A
        cancelled sample runs at most the one denoising step in progress when the cancel arrives. When every
        sample is cancelled the loop stops and no VAE decode runs.
        Without `cancelled` the result never holds None."""
        if not samples:
            return []
        self.check(spec, samples)
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
        tracker = _Progress(progress, len(samples))
        return self._fit(spec, list(samples), latents, level, tracker, list(range(len(samples))), cancelled)

    def _fit(self, spec, samples, latents, level, tracker, index, cancelled) -> list[Image.Image | None]:
        """`index[j]` is the position of `samples[j]` in the caller's list: what `cancelled()` speaks of."""
        chunk = tracker.chunk(len(samples))
        try:
            images = self._run(spec, samples, latents, level, chunk, _chunk_cancels(cancelled, index))
            tracker.finish(chunk)
            return images
        except Exception as exc:
            if not is_out_of_memory(exc):
                raise
            log.warning("out of memory at batch %d, savings level %d: %s", len(samples), level, exc)
        # Retried outside the except block, so the failed attempt's tensors are already freed.
        release_cached_memory(self.backend.device)
        if level < SLICED:
            return self._fit(spec, samples, latents, SLICED, tracker, index, cancelled)
        if len(samples) > 1:
            half = len(samples) // 2
            head = None if latents is None else latents[:half]
            tail = None if latents is None else latents[half:]
            return self._fit(spec, samples[:half], head, level, tracker, index[:half], cancelled) + self._fit(
                spec, samples[half:], tail, level, tracker, index[half:], cancelled
            )
        if level < TILED:
            return self._fit(spec, samples, latents, TILED, tracker, index, cancelled)
        raise DoesNotFit(
            f"a {spec.width}x{spec.height} image does not fit in {self.backend.device.type} memory even alone, "
            "with attention slicing and VAE tiling; ask for a smaller size"
        )

    def encode_init(self, spec: BatchSpec, samples: Sequence[Sample]) -> torch.Tensor:
        """The scaled latents of every sample's init image, fp32 on the backend's device. One image at a time: a
        latent then never depends on its batch-mates, and the encoder's activations stay those of one image."""
        be = self.backend
        out = []
        for s in samples:
            pixels = init_tensor(s.init_image, spec.width, spec.height).to(be.device, be.dtype)
            out.append(be.encode(pixels).float() * be.vae_scaling_factor)
        return torch.cat(out)

    def initial_latents(self, spec: BatchSpec, samples: Sequence[Sample]) -> tuple[torch.Tensor, list[torch.Generator]]:
        f = self.backend.vae_scale_factor
        shape = (1, self.backend.latent_channels, spec.height // f, spec.width // f)
        gens = [torch.Generator("cpu").manual_seed(s.seed) for s in samples]
        # Drawn on the CPU in fp32 so a seed means the same picture on every device and precision.
        latents = torch.cat([torch.randn(shape, generator=g, dtype=torch.float32) for g in gens])
        return latents, gens

    @torch.inference_mode()
    def _run(self, spec, samples, latents, level, progress: _ChunkProgress, cancels) -> list[Image.Image | None]:
        """One attempt at one chunk. `cancels()` returns positions in `samples` that must stop."""
        be = self.backend
        be.set_memory_savings(level)
        scheduler = self.make_scheduler(spec.scheduler)
        scheduler.set_timesteps(spec.steps, device=be.device)
        timesteps = scheduler.timesteps
        if spec.strength is not None:  # img2img: only the schedule's last int(steps * strength) steps run
            begin = (spec.steps - min(int(spec.steps * spec.strength), spec.steps)) * scheduler.order
            timesteps = timesteps[begin:]
            if hasattr(scheduler, "set_begin_index"):
                scheduler.set_begin_index(begin)
        n = len(timesteps)

        # `alive[j]` is the position in `samples` of row j of the batch. Samples cancelled before anything runs
        # are left out before the text is encoded: the rest then run exactly as a batch that never held them.
        alive = list(range(len(samples)))
        gone = cancels() & set(alive)
        if gone:
            progress.dropped(len(gone), 0, n)
            alive = [j for j in alive if j not in gone]
            if not alive:
                return [None] * len(samples)
        if latents is not None and len(alive) < len(samples):
            latents = latents[alive]
        samples_in = [samples[j] for j in alive]

        cfg = spec.guidance > 1.0
        emb = be.encode_text(be.tokenize([s.prompt for s in samples_in]))
        if cfg:
            neg = be.encode_text(be.tokenize([s.negative_prompt for s in samples_in]))
            emb = torch.cat([neg, emb])

        # Fresh generators on every attempt: a retry after an OOM repeats exactly the same randomness.
        init, gens = self.initial_latents(spec, samples_in)
        # The scheduler math runs in fp32 on the backend's device, so latents never leave it between steps.
        noise = (init if latents is None else latents).to(be.device)
        if spec.strength is None:
            latents = noise * scheduler.init_noise_sigma
        else:
            clean = self.encode_init(spec, samples_in)
            latents = scheduler.add_noise(clean, noise, timesteps[:1].repeat(len(samples_in)))

        def drop(after_steps: int) -> bool:
            """Takes newly cancelled samples out of the batch; True when none is left."""
            nonlocal alive, latents, emb, gens
            gone = cancels() & set(alive)
            if not gone:
                return False
            progress.dropped(len(gone), after_steps, n)
            rows = [r for r, j in enumerate(alive) if j not in gone]
            alive = [alive[r] for r in rows]
            if not alive:
                return True
            b = len(gens)
            keep = torch.tensor(rows, device=latents.device)
            latents = latents.index_select(0, keep)
            emb_rows = rows + [b + r for r in rows] if cfg else rows  # emb = cat([neg, emb]) under guidance
            emb = emb.index_select(0, torch.tensor(emb_rows, device=emb.device))
            gens = [gens[r] for r in rows]
            _slice_scheduler_state(scheduler, b, rows)
            return False

        # Checked again after the text encoding, so a cancel that arrived meanwhile costs no denoising step.
        if drop(0):
            return [None] * len(samples)
        for i, t in enumerate(timesteps):
            model_in = torch.cat([latents, latents]) if cfg else latents
            model_in = scheduler.scale_model_input(model_in, t)
            noise = be.unet(model_in.to(be.dtype), t, emb).float()
            if cfg:
                uncond, cond = noise.chunk(2)
                noise = uncond + spec.guidance * (cond - uncond)
            latents = scheduler.step(noise, t, latents, generator=gens, return_dict=True).prev_sample
            progress(i + 1, n)
            if drop(i + 1):
                return [None] * len(samples)
        scaled = (latents / be.vae_scaling_factor).to(be.dtype)
        if be.slices_decode:
            images = torch.cat([be.decode(z[None]).float().cpu() for z in scaled])
        else:
            images = be.decode(scaled).float().cpu()
        out: list[Image.Image | None] = [None] * len(samples)
        for j, image in zip(alive, to_pil(images), strict=True):
            out[j] = image
        return out


def init_tensor(image: Image.Image, width: int, height: int) -> torch.Tensor:
    """An init image as the VAE takes it: (1, 3, height, width) in [-1, 1], fp32; a half-size image is enlarged
    2x with Lanczos first (the upscale)."""
    image = image.convert("RGB")
    if image.size != (width, height):
        image = image.resize((width, height), Image.Resampling.LANCZOS)
    arr = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(arr).permute(2, 0, 1)[None].contiguous()


def _chunk_cancels(cancelled: CancelledFn | None, index: list[int]) -> Callable[[], set[int]]:
    """`cancelled()` speaks of the caller's positions; a chunk of a split batch needs its own."""
    if cancelled is None:
        return set
    where = {orig: j for j, orig in enumerate(index)}

    def cancels() -> set[int]:
        return {where[i] for i in cancelled() if i in where}

    return cancels


def _slice_scheduler_state(scheduler, batch: int, rows: list[int]) -> None:
    """Keeps only `rows` of every per-sample tensor the scheduler carries between steps.

    The rule, generic over diffusers' schedulers: an attribute in `scheduler.__dict__` is per-sample state when it
    is a torch.Tensor whose first dimension equals the current batch size (DPM-Solver's `sample`, UniPC's
    `last_sample`), or a list/tuple whose non-None items all are such tensors (DPM-Solver's and UniPC's
    `model_outputs`). Anything whose name (leading underscores aside) starts with one of _SCHEDULE_PREFIXES
    (timesteps, sigmas, alphas*, betas, lambda_t, sigma_t, alpha_t, ...) describes the schedule and is never
    sliced, even when its length happens to equal the batch size. Scalars, 0-d tensors and other objects are left
    alone.
    """

    def per_sample(v) -> bool:
        return isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == batch

    for name, value in list(vars(scheduler).items()):
        if name.lstrip("_").startswith(_SCHEDULE_PREFIXES):
            continue
        if per_sample(value):
            setattr(scheduler, name, value.index_select(0, torch.tensor(rows, device=value.device)))
        elif isinstance(value, (list, tuple)) and value:
            items = [v for v in value if v is not None]
            if items and all(per_sample(v) for v in items):
                kept = [None if v is None else v.index_select(0, torch.tensor(rows, device=v.device)) for v in value]
                setattr(scheduler, name, type(value)(kept))


class _Progress:
    """Reports (step, steps) over the whole request even when the engine splits it into smaller batches.

    It counts sample-steps: the step reported is steps * (sample-steps run) / (sample-steps that will run). A
    cancelled sample's remaining steps leave the total, so progress counts only what runs; it never goes backwards
    (a failed attempt's count is dropped, and nothing is reported until the retry passes it) and never exceeds
    steps."""

    def __init__(self, fn: ProgressFn | None, n_samples: int):
        self.fn, self.n_samples = fn, n_samples
        self.done = 0  # sample-steps of finished chunks
        self.skipped = 0  # sample-steps that cancelled samples of finished chunks will never run
        self.last = 0
        self.steps = 0

    def chunk(self, k: int) -> _ChunkProgress:
        return _ChunkProgress(self, k)

    def report(self, chunk: _ChunkProgress) -> None:
        n = self.steps
        total = self.n_samples * n - self.skipped - chunk.skipped
        if self.fn is None or total <= 0:
            return
        step = min(n, n * (self.done + chunk.ran) // total)
        if step > self.last:
            self.last = step
            self.fn(step, n)

    def finish(self, chunk: _ChunkProgress) -> None:
        self.done += chunk.ran
        self.skipped += chunk.skipped


class _ChunkProgress:
    """One attempt at one chunk of `k` samples; its counts join the request's only when the attempt finishes."""

    def __init__(self, tracker: _Progress, k: int):
        self.tracker, self.live = tracker, k
        self.ran = 0  # sample-steps run by this attempt
        self.skipped = 0  # sample-steps its cancelled samples will not run

    def __call__(self, i: int, n: int) -> None:
        """Step `i` of `n` is done for every sample still in the batch."""
        self.tracker.steps = n
        self.ran += self.live
        self.tracker.report(self)

    def dropped(self, count: int, after_steps: int, n: int) -> None:
        self.tracker.steps = n
        self.live -= count
        self.skipped += count * (n - after_steps)
        self.tracker.report(self)


def release_cached_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    arr = ((images / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)
    return [Image.fromarray(a) for a in arr]
