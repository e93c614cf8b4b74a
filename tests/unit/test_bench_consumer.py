"""bench/consumer.py's split of the overhead: what it reads off the events' created_at."""

from __future__ import annotations

import pytest

from bench.consumer import PARTS, ConsumerBench, Stats, _Client, format_report

pytestmark = pytest.mark.unit


def test_the_timeline_splits_a_roundtrip_at_the_events_creation_times() -> None:
    client = _Client(settings=None)  # type: ignore[arg-type] - the timeline reads no settings
    client.published["r1"] = 1000.0
    client.made["r1"] = {"started": 1000.006, "progress": 1000.05, "succeeded": 1000.2}
    client.read_at = 1000.203
    pickup, between, delivery = client.timeline("r1")  # type: ignore[misc]
    assert (round(pickup, 6), round(between, 6), round(delivery, 6)) == (0.006, 0.194, 0.003)
    client.made["r2"], client.published["r2"] = {"succeeded": 1000.3}, 1000.25  # e.g. a cache hit: no started event
    assert client.timeline("r2") is None


def test_the_report_shows_the_parts_when_measured_and_not_for_older_results() -> None:
    s = Stats.of([0.004, 0.006])
    base = {"machine": "m", "model": "x", "device": "cpu", "width": 64, "height": 64, "steps": 4, "quick": True,
            "throughput": [], "overhead_ms": s, "overhead_without_safety_ms": s, "safety_check_ms": s,
            "pipeline_ms": s, "cache_hit_l1_ms": s, "cache_hit_l2_ms": None, "notes": []}
    with_parts = format_report(ConsumerBench(**base, overhead_parts_ms={name: s for name in PARTS}))
    assert "    pickup" in with_parts and "    post-processing" in with_parts and "    delivery" in with_parts
    assert "pickup" not in format_report(ConsumerBench.model_validate(base))
