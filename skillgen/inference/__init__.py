"""The inference engine: `load_engine(...)` returns an Engine whose `generate(spec, samples)` makes images.

Heavy imports (torch, diffusers, onnxruntime) happen inside the functions, never when a bot imports a name.
"""

from __future__ import annotations

from pathlib import Path

from skillgen.inference.errors import (
    AdapterError,
    DoesNotFit,
    ExportError,
    ModelLoadError,
    PipelineError,
)

__all__ = ["AdapterError", "DoesNotFit", "ExportError", "ModelLoadError", "PipelineError", "load_engine"]


def load_engine(
    model: str | Path,
    backend: str = "torch",
    device: str = "auto",
    precision: str = "fp16",
    *,
    cache_dir: Path | None = None,
    provider: str = "auto",
    max_cached_adapters: int = 4,
    max_loaded_adapters: int = 8,
    max_pixels: int = 1024 * 1024,
    trt_profile=None,
    fused_attention: bool | None = None,
):
    """An Engine for `model` (diffusers directory or hub id).

    backend: "torch" (reference) or "onnx". precision: fp32 | fp16 (fp16 applies on CUDA devices and, for onnx,
    wherever ONNX Runtime has the kernels) | int8 (onnx only). cache_dir: where onnx exports and TensorRT
    engines are kept (default ~/.cache/skillgen/onnx). provider: onnx only, auto | tensorrt | cuda | cpu.
    max_cached_adapters: onnx only, fused adapter weight sets kept in memory. max_loaded_adapters: adapters kept
    loaded (the least recently used one that is not active goes first). max_pixels: width*height cap.
    trt_profile: onnx on TensorRT only, an onnx_backend.TrtProfile (image sides and batch the engines cover).
    fused_attention: onnx only, None (default: fused where measured, the CPU at fp32 and int8; see
    export.ExportOptions), True or False to choose; TensorRT graphs are always plain.
    """
    from skillgen.inference.engine import Engine
    from skillgen.inference.memory import MemoryPolicy

    memory = MemoryPolicy(max_pixels=max_pixels)
    if backend == "torch":
        from skillgen.inference.torch_backend import TorchBackend

        if precision == "int8":
            raise PipelineError("int8 is an onnx backend precision; use fp32 or fp16 with the torch backend")
        torch_backend = TorchBackend(model, device=device, precision=precision, max_loaded_adapters=max_loaded_adapters)
        return Engine(torch_backend, memory=memory)
    if backend == "onnx":
        from skillgen.inference.onnx_backend import OnnxBackend

        onnx = OnnxBackend(
            model,
            device=device,
            precision=precision,
            cache_dir=cache_dir,
            provider=provider,
            max_cached_adapters=max_cached_adapters,
            max_loaded_adapters=max_loaded_adapters,
            trt_profile=trt_profile,
            fused_attention=fused_attention,
        )
        return Engine(onnx, memory=memory)
    raise PipelineError(f"unknown backend {backend!r}; choose torch or onnx")
