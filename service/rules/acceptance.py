"""Acceptance rules: when a candidate that ran successfully is kept. Pure: no I/O, no clock.

`strict` keeps anything better than the best so far on one run — the reference loop's rule, and a
running minimum over noise. The noise-aware rules re-run a candidate that looks better and keep it
only when the mean of its runs beats the incumbent's mean by `k` standard errors, the standard
error coming from the noise measured on repeated runs (the baseline's, then every repeated
candidate's). The same `judge` is called after every run of a candidate: it answers keep, discard,
or "run it again".
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Literal

import msgspec

from ..models import Status
from .decisions import improves

__all__ = [
    "PRESETS",
    "Judgement",
    "Rule",
    "judge",
    "mean",
    "pooled",
    "pooled_sd",
    "resolve",
    "sum_squares",
]

RuleName = Literal["strict", "confirm", "significant"]


class Rule(msgspec.Struct, kw_only=True, frozen=True):
    name: RuleName
    baseline_runs: int  # runs of the baseline (1 + repeats with other seeds): the first noise estimate
    confirm_runs: int  # extra runs of a candidate whose first run looks better
    k: float  # standard errors by which the candidate's mean must beat the incumbent's
    remeasure_runs: int  # an idle slot re-runs the best until it has this many runs (0: never)


PRESETS: dict[str, Rule] = {
    "strict": Rule(name="strict", baseline_runs=1, confirm_runs=0, k=0.0, remeasure_runs=0),
    # One confirmation run; keep when the 2-run mean beats the incumbent's mean.
    "confirm": Rule(name="confirm", baseline_runs=3, confirm_runs=1, k=0.0, remeasure_runs=16),
    # Two confirmation runs; keep when the 3-run mean beats the incumbent's by 2 standard errors
    # (one-sided 97.7 % when the noise is normal).
    "significant": Rule(name="significant", baseline_runs=3, confirm_runs=2, k=2.0, remeasure_runs=16),
}


def resolve(
    name: str,
    *,
    baseline_runs: int | None = None,
    confirm_runs: int | None = None,
    k: float | None = None,
    remeasure_runs: int | None = None,
) -> Rule:
    """A preset with the given overrides; raises ValueError with what to change."""
    if name not in PRESETS:
        raise ValueError(f"unknown acceptance rule {name!r}; use one of {', '.join(PRESETS)}")
    rule = PRESETS[name]
    changes = {
        key: value
        for key, value in (
            ("baseline_runs", baseline_runs),
            ("confirm_runs", confirm_runs),
            ("k", k),
            ("remeasure_runs", remeasure_runs),
        )
        if value is not None
    }
    rule = msgspec.structs.replace(rule, **changes)
    if rule.name != "strict" and rule.k > 0 and rule.baseline_runs < 2:
        raise ValueError(
            f"acceptance {rule.name!r} with k > 0 needs the noise measured: set baseline_runs to 2 or more"
        )
    return rule


class Judgement(msgspec.Struct, kw_only=True, frozen=True):
    verdict: Literal[Status.keep, Status.discard, Status.confirming]  # confirming: run it again
    reason: str
    mean: float  # the candidate's mean over its runs so far


def mean(values: Sequence[float]) -> float:
    return math.fsum(values) / len(values)


def sum_squares(values: Sequence[float]) -> float:
    """Squared deviations from the group's own mean: a group's share of the pooled noise."""
    centre = mean(values)
    return math.fsum((v - centre) ** 2 for v in values)


def pooled(squares: float, dof: int) -> float | None:
    return math.sqrt(squares / dof) if dof > 0 else None


def pooled_sd(groups: Iterable[Sequence[float]]) -> float | None:
    """Standard deviation of one run around its own candidate's mean, pooled over every group of
    repeated runs (each group: the runs of one snapshot). None until some group has two runs."""
    squares, dof = 0.0, 0
    for values in groups:
        if len(values) >= 2:
            squares += sum_squares(values)
            dof += len(values) - 1
    return pooled(squares, dof)


def judge(
    rule: Rule,
    candidate: Sequence[float],
    incumbent: Sequence[float],
    noise_sd: float | None,
    *,
    direction: str,
    min_delta: float,
    metric_name: str,
) -> Judgement:
    """The verdict after the candidate's latest successful run. `candidate` and `incumbent` are the
    metric values of every successful run of each (at least one each)."""
    c, i = mean(candidate), mean(incumbent)
    runs = len(candidate)
    shown = _shown(metric_name, c, runs)
    best = _shown("the best's", i, len(incumbent))
    if not improves(c, i, direction, min_delta):
        delta = f" by more than {min_delta:g}" if min_delta else ""
        return Judgement(verdict=Status.discard, reason=f"{shown} is not better than {best}{delta}", mean=c)
    if runs < 1 + rule.confirm_runs:
        return Judgement(
            verdict=Status.confirming,
            reason=f"{shown} beats {best}; confirming ({runs} of {1 + rule.confirm_runs} runs)",
            mean=c,
        )
    if rule.k <= 0:
        return Judgement(verdict=Status.keep, reason=f"{shown} beats {best}", mean=c)
    if noise_sd is None:
        return Judgement(
            verdict=Status.discard, reason=f"{shown} beats {best}, but the noise is not measured yet", mean=c
        )
    se = noise_sd * math.sqrt(1 / runs + 1 / len(incumbent))
    margin = min_delta + rule.k * se
    gap = f"{rule.k:g} standard errors ({rule.k * se:.6f}, noise sd {noise_sd:.6f})"
    if improves(c, i, direction, margin):
        return Judgement(verdict=Status.keep, reason=f"{shown} beats {best} by more than {gap}", mean=c)
    return Judgement(
        verdict=Status.discard, reason=f"{shown} beats {best}, but not by {gap}: within the noise", mean=c
    )


def _shown(name: str, value: float, runs: int) -> str:
    return f"{name} {value:.6f}" if runs == 1 else f"{name} {value:.6f} (mean of {runs} runs)"
