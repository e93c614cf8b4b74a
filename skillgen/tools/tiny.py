"""Build a small Stable Diffusion offline: real CLIP tokenizer, SD geometry (8x VAE, 4 latent channels),
random weights, saved in diffusers format so the loading code is the one real SD 1.5 weights go through.

The tokenizer is the real CLIP BPE, rebuilt from `bpe_simple_vocab_16e6.txt.gz` that the open-clip-torch wheel
ships; open_clip itself is never imported (it would pull torchvision).
"""

from __future__ import annotations

import gzip
import importlib.util
from dataclasses import dataclass, replace
from pathlib import Path

SD15_SCHEDULER = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "prediction_type": "epsilon",
    "steps_offset": 1,
    "timestep_spacing": "leading",
}


class TinyModelError(RuntimeError):
    pass


def bpe_vocab_path() -> Path:
    spec = importlib.util.find_spec("open_clip")  # locates the package without executing it
    if spec is None or not spec.submodule_search_locations:
        raise TinyModelError(
            "the CLIP BPE vocabulary comes from the open-clip-torch wheel: "
            "pip install --no-deps open-clip-torch (make install does this)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "bpe_simple_vocab_16e6.txt.gz"
    if not path.exists():
        raise TinyModelError(f"{path} is missing: reinstall open-clip-torch")
    return path


def _bytes_to_unicode() -> dict[int, str]:
    # The byte->printable-unicode table of GPT-2/CLIP BPE.
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def write_clip_tokenizer(out: Path) -> None:
    """vocab.json + merges.txt exactly as CLIP's (49408 tokens), for transformers' CLIPTokenizer."""
    lines = gzip.open(bpe_vocab_path()).read().decode("utf-8").split("\n")
    merges = [tuple(m.split()) for m in lines[1 : 49152 - 256 - 2 + 1]]
    vocab = list(_bytes_to_unicode().values())
    vocab = vocab + [v + "</w>" for v in vocab]
    vocab += ["".join(m) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    from transformers import CLIPTokenizer

    # save_pretrained writes tokenizer.json plus the classic vocab.json/merges.txt pair.
    CLIPTokenizer(
        vocab={tok: i for i, tok in enumerate(vocab)},
        merges=merges,
        model_max_length=77,
    ).save_pretrained(out)


@dataclass(frozen=True)
class SDShape:
    """The sizes of a small Stable Diffusion: SD 1.x's architecture, narrower and shallower. The UNet has one
    cross-attention block per level but the last; the VAE one block per level, four levels."""

    sample_px: int
    text_width: int
    text_layers: int
    unet_channels: tuple[int, ...]
    unet_layers: int
    unet_groups: int
    vae_channels: tuple[int, int, int, int]
    vae_layers: int
    vae_groups: int
    text_ff: int | None = None  # None: twice text_width
    text_heads: int = 4


# SD 1.5's own sizes (CLIP ViT-L/14's text encoder), for the GPU benchmarks: 1.1 B parameters.
SD15 = SDShape(sample_px=512, text_width=768, text_layers=12, text_ff=3072, text_heads=12,
               unet_channels=(320, 640, 1280, 1280), unet_layers=2, unet_groups=32, vae_channels=(128, 256, 512, 512),
               vae_layers=2, vae_groups=32)
TINY = SDShape(sample_px=64, text_width=64, text_layers=2, unet_channels=(32, 64, 64), unet_layers=1,
               unet_groups=32, vae_channels=(32, 32, 64, 64), vae_layers=1, vae_groups=16)


def random_pipeline(shape: SDShape, tokenizer, device=None):
    """A StableDiffusionPipeline of that shape with random weights (from torch's global generator: text encoder,
    UNet, VAE, in that order), created on `device` (default: torch's), with SD 1.5's scheduler; no safety checker."""
    import contextlib

    import torch
    from diffusers import (
        AutoencoderKL,
        DPMSolverMultistepScheduler,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel

    with torch.device(device) if device is not None else contextlib.nullcontext():
        text_encoder = CLIPTextModel(
            CLIPTextConfig(
                vocab_size=49408,
                hidden_size=shape.text_width,
                intermediate_size=shape.text_ff or 2 * shape.text_width,
                num_attention_heads=shape.text_heads,
                num_hidden_layers=shape.text_layers,
                max_position_embeddings=77,
                bos_token_id=49406,
                eos_token_id=49407,
                pad_token_id=49407,
                projection_dim=shape.text_width,
            )
        )
        levels = len(shape.unet_channels)
        unet = UNet2DConditionModel(
            sample_size=shape.sample_px // 8,
            in_channels=4,
            out_channels=4,
            block_out_channels=shape.unet_channels,
            layers_per_block=shape.unet_layers,
            down_block_types=("CrossAttnDownBlock2D",) * (levels - 1) + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (levels - 1),
            cross_attention_dim=shape.text_width,
            attention_head_dim=8,
            norm_num_groups=shape.unet_groups,
        )
        vae = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            block_out_channels=shape.vae_channels,
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            latent_channels=4,
            layers_per_block=shape.vae_layers,
            norm_num_groups=shape.vae_groups,
            sample_size=shape.sample_px,
        )
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=DPMSolverMultistepScheduler(**SD15_SCHEDULER),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def build_random(out: Path, shape: SDShape, seed: int = 0) -> Path:
    """Save a random-weight pipeline of `shape` (with the real CLIP tokenizer) under `out` and return it."""
    import torch
    from transformers import CLIPTokenizer

    out = Path(out)
    torch.manual_seed(seed)
    write_clip_tokenizer(out / "tokenizer")
    pipe = random_pipeline(shape, CLIPTokenizer.from_pretrained(out / "tokenizer"))
    pipe.save_pretrained(out, safe_serialization=True)
    return out


def build_tiny(out: Path, seed: int = 0, sample_px: int = 64) -> Path:
    """Save the tiny random StableDiffusionPipeline under `out` and return it."""
    return build_random(out, replace(TINY, sample_px=sample_px), seed)


def add_arguments(parser) -> None:
    parser.add_argument("--out", type=Path, required=True, help="directory to write the diffusers-format model to")
    parser.add_argument("--seed", type=int, default=0, help="seed for the random weights (default 0)")


def run(args) -> int:
    path = build_tiny(args.out, seed=args.seed)
    print(f"tiny Stable Diffusion written to {path}")
    return 0
