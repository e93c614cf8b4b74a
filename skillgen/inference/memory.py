"""Out-of-memory guards: a resolution cap, memory savings chosen by headroom, and recognising an OOM error.

Savings come in levels. Level 1 (attention slicing where the backend has it, one VAE decode per image) does the
same arithmetic in smaller pieces. Level 2 adds VAE tiling, which changes pixels slightly, so it is used only
when a single image does not fit otherwise; a request's picture therefore never depends on its batch-mates.
The estimate is a coarse upper bound; the engine's split-and-retry on a real OOM is what makes it safe.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from pydantic import BaseModel, Field

NO_SAVINGS, SLICED, TILED = 0, 1, 2


class MemoryPolicy(BaseModel):
    max_pixels: int = Field(default=1024 * 1024, ge=64 * 64, description="width*height cap per image")
    headroom_fraction: float = Field(default=0.8, gt=0, le=1, description="share of free memory a batch may plan on")


@dataclass(frozen=True)
class Geometry:
    """What the estimate needs to know about a model and how its backend runs it."""

    attention_heads: int
    vae_channels: int  # channels of the VAE decoder's full-resolution block
    dtype_bytes: int
    materializes_attention: bool  # False where attention kernels never hold the full score matrix


def estimate_peak_bytes(geo: Geometry, width: int, height: int, batch: int, cfg: bool, level: int) -> int:
    tokens = (width // 8) * (height // 8)
    unet_batch = batch * (2 if cfg else 1)
    attention = 0
    if geo.materializes_attention:
        # Sliced attention holds one head of one sample at a time.
        heads_at_once = 1 if level >= SLICED else unet_batch * geo.attention_heads
        attention = heads_at_once * tokens * tokens * geo.dtype_bytes
    # Input, output and one residual of the decoder's last block are alive at once; tiles are 512 px square.
    decode_px = min(width * height, 512 * 512) if level >= TILED else width * height
    decode_batch = 1 if level >= SLICED else batch
    decode = 3 * decode_batch * decode_px * geo.vae_channels * geo.dtype_bytes
    return max(attention, decode)


def headroom_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free)
    import psutil

    return int(psutil.virtual_memory().available)


def plan_level(geo: Geometry, headroom: int, fraction: float, width: int, height: int, batch: int, cfg: bool) -> int:
    """The lowest savings level whose estimate fits the headroom (the highest level when none does)."""
    budget = headroom * fraction
    for level, n in ((NO_SAVINGS, batch), (SLICED, batch), (TILED, 1)):
        if estimate_peak_bytes(geo, width, height, n, cfg, level) <= budget:
            return level
    return TILED


_OOM_MARKERS = ("out of memory", "failed to allocate memory", "can't allocate memory", "cudaerrormemoryallocation")


def is_out_of_memory(exc: BaseException) -> bool:
    if isinstance(exc, (MemoryError, torch.OutOfMemoryError)):
        return True
    # ONNX Runtime and the torch CPU allocator raise generic errors (ORT's do not derive from RuntimeError);
    # their messages are stable.
    generic = isinstance(exc, RuntimeError) or type(exc).__module__.startswith("onnxruntime")
    text = str(exc).lower()
    return generic and any(m in text for m in _OOM_MARKERS)
