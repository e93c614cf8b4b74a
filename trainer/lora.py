"""LoRA training on a diffusers Stable Diffusion: peft adapters, accelerate for mixed precision, checkpoints
that resume to the same result.

The recipe (`trainer.settings.LoraRecipe`) is the source article's: rank 8 on the UNet's to_q/to_k/to_v (and
to_out.0), rank 4 on the text encoder's q_proj/k_proj/v_proj. On CUDA the base weights are fp16, the LoRA
weights fp32 under autocast with a loss scaler, and activations are recomputed (gradient checkpointing). The
loss is the shared noise-prediction step (`trainer.diffusion.noise_prediction_loss`). Every random draw
(batch, crop, noise, timestep) comes from one CPU generator whose state is checkpointed with the LoRA and
optimizer state, so a run stopped at step k and resumed ends bit-for-bit where an uninterrupted run does.
Checkpoints are safetensors plus JSON: nothing is pickled.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from trainer.dataset import SkillDataset
from trainer.diffusion import noise_prediction_loss
from trainer.errors import TrainerError
from trainer.ingest import Example
from trainer.settings import LoraRecipe

if TYPE_CHECKING:
    from PIL import Image

ADAPTER_NAME = "default"
WEIGHTS_NAME = "pytorch_lora_weights.safetensors"
CURVE_POINTS = 50


class Stopped(TrainerError):
    """Training stopped on request at `step`; a checkpoint of that step is on disk (unless the reason is Unsaved)."""

    def __init__(self, reason: str, step: int):
        super().__init__(reason)
        self.reason, self.step = reason, step


class Unsaved(str):
    """A stop reason that writes no checkpoint: the run no longer owns its checkpoint directory (another trainer
    took the job over), so the last checkpoint stays whatever that trainer has written."""


@dataclass
class Components:
    """The parts of a Stable Diffusion that training touches."""

    tokenizer: object
    text_encoder: torch.nn.Module
    unet: torch.nn.Module
    vae: torch.nn.Module
    noise_scheduler: object

    @property
    def resolution_px(self) -> int:
        return self.unet.config.sample_size * 2 ** (len(self.vae.config.block_out_channels) - 1)


@dataclass(frozen=True)
class LoraResult:
    weights: bytes  # diffusers-format LoRA safetensors, as `load_lora_weights` reads them
    loss_curve: list[tuple[int, float]]
    steps: int
    resumed_from: int
    seconds: float
    resolution_px: int


def pick_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def mixed_precision(recipe: LoraRecipe, device: torch.device) -> str:
    if recipe.mixed_precision == "auto":
        return "fp16" if device.type == "cuda" else "no"
    return recipe.mixed_precision


def weight_dtype(recipe: LoraRecipe, device: torch.device) -> torch.dtype:
    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(mixed_precision(recipe, device), torch.float32)


def load_components(model: str | Path, device: torch.device, dtype: torch.dtype = torch.float32) -> Components:
    """A fresh copy of the base model's parts, frozen, in `dtype` on `device`. Each training loads its own,
    so adapters never stack on a base that another job changed."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    model = str(model)
    # use_safetensors=True: a pickled .bin beside (or instead of) the weights is never unpickled; without
    # safetensors weights the load fails here, naming the model.
    try:
        parts = Components(
            tokenizer=CLIPTokenizer.from_pretrained(model, subfolder="tokenizer"),
            text_encoder=CLIPTextModel.from_pretrained(model, subfolder="text_encoder", dtype=dtype,
                                                       use_safetensors=True),
            unet=UNet2DConditionModel.from_pretrained(model, subfolder="unet", dtype=dtype, use_safetensors=True),
            vae=AutoencoderKL.from_pretrained(model, subfolder="vae", dtype=dtype, use_safetensors=True),
            noise_scheduler=DDPMScheduler.from_pretrained(model, subfolder="scheduler"),
        )
    except (OSError, ValueError) as exc:
        raise TrainerError(f"cannot load the base model from {model}: {exc}") from exc
    for module in (parts.text_encoder, parts.unet, parts.vae):
        module.requires_grad_(False)
        module.to(device)
    return parts


def base_model_sha256(model: str | Path) -> str:
    """One hash over every weights file of the base model, so an adapter records exactly what it was trained on."""
    digest = hashlib.sha256()
    root = Path(model)
    for path in sorted(root.rglob("*.safetensors")):
        digest.update(path.relative_to(root).as_posix().encode())
        with path.open("rb") as f:
            while chunk := f.read(1 << 24):
                digest.update(chunk)
    return digest.hexdigest()


def add_adapters(parts: Components, recipe: LoraRecipe) -> list[torch.nn.Parameter]:
    """Inject the LoRA layers (zero-initialised up-projections: the output starts exactly at the base's)."""
    from diffusers.training_utils import cast_training_params
    from peft import LoraConfig

    parts.unet.add_adapter(
        LoraConfig(r=recipe.unet_rank, lora_alpha=recipe.unet_alpha or recipe.unet_rank,
                   init_lora_weights="gaussian", target_modules=list(recipe.unet_targets))
    )
    models = [parts.unet]
    if recipe.text_rank:
        parts.text_encoder.add_adapter(
            LoraConfig(r=recipe.text_rank, lora_alpha=recipe.text_alpha or recipe.text_rank,
                       init_lora_weights="gaussian", target_modules=list(recipe.text_targets))
        )
        models.append(parts.text_encoder)
    cast_training_params(models, dtype=torch.float32)  # fp16 base, fp32 adapter: the update is not lost to rounding
    params = [p for m in models for p in m.parameters() if p.requires_grad]
    if not params:
        raise TrainerError(f"the targets {recipe.unet_targets} match no module of this UNet")
    return params


def lora_state_bytes(parts: Components, recipe: LoraRecipe) -> bytes:
    """The adapter in diffusers' LoRA file format, the one `pipe.load_lora_weights` and the consumer read, with
    peft's own key names (`lora_A`/`lora_B`). Not diffusers' `convert_state_dict_to_diffusers`: for targets such as
    proj_in/proj_out or time_emb_proj it renames only some keys, and `load_lora_weights` then skips the attention
    layers with a warning (56 of 117 layers of an LCM-style target list lost on the tiny model)."""
    from diffusers import StableDiffusionPipeline
    from peft.utils import get_peft_model_state_dict

    def layers(model) -> dict:
        return get_peft_model_state_dict(model, save_embedding_layers=False)

    unet_layers = layers(parts.unet)
    text_layers = layers(parts.text_encoder) if recipe.text_rank else None
    with tempfile.TemporaryDirectory() as tmp:
        StableDiffusionPipeline.save_lora_weights(
            tmp,
            unet_lora_layers=unet_layers,
            text_encoder_lora_layers=text_layers,
            unet_lora_adapter_metadata=parts.unet.peft_config[ADAPTER_NAME].to_dict(),
            text_encoder_lora_adapter_metadata=(
                parts.text_encoder.peft_config[ADAPTER_NAME].to_dict() if recipe.text_rank else None
            ),
        )
        return (Path(tmp) / WEIGHTS_NAME).read_bytes()


# ------------------------------------------------------------------------------------------------ checkpoints


class Checkpoint:
    """`<dir>/state.safetensors` (LoRA, optimizer moments, generator) and `<dir>/state.json` (the rest), swapped
    in by rename so a crash mid-write leaves the previous checkpoint whole."""

    def __init__(self, directory: Path, fingerprint: str):
        self.dir = Path(directory)
        self.fingerprint = fingerprint

    def save(self, step: int, named: list[tuple[str, torch.nn.Parameter]], optimizer, scheduler, scaler,
             generator: torch.Generator, curve: list, window: list[float]) -> None:
        from safetensors.torch import save_file

        tensors = {f"lora/{name}": p.detach().cpu().contiguous() for name, p in named}
        state = optimizer.state_dict()
        scalars: dict = {}
        for idx, slots in state["state"].items():
            for slot, value in slots.items():
                if torch.is_tensor(value):
                    tensors[f"opt/{idx}/{slot}"] = value.detach().cpu().contiguous()
                else:
                    scalars[f"{idx}/{slot}"] = value
        tensors["rng/cpu"] = generator.get_state()
        meta = {
            "fingerprint": self.fingerprint,
            "step": step,
            "param_groups": state["param_groups"],
            "optimizer_scalars": scalars,
            "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict() if scaler is not None else None,
            "curve": curve,
            "window": window,
        }
        tmp = self.dir.with_name(self.dir.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        save_file(tensors, str(tmp / "state.safetensors"))
        (tmp / "state.json").write_text(json.dumps(meta))
        old = self.dir.with_name(self.dir.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        if self.dir.exists():
            self.dir.rename(old)
        tmp.rename(self.dir)
        shutil.rmtree(old, ignore_errors=True)

    def load(self, named, optimizer, scheduler, scaler, generator: torch.Generator) -> tuple[int, list, list[float]] | None:
        """Restore everything and return (step, curve, window); None when there is no checkpoint of this run."""
        from safetensors.torch import load_file

        if not (self.dir / "state.json").exists():
            return None
        meta = json.loads((self.dir / "state.json").read_text())
        if meta["fingerprint"] != self.fingerprint:
            return None  # another recipe, data or base: start over rather than mix runs
        tensors = load_file(str(self.dir / "state.safetensors"))
        with torch.no_grad():
            for name, p in named:
                p.copy_(tensors[f"lora/{name}"])
        opt_state: dict = {}
        for key, value in tensors.items():
            if key.startswith("opt/"):
                _, idx, slot = key.split("/", 2)
                opt_state.setdefault(int(idx), {})[slot] = value
        for key, value in meta["optimizer_scalars"].items():
            idx, slot = key.split("/", 1)
            opt_state.setdefault(int(idx), {})[slot] = value
        optimizer.load_state_dict({"state": opt_state, "param_groups": meta["param_groups"]})
        scheduler.load_state_dict(meta["scheduler"])
        if scaler is not None and meta["scaler"]:
            scaler.load_state_dict(meta["scaler"])
        generator.set_state(tensors["rng/cpu"])
        return meta["step"], [tuple(point) for point in meta["curve"]], list(meta["window"])


def fingerprint(recipe: LoraRecipe, steps: int, dataset_sha256: str, base_sha256: str) -> str:
    payload = {"recipe": recipe.model_dump(mode="json"), "steps": steps, "data": dataset_sha256, "base": base_sha256}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


# ----------------------------------------------------------------------------------------------------- training

StepFn = Callable[[int, int, float], None]


class LoraTrainer:
    """One run's state (adapters, data, optimizer, schedule, generator) around the base's parts; `step()`
    trains on one batch and returns its loss."""

    def __init__(self, parts: Components, examples: Sequence[Example], recipe: LoraRecipe):
        from accelerate import Accelerator
        from diffusers.optimization import get_scheduler

        self.parts, self.recipe = parts, recipe
        device = parts.unet.device
        self.accelerator = Accelerator(mixed_precision=mixed_precision(recipe, device), cpu=device.type == "cpu")
        self.generator = torch.Generator("cpu").manual_seed(recipe.seed)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(recipe.seed)  # peft draws the down-projections' init from the global generator
            self.params = add_adapters(parts, recipe)
        self.named = [(f"unet/{n}", p) for n, p in parts.unet.named_parameters() if p.requires_grad]
        self.named += [(f"text/{n}", p) for n, p in parts.text_encoder.named_parameters() if p.requires_grad]
        if recipe.gradient_checkpointing if recipe.gradient_checkpointing is not None else device.type == "cuda":
            parts.unet.enable_gradient_checkpointing()
            if recipe.text_rank:
                parts.text_encoder.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        parts.unet.train()
        parts.text_encoder.train(bool(recipe.text_rank))
        self.size_px = recipe.resolution_px or parts.resolution_px
        self.dataset = SkillDataset(examples, parts.tokenizer, self.size_px, self.generator)
        optimizer = torch.optim.AdamW(self.params, lr=recipe.lr)
        scheduler = get_scheduler("constant_with_warmup", optimizer, num_warmup_steps=recipe.warmup_steps)
        parts.unet, parts.text_encoder, self.optimizer, self.scheduler = self.accelerator.prepare(
            parts.unet, parts.text_encoder, optimizer, scheduler
        )

    def step(self) -> float:
        p, acc = self.parts, self.accelerator
        batch = self.dataset.batch(self.recipe.batch_size)
        with acc.autocast():
            loss = noise_prediction_loss(
                p.unet, p.vae, p.text_encoder, p.tokenizer, p.noise_scheduler, batch, self.generator
            )
        acc.backward(loss)
        if acc.sync_gradients:
            acc.clip_grad_norm_(self.params, self.recipe.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())

    def save(self, checkpoint: Checkpoint, step: int, curve: list, window: list[float]) -> None:
        checkpoint.save(step, self.named, self.optimizer, self.scheduler, self.accelerator.scaler, self.generator,
                        curve, window)

    def restore(self, checkpoint: Checkpoint) -> tuple[int, list, list[float]] | None:
        return checkpoint.load(self.named, self.optimizer, self.scheduler, self.accelerator.scaler, self.generator)

    def weights(self) -> bytes:
        self.parts.unet = self.accelerator.unwrap_model(self.parts.unet)
        self.parts.text_encoder = self.accelerator.unwrap_model(self.parts.text_encoder)
        return lora_state_bytes(self.parts, self.recipe)


def train_lora(
    parts: Components,
    examples: Sequence[Example],
    recipe: LoraRecipe,
    steps: int,
    checkpoint_dir: Path,
    run_fingerprint: str,
    on_step: StepFn | None = None,
    should_stop: Callable[[], str | None] = lambda: None,
) -> LoraResult:
    """Train a LoRA on `examples` for `steps` steps, resuming from `checkpoint_dir` if it holds this run.

    `on_step(step, steps, loss)` is called after each step; `should_stop()` is asked before each one, and when
    it returns a reason a checkpoint of every step done so far is written (none for an Unsaved reason) and
    Stopped(reason, step) raised. A stop asked during the last step is not seen: the run returns its result.
    """
    trainer = LoraTrainer(parts, examples, recipe)
    checkpoint = Checkpoint(checkpoint_dir, run_fingerprint)
    start, curve, window = trainer.restore(checkpoint) or (0, [], [])
    curve_every = max(1, steps // CURVE_POINTS)
    started = time.perf_counter()
    for step in range(start, steps):
        reason = should_stop()
        if reason:
            if not isinstance(reason, Unsaved):
                trainer.save(checkpoint, step, curve, window)
            raise Stopped(reason, step)
        value = trainer.step()
        if value != value:  # NaN: fp16 overflow the scaler could not save, or a broken base
            raise TrainerError(f"training diverged at step {step + 1} (loss is NaN); try a lower learning rate")
        window.append(value)
        done = step + 1
        if done % curve_every == 0 or done == steps:
            curve.append((done, sum(window) / len(window)))
            window = []
        if on_step is not None:
            on_step(done, steps, value)
        if done % recipe.checkpoint_every == 0 and done < steps:
            trainer.save(checkpoint, done, curve, window)
    return LoraResult(
        weights=trainer.weights(),
        loss_curve=curve,
        steps=steps,
        resumed_from=start,
        seconds=time.perf_counter() - started,
        resolution_px=trainer.size_px,
    )


# ------------------------------------------------------------------------------------------------ sample grid


@dataclass(frozen=True)
class SampleGrid:
    """The sample grid's cells, not yet composed: every cell is image-checked on its own first
    (`skillgen.safety.postprocess.screen`), so a blocked cell can withhold the grid before it exists."""

    rows: list[list[Image.Image]]  # the base model's row, then the adapter's; one cell per seed
    size_px: int

    @property
    def cells(self) -> list[Image.Image]:
        return [image for row in self.rows for image in row]

    def compose(self) -> Image.Image:
        from PIL import Image

        grid = Image.new("RGB", (self.size_px * len(self.rows[0]), self.size_px * len(self.rows)))
        for y, row in enumerate(self.rows):
            for x, image in enumerate(row):
                grid.paste(image, (x * self.size_px, y * self.size_px))
        return grid


def sample_grid(engine, adapter_key: str, weights_path: str | Path, prompt: str, seeds: Sequence[int],
                size_px: int, steps: int, guidance: float = 7.5) -> SampleGrid:
    """Two rows from the consumer's own engine: the base model on top, the adapter below, same seeds.

    Loading the saved file the way the consumer will is also the check that it loads at all."""
    from skillgen.inference.engine import BatchSpec, Sample

    engine.backend.load_adapter(adapter_key, weights_path)
    samples = [Sample(prompt, "", seed) for seed in seeds]
    rows = [
        engine.generate(BatchSpec(size_px, size_px, steps, guidance, adapter=adapter), samples)
        for adapter in (None, adapter_key)
    ]
    return SampleGrid(rows, size_px)
