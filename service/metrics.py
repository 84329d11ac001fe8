"""Prometheus metrics. Names are part of the public contract (dashboards depend on them); the
`loop` label is the loop's name, never an experiment id, so cardinality stays bounded."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

__all__ = [
    "BEST_METRIC",
    "DURATION",
    "ENGINE_ERRORS",
    "EXPERIMENTS",
    "OVERHEAD",
    "QUEUE_DEPTH",
    "RUNNING",
    "SLOTS_BUSY",
    "SLOTS_TOTAL",
]

_DURATION_BUCKETS = (1, 5, 10, 20, 30, 60, 120, 300, 600, 900, 1800, 3600, 7200)
_OVERHEAD_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.2, 0.3, 0.5, 1, 2, 5, 10)

EXPERIMENTS = Counter("ratchet_experiments", "Experiments finished, by final status", ["loop", "status"])
DURATION = Histogram(
    "ratchet_experiment_duration_seconds", "Wall time of the workload itself", buckets=_DURATION_BUCKETS
)
OVERHEAD = Histogram(
    "ratchet_experiment_overhead_seconds",
    "Slot time not spent inside the workload (before its start plus after its exit)",
    buckets=_OVERHEAD_BUCKETS,
)
QUEUE_DEPTH = Gauge("ratchet_queue_depth", "Queued experiments", ["loop"])
SLOTS_TOTAL = Gauge("ratchet_slots_total", "Experiment slots of this service")
SLOTS_BUSY = Gauge("ratchet_slots_busy", "Slots holding an experiment")
RUNNING = Gauge("ratchet_experiments_running", "Experiments running now")
BEST_METRIC = Gauge("ratchet_loop_best_metric", "The loop's best metric so far", ["loop", "metric"])
ENGINE_ERRORS = Counter("ratchet_engine_errors", "Container engine failures", ["reason"])
