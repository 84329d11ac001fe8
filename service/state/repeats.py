"""A candidate's runs under noise-aware acceptance: its own run and its repeat runs form a group whose
mean decides (`runs`, `mean`, `m2` on the candidate), each group adds its share to the loop's pooled
noise, and the best's metric is the mean of all of its runs. Called inside `transitions`' writes."""

from __future__ import annotations

import sqlite3
from typing import Any

from ..models import LoopConfig, Status
from ..rules.acceptance import Judgement, Rule, judge, mean, pooled, sum_squares
from ..rules.decisions import Decision
from .database import fetch

__all__ = [
    "GOOD_RUN",
    "as_decision",
    "first_run",
    "group_values",
    "incumbent",
    "judged",
    "make_best",
    "refresh",
]

# a candidate's own run that produced its value
GOOD_RUN = (Status.keep.value, Status.discard.value, Status.confirming.value)


def group_values(db: sqlite3.Connection, primary_id: str | None) -> list[float]:
    """The metric of every successful run of a candidate: its own and its repeats', in run order."""
    if primary_id is None:
        return []
    rows = fetch(
        db,
        "SELECT metric FROM experiments WHERE metric IS NOT NULL AND ("
        f" (id = ? AND status IN ({','.join('?' * len(GOOD_RUN))}))"
        " OR (repeat_of = ? AND status = 'measured')) ORDER BY seq",
        (primary_id, *GOOD_RUN, primary_id),
    )
    return [r[0] for r in rows]


def incumbent(db: sqlite3.Connection, loop: Any) -> list[float]:
    """The metric of every run of the loop's best (its one stored value if its runs are gone)."""
    return group_values(db, loop["best_experiment"]) or [loop["best_metric"]]


def judged(
    config: LoopConfig, rule: Rule, candidate: list[float], incumbent: list[float], noise: float | None
) -> Judgement:
    return judge(
        rule,
        candidate,
        incumbent,
        noise,
        direction=config.metric.direction,
        min_delta=config.metric.min_delta,
        metric_name=config.metric.name,
    )


def as_decision(j: Judgement) -> Decision:
    return Decision(status=j.verdict, reason=j.reason, becomes_best=j.verdict == Status.keep)


def first_run(db: sqlite3.Connection, loop: Any, config: LoopConfig, rule: Rule, value: float) -> Decision:
    """The verdict on a candidate's own run: keep, discard, or confirming (its repeats decide)."""
    return as_decision(judged(config, rule, [value], incumbent(db, loop), loop["noise_sd"]))


def make_best(db: sqlite3.Connection, loop_id: str, exp_id: str, snapshot: str, metric: float | None) -> None:
    db.execute(
        "UPDATE loops SET best_snapshot = ?, best_metric = ?, best_experiment = ?,"
        " baseline = 'ok', baseline_reason = NULL WHERE id = ?",
        (snapshot, metric, exp_id, loop_id),
    )


def refresh(db: sqlite3.Connection, primary_id: str) -> None:
    """Recomputes the candidate's runs/mean/m2, its share of the loop's pooled noise, and the
    loop's best metric when this candidate is the best (the best is the mean of all its runs)."""
    values = group_values(db, primary_id)
    row = fetch(db, "SELECT loop_id, m2, runs FROM experiments WHERE id = ?", (primary_id,), first=True)
    if not values:
        return
    m2 = sum_squares(values)
    centre = mean(values)
    old_m2, old_dof = row["m2"] or 0.0, max(0, (row["runs"] or 1) - 1)
    db.execute(
        "UPDATE experiments SET runs = ?, mean = ?, m2 = ? WHERE id = ?",
        (len(values), centre, m2, primary_id),
    )
    loop = fetch(
        db,
        "SELECT noise_ss, noise_dof, best_experiment FROM loops WHERE id = ?",
        (row["loop_id"],),
        first=True,
    )
    ss = max(0.0, loop["noise_ss"] - old_m2 + m2)
    dof = loop["noise_dof"] - old_dof + len(values) - 1
    db.execute(
        "UPDATE loops SET noise_ss = ?, noise_dof = ?, noise_sd = ? WHERE id = ?",
        (ss, dof, pooled(ss, dof), row["loop_id"]),
    )
    if loop["best_experiment"] == primary_id:
        db.execute("UPDATE loops SET best_metric = ? WHERE id = ?", (centre, row["loop_id"]))
