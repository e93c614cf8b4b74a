from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator

from schemas.messages import LANES
from skillgen.runtime.groupview import DEFAULT_LANE_WEIGHTS
from skillgen.runtime.settings import (
    EMBEDDED_MODEL_DIR,
    REPO_ROOT,
    CommonSettings,
    default_model,
)

# The embedded model's LCM-LoRA, where it was distilled (models/skill-icons-lcm): turbo's default with that model.
EMBEDDED_FAST_LORA = REPO_ROOT / "models" / "skill-icons-lcm" / "pytorch_lora_weights.safetensors"


def _default_fast_lora(data: dict) -> Path | None:
    try:
        embedded = Path(data["model"]).resolve() == EMBEDDED_MODEL_DIR.resolve()
    except (KeyError, OSError, TypeError, ValueError):  # a model refused on its own field, or not a path
        return None
    return EMBEDDED_FAST_LORA if embedded and EMBEDDED_FAST_LORA.is_file() else None


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
    # Turbo requests (GenerateRequest.turbo) run with this LoRA (an LCM-LoRA for `model`, safetensors); unset, they
    # fail saying so. Default: the embedded model's own (EMBEDDED_FAST_LORA) when `model` is the embedded one.
    fast_lora: Path | None = Field(default_factory=_default_fast_lora)
    # Adapters kept loaded (on the GPU for torch); past this the least recently used one that is not active goes.
    max_loaded_adapters: int = Field(default=8, ge=1)
    # Resolution cap (width x height) a request may ask for on this deployment's GPU.
    max_pixels: int = Field(default=1024 * 1024, ge=64 * 64)
    # The trainer's adapter registry (file:// or s3://); unset: a request naming an adapter fails, saying so.
    adapter_url: str | None = None
    # Batching: a batch leaves when it holds max_batch images or its oldest request waited max_wait_ms.
    max_batch: int = Field(default=8, ge=1, le=64)
    max_wait_ms: int = Field(default=50, ge=0, le=10_000)
    # Records taken from Kafka and not yet answered: the read-ahead window the fair scheduler chooses from (a
    # record is about 1 KB, so thousands cost a few MB); past this the partitions are paused, not left unpolled.
    max_pending: int = Field(default=2048, ge=1, le=100_000)
    # Scheduling (consumer/batcher.py): `fair` (weighted fair queuing over lanes and teams) or `fifo` (oldest
    # first). Team weights (team id -> weight, default 1) and lane weights (fast 1, relax 0.25, replay 0.1), as
    # JSON in SKILL_TEAM_WEIGHTS / SKILL_LANE_WEIGHTS.
    scheduling: Literal["fair", "fifo"] = "fair"
    # With fair scheduling: a batch of a team that has nothing else queued (someone asking once) may run between
    # two denoising steps of a running batch of teams with more queued (a flood), instead of waiting for its end.
    preempt: bool = True
    # At start, before joining the group: a full batch and a lone image at the model's size, timed, so the first
    # ETAs (consumer/speed.py's cost model) come from both sizes instead of from whichever batch ran first.
    warm_up: bool = True
    # Where a consumer keeps, across restarts, how much slower than its warm-up it ran in service (consumer/speed.py
    # SpeedMemory): a restarted consumer's first ETAs start from it. Used only with the warm-up.
    speed_memory: Path = Field(default_factory=lambda: Path.home() / ".cache" / "skillgen" / "speed.json")

    @field_validator("speed_memory")
    @classmethod
    def _expand_user(cls, v: Path) -> Path:
        return v.expanduser()
    team_weights: dict[str, float] = Field(default_factory=dict)
    lane_weights: dict[str, float] = Field(default_factory=lambda: dict(DEFAULT_LANE_WEIGHTS))
    # A team's fast-lane budget per UTC day in work units (one 512x512 image, 20 steps, with guidance); past it
    # the team's requests run in the relax lane. 0: no budget (always fast). Counted in Redis across the group.
    fast_units_per_day: float = Field(default=0.0, ge=0)
    # A request whose expected finish is past its deadline is refused at once ("busy, try again in about N
    # min"), instead of queueing work nobody waits for. Per lane, seconds after the request was made; a request
    # may ask for a shorter one (GenerateRequest.deadline_s).
    lane_deadline_s: dict[str, float] = Field(
        default_factory=lambda: {"fast": 1800.0, "relax": 6 * 3600.0, "replay": 24 * 3600.0})
    # How often the consumer publishes its queue and speed to Redis (skillgen/runtime/groupview.py).
    view_interval_s: float = Field(default=1.0, gt=0)
    # Image cancels this recent are read at start (skill.generate.cancel), so a cancel sent just before a
    # restart still stops the request it names.
    cancel_lookback_s: float = Field(default=3600.0, ge=0)
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

    @field_validator("team_weights", "lane_weights")
    @classmethod
    def _positive_weights(cls, v: dict[str, float]) -> dict[str, float]:
        bad = {k: w for k, w in v.items() if not w > 0}
        if bad:
            raise ValueError(f"weights must be above 0, got {bad}")
        return v

    @field_validator("lane_weights", "lane_deadline_s")
    @classmethod
    def _known_lanes(cls, v: dict[str, float]) -> dict[str, float]:
        unknown = sorted(set(v) - set(LANES))
        if unknown:
            raise ValueError(f"unknown lanes {unknown}: the lanes are {', '.join(LANES)}")
        return v
