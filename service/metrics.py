"""Prometheus metrics. Names are part of the public contract (dashboards depend on them); the
`loop` label is the loop's name, never an experiment id, and every other label takes its values
from a small fixed set, so cardinality stays bounded however many experiments run."""

from __future__ import annotations

import math

from prometheus_client import Counter, Gauge, Histogram, Info, disable_created_metrics

from sandbox import RunResult, SandboxError, SpecError

from .models import FAILED, FINAL, Status
from .rules.decisions import Outcome

__all__ = [
    "BEST_METRIC",
    "BUILD",
    "DURATION",
    "ENGINE_ERRORS",
    "ENGINE_ERROR_REASONS",
    "ENGINE_UP",
    "EXPERIMENTS",
    "FAILED",
    "FAILURES",
    "FAILURE_REASONS",
    "FINAL_STATUSES",
    "KILLS",
    "KILL_REASONS",
    "LOG_TRUNCATED",
    "NODE_SLOTS",
    "NODE_SLOTS_BUSY",
    "OVERHEAD",
    "QUEUE_DEPTH",
    "QUEUE_WAIT",
    "RUNNING",
    "SLOTS_BUSY",
    "SLOTS_TOTAL",
    "TIME_TO_FIRST_RESULT",
    "engine_error_reason",
    "failure_reason",
    "publish_nodes",
    "record_run",
    "track_loop",
]

FINAL_STATUSES = tuple(s.value for s in Status if s in FINAL)
FAILURE_REASONS = (
    "exit_nonzero",
    "oom",
    "timeout",
    "missing_metric",
    "non_finite_metric",
    "forged_report",
    "engine",
    "internal",
)
KILL_REASONS = ("timeout", "oom", "cancel")
ENGINE_ERROR_REASONS = ("image_missing", "refused", "unreachable", "bad_spec", "setup")

# `*_created` series double the series count and no dashboard reads them.
disable_created_metrics()

_DURATION_BUCKETS = (1, 5, 10, 20, 30, 60, 120, 300, 600, 900, 1800, 3600, 7200)
_OVERHEAD_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 1, 2, 5, 10)
_WAIT_BUCKETS = (0.1, 0.5, 1, 5, 10, 30, 60, 300, 600, 1800, 3600, 7200, 21600, 86400)

EXPERIMENTS = Counter("ratchet_experiments", "Experiments finished, by final status", ["loop", "status"])
DURATION = Histogram(
    "ratchet_experiment_duration_seconds",
    "Wall time of the workload itself",
    ["loop"],
    buckets=_DURATION_BUCKETS,
)
OVERHEAD = Histogram(
    "ratchet_experiment_overhead_seconds",
    "Slot time not spent inside the workload (before its start plus after its exit)",
    ["loop"],
    buckets=_OVERHEAD_BUCKETS,
)
QUEUE_WAIT = Histogram(
    "ratchet_experiment_queue_seconds",
    "Time from submission to the start of the run",
    ["loop"],
    buckets=_WAIT_BUCKETS,
)
TIME_TO_FIRST_RESULT = Histogram(
    "ratchet_loop_time_to_first_result_seconds",
    "Time from a loop's creation to its first decided experiment",
    ["loop"],
    buckets=_WAIT_BUCKETS,
)
QUEUE_DEPTH = Gauge("ratchet_queue_depth", "Queued experiments", ["loop"])
SLOTS_TOTAL = Gauge("ratchet_slots_total", "Experiment slots of this service")
SLOTS_BUSY = Gauge("ratchet_slots_busy", "Slots holding an experiment")
# Per node of the executor's inventory (one, `local`, on the local engine); a node that leaves
# loses its series.
NODE_SLOTS = Gauge("ratchet_node_slots", "Experiment slots on the node", ["node"])
NODE_SLOTS_BUSY = Gauge("ratchet_node_slots_busy", "Slots on the node holding an experiment", ["node"])
RUNNING = Gauge("ratchet_experiments_running", "Experiments running now")
ENGINE_UP = Gauge("ratchet_engine_up", "1 when the container engine answered its last ping in time, else 0")
BEST_METRIC = Gauge("ratchet_loop_best_metric", "The loop's best metric so far", ["loop", "metric"])
FAILURES = Counter(
    "ratchet_experiment_failures",
    "Experiments that ended in crash, timeout or error, by cause",
    ["loop", "reason"],
)
ENGINE_ERRORS = Counter("ratchet_engine_errors", "Container engine and sandbox set-up failures", ["reason"])
KILLS = Counter("ratchet_sandbox_kills", "Workloads stopped from outside, by cause", ["reason"])
LOG_TRUNCATED = Counter(
    "ratchet_log_truncated", "Runs whose output went over the log cap (the middle was dropped)"
)
BUILD = Info("ratchet_build", "Version of the running service")

# Known label values start at zero, so the first event of a kind shows up in rate() and a
# dashboard query has a series to show before anything happened.
for _reason in KILL_REASONS:
    KILLS.labels(reason=_reason)
for _reason in ENGINE_ERROR_REASONS:
    ENGINE_ERRORS.labels(reason=_reason)
_tracked: set[str] = set()
_nodes: set[str] = set()


def track_loop(name: str) -> None:
    """Creates the loop's series at zero (idempotent; called for every loop the scheduler sees)."""
    if name in _tracked:
        return
    _tracked.add(name)
    for status in FINAL_STATUSES:
        EXPERIMENTS.labels(loop=name, status=status)
    for reason in FAILURE_REASONS:
        FAILURES.labels(loop=name, reason=reason)
    for histogram in (DURATION, OVERHEAD, QUEUE_WAIT, TIME_TO_FIRST_RESULT):
        histogram.labels(loop=name)


def publish_nodes(per_node: dict[str, tuple[int, int]]) -> None:
    """Slots and busy slots per node (node -> (slots, busy)); nodes no longer there are dropped."""
    for node in _nodes - per_node.keys():
        NODE_SLOTS.remove(node)
        NODE_SLOTS_BUSY.remove(node)
    _nodes.intersection_update(per_node)
    for node, (total, busy) in per_node.items():
        NODE_SLOTS.labels(node=node).set(total)
        NODE_SLOTS_BUSY.labels(node=node).set(busy)
        _nodes.add(node)


def failure_reason(outcome: Outcome, unparsable: bool = False) -> str:
    """Why a run judged crash or timeout failed, in the order of precedence of `decisions.decide`.
    `unparsable`: the metric was reported, but its value is not a number."""
    if outcome.timed_out:
        return "timeout"
    if outcome.oom_killed:
        return "oom"
    if outcome.report_forged:
        return "forged_report"
    if outcome.exit_code != 0:
        return "exit_nonzero"
    if outcome.metric is None:
        return "non_finite_metric" if unparsable else "missing_metric"
    if not math.isfinite(outcome.metric):
        return "non_finite_metric"
    return "internal"  # decide() found a usable metric, so this is not a failure of the workload


def engine_error_reason(exc: BaseException) -> str:
    if isinstance(exc, SandboxError) and exc.reason in ENGINE_ERROR_REASONS:
        return exc.reason
    if isinstance(exc, SpecError):
        return "bad_spec"
    if isinstance(exc, SandboxError):
        return "refused"
    return "setup"


def record_run(result: RunResult) -> None:
    """What the sandbox had to do to the run: kills from outside and log truncation."""
    if result.timed_out:
        KILLS.labels(reason="timeout").inc()
    elif result.cancelled:
        KILLS.labels(reason="cancel").inc()
    elif result.oom_killed:
        KILLS.labels(reason="oom").inc()
    if result.log_truncated:
        LOG_TRUNCATED.inc()
