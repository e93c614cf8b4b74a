"""LoRA adapters for exported graphs whose attention weights are inputs.

The file is read by diffusers and peft themselves (every format diffusers loads, alpha and rank patterns
included): they inject the adapter into a weightless skeleton of the UNet and text encoder, and we read each
LoRA layer's A, B and scaling back out. An adapter becomes fused weights `W + scaling * B @ A` for the modules it
touches; the base weights are never modified, so the base model is always one dictionary away. Modules that are
not a plain LoRA on a Linear layer (convolutions, DoRA: an LCM-LoRA has both kinds) are reported, not read, so
the backend can carry such an adapter another way (merged.py).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from skillgen.inference.errors import AdapterError


@dataclass(frozen=True)
class LoraFactors:
    down: np.ndarray  # A: (rank, in_features)
    up: np.ndarray  # B: (out_features, rank)
    scaling: float

    def delta(self) -> np.ndarray:
        return (self.up.astype(np.float32) @ self.down.astype(np.float32)) * np.float32(self.scaling)


def weights_file(path: str | Path) -> Path:
    path = Path(path)
    weights = path if path.is_file() else path / "pytorch_lora_weights.safetensors"
    if weights.suffix != ".safetensors" or not weights.is_file():
        raise AdapterError(f"expected a .safetensors LoRA file at {weights}")
    return weights


@dataclass(frozen=True)
class LoraContents:
    """What a LoRA file changes, per component ("unet", "text_encoder")."""

    factors: dict[str, dict[str, LoraFactors]]  # plain LoRAs on Linear layers: {component: {module: factors}}
    other: dict[str, list[str]]  # {component: modules changed another way (a convolution, DoRA)}

    @property
    def components(self) -> set[str]:
        return set(self.factors) | set(self.other)


def read_lora(path: str | Path, model_dir: Path) -> LoraContents:
    """Read the LoRA at `path` for the model in `model_dir`; AdapterError when it is no LoRA or does not fit."""
    import torch
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from peft.tuners.lora import LoraLayer
    from transformers import CLIPTextConfig, CLIPTextModel

    weights = weights_file(path)
    try:
        # use_safetensors=True: otherwise diffusers may fall back to unpickling a .bin lying beside the file.
        state_dict, alphas, metadata = StableDiffusionPipeline.lora_state_dict(
            str(weights.parent), weight_name=weights.name, use_safetensors=True, return_lora_metadata=True
        )
    except (ValueError, KeyError, OSError, RuntimeError) as exc:
        raise AdapterError(f"cannot read the LoRA at {weights}: {exc}") from exc
    if not any("lora" in k for k in state_dict):  # diffusers would fail on it with an IndexError
        raise AdapterError(f"{weights.name} holds no LoRA weights (no lora_A/lora_B or lora.down/lora.up tensors)")
    # Skeletons without initialised weights: their storage is never touched, so even SD 1.5 costs no real memory.
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(model_dir / "unet"))
        text_encoder = CLIPTextModel(CLIPTextConfig.from_pretrained(model_dir / "text_encoder"))
    unet.to_empty(device="cpu")
    text_encoder.to_empty(device="cpu")
    name = "adapter"
    try:
        StableDiffusionPipeline.load_lora_into_unet(state_dict, alphas, unet, adapter_name=name, metadata=metadata)
        StableDiffusionPipeline.load_lora_into_text_encoder(
            state_dict, alphas, text_encoder, adapter_name=name, metadata=metadata
        )
    except (ValueError, KeyError, RuntimeError) as exc:
        raise AdapterError(f"the LoRA at {weights} does not fit this model: {exc}") from exc
    found: dict[str, dict[str, LoraFactors]] = {}
    other: dict[str, list[str]] = {}
    for component, module in (("unet", unet), ("text_encoder", text_encoder)):
        for mod_name, mod in module.named_modules():
            if not isinstance(mod, LoraLayer) or name not in mod.lora_A:
                continue
            if mod.use_dora.get(name) or not isinstance(mod.get_base_layer(), torch.nn.Linear):
                other.setdefault(component, []).append(mod_name)
                continue
            found.setdefault(component, {})[mod_name] = LoraFactors(
                down=mod.lora_A[name].weight.detach().float().numpy().copy(),
                up=mod.lora_B[name].weight.detach().float().numpy().copy(),
                scaling=float(mod.scaling[name]),
            )
    if not found and not other:
        raise AdapterError(f"{weights.name} holds no LoRA weights for this model's UNet or text encoder")
    return LoraContents(found, other)


class FusedWeights:
    """Fused weight sets per adapter, computed on first use and kept in a bounded LRU.

    `make(adapter) -> {component: {module: array}}` builds one set; only the modules an adapter touches are new
    arrays, the rest are the base arrays themselves.
    """

    def __init__(self, capacity: int):
        if capacity < 1:
            raise ValueError("capacity must be at least 1")
        self.capacity = capacity
        self._sets: OrderedDict[str, object] = OrderedDict()

    def get(self, key: str, make):
        if key in self._sets:
            self._sets.move_to_end(key)
            return self._sets[key]
        value = make(key)
        self._sets[key] = value
        while len(self._sets) > self.capacity:
            self._sets.popitem(last=False)
        return value

    def discard(self, key: str) -> None:
        self._sets.pop(key, None)

    def __contains__(self, key: str) -> bool:
        return key in self._sets
