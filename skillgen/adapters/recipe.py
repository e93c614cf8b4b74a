"""The LoRA recipe: how an adapter was (or is to be) trained. The registry records it beside every version."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field


class LoraRecipe(BaseModel):
    """The source article's recipe: rank 8 on the UNet's attention projections, rank 4 on the text encoder's.

    Targets are module-name suffixes as peft matches them; add "conv1", "conv2" to reach the UNet's ResNet
    convolutions (a random-weight base learns colour only through those). `text_rank=0` trains the UNet alone.
    """

    unet_rank: int = Field(8, ge=1, le=256)
    unet_alpha: float | None = Field(None, gt=0, description="LoRA alpha; None means alpha = rank (scale 1)")
    unet_targets: list[str] = Field(default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0"], min_length=1)
    text_rank: int = Field(4, ge=0, le=256)
    text_alpha: float | None = Field(None, gt=0)
    text_targets: list[str] = Field(default_factory=lambda: ["q_proj", "k_proj", "v_proj"])
    lr: float = Field(1e-4, gt=0)
    warmup_steps: int = Field(0, ge=0)
    max_grad_norm: float = Field(1.0, gt=0)
    batch_size: int = Field(4, ge=1, le=64)
    resolution_px: int | None = Field(None, ge=64, le=1024, multiple_of=8, description="None: the model's own size")
    seed: int = Field(0, ge=0)
    mixed_precision: Literal["auto", "no", "fp16", "bf16"] = Field("auto", description="auto: fp16 on CUDA, else no")
    gradient_checkpointing: bool | None = Field(None, description="None: on for CUDA")
    checkpoint_every: int = Field(100, ge=1, description="steps between resumable checkpoints")
