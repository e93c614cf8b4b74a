"""The image policy: every generated image is checked before it is stored, cached or posted.

NudeNet's detector (the ONNX model its wheel ships, nothing downloaded) always runs; diffusers'
StableDiffusionSafetyChecker runs too when SKILL_SAFETY_CHECKER_DIR points at its weights: a local SD 1.x model
directory, or a hub id of one (compose's gpu profile: the SD 1.5 repository the consumer draws with), whose
safety_checker/ and feature_extractor/ folders are fetched once into the hub cache like the model itself.
There is no image check for gore: no violence or gore detector ships inside a package we can install, and none
may be downloaded, so violence is refused on the prompt side only (docs/safety.md).
NudeNet runs with its own preprocessing, labels and non-maximum suppression, but in our own ONNX Runtime
session: its `NudeDetector` ignores `providers` (so it never runs on a GPU) and decodes boxes in a Python
loop over all 2100 candidates (about 5 ms an image). `_NudeNet` decodes them with numpy, on the consumer's
device; tests check that its detections equal NudeDetector's. The images of one call share a session.run
(up to `_NudeNet.BATCH`): each image is letterboxed, decoded and decided on its own, and the network treats
each batch entry apart (on the CPU its outputs are bit-identical to a run of that image alone; tests check),
so a decision still depends on its own image only. In a batch of 8 an image costs 10 to 25% less (2 CPU cores).
The network's run is about 97% of a check (2 CPU cores; the letterbox 0.3 to 0.8 ms, decoding 0.2 ms), and
what would shorten it changes decisions: int8 weights moved scores by up to 0.3 (and ran no faster here), and a
64-pixel image cannot be read at less than 320 pixels without other detections (the network's input size).

Fail closed without raising: `check` returns one decision per image, and an image whose check
raised gets a blocked decision with category "check_failed" (the error is logged). The caller
fails the whole request when any of its images has that category. Construction does raise
`SafetyError` when a checker cannot be loaded, so a consumer without its checks does not start.

torch, diffusers, onnxruntime and cv2 are imported when an `ImagePolicy` is built, not with this module.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np

from skillgen.safety.audit import AuditLog, from_setting, reference, with_ref
from skillgen.safety.decision import CHECK_FAILED, Decision
from skillgen.safety.errors import SafetyError
from skillgen.safety.settings import SafetySettings

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
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
_CHECKER_FILES = ["safety_checker/*.json", "safety_checker/model.safetensors", "feature_extractor/*.json"]


def checker_root(value: str | Path, download: bool = False) -> Path:
    """The local folder of SKILL_SAFETY_CHECKER_DIR: the value itself when it is a folder; for a hub id
    ("stable-diffusion-v1-5/stable-diffusion-v1-5"), its snapshot in the hub cache, fetched first (only the
    checker's two folders) when `download` and the hub is reachable (HF_HUB_OFFLINE is respected). Anything else
    comes back as given, so the caller's folder check names what is missing."""
    path = Path(value)
    if path.is_dir() or not _HUB_ID.fullmatch(str(value)):
        return path
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(str(value), allow_patterns=_CHECKER_FILES, local_files_only=not download))
    except Exception:  # noqa: BLE001 - no hub, no cache, no such repository: the folder check says so
        return path


def nudenet_providers(device: str, available: list[str]) -> list[str]:
    """CUDA first where the consumer runs on CUDA (or may) and onnxruntime-gpu offers it; the CPU always."""
    if device in ("cuda", "auto") and "CUDAExecutionProvider" in available:
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def session_options(ort: Any) -> Any:
    """NudeNet's session options: ONNX Runtime's defaults, spinning workers included. Measured both ways, bit-identical
    outputs: on 2 cores busy with other work (load 4 to 7) a check without spinning took 0.45 to 0.75 of the time,
    but on a quiet CPU, a consumer's usual state, it was slower: one 64x64 check 19.0 ms against 13.6 ms (median of
    60 interleaved), and `skillgen bench consumer` served 4.3 images/s at max_batch 1 against 6.7 with spinning."""
    return ort.SessionOptions()


class _Letterboxed(NamedTuple):
    """One image as NudeNet's network reads it (1 x 3 x 320 x 320, RGB in 0..1) and what maps boxes back."""

    blob: np.ndarray
    x_pad: int
    y_pad: int
    width: int
    height: int


class _NudeNet:
    """NudeNet's 320-pixel detector: `detect` answers what `nudenet.NudeDetector.detect` answers."""

    MIN_SCORE, NMS_SCORE, NMS_IOU = 0.2, 0.25, 0.45  # NudeDetector's own
    BATCH = 8  # images per session.run at most: bounds the memory of one run (1.2 MB of input an image)

    def __init__(self, device: str) -> None:
        import onnxruntime as ort
        from nudenet import nudenet

        self._nudenet = nudenet
        self._labels: list[str] = getattr(nudenet, "__labels")  # noqa: B009 - a module-private name
        model = Path(nudenet.__file__).with_name("320n.onnx")
        providers = nudenet_providers(device, ort.get_available_providers())
        self._session = ort.InferenceSession(str(model), session_options(ort), providers=providers)
        self._input = self._session.get_inputs()[0].name
        self._size = 320

    @property
    def providers(self) -> list[str]:
        return self._session.get_providers()

    def detect(self, pixels: np.ndarray) -> list[dict[str, Any]]:
        prepared = self.prepare(pixels)
        return self.detections(self.infer([prepared]), 0, prepared)

    def prepare(self, pixels: np.ndarray) -> _Letterboxed:
        """NudeNet's own letterbox of one RGB image (a numpy or PIL rewrite saves under 0.1 ms of about 15)."""
        blob, _, _, x_pad, y_pad, width, height = self._nudenet._read_image(pixels, self._size)
        return _Letterboxed(blob, x_pad, y_pad, width, height)

    def infer(self, prepared: Sequence[_Letterboxed]) -> np.ndarray:
        """The network's output for prepared images (one row each, in order), from one session.run."""
        return self._session.run(None, {self._input: np.concatenate([p.blob for p in prepared])})[0]

    def detections(self, output: np.ndarray, row: int, prepared: _Letterboxed) -> list[dict[str, Any]]:
        """The detections of the image in `row` of `infer`'s output: what NudeDetector.detect answers for it."""
        return self.decode([output[row : row + 1]], prepared.x_pad, prepared.y_pad, prepared.width, prepared.height)

    def decode(self, output: list[np.ndarray], x_pad: int, y_pad: int, width: int, height: int) -> list[dict[str, Any]]:
        """NudeNet's `_postprocess`, vectorised."""
        import cv2

        rows = np.transpose(np.squeeze(output[0]))  # candidates x (cx, cy, w, h, one score per class)
        class_scores = rows[:, 4:]
        best = class_scores.max(axis=1)
        keep = best >= self.MIN_SCORE
        rows, best, classes = rows[keep], best[keep], class_scores[keep].argmax(axis=1)
        cx, cy, w, h = rows[:, 0], rows[:, 1], rows[:, 2], rows[:, 3]
        # The same float32 arithmetic as NudeNet's loop: corner, scale to the padded original, clip.
        x = (cx - w / 2) * (width + x_pad) / self._size
        y = (cy - h / 2) * (height + y_pad) / self._size
        w = w * (width + x_pad) / self._size
        h = h * (height + y_pad) / self._size
        x = np.maximum(0, np.minimum(x, width))
        y = np.maximum(0, np.minimum(y, height))
        w = np.minimum(w, width - x)
        h = np.minimum(h, height - y)
        boxes = np.stack([x, y, w, h], axis=1).astype(np.float64)
        kept = cv2.dnn.NMSBoxes(boxes.tolist(), best.astype(np.float64).tolist(), self.NMS_SCORE, self.NMS_IOU)
        return [
            {"class": self._labels[classes[i]], "score": float(best[i]), "box": [int(v) for v in boxes[i]]}
            for i in np.asarray(kept, dtype=int).reshape(-1)
        ]


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
            from diffusers.pipelines.stable_diffusion.safety_checker import (
                StableDiffusionSafetyChecker,
            )
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
    device: where the checkers run ("auto", "cpu", "cuda"; SKILL_DEVICE's values): NudeNet on CUDA through ONNX
      Runtime's CUDA provider when onnxruntime-gpu has it, else on the CPU (about 13 ms an image here).
    Thread-safe: the consumer calls `check` from its worker thread.
    """

    def __init__(
        self, nsfw_threshold: float = 0.6, checker_dir: str | Path | None = None, device: str = "cpu",
        audit_log: Path | None = None,
    ) -> None:
        if not 0.2 <= nsfw_threshold <= 1.0:
            raise SafetyError(
                f"nsfw_threshold must be within 0.2 and 1 (NudeNet reports nothing under 0.2), got {nsfw_threshold}"
            )
        try:
            self._detector = _NudeNet(device)
        except ImportError as exc:
            raise SafetyError(_INSTALL_HINT) from exc
        self._nsfw_threshold = nsfw_threshold
        self._checker = _StableDiffusionChecker(checker_root(checker_dir, download=True), device) if checker_dir else None
        self._audit: AuditLog | None = from_setting(audit_log)

    @classmethod
    def from_settings(cls, settings: SafetySettings | None = None, device: str = "cpu") -> ImagePolicy:
        settings = settings or SafetySettings()
        return cls(nsfw_threshold=settings.nsfw_threshold, checker_dir=settings.checker_dir, device=device,
                   audit_log=settings.audit_log)

    def check(self, images: Sequence[Image.Image]) -> list[Decision]:
        decisions: list[Decision] = []
        for start in range(0, len(images), self._detector.BATCH):
            decisions += self._check_batch(images[start : start + self._detector.BATCH])
        return [self._with_ref(decision) for decision in decisions]

    def _with_ref(self, decision: Decision) -> Decision:
        """A blocked decision with its reference id (at the end of its reason) and, when set, an audit line."""
        if decision.allowed:
            return decision
        ref = reference(decision.detail or "")
        if self._audit is not None:
            self._audit.write({"ref": ref, "kind": "image", "category": decision.category, "layer": decision.layer,
                               "detail": decision.detail})
        return decision.model_copy(update={"ref": ref, "reason": with_ref(decision.reason, ref)})

    def _check_batch(self, images: Sequence[Image.Image]) -> list[Decision]:
        """One decision per image; NudeNet reads the images that could be letterboxed in one session.run.
        An image that cannot be read fails alone; a failed run fails every image it held."""
        decisions: list[Decision | None] = [None] * len(images)
        read: list[tuple[int, Image.Image, np.ndarray, _Letterboxed]] = []
        for i, image in enumerate(images):
            try:
                rgb = image.convert("RGB")
                pixels = np.asarray(rgb)
                # NudeDetector reads an ndarray as RGB (it swaps channels twice on the way in).
                read.append((i, rgb, pixels, self._detector.prepare(pixels)))
            except Exception as exc:  # noqa: BLE001 - fail closed, whatever went wrong
                decisions[i] = _failed(exc)
        try:
            output = self._detector.infer([entry[3] for entry in read]) if read else None
        except Exception as exc:  # noqa: BLE001 - fail closed, whatever went wrong
            output = None
            for i, *_ in read:
                decisions[i] = _failed(exc)
        for row, (i, rgb, pixels, prepared) in enumerate(read if output is not None else []):
            try:
                decisions[i] = self._decide(rgb, pixels, self._detector.detections(output, row, prepared))
            except Exception as exc:  # noqa: BLE001 - fail closed, whatever went wrong
                decisions[i] = _failed(exc)
        unchecked = RuntimeError("the image was not checked")  # none is: every branch above decides
        return [decision if decision is not None else _failed(unchecked) for decision in decisions]

    def _decide(self, rgb: Image.Image, pixels: np.ndarray, detections: list[dict[str, Any]]) -> Decision:
        for detection in detections:
            if detection["class"] in _EXPOSED_CLASSES and detection["score"] >= self._nsfw_threshold:
                detail = f"nudenet {detection['class']} {detection['score']:.2f}"
                return Decision(allowed=False, category="sexual", reason=_NUDITY_REASON, detail=detail,
                                layer="nudenet")
        if self._checker is not None and self._checker.flags(rgb, pixels):
            return Decision(allowed=False, category="sexual", reason=_FLAGGED_REASON,
                            detail="StableDiffusionSafetyChecker", layer="sd_checker")
        return Decision(allowed=True)


def _failed(exc: Exception) -> Decision:
    """Fail closed: an image nothing vouched for is never shown, whatever went wrong."""
    logger.error("image safety check failed; blocking the image", exc_info=exc)
    return Decision(allowed=False, category=CHECK_FAILED, reason=_FAILED_REASON,
                    detail=f"{type(exc).__name__}: {exc}", layer="image")
