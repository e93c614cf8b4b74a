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
        # Scheduling (consumer/batcher.py), per team and lane: what is queued, what was served, how long it waited.
        self.sched_queued = Gauge("skill_sched_queued", "Requests queued for the GPU", ["team", "lane"], registry=r)
        self.sched_queued_units = Gauge("skill_sched_queued_units", "Work units queued for the GPU", ["team", "lane"],
                                        registry=r)
        self.sched_served = Counter("skill_sched_served_units", "Work units sent to the GPU", ["team", "lane"],
                                    registry=r)
        self.sched_wait = Histogram("skill_sched_wait_seconds", "From joining the GPU queue to leaving it",
                                    ["team", "lane"], buckets=_SECONDS + (600, 1800, 3600), registry=r)
        self.sched_refused = Counter("skill_sched_refused", "Requests refused because they could not meet their "
                                     "deadline", ["lane"], registry=r)
        self.preempted = Counter("skill_sched_preempted", "Batches that ran between two steps of another",
                                 registry=r)
        self.cancelled = Counter("skill_cancelled", "Requests cancelled by their owner", ["where"], registry=r)
        self.cancel_late_steps = Histogram(
            "skill_cancel_late_steps", "Denoising steps a cancelled sample ran after its cancel arrived",
            buckets=(0, 1, 2, 3, 5, 10, 20, 50), registry=r)
        self.lag = Gauge("skill_consumer_lag", "Records not yet committed, per partition", ["topic", "partition"], registry=r)
