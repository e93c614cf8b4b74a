"""The PyTorch reference backend: diffusers' own modules, fp16 on CUDA, SDPA attention (diffusers' default)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from skillgen.inference.errors import AdapterError, ModelLoadError
from skillgen.inference.lora import weights_file
from skillgen.inference.memory import SLICED, TILED, Geometry


def pick_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


class TorchBackend:
    name = "torch"

    def __init__(self, model: str | Path, device: str = "auto", precision: str = "fp16"):
        from diffusers import StableDiffusionPipeline
        from diffusers.utils import logging as diffusers_logging

        diffusers_logging.disable_progress_bar()  # services log lines, not progress bars
        self.device = pick_device(device)
        # fp16 matmuls on a CPU are slow and lossy: precision applies where the hardware has it.
        self.dtype = torch.float16 if precision == "fp16" and self.device.type == "cuda" else torch.float32
        try:
            pipe = StableDiffusionPipeline.from_pretrained(
                str(model), dtype=self.dtype, safety_checker=None, requires_safety_checker=False, use_safetensors=True
            )
        except (OSError, ValueError) as exc:
            raise ModelLoadError(f"cannot load a diffusers Stable Diffusion from {model}: {exc}") from exc
        pipe.to(self.device)
        pipe.set_progress_bar_config(disable=True)
        self.pipe = pipe
        self.model_id = str(model)
        self.scheduler_config = dict(pipe.scheduler.config)
        self.vae_scale_factor = pipe.vae_scale_factor
        self.vae_scaling_factor = pipe.vae.config.scaling_factor
        self.latent_channels = pipe.unet.config.in_channels
        heads = pipe.unet.config.num_attention_heads or pipe.unet.config.attention_head_dim
        self.geometry = Geometry(
            attention_heads=max(heads) if isinstance(heads, (list, tuple)) else heads,
            vae_channels=pipe.vae.config.block_out_channels[0],
            dtype_bytes=torch.finfo(self.dtype).bits // 8,
            # SDPA's flash and memory-efficient kernels never hold the score matrix.
            materializes_attention=False,
        )
        self._adapters: set[str] = set()
        self._active: str | None = None
        self._savings = 0

    def tokenize(self, texts: Sequence[str]) -> torch.Tensor:
        tok = self.pipe.tokenizer
        return tok(
            list(texts), padding="max_length", max_length=tok.model_max_length, truncation=True, return_tensors="pt"
        ).input_ids

    def encode_text(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.pipe.text_encoder(input_ids.to(self.device))[0]

    def unet(self, latents: torch.Tensor, t: torch.Tensor, text_emb: torch.Tensor) -> torch.Tensor:
        return self.pipe.unet(latents, t, encoder_hidden_states=text_emb).sample

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return self.pipe.vae.decode(latents).sample

    # -- memory ----------------------------------------------------------------------------------------------
    def set_memory_savings(self, level: int) -> None:
        if level == self._savings:
            return
        if level >= SLICED:
            self.pipe.enable_attention_slicing()
        else:
            self.pipe.disable_attention_slicing()
        if level >= TILED:
            self.pipe.vae.enable_tiling()
        else:
            self.pipe.vae.disable_tiling()
        self._savings = level

    @property
    def slices_decode(self) -> bool:
        return self._savings >= SLICED

    # -- LoRA -----------------------------------------------------------------------------------------------
    def load_adapter(self, key: str, path: str | Path) -> None:
        """Load a diffusers-format LoRA (safetensors only) under `key`; loading a key twice is a no-op."""
        if key in self._adapters:
            return
        weights = weights_file(path)
        try:
            # use_safetensors=True: otherwise diffusers may fall back to unpickling a .bin lying beside the file.
            self.pipe.load_lora_weights(
                str(weights.parent), weight_name=weights.name, adapter_name=key, use_safetensors=True
            )
        except (ValueError, KeyError, RuntimeError, OSError) as exc:
            raise AdapterError(f"adapter {key!r} does not fit this model: {exc}") from exc
        self._adapters.add(key)
        self._active = "__unset__"

    def use_adapter(self, adapter: str | None) -> None:
        if adapter == self._active:
            return
        if adapter is None:
            if self._adapters:
                self.pipe.disable_lora()  # bypasses the LoRA layers: exactly the base output again
        else:
            if adapter not in self._adapters:
                raise AdapterError(f"adapter {adapter!r} is not loaded")
            self.pipe.enable_lora()
            self.pipe.set_adapters([adapter])
        self._active = adapter
