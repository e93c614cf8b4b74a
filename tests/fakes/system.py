"""The real consumer (tiny model) in this process, for end-to-end tests of the chat front-ends."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from consumer.settings import ConsumerSettings
from consumer.worker import Worker
from tests.harness import FAST_GROUP, serving

# The bots' defaults for a bare /skill, sized for the tiny model: small and few steps.
TINY_DEFAULTS = {"default_width": 64, "default_height": 64, "default_steps": 3}


@asynccontextmanager
async def consumer_running(model: Path, engine, **worker_options) -> AsyncIterator[Worker]:
    settings = ConsumerSettings(
        model=str(model), device="cpu", progress_interval_s=0.2,
        kafka_session_timeout_ms=FAST_GROUP["session_timeout_ms"],
        kafka_heartbeat_interval_ms=FAST_GROUP["heartbeat_interval_ms"],
        kafka_rebalance_timeout_ms=FAST_GROUP["rebalance_timeout_ms"],
    )
    async with serving(Worker(settings, engine, **worker_options), ready_timeout_s=120) as worker:
        yield worker
