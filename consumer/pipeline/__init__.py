"""The inference engine: `load_engine(...)` returns an Engine whose `generate(spec, samples)` makes images.

Heavy imports (torch, diffusers, onnxruntime) happen inside the functions, never when a bot imports a name.
"""

from __future__ import annotations

from pathlib import Path

from consumer.pipeline.errors import AdapterError, DoesNotFit, ModelLoadError, PipelineError

__all__ = ["AdapterError", "DoesNotFit", "ModelLoadError", "PipelineError", "load_engine"]


def load_engine(model: str | Path, backend: str = "torch", device: str = "auto", precision: str = "fp16"):
    from consumer.pipeline.engine import Engine

    if backend == "torch":
        from consumer.pipeline.torch_backend import TorchBackend

        return Engine(TorchBackend(model, device=device, precision=precision))
    raise PipelineError(f"unknown backend {backend!r}; choose torch or onnx")
