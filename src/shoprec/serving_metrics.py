"""Prometheus metrics of the recommender, exported through BentoML's /metrics endpoint.

``bentoml serve`` starts its workers with PROMETHEUS_MULTIPROC_DIR set, so prometheus_client
writes these values to that directory and BentoML's /metrics endpoint merges them with its own
request metrics. ``prometheus_client`` is imported only when the metrics are created, after
the worker environment is in place.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

# Seconds; from half a millisecond (a cache hit) to a few seconds (a stalled store).
STAGE_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


class ServingMetrics:
    """Counters and histograms of the recommender, registered in one registry."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        from prometheus_client import REGISTRY, Counter, Histogram

        registry = REGISTRY if registry is None else registry
        self.registry = registry
        self.requests = Counter(
            "shoprec_requests",
            "Requests handled by the recommender, by endpoint and outcome.",
            ["endpoint", "outcome"],
            registry=registry,
        )
        self.cold_starts = Counter(
            "shoprec_cold_start_fallbacks",
            "Recommendations answered with the cold-start list because the user had no history.",
            registry=registry,
        )
        self.fold_ins = Counter(
            "shoprec_fold_ins",
            "Recommendations computed with the user's online events folded into the model.",
            registry=registry,
        )
        self.events = Counter(
            "shoprec_events_recorded",
            "Shopper events written to the online store, by event type.",
            ["event_type"],
            registry=registry,
        )
        self.degraded = Counter(
            "shoprec_degraded_responses",
            "Recommendations answered without the shopper's online events, by reason.",
            ["reason"],
            registry=registry,
        )
        self.store_errors = Counter(
            "shoprec_online_store_errors",
            "Online store calls that failed (backend down or timed out), by operation.",
            ["operation"],
            registry=registry,
        )
        self.score_cache = Counter(
            "shoprec_score_cache",
            "Ranked recommendations by whether cached ranker scores were reused (hit or miss).",
            ["result"],
            registry=registry,
        )
        self.response_cache = Counter(
            "shoprec_response_cache",
            "Recommendations answered from the per-worker answer cache (hit) or computed (miss).",
            ["result"],
            registry=registry,
        )
        self.reloads = Counter(
            "shoprec_model_reloads",
            "Model reload attempts, by outcome.",
            ["outcome"],
            registry=registry,
        )
        # Create the label sets that start at zero, so /metrics lists them before the first
        # reload, outage or cache miss instead of leaving them out.
        for outcome in ("reloaded", "failed"):
            self.reloads.labels(outcome=outcome)
        self.degraded.labels(reason="online_store_unavailable")
        for operation in ("read", "write"):
            self.store_errors.labels(operation=operation)
        for result in ("hit", "miss"):
            self.score_cache.labels(result=result)
            self.response_cache.labels(result=result)
        self.stage_latency = Histogram(
            "shoprec_stage_latency_seconds",
            "Time spent in each stage of a request.",
            ["endpoint", "stage"],
            buckets=STAGE_LATENCY_BUCKETS,
            registry=registry,
        )


@functools.cache
def default_metrics() -> ServingMetrics:
    """Return the process-wide metrics in prometheus_client's default registry (created once)."""
    return ServingMetrics()
