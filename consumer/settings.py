from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field

from skillgen.runtime.settings import CommonSettings, default_model


class ConsumerSettings(CommonSettings):
    model: str = Field(default_factory=default_model, description="diffusers directory or hub id")
    backend: Literal["torch", "onnx"] = "torch"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    precision: Literal["fp32", "fp16", "int8"] = "fp16"  # int8: onnx backend only
    # onnx backend: where exports and TensorRT engines are cached (default ~/.cache/skillgen/onnx), which
    # execution provider to use (auto: TensorRT > CUDA > CPU), and how many fused adapters stay in memory.
    onnx_cache_dir: Path | None = None
    onnx_provider: Literal["auto", "tensorrt", "cuda", "cpu"] = "auto"
    max_cached_adapters: int = Field(default=4, ge=1, le=64)
    # Adapters kept loaded (on the GPU for torch); past this the least recently used one that is not active goes.
    max_loaded_adapters: int = Field(default=8, ge=1)
    # Resolution cap (width x height) a request may ask for on this deployment's GPU.
    max_pixels: int = Field(default=1024 * 1024, ge=64 * 64)
    # The trainer's adapter registry (file:// or s3://); unset: a request naming an adapter fails, saying so.
    adapter_url: str | None = None
    # Batching: a batch leaves when it holds max_batch images or its oldest request waited max_wait_ms.
    max_batch: int = Field(default=8, ge=1, le=64)
    max_wait_ms: int = Field(default=50, ge=0, le=10_000)
    # Records taken from Kafka and not yet answered; past this the partitions are paused, not left unpolled.
    max_pending: int = Field(default=64, ge=1, le=10_000)
    max_retries: int = Field(default=2, ge=0, le=10)
    retry_backoff_ms: int = Field(default=200, ge=0)
    progress_interval_s: float = Field(default=1.0, ge=0)
    drain_timeout_s: float = Field(default=60.0, ge=0)
    # Cache: L1 in this process, L2 in Redis (when SKILL_REDIS_URL is set); every L2 key expires.
    l1_max_bytes: int = Field(default=16 * 1024 * 1024, ge=0)
    cache_ttl_s: int = Field(default=7 * 24 * 3600, ge=1)
    # Single flight across consumers: a holder renews its lease every lease_ttl_s / 3 while its GPU loop makes
    # progress, and releases it at once when the flight ends or its partitions are revoked. A killed (or stalled)
    # holder's lease lapses within lease_ttl_s, and a consumer waiting on it looks every lease_poll_ms: it takes
    # the picture over at most lease_ttl_s + lease_poll_ms after the holder died. The requests the dead consumer
    # held come back only after the group notices (SKILL_KAFKA_SESSION_TIMEOUT_MS, then a rebalance): after a
    # kill -9 every request is answered within about max(session timeout + rebalance, lease_ttl_s) + poll + the
    # time to draw what was lost (those records run one at a time: skillgen/runtime/attempts.py).
    lease_ttl_s: float = Field(default=6.0, gt=0)
    lease_poll_ms: int = Field(default=100, ge=10)
    # A GPU call with no progress (no denoising step, no finished batch) for this long is stuck: its leases stop
    # being renewed (so peers take its pictures over) and /healthz answers 503 (so the orchestrator restarts it).
    gpu_stall_s: float = Field(default=120.0, gt=0)
    # A record still unanswered this long after it was fetched (a terminal event that cannot be produced, a
    # handler that never returns) turns /healthz to 503: nothing in hand wedges silently.
    max_record_age_s: float = Field(default=600.0, gt=0)
    # After a Redis error, Redis is left alone this long: a down Redis costs one timeout, not one per request.
    redis_timeout_s: float = Field(default=0.5, gt=0)
    redis_retry_s: float = Field(default=2.0, ge=0)
    # The pickup latency on Tansu (see CommonSettings): a consumer wants requests at once.
    fetch_max_wait_ms: int = Field(default=10, ge=1, le=10_000)
