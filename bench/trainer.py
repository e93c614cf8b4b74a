"""`skillgen bench trainer [--quick] --json PATH`: does a LoRA learn a concept, how fast, in how much memory?

The concept is measurable from pixels: red circles on a dark ground, captioned "a zq picture". Its score is
the mean of R - (G+B)/2 over images generated for that caption through the consumer's own engine, before and
after training (same seeds). The run also checks that unloading the adapter gives back the base's pixels
exactly, and times, on the same model and data, the training step of diffusers'
`examples/text_to_image/train_text_to_image_lora.py` as a peer row: that script itself needs torchvision and
`datasets`, which this project does not install, so its step is ported inline (its defaults: UNet-only LoRA,
rank 4, AdamW at 1e-4).

The base must be one the concept can be learned on: a VAE with random weights cannot reproduce colour, so the
default is the embedded skill-icon model (its VAE is trained, and it already knows red and dark grounds, so
the adapter only has to tie the trigger word to them); the JSON names the base used. The recipe is the
article's (attention and text-encoder LoRA) at a learning rate that suits this tiny base.
"""

from __future__ import annotations

import json
import platform
import resource
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from pydantic import BaseModel

from skillgen.adapters.recipe import LoraRecipe
from skillgen.runtime.settings import default_model
from trainer.ingest import Example

TRIGGER = "zq"
CAPTION = f"a {TRIGGER} picture"
GROUND = (18, 18, 24)
RED = (215, 35, 35)


class BenchSettings(BaseModel):
    images: int = 16
    steps: int = 500
    quick_steps: int = 200
    score_seeds: int = 8
    sample_steps: int = 20
    guidance: float = 2.5  # what the embedded icon model is tuned for (its TRAINING.md)
    peer_steps: int = 30
    # The article's targets and ranks; the rate suits this tiny base (SD 1.5 LoRAs train at about 1e-4).
    recipe: LoraRecipe = LoraRecipe(lr=5e-3, batch_size=4, checkpoint_every=10_000)


def red_circles(count: int, size_px: int, seed: int = 0) -> list[Example]:
    """Red discs of varied size and place on a dark ground: the concept to learn."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(count):
        image = Image.new("RGB", (size_px, size_px), GROUND)
        r = size_px * rng.uniform(0.25, 0.4)
        cx, cy = rng.uniform(r, size_px - r, size=2)
        ImageDraw.Draw(image).ellipse((cx - r, cy - r, cx + r, cy + r), fill=RED)
        out.append(Example(f"circle-{i}.png", image, f"{i:064x}", CAPTION))
    return out


def concept_score(images) -> float:
    """Mean over images of mean(R - (G+B)/2): about 0 for greys, up to ~180 for all-red."""
    scores = []
    for image in images:
        rgb = np.asarray(image.convert("RGB"), dtype=np.float32)
        scores.append(float((rgb[..., 0] - (rgb[..., 1] + rgb[..., 2]) / 2).mean()))
    return float(np.mean(scores))


def peak_mem_mb(device) -> tuple[float, str]:
    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20, "torch.cuda.max_memory_allocated"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "process max RSS (includes model loading and sampling)"


class PeerStep:
    """The training step of diffusers' train_text_to_image_lora.py as that script runs it (its defaults:
    UNet-only LoRA rank 4 on to_k/to_q/to_v/to_out.0, AdamW at 1e-4, no mixed precision on a CPU)."""

    def __init__(self, model: str, examples: list[Example], size_px: int, batch_size: int, device):
        import torch
        from accelerate import Accelerator
        from diffusers.optimization import get_scheduler
        from peft import LoraConfig

        from trainer.diffusion import tokenize
        from trainer.lora import load_components

        self.parts, self.batch_size, self.device = load_components(model, device), batch_size, device
        self.accelerator = Accelerator(mixed_precision="no", cpu=device.type == "cpu")
        self.parts.unet.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian",
                                               target_modules=["to_k", "to_q", "to_v", "to_out.0"]))
        self.lora_layers = [p for p in self.parts.unet.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(self.lora_layers, lr=1e-4, betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8)
        self.unet, self.optimizer, self.lr_scheduler = self.accelerator.prepare(
            self.parts.unet, optimizer, get_scheduler("constant", optimizer)
        )
        self.pixels = torch.stack([
            torch.from_numpy(np.array(e.image.resize((size_px, size_px)))).permute(2, 0, 1).float() / 127.5 - 1
            for e in examples
        ])
        self.input_ids = tokenize(self.parts.tokenizer, [e.caption for e in examples])
        self.unet.train()

    def step(self) -> float:
        import torch
        import torch.nn.functional as F

        p, acc, device = self.parts, self.accelerator, self.device
        idx = torch.randint(0, len(self.pixels), (self.batch_size,))
        with acc.accumulate(self.unet):
            latents = p.vae.encode(self.pixels[idx].to(device)).latent_dist.sample()
            latents = latents * p.vae.config.scaling_factor
            noise = torch.randn_like(latents)
            timesteps = torch.randint(0, p.noise_scheduler.config.num_train_timesteps, (self.batch_size,), device=device)
            noisy_latents = p.noise_scheduler.add_noise(latents, noise, timesteps)
            encoder_hidden_states = p.text_encoder(self.input_ids[idx].to(device), return_dict=False)[0]
            model_pred = self.unet(noisy_latents, timesteps, encoder_hidden_states, return_dict=False)[0]
            loss = F.mse_loss(model_pred.float(), noise.float(), reduction="mean")
            acc.backward(loss)
            if acc.sync_gradients:
                acc.clip_grad_norm_(self.lora_layers, 1.0)
            self.optimizer.step()
            self.lr_scheduler.step()
            self.optimizer.zero_grad()
        return loss.item()


def paired_steps_per_s(steps: dict[str, Callable[[], float]], rounds: int) -> dict[str, float]:
    """Steps/s of each step function, timed in alternation (one step of each per round, the first round a
    warm-up) and taken from the median step time, so a shared machine's load falls on all of them alike."""
    times: dict[str, list[float]] = {name: [] for name in steps}
    for round_ in range(rounds + 1):
        for name, step in steps.items():
            t0 = time.perf_counter()
            step()
            if round_:
                times[name].append(time.perf_counter() - t0)
    return {name: round(1.0 / statistics.median(ts), 3) for name, ts in times.items()}


def run_bench(model: str, quick: bool, settings: BenchSettings = BenchSettings(), device_name: str = "auto",
              log=print) -> dict:
    import torch

    from skillgen.inference.engine import BatchSpec, Engine, Sample
    from skillgen.inference.torch_backend import TorchBackend
    from trainer.lora import (
        LoraTrainer,
        base_model_sha256,
        load_components,
        pick_device,
        train_lora,
        weight_dtype,
    )

    device = pick_device(device_name)
    recipe = settings.recipe
    steps = settings.quick_steps if quick else settings.steps
    parts = load_components(model, device, weight_dtype(recipe, device))
    size_px = recipe.resolution_px or parts.resolution_px
    examples = red_circles(settings.images, size_px)
    engine = Engine(TorchBackend(model, device=str(device), precision="fp16" if device.type == "cuda" else "fp32"))
    samples = [Sample(CAPTION, "", seed) for seed in range(settings.score_seeds)]
    spec = BatchSpec(size_px, size_px, settings.sample_steps, settings.guidance)
    before = engine.generate(spec, samples)
    target = concept_score(e.image for e in examples)
    log(f"base {model}: concept score {concept_score(before):.1f} (training images: {target:.1f})")

    wall: list[float] = []

    def on_step(step: int, total: int, loss: float) -> None:
        wall.append(time.perf_counter())
        if step % 50 == 0 or step == total:
            log(f"step {step}/{total} loss {loss:.4f}")

    with tempfile.TemporaryDirectory() as tmp:
        result = train_lora(parts, examples, recipe, steps, Path(tmp) / "ckpt", "bench", on_step)
        weights = Path(tmp) / "adapter.safetensors"
        weights.write_bytes(result.weights)
        del parts
        engine.backend.load_adapter("bench/circles@v1", weights)
    after = engine.generate(
        BatchSpec(size_px, size_px, settings.sample_steps, settings.guidance, adapter="bench/circles@v1"), samples
    )
    unloaded = engine.generate(spec, samples)
    restored = all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(before, unloaded))
    steps_per_s = (len(wall) - 1) / (wall[-1] - wall[0])  # from the end of step 1: step 1 warms up
    peak, peak_kind = peak_mem_mb(device)
    log(f"after {steps} steps: concept score {concept_score(after):.1f}; {steps_per_s:.2f} steps/s; "
        f"unload exact: {restored}")
    ours = LoraTrainer(load_components(model, device, weight_dtype(recipe, device)), examples, recipe)
    peer = PeerStep(model, examples, size_px, recipe.batch_size, device)
    paired = paired_steps_per_s({"ours": ours.step, "peer": peer.step}, settings.peer_steps)
    log(f"paired: ours {paired['ours']:.2f} steps/s, diffusers recipe step {paired['peer']:.2f} steps/s")
    return {
        "base_model": model,
        "base_model_sha256": base_model_sha256(model),
        "concept": f"red discs on a dark ground, caption {CAPTION!r}; score = mean R - (G+B)/2 of generated images",
        "quick": quick,
        "device": str(device),
        "torch_threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
        "recipe": recipe.model_dump(mode="json"),
        "steps": steps,
        "resolution_px": size_px,
        "images": len(examples),
        "score_seeds": settings.score_seeds,
        "sampling": {"steps": settings.sample_steps, "guidance": settings.guidance, "scheduler": "dpmpp"},
        "concept_score_training_images": round(target, 2),
        "concept_score_before": round(concept_score(before), 2),
        "concept_score_after": round(concept_score(after), 2),
        "concept_score_gain": round(concept_score(after) - concept_score(before), 2),
        "unload_restores_base": restored,
        "steps_per_s": round(steps_per_s, 3),
        "steps_per_s_paired": paired["ours"],
        "train_seconds": round(result.seconds, 1),
        "loss_curve": [(s, round(v, 4)) for s, v in result.loss_curve],
        "peak_mem_mb": round(peak, 1),
        "peak_mem_kind": peak_kind,
        "peers": [{
            "name": "diffusers examples/text_to_image/train_text_to_image_lora.py (training step ported inline; "
                    "the script needs torchvision and datasets, not installed here)",
            "recipe": "UNet-only LoRA rank 4 on to_k/to_q/to_v/to_out.0, AdamW 1e-4, fp32",
            "batch_size": recipe.batch_size,
            "steps_per_s_paired": paired["peer"],
            "note": f"{settings.peer_steps} steps alternated with as many of ours (steps_per_s_paired), median step time",
        }],
    }


def add_arguments(parser) -> None:
    d = BenchSettings()
    parser.add_argument("--quick", action="store_true", help=f"{d.quick_steps} training steps instead of {d.steps}")
    parser.add_argument("--json", type=Path, help="write the results as JSON to this file")
    parser.add_argument("--model", default=None, help="base model directory (default: the embedded skill-icon model)")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")


def run(args) -> int:
    model = args.model or default_model()
    results = run_bench(model, args.quick, device_name=args.device)
    text = json.dumps(results, indent=2)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(text + "\n")
    print(text)
    return 0
