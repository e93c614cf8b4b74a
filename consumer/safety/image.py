"""The image policy: every generated image is checked before it is stored, cached or posted.

NudeNet's detector (the ONNX model its wheel ships, nothing downloaded) always runs; diffusers'
StableDiffusionSafetyChecker runs too when SKILL_SAFETY_CHECKER_DIR points at its weights.
NudeNet is used through its own `NudeDetector`, which preprocesses, decodes boxes and applies
non-maximum suppression the way the model was trained; we read it per image and never batch it,
so a decision depends on its own image only.

Fail closed without raising: `check` returns one decision per image, and an image whose check
raised gets a blocked decision with category "check_failed" (the error is logged). The caller
fails the whole request when any of its images has that category. Construction does raise
`SafetyError` when a checker cannot be loaded, so a consumer without its checks does not start.

torch, diffusers, onnxruntime and cv2 are imported when an `ImagePolicy` is built, not with this module.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from consumer.safety.decision import CHECK_FAILED, Decision
from consumer.safety.errors import SafetyError
from consumer.safety.settings import SafetySettings

if TYPE_CHECKING:
    from PIL import Image

logger = logging.getLogger(__name__)

# NudeNet also reports covered parts, faces, feet and bellies; only these mean nudity.
_EXPOSED_CLASSES = frozenset(
    {
        "FEMALE_GENITALIA_EXPOSED",
        "MALE_GENITALIA_EXPOSED",
        "FEMALE_BREAST_EXPOSED",
        "BUTTOCKS_EXPOSED",
        "ANUS_EXPOSED",
    }
)
_NUDITY_REASON = "Your image was blocked: it appears to show nudity."
_FLAGGED_REASON = "Your image was blocked: the safety checker flagged it as not safe for work."
_FAILED_REASON = "Your image was withheld: the safety check could not run, so nothing was shown. Please try again."
_INSTALL_HINT = "the image policy needs the ml extra: pip install 'skillgen[ml]'"


class _StableDiffusionChecker:
    def __init__(self, checker_dir: Path, device: str) -> None:
        for sub in ("safety_checker", "feature_extractor"):
            if not (checker_dir / sub).is_dir():
                raise SafetyError(
                    f"SKILL_SAFETY_CHECKER_DIR={checker_dir} has no {sub}/ folder; point it at a directory laid "
                    "out like a Stable Diffusion 1.x model (safety_checker/ and feature_extractor/)"
                )
        try:
            import torch
            from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
            from transformers import CLIPImageProcessorPil
        except ImportError as exc:
            raise SafetyError(_INSTALL_HINT) from exc
        self._device = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
        try:
            self._processor = CLIPImageProcessorPil.from_pretrained(
                checker_dir / "feature_extractor", local_files_only=True
            )
            self._model = StableDiffusionSafetyChecker.from_pretrained(
                checker_dir / "safety_checker", use_safetensors=True, local_files_only=True
            )
        except (OSError, ValueError) as exc:
            raise SafetyError(f"cannot load the safety checker from {checker_dir}: {exc}") from exc
        self._model.to(self._device).eval()

    def flags(self, image: Image.Image, pixels: np.ndarray) -> bool:
        clip_input = self._processor(images=image, return_tensors="pt").pixel_values
        clip_input = clip_input.to(self._device, dtype=self._model.dtype)
        # The checker blacks out flagged entries of `images`: hand it a list it may overwrite.
        _, has_nsfw = self._model(clip_input=clip_input, images=[pixels])
        return bool(has_nsfw[0])


class ImagePolicy:
    """Checks generated images; one decision per image, never raising for a checker error.

    nsfw_threshold: NudeNet score (0.2 to 1) at or above which an exposed-body-part detection blocks.
      Plain coloured shapes reach about 0.53, so the default is 0.6.
    checker_dir: local directory with safety_checker/ and feature_extractor/ (None: NudeNet alone).
    device: where the StableDiffusionSafetyChecker runs ("auto", "cpu", "cuda"; SKILL_DEVICE's values);
      NudeNet runs on CPU, where its 320-pixel model takes a few milliseconds an image.
    Thread-safe: the consumer calls `check` from its worker thread.
    """

    def __init__(
        self, nsfw_threshold: float = 0.6, checker_dir: str | Path | None = None, device: str = "cpu"
    ) -> None:
        if not 0.2 <= nsfw_threshold <= 1.0:
            raise SafetyError(
                f"nsfw_threshold must be within 0.2 and 1 (NudeNet reports nothing under 0.2), got {nsfw_threshold}"
            )
        try:
            from nudenet import NudeDetector
        except ImportError as exc:
            raise SafetyError(_INSTALL_HINT) from exc
        self._nsfw_threshold = nsfw_threshold
        self._detector: Any = NudeDetector()
        self._checker = _StableDiffusionChecker(Path(checker_dir), device) if checker_dir else None

    @classmethod
    def from_settings(cls, settings: SafetySettings | None = None, device: str = "cpu") -> ImagePolicy:
        settings = settings or SafetySettings()
        return cls(nsfw_threshold=settings.nsfw_threshold, checker_dir=settings.checker_dir, device=device)

    def check(self, images: Sequence[Image.Image]) -> list[Decision]:
        return [self._check_one(image) for image in images]

    def _check_one(self, image: Image.Image) -> Decision:
        try:
            rgb = image.convert("RGB")
            pixels = np.asarray(rgb)
            # NudeDetector reads an ndarray as RGB (it swaps channels twice on the way in).
            for detection in self._detector.detect(pixels):
                if detection["class"] in _EXPOSED_CLASSES and detection["score"] >= self._nsfw_threshold:
                    detail = f"nudenet {detection['class']} {detection['score']:.2f}"
                    return Decision(allowed=False, category="sexual", reason=_NUDITY_REASON, detail=detail)
            if self._checker is not None and self._checker.flags(rgb, pixels):
                return Decision(
                    allowed=False, category="sexual", reason=_FLAGGED_REASON, detail="StableDiffusionSafetyChecker"
                )
        except Exception as exc:
            # Fail closed: an image nothing vouched for is never shown, whatever went wrong.
            logger.exception("image safety check failed; blocking the image")
            detail = f"{type(exc).__name__}: {exc}"
            return Decision(allowed=False, category=CHECK_FAILED, reason=_FAILED_REASON, detail=detail)
        return Decision(allowed=True)
