"""The training set of one `/skill-train`, in the spirit of the source article's SkillDataset.

Captions are tokenized here only to refuse one longer than the model reads (77 tokens) rather than cut it
silently, since the cut part is often the trigger word; the loss tokenizes batches itself, exactly as the
inference backends do (`trainer.diffusion.tokenize`). Images are resized once so
their short side is the training size, then each draw takes a random square crop, normalized to [-1, 1].
All randomness comes from the caller's CPU generator, so a seed (and a checkpointed generator state) replays
the same batches.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image

from trainer.diffusion import TextImageBatch
from trainer.ingest import Example, IngestError


class SkillDataset(torch.utils.data.Dataset):
    def __init__(self, examples: Sequence[Example], tokenizer, size_px: int, generator: torch.Generator):
        if not examples:
            raise IngestError("no training images")
        self.size_px = size_px
        self.generator = generator
        self.captions = [e.caption for e in examples]
        lengths = [len(ids) for ids in tokenizer(self.captions, truncation=False).input_ids]
        for i, n in enumerate(lengths, 1):  # by position: the name is the sender's text
            if n > tokenizer.model_max_length:
                raise IngestError(
                    f"the caption of image {i} is {n} tokens; the model reads {tokenizer.model_max_length}: shorten it"
                )
        self.images = [_short_side(e.image, size_px) for e in examples]

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, idx: int) -> dict:
        image = self.images[idx]
        _, h, w = image.shape
        top = int(torch.randint(0, h - self.size_px + 1, (1,), generator=self.generator))
        left = int(torch.randint(0, w - self.size_px + 1, (1,), generator=self.generator))
        crop = image[:, top : top + self.size_px, left : left + self.size_px]
        return {
            "pixel_values": crop.float() / 127.5 - 1.0,
            "caption": self.captions[idx],
        }

    def batch(self, size: int) -> TextImageBatch:
        """`size` examples drawn with replacement: a handful of images makes no meaningful epoch."""
        items = [self[int(i)] for i in torch.randint(0, len(self), (size,), generator=self.generator)]
        return TextImageBatch(
            captions=[item["caption"] for item in items], pixels=torch.stack([item["pixel_values"] for item in items])
        )


def _short_side(image: Image.Image, size_px: int) -> torch.Tensor:
    """uint8 (3, H, W) with min(H, W) == size_px."""
    w, h = image.size
    scale = size_px / min(w, h)
    resized = image.resize((max(size_px, round(w * scale)), max(size_px, round(h * scale))), Image.Resampling.LANCZOS)
    return torch.from_numpy(np.array(resized.convert("RGB"))).permute(2, 0, 1).contiguous()
