"""The consumer's Prometheus metrics. The names are what infra/grafana/dashboards/skillgen.json queries.

Each Worker gets its own registry, so several workers in one process (tests, benchmarks) never collide.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

_SECONDS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


class ConsumerMetrics:
    def __init__(self, registry: CollectorRegistry | None = None):
        r = self.registry = registry if registry is not None else CollectorRegistry()
        self.batch_size = Histogram(
            "skill_batch_size", "Images per GPU batch", buckets=(1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64), registry=r
        )
        self.queue_wait = Histogram(
            "skill_queue_wait_seconds", "From a record's arrival to the start of its batch", buckets=_SECONDS, registry=r
        )
        self.generation = Histogram(
            "skill_generation_seconds", "Time on the GPU per batch", buckets=_SECONDS, registry=r
        )
        self.request_latency = Histogram(
            "skill_request_latency_seconds", "From publish (record timestamp) to the terminal event",
            buckets=_SECONDS, registry=r,
        )
        self.cache_hits = Counter("skill_cache_hits", "Requests answered from the cache", ["level"], registry=r)
        self.cache_misses = Counter("skill_cache_misses", "Requests that missed both cache levels", registry=r)
        self.blocked = Counter("skill_blocked", "Requests blocked by the safety policy", ["stage"], registry=r)
        self.dlq = Counter("skill_dlq", "Records sent to a dead-letter topic", ["topic"], registry=r)
        self.lag = Gauge("skill_consumer_lag", "Records not yet committed, per partition", ["topic", "partition"], registry=r)
