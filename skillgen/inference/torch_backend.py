"""The PyTorch reference backend: diffusers' own modules, fp16 on CUDA, SDPA attention (diffusers' default)."""

from __future__ import annotations

import logging
import warnings
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path

import torch

from skillgen.inference.errors import AdapterError, ModelLoadError
from skillgen.inference.lora import weights_file
from skillgen.inference.memory import SLICED, TILED, Geometry

log = logging.getLogger(__name__)


def pick_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


class TorchBackend:
    name = "torch"

    def __init__(
        self, model: str | Path, device: str = "auto", precision: str = "fp16", max_loaded_adapters: int = 8
    ):
        from diffusers import StableDiffusionPipeline
        from diffusers.utils import logging as diffusers_logging

        if max_loaded_adapters < 1:
            raise ValueError("max_loaded_adapters must be at least 1")
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
        # Adapters in the pipeline, least recently used first; past max_loaded_adapters the least recently used
        # one that is not the active one is deleted from the pipeline (its LoRA weights leave the GPU).
        self.max_loaded_adapters = max_loaded_adapters
        self._adapters: OrderedDict[str, None] = OrderedDict()
        self._active: str | None = None  # what use_adapter last asked for; None is the base model
        self._stale = False  # the pipeline's LoRA state may differ from _active (a load or a deletion changed it)
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

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        # The mean, not a draw: the sample's own generator adds all the randomness (engine.Engine.encode_init).
        return self.pipe.vae.encode(images).latent_dist.mode()

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
        """Load a diffusers-format LoRA (safetensors only) under `key`; loading a key that is loaded is a no-op
        that marks it recently used. May delete the least recently used other adapter (see `loaded_adapters`)."""
        if key in self._adapters:
            self._adapters.move_to_end(key)
            return
        weights = weights_file(path)
        try:
            # use_safetensors=True: otherwise diffusers may fall back to unpickling a .bin lying beside the file.
            self.pipe.load_lora_weights(
                str(weights.parent), weight_name=weights.name, adapter_name=key, use_safetensors=True
            )
        except (ValueError, KeyError, RuntimeError, OSError) as exc:
            raise AdapterError(f"adapter {key!r} does not fit this model: {exc}") from exc
        self._adapters[key] = None
        self._stale = True  # diffusers activates what it just loaded
        self._evict()

    @property
    def loaded_adapters(self) -> list[str]:
        """The adapters in the pipeline now, least recently used first."""
        return list(self._adapters)

    def use_adapter(self, adapter: str | None) -> None:
        if adapter is not None:
            if adapter not in self._adapters:
                raise AdapterError(f"adapter {adapter!r} is not loaded")
            self._adapters.move_to_end(adapter)
        if adapter != self._active or self._stale:
            if adapter is None:
                if self._adapters:
                    self.pipe.disable_lora()  # bypasses the LoRA layers: exactly the base output again
            else:
                self.pipe.enable_lora()
                self.pipe.set_adapters([adapter])
            self._active = adapter
            self._stale = False
        self._evict()  # the adapter active until now may be the one over capacity

    def unload_adapter(self, key: str) -> None:
        """Delete `key`'s LoRA weights from the UNet and the text encoder; unknown keys are ignored. After deleting
        the active adapter, use_adapter must name the next one (None included) before a generation."""
        if key not in self._adapters:
            return
        with warnings.catch_warnings():
            # peft warns when a deleted adapter was the layers' active one and picks another: use_adapter sets
            # the state it needs again (_stale), so that choice never shows.
            warnings.simplefilter("ignore", UserWarning)
            self.pipe.delete_adapters([key])
        del self._adapters[key]
        if key == self._active:
            self._active = None
        self._stale = True

    def _evict(self) -> None:
        """Delete least recently used adapters until at most max_loaded_adapters remain, never the active one
        nor the most recently used one (the one just loaded or just put to use)."""
        while len(self._adapters) > self.max_loaded_adapters:
            victim = next((k for k in list(self._adapters)[:-1] if k != self._active), None)
            if victim is None:
                return
            self.unload_adapter(victim)
            log.info("adapter %s deleted from the pipeline (%d stay loaded at most)", victim, self.max_loaded_adapters)
