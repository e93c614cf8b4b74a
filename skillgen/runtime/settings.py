"""Settings shared by every service: where Kafka, Redis and the blob store are, and how to log.

Each service has its own class (consumer, bots, trainer) that extends these; all read `SKILL_*` variables and
an optional `.env`. Secrets are SecretStr so they never reach a log line or a repr. An empty variable counts as
unset (compose passes `${X:-}` as an empty string), so it takes the default rather than failing to parse.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

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
    # Kafka security, applied to every client (producers, consumers, the admin client, replay). docs/security.md
    kafka_security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    kafka_sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] = "SCRAM-SHA-512"
    kafka_username: str | None = None
    kafka_password: SecretStr | None = None
    kafka_ca_file: Path | None = Field(default=None, description="PEM bundle that signs the brokers' certificates")
    kafka_cert_file: Path | None = Field(default=None, description="client certificate (mutual TLS)")
    kafka_key_file: Path | None = Field(default=None, description="the client certificate's private key")
    # Apache Kafka supports idempotent producers; the embedded Tansu broker (memory storage) answers
    # InitProducerId with an error, so the demo and the tests turn this off. Keep it on in production.
    kafka_idempotence: bool = True
    topic_prefix: str = Field(default="", pattern=r"^[A-Za-z0-9._-]*$")
    # Correctness keys (delivery markers, rate windows, leases, training sessions, chat credentials): run this
    # Redis with maxmemory-policy noeviction. redis:// or rediss:// (TLS), password in the URL.
    redis_url: str | None = Field(default=None, description="unset: in-process cache and limits only")
    # The image cache only, in its own instance with allkeys-lru (unset: the cache uses redis_url).
    cache_redis_url: str | None = None
    redis_prefix: str = "skill:"
    blob_url: str = Field(default="file://./out/blobs", description="file:///path or s3://bucket/prefix")
    metrics_port: int = Field(default=0, ge=0, le=65535, description="0 disables /metrics and /healthz")
    # Group membership, the same for every service that joins a group. Tansu answers a fetch only when
    # fetch_max_wait_ms runs out, so it bounds pickup latency there; Apache Kafka answers as soon as a record arrives.
    fetch_max_wait_ms: int = Field(default=100, ge=1, le=10_000)
    kafka_session_timeout_ms: int = Field(default=10_000, ge=1000)
    kafka_heartbeat_interval_ms: int = Field(default=3_000, ge=100)
    kafka_rebalance_timeout_ms: int = Field(default=60_000, ge=1000)
    # HMAC key shared by the bots, delivery, the consumer and replay: seals each request's origin (delivery posts
    # only where a sealed origin points) and signs cache entries. At least 32 characters; docs/security.md.
    signing_key: SecretStr | None = None
    # Who may use the system: "discord:<guild id>", "slack:<team id>", comma-separated, or "*" for anyone.
    # The bots refuse to start without it; the consumer and trainer check it again when it is set.
    allowed_teams: Annotated[list[str], NoDecode] = []
    # A record whose handling killed its process this many times goes to the DLQ with a failed event; its last
    # attempt runs alone, so at least 2 (one try among the rest, one alone).
    record_max_attempts: int = Field(default=3, ge=2, le=100)
    log_format: Literal["json", "text"] = "text"
    log_level: str = "INFO"

    @field_validator("allowed_teams", mode="before")
    @classmethod
    def _teams(cls, value: object) -> object:
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    @field_validator("signing_key")
    @classmethod
    def _long_enough(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and len(value.get_secret_value()) < 32:
            raise ValueError("SKILL_SIGNING_KEY must be at least 32 characters (e.g. `openssl rand -hex 32`)")
        return value

    def team_allowed(self, platform: str, team_id: str) -> bool:
        """Whether SKILL_ALLOWED_TEAMS lets this team in. The console (local, no chat) always may; an unset list
        lets everyone in here, which only the services behind the bots accept (the bots refuse to start)."""
        if platform == "console" or not self.allowed_teams or "*" in self.allowed_teams:
            return True
        return f"{platform}:{team_id}" in self.allowed_teams

    @property
    def topics(self) -> Topics:
        return Topics(self.topic_prefix)
