"""Settings shared by every service: where Kafka, Redis and the blob store are, and how to log.

Each service has its own class (consumer, bots, trainer) that extends these; all read `SKILL_*` variables and
an optional `.env`. Secrets are SecretStr so they never reach a log line or a repr. An empty variable counts as
unset (compose passes `${X:-}` as an empty string), so it takes the default rather than failing to parse.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from schemas.topics import Topics

REPO_ROOT = Path(__file__).resolve().parents[2]
# The embedded default: a tiny SD trained by this project on procedural skill icons (models/skill-icons).
EMBEDDED_MODEL_DIR = REPO_ROOT / "models" / "skill-icons"
# Before that model exists, or where it was not shipped, `skillgen model tiny` builds a random one here.
RANDOM_TINY_DIR = REPO_ROOT / ".cache" / "models" / "tiny-random"


def default_model() -> str:
    if (EMBEDDED_MODEL_DIR / "model_index.json").exists():
        return str(EMBEDDED_MODEL_DIR)
    return str(RANDOM_TINY_DIR)


class CommonSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="SKILL_", env_file=".env", extra="ignore", env_ignore_empty=True)

    kafka_bootstrap: str = Field(default="127.0.0.1:9092", description="host:port[,host:port]")
    # Apache Kafka supports idempotent producers; the embedded Tansu broker (memory storage) answers
    # InitProducerId with an error, so the demo and the tests turn this off. Keep it on in production.
    kafka_idempotence: bool = True
    topic_prefix: str = Field(default="", pattern=r"^[A-Za-z0-9._-]*$")
    redis_url: str | None = Field(default=None, description="unset: in-process cache and limits only")
    redis_prefix: str = "skill:"
    blob_url: str = Field(default="file://./out/blobs", description="file:///path or s3://bucket/prefix")
    metrics_port: int = Field(default=0, ge=0, le=65535, description="0 disables /metrics and /healthz")
    # Group membership, the same for every service that joins a group. Tansu answers a fetch only when
    # fetch_max_wait_ms runs out, so it bounds pickup latency there; Apache Kafka answers as soon as a record arrives.
    fetch_max_wait_ms: int = Field(default=100, ge=1, le=10_000)
    kafka_session_timeout_ms: int = Field(default=10_000, ge=1000)
    kafka_heartbeat_interval_ms: int = Field(default=3_000, ge=100)
    kafka_rebalance_timeout_ms: int = Field(default=60_000, ge=1000)
    log_format: Literal["json", "text"] = "text"
    log_level: str = "INFO"

    @property
    def topics(self) -> Topics:
        return Topics(self.topic_prefix)
