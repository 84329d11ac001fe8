"""Keep, discard or crash: a pure function of what happened and the best so far. No I/O, no clock."""

from __future__ import annotations

import math

import msgspec

from ..models import Status

__all__ = ["Decision", "Outcome", "decide", "improves"]


class Outcome(msgspec.Struct, kw_only=True, frozen=True):
    """What the run did, as the sandbox saw it, plus the metric it reported (if any)."""

    exit_code: int | None
    oom_killed: bool = False
    timed_out: bool = False
    cancelled: bool = False
    metric: float | None = None
    metric_problem: str | None = None  # why the metric is missing
    timeout_s: float = 0.0
    memory_mb: int = 0
    phase: str | None = None  # "evaluation" when this is the trusted evaluation's outcome
    exit_reported: bool = True  # False: the container died around the gate (no exit status of its own)
    report_forged: bool = False  # the workload wrote the gate's end-of-run report itself
    note: str | None = None  # what a failure's reason should add (e.g. training output left out)


class Decision(msgspec.Struct, kw_only=True, frozen=True):
    """A verdict: keep, discard, crash or timeout (or cancelled); the noise-aware rules add
    confirming (looks better, its confirmation runs decide) and measured (a repeat run's value)."""

    status: Status
    reason: str
    becomes_best: bool = False
    settled: Status | None = None  # a repeat run's: the verdict it completed for its candidate


def improves(value: float, best: float, direction: str, min_delta: float) -> bool:
    """Strictly better than `best` by more than `min_delta` in the loop's direction."""
    gain = best - value if direction == "minimize" else value - best
    return gain > min_delta


def decide(
    outcome: Outcome,
    *,
    metric_name: str,
    direction: str,
    min_delta: float,
    best: float | None,
    baseline: bool,
) -> Decision:
    decision = _decide(
        outcome,
        metric_name=metric_name,
        direction=direction,
        min_delta=min_delta,
        best=best,
        baseline=baseline,
    )
    if decision.status in (Status.keep, Status.discard, Status.cancelled):
        return decision
    if outcome.note:
        decision = Decision(status=decision.status, reason=f"{decision.reason}; {outcome.note}")
    if outcome.phase is None:
        return decision
    if decision.status == Status.timeout:
        reason = f"{outcome.phase} killed at its hard timeout of {outcome.timeout_s:g} s"
        reason += f"; {outcome.note}" if outcome.note else ""
    else:
        reason = f"{outcome.phase}: {decision.reason}"
    return Decision(status=decision.status, reason=reason)


def _decide(
    outcome: Outcome,
    *,
    metric_name: str,
    direction: str,
    min_delta: float,
    best: float | None,
    baseline: bool,
) -> Decision:
    if outcome.cancelled:
        return Decision(status=Status.cancelled, reason="cancelled")
    if outcome.timed_out:
        return Decision(
            status=Status.timeout, reason=f"killed at the hard timeout of {outcome.timeout_s:g} s"
        )
    if outcome.oom_killed:
        return Decision(status=Status.crash, reason=f"out of memory (limit {outcome.memory_mb} MB)")
    if outcome.report_forged:
        return Decision(
            status=Status.crash,
            reason="the workload wrote the sandbox's end-of-run report itself (forged); not judged",
        )
    if outcome.exit_code != 0 and not outcome.exit_reported:
        return Decision(
            status=Status.crash,
            reason=f"the sandbox died before the workload's exit was reported (container exit code"
            f" {outcome.exit_code}); under runsc that is what reaching the pids limit looks like",
        )
    if outcome.exit_code != 0:
        return Decision(status=Status.crash, reason=f"exited with code {outcome.exit_code}")
    value = outcome.metric
    if value is None:
        why = outcome.metric_problem or f"metric {metric_name!r} not reported"
        return Decision(status=Status.crash, reason=why)
    if not math.isfinite(value):
        return Decision(status=Status.crash, reason=f"{metric_name} is {value}, not a finite number")
    if baseline:
        return Decision(status=Status.keep, reason=f"baseline {metric_name} {value:.6f}", becomes_best=True)
    if best is None:
        return Decision(status=Status.discard, reason="no successful baseline to compare against")
    if improves(value, best, direction, min_delta):
        return Decision(
            status=Status.keep,
            reason=f"{metric_name} {value:.6f} beats best {best:.6f}",
            becomes_best=True,
        )
    delta = f" by more than {min_delta:g}" if min_delta else ""
    return Decision(
        status=Status.discard,
        reason=f"{metric_name} {value:.6f} is not better than best {best:.6f}{delta}",
    )
