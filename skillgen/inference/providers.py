"""ONNX Runtime execution providers: which to try, best first, and the shapes TensorRT engines are built for."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

from skillgen.inference.errors import ModelLoadError

Provider = Literal["auto", "tensorrt", "cuda", "cpu"]
EP_NAMES = {"tensorrt": "TensorrtExecutionProvider", "cuda": "CUDAExecutionProvider", "cpu": "CPUExecutionProvider"}


class TrtProfile(BaseModel):
    """TensorRT shape profile: the image sides and batch sizes engines are built for."""

    min_side_px: int = Field(default=256, ge=64)
    opt_side_px: int = Field(default=512, ge=64)
    max_side_px: int = Field(default=1024, ge=64)
    max_batch: int = Field(default=4, ge=1, description="images per batch; the UNet sees twice this with guidance")

    def shapes(self, component: str, latent_channels: int, text_dim: int, vae_factor: int) -> dict[str, str]:
        def side(px: int) -> int:
            return px // vae_factor

        out = {}
        for kind, px, batch in (
            ("min", self.min_side_px, 1),
            ("opt", self.opt_side_px, self.max_batch),
            ("max", self.max_side_px, self.max_batch),
        ):
            if component == "text_encoder":
                out[kind] = f"input_ids:{batch}x77"
            elif component == "vae_encoder":
                out[kind] = f"image:1x3x{px}x{px}"  # the engine encodes one init image at a time
            elif component == "unet":
                s = side(px)
                n = batch if kind == "min" else 2 * batch  # without guidance the UNet sees the batch itself
                out[kind] = f"sample:{n}x{latent_channels}x{s}x{s},encoder_hidden_states:{n}x77x{text_dim}"
            else:
                s = side(px)
                out[kind] = f"latent:{batch}x{latent_channels}x{s}x{s}"
        return out


def provider_order(device: str, provider: Provider) -> list[str]:
    """Providers to try, best first, among those this onnxruntime build has."""
    import onnxruntime as ort

    available = set(ort.get_available_providers())
    if provider != "auto":
        if EP_NAMES[provider] not in available:
            raise ModelLoadError(f"this onnxruntime build has no {EP_NAMES[provider]} (it has {sorted(available)})")
        return [provider]
    if device == "cpu":
        return ["cpu"]
    order = [p for p in ("tensorrt", "cuda") if EP_NAMES[p] in available]
    if device == "cuda":
        if not order:
            raise ModelLoadError("device cuda asked for, but this onnxruntime build has no CUDA or TensorRT provider")
        return order
    return order + ["cpu"]
