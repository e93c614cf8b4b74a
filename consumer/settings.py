from __future__ import annotations

from typing import Literal

from pydantic import Field

from schemas.settings import CommonSettings, default_model


class ConsumerSettings(CommonSettings):
    model: str = Field(default_factory=default_model, description="diffusers directory or hub id")
    backend: Literal["torch", "onnx"] = "torch"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    precision: Literal["fp32", "fp16"] = "fp16"
    max_batch: int = Field(default=8, ge=1, le=64)
    max_wait_ms: int = Field(default=50, ge=0, le=10_000)
    max_retries: int = Field(default=2, ge=0, le=10)
    retry_backoff_ms: int = Field(default=200, ge=0)
    progress_interval_s: float = Field(default=1.0, ge=0)
    drain_timeout_s: float = Field(default=60.0, ge=0)
