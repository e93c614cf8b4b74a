"""An LCM-LoRA for the embedded icon model, distilled on this CPU (`skillgen model train-lcm`).

Latent consistency distillation as the LCM-LoRA recipe does it (Luo et al. 2023; diffusers'
examples/consistency_distillation/train_lcm_distill_lora_sd_wds.py): the teacher is the frozen base UNet with
classifier-free guidance; one DDIM step takes the teacher from timestep t to t - k over a skipping schedule (50 of the
1000 training timesteps, k = 20, the schedule `LCMScheduler` samples from); the student is the base UNet plus a LoRA;
the target is the student itself, without grad, at t - k on the solver's output (no separate target network, as in
LCM-LoRA); both sides go through the consistency boundary conditions c_skip / c_out; the loss is pseudo-Huber.
The data are the icons and captions the base model was trained on (`skillgen.tools.icons`), encoded by the model's
own VAE. The result is a diffusers-format LoRA file that `pipe.load_lora_weights` and the engine's backends read;
`LCMScheduler` at 2-8 steps and guidance 1 samples it.

Guidance here is the usual (Imagen) scale g: uncond + g * (cond - uncond). The diffusers script's w is g - 1.
"""

from __future__ import annotations

import copy
import platform
import time
from collections.abc import Callable
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, Field, model_validator
from tqdm.auto import tqdm

from skillgen.tools.icon_model import training_log
from skillgen.tools.icons import IconDataset
from trainer.diffusion import TrainSchedule, tokenize, train

WEIGHTS_NAME = "pytorch_lora_weights.safetensors"
ADAPTER_NAME = "default"
# Every linear and conv of the UNet's attention, feed-forward and ResNet blocks, as the LCM-LoRA script targets.
LCM_TARGETS = (
    "to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "conv1", "conv2",
    "time_emb_proj",
)


class LcmRecipe(BaseModel):
    seed: int = 0
    images: int = Field(2688, gt=0, description="icons drawn, as the base model's recipe draws them")
    size_px: int = 64
    schedule: TrainSchedule = TrainSchedule(steps=2000, lr=1e-3, warmup_steps=100, log_every=100)
    batch: int = Field(32, gt=0)
    rank: int = Field(16, gt=0)
    targets: tuple[str, ...] = LCM_TARGETS
    guidance_min: float = Field(2.5, ge=1.0, description="teacher's CFG scale, drawn per sample in [min, max]")
    guidance_max: float = Field(2.5, ge=1.0)
    ddim_timesteps: int = Field(50, gt=1, description="the solver's skipping schedule (LCMScheduler's 50)")
    timestep_scaling: float = Field(10.0, gt=0.0, description="boundary-condition scaling (LCMScheduler's 10)")
    loss: Literal["huber", "l2"] = "l2"
    huber_c: float = Field(0.001, gt=0.0)

    @model_validator(mode="after")
    def _check(self) -> LcmRecipe:
        if self.guidance_max < self.guidance_min:
            raise ValueError(f"guidance_max {self.guidance_max} is below guidance_min {self.guidance_min}")
        return self


def boundary_scalings(t: torch.Tensor, scaling: float, sigma_data: float = 0.5) -> tuple[torch.Tensor, torch.Tensor]:
    """c_skip, c_out of the consistency parametrisation f(x, t) = c_skip x + c_out x0(x, t): at t = 0 it is x."""
    scaled = scaling * t.float()
    c_skip = sigma_data**2 / (scaled**2 + sigma_data**2)
    c_out = scaled / (scaled**2 + sigma_data**2) ** 0.5
    return c_skip.view(-1, 1, 1, 1), c_out.view(-1, 1, 1, 1)


class DdimSolver:
    """The DDIM timesteps [k - 1, 2k - 1, ..., T - 1] and one deterministic step from index i to i - 1."""

    def __init__(self, alphas_cumprod: torch.Tensor, ddim_timesteps: int):
        train_steps = len(alphas_cumprod)
        if train_steps % ddim_timesteps:
            raise ValueError(f"ddim_timesteps {ddim_timesteps} must divide the {train_steps} training timesteps")
        self.k = train_steps // ddim_timesteps
        self.timesteps = torch.arange(1, ddim_timesteps + 1) * self.k - 1
        prev = torch.cat([alphas_cumprod[:1], alphas_cumprod[self.timesteps[:-1]]])
        self.alpha_prev = prev.float()

    def step(self, x0: torch.Tensor, eps: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        a = self.alpha_prev[index].view(-1, 1, 1, 1)
        return a.sqrt() * x0 + (1 - a).sqrt() * eps


class Distiller:
    """One LCM-LoRA training step on a batch of latents and caption embeddings (`loss`)."""

    def __init__(self, unet, scheduler_config: dict, recipe: LcmRecipe, uncond: torch.Tensor):
        from diffusers import DDPMScheduler
        from peft import LoraConfig

        noise_scheduler = DDPMScheduler.from_config(scheduler_config)
        if noise_scheduler.config.prediction_type != "epsilon":
            raise ValueError(f"can only distill an epsilon-prediction model, not {noise_scheduler.config.prediction_type!r}")
        self.noise_scheduler = noise_scheduler
        alphas = noise_scheduler.alphas_cumprod.float()
        self.alpha, self.sigma = alphas.sqrt(), (1 - alphas).sqrt()
        self.solver = DdimSolver(alphas, recipe.ddim_timesteps)
        self.recipe = recipe
        self.uncond = uncond  # (1, L, D): the embedding of "" that guidance steers away from
        self.teacher = copy.deepcopy(unet).requires_grad_(False).eval()
        unet.requires_grad_(False)
        # Default LoRA init (B = 0): the student starts as the teacher.
        unet.add_adapter(LoraConfig(r=recipe.rank, lora_alpha=recipe.rank, target_modules=list(recipe.targets)))
        self.student = unet
        self.parameters = [p for p in unet.parameters() if p.requires_grad]
        if not self.parameters:
            raise ValueError(f"the targets {recipe.targets} match no module of this UNet")

    def _x0(self, eps: torch.Tensor, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return (x - self.sigma[t].view(-1, 1, 1, 1) * eps) / self.alpha[t].view(-1, 1, 1, 1)

    def _consistency(self, x: torch.Tensor, t: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        c_skip, c_out = boundary_scalings(t, self.recipe.timestep_scaling)
        return c_skip * x + c_out * self._x0(self.student(x, t, encoder_hidden_states=emb).sample, t, x)

    def loss(self, latents: torch.Tensor, emb: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        r, n = self.recipe, latents.shape[0]
        index = torch.randint(0, r.ddim_timesteps, (n,), generator=gen)
        start = self.solver.timesteps[index]
        end = (start - self.solver.k).clamp(min=0)
        noise = torch.randn(latents.shape, generator=gen)
        noisy = self.noise_scheduler.add_noise(latents, noise, start)
        g = (r.guidance_min + (r.guidance_max - r.guidance_min) * torch.rand(n, generator=gen)).view(-1, 1, 1, 1)

        prediction = self._consistency(noisy, start, emb)
        with torch.no_grad():
            both = self.teacher(
                torch.cat([noisy, noisy]), torch.cat([start, start]),
                encoder_hidden_states=torch.cat([self.uncond.expand_as(emb), emb]),
            ).sample
            uncond_eps, cond_eps = both.chunk(2)
            eps = uncond_eps + g * (cond_eps - uncond_eps)
            x_prev = self.solver.step(self._x0(eps, start, noisy), eps, index)
            target = self._consistency(x_prev, end, emb)
        if r.loss == "l2":
            return F.mse_loss(prediction, target)
        return (torch.sqrt((prediction - target) ** 2 + r.huber_c**2) - r.huber_c).mean()


def lora_layers(unet) -> dict[str, torch.Tensor]:
    """peft's own key names (`lora_A`/`lora_B`), which `load_lora_weights` reads for every module kind; diffusers'
    older converted names would spell attention layers differently and leave them unloaded."""
    from peft.utils import get_peft_model_state_dict

    return get_peft_model_state_dict(unet, adapter_name=ADAPTER_NAME)


def save_lora(unet, out: Path) -> Path:
    """`out/pytorch_lora_weights.safetensors` in diffusers' LoRA format (fp16, like the base model)."""
    from diffusers import StableDiffusionPipeline

    layers = {k: v.detach().to(torch.float16).contiguous() for k, v in lora_layers(unet).items()}
    metadata = unet.peft_config[ADAPTER_NAME].to_dict()
    # peft keeps the targets as a set, whose order follows the process's string hash seed: sorted, a rerun of the
    # same recipe writes the same bytes.
    metadata["target_modules"] = sorted(metadata["target_modules"])
    StableDiffusionPipeline.save_lora_weights(
        out, unet_lora_layers=layers, unet_lora_adapter_metadata=metadata,
        weight_name=WEIGHTS_NAME, safe_serialization=True,
    )
    return out / WEIGHTS_NAME


@torch.no_grad()
def _data(pipe, recipe: LcmRecipe, log) -> tuple[torch.Tensor, ...]:
    """Posterior means and stds of every icon, the index of its caption, the unique captions' embeddings, and ""'s."""
    dataset = IconDataset(recipe.images, seed=recipe.seed, size_px=recipe.size_px)
    pixels = np.stack([np.asarray(image) for image, _ in tqdm(dataset, desc="icons", unit="img")])
    x = torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    means, stds = [], []
    for chunk in x.split(256):
        posterior = pipe.vae.encode(chunk).latent_dist
        means.append(posterior.mean)
        stds.append(posterior.std)
    captions = [spec.caption for spec in dataset.specs]
    unique = sorted(set(captions))
    which = torch.tensor([unique.index(c) for c in captions])
    emb = pipe.text_encoder(tokenize(pipe.tokenizer, unique + [""]))[0]
    log(f"encoded {len(captions)} icons and {len(unique)} captions")
    return torch.cat(means), torch.cat(stds), which, emb[:-1], emb[-1:]


def distill_lcm_lora(model: str | Path, recipe: LcmRecipe, out: Path, log: Callable[[str], None] = print) -> Path:
    """Distill an LCM-LoRA for the diffusers model at `model` and save it under `out`; returns the weights file."""
    from diffusers import StableDiffusionPipeline

    started = time.perf_counter()
    log(f"recipe {recipe.model_dump_json()}")
    log(f"base {model}; torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"{platform.processor() or platform.machine()}")
    torch.manual_seed(recipe.seed)
    gen = torch.Generator("cpu").manual_seed(recipe.seed)
    pipe = StableDiffusionPipeline.from_pretrained(
        model, dtype=torch.float32, safety_checker=None, requires_safety_checker=False, use_safetensors=True
    )
    mean, std, which, embeddings, uncond = _data(pipe, recipe, log)
    scaling = pipe.vae.config.scaling_factor
    distiller = Distiller(pipe.unet, dict(pipe.scheduler.config), recipe, uncond)
    n_lora = sum(p.numel() for p in distiller.parameters)
    log(f"LoRA rank {recipe.rank} on {len(recipe.targets)} module kinds: {n_lora} parameters")
    distiller.student.train()

    def step_loss(step: int) -> torch.Tensor:
        idx = torch.randint(0, len(which), (recipe.batch,), generator=gen)
        latents = (mean[idx] + std[idx] * torch.randn(mean[idx].shape, generator=gen)) * scaling
        return distiller.loss(latents, embeddings[which[idx]], gen)

    train(distiller.parameters, step_loss, recipe.schedule, "lcm-lora", log)
    distiller.student.eval()
    out.mkdir(parents=True, exist_ok=True)
    path = save_lora(distiller.student, out)
    log(f"saved {path.name} ({path.stat().st_size / 1e6:.2f} MB) to {out}; total {time.perf_counter() - started:.0f}s")
    return path


def add_arguments(parser) -> None:
    from skillgen.runtime.settings import REPO_ROOT, default_model

    d = LcmRecipe()
    parser.add_argument("--model", default=default_model(), help="the base diffusers model (default: the embedded one)")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "models" / "skill-icons-lcm",
                        help="directory for pytorch_lora_weights.safetensors and the log (default models/skill-icons-lcm)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (default 1: on a shared 2-core machine two threads that lose a core to "
                        "another process run many times slower than one)")
    parser.add_argument("--seed", type=int, default=d.seed, help=f"seeds the data, the LoRA and training (default {d.seed})")
    parser.add_argument("--images", type=int, default=d.images, help=f"icons to draw (default {d.images})")
    parser.add_argument("--steps", type=int, default=d.schedule.steps, help=f"training steps (default {d.schedule.steps})")
    parser.add_argument("--batch", type=int, default=d.batch, help=f"latents per step (default {d.batch})")
    parser.add_argument("--lr", type=float, default=d.schedule.lr, help=f"AdamW learning rate (default {d.schedule.lr})")
    parser.add_argument("--rank", type=int, default=d.rank, help=f"LoRA rank (default {d.rank})")
    parser.add_argument("--loss", choices=("huber", "l2"), default=d.loss, help=f"consistency loss (default {d.loss})")
    parser.add_argument("--guidance", type=float, nargs=2, metavar=("MIN", "MAX"),
                        default=(d.guidance_min, d.guidance_max),
                        help=f"teacher CFG scale range (default {d.guidance_min} {d.guidance_max})")


def run(args) -> int:
    torch.set_num_threads(args.threads)
    d = LcmRecipe()
    warmup = min(d.schedule.warmup_steps, args.steps // 10)
    recipe = LcmRecipe(
        seed=args.seed, images=args.images, batch=args.batch, rank=args.rank, loss=args.loss,
        guidance_min=args.guidance[0], guidance_max=args.guidance[1],
        schedule=d.schedule.model_copy(update={"steps": args.steps, "lr": args.lr, "warmup_steps": warmup}),
    )
    with training_log(args.out) as log:
        distill_lcm_lora(args.model, recipe, args.out, log)
    return 0


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser)
    raise SystemExit(run(parser.parse_args()))
