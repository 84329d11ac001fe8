"""The experiment state machine. Every change of status is one function here and one guarded
write (`UPDATE ... WHERE status = :expected`, refused unless `ALLOWED`) in its own transaction,
committed before the scheduler acts on it. New experiments enter as `queued` through `enqueue`.

    queued ──start──> running ──finish──> keep | discard | crash | timeout
      │                  │                measured           (a repeat run that succeeded)
      │                  │                confirming ──settle──> keep | discard
      │                  │                     └──cancel──> cancelled
      │                  ├──fail────────> error
      │                  ├──cancel──────> cancelled
      │                  ├──requeue─────> queued      (service restarted mid-run)
      │                  └──retry───────> queued      (the engine failed; not before a back-off)
      └──cancel──> cancelled

Noise-aware acceptance adds repeat runs (`repeat_of` = the candidate they repeat): the baseline's
noise runs, a promising candidate's confirmation runs, and re-measurements of the best. Each is an
experiment of its own; its value joins its candidate's mean (see `repeats`), and the candidate waits
in `confirming` until its last confirmation run ends, then `settle`s.
"""

from __future__ import annotations

import sqlite3
import time
from typing import Any, Literal

import msgspec

from ..models import FINAL, LoopConfig, LoopState, Status
from ..rules.acceptance import mean
from ..rules.decisions import Decision, Outcome, decide
from . import repeats
from .database import fetch
from .enqueue import Conflict, queue_repeats, rule_of
from .store import Store, loop_config

__all__ = [
    "ALLOWED",
    "Conflict",
    "Finished",
    "TransitionRefused",
    "cancel",
    "fail",
    "finish",
    "requeue",
    "retry",
    "set_loop_state",
    "start",
    "start_many",
]

ALLOWED: dict[Status, frozenset[Status]] = {
    Status.queued: frozenset({Status.running, Status.cancelled}),
    Status.running: frozenset(FINAL | {Status.queued, Status.confirming}),
    Status.confirming: frozenset({Status.keep, Status.discard, Status.cancelled}),
}
LOOP_MOVES: dict[str, dict[str, str]] = {
    "pause": {LoopState.active: LoopState.paused, LoopState.paused: LoopState.paused},
    "resume": {LoopState.paused: LoopState.active, LoopState.active: LoopState.active},
    "stop": {
        LoopState.active: LoopState.stopped,
        LoopState.paused: LoopState.stopped,
        LoopState.stopped: LoopState.stopped,
    },
}


class TransitionRefused(Exception):
    """A transition that the state machine does not allow: a bug, never user input."""


def _check(expected: Status, new: Status) -> None:
    if new not in ALLOWED.get(expected, frozenset()):
        raise TransitionRefused(f"{expected} -> {new} is not a transition")


def _move(db: sqlite3.Connection, exp_id: str, expected: Status, new: Status, **fields: Any) -> bool:
    _check(expected, new)
    sets = ", ".join(f"{k} = ?" for k in ("status", *fields))
    cur = db.execute(
        f"UPDATE experiments SET {sets} WHERE id = ? AND status = ?",
        (new.value, *fields.values(), exp_id, expected.value),
    )
    return cur.rowcount == 1


def _cancel_all(
    db: sqlite3.Connection,
    column: Literal["loop_id", "repeat_of"],
    value: str,
    expected: tuple[Status, ...],
    reason: str,
) -> None:
    """`_move` for many: every experiment of a loop (or every repeat run of a candidate) that is in
    one of `expected` is cancelled, in one guarded UPDATE."""
    for status in expected:
        _check(status, Status.cancelled)
    marks = ",".join("?" * len(expected))
    db.execute(
        f"UPDATE experiments SET status = ?, reason = ?, finished_at = ? WHERE {column} = ?"
        f" AND status IN ({marks})",
        (Status.cancelled.value, reason[:2000], time.time(), value, *(s.value for s in expected)),
    )


async def start(store: Store, exp_id: str, gpus: list[str], node: str | None = None) -> bool:
    (moved,) = await start_many(store, [(exp_id, gpus, node)])
    return moved


async def start_many(store: Store, moves: list[tuple[str, list[str], str | None]]) -> list[bool]:
    """queued -> running for each (experiment, its GPU ids, the node it runs on), committed
    together: one guarded write per experiment; False for one that was not queued any more
    (cancelled meanwhile) or whose loop is not active any more (paused or stopped after the
    scheduler read its queue)."""

    def write(db: sqlite3.Connection) -> list[bool]:
        started, now = [], time.time()
        for exp_id, gpus, node in moves:
            loop = fetch(
                db,
                "SELECT l.state FROM loops l JOIN experiments e ON e.loop_id = l.id WHERE e.id = ?",
                (exp_id,),
                first=True,
            )
            active = loop is not None and loop[0] == LoopState.active
            moved = active and _move(
                db, exp_id, Status.queued, Status.running, started_at=now, gpus=",".join(gpus), node=node
            )
            if moved:
                db.execute("UPDATE experiments SET attempts = attempts + 1 WHERE id = ?", (exp_id,))
            started.append(moved)
        return started

    return await store.write(write)


async def requeue(store: Store, exp_id: str) -> bool:
    def write(db: sqlite3.Connection) -> bool:
        return _move(db, exp_id, Status.running, Status.queued, started_at=None, gpus=None, node=None)

    return await store.write(write)


async def retry(store: Store, exp_id: str, reason: str, not_before: float) -> bool:
    """Back to the queue after an infrastructure failure; `reason` says why until it runs again."""

    def write(db: sqlite3.Connection) -> bool:
        return _move(
            db,
            exp_id,
            Status.running,
            Status.queued,
            started_at=None,
            gpus=None,
            node=None,
            reason=reason[:2000],
            not_before=not_before,
        )

    return await store.write(write)


async def fail(store: Store, exp_id: str, reason: str, log_tail: str | None = None) -> bool:
    def write(db: sqlite3.Connection) -> bool:
        moved = _move(
            db,
            exp_id,
            Status.running,
            Status.error,
            reason=reason[:2000],
            finished_at=time.time(),
            log_tail=log_tail,
        )
        if moved:
            _after_repeat_ended(db, exp_id)
        return moved

    return await store.write(write)


async def cancel(store: Store, exp_id: str, reason: str = "cancelled") -> bool:
    """Cancels a queued, running or confirming experiment (a confirming one with its queued repeat
    runs; running ones are the caller's to kill); False when it had already finished."""

    def write(db: sqlite3.Connection) -> bool:
        for expected in (Status.queued, Status.running, Status.confirming):
            if _move(db, exp_id, expected, Status.cancelled, reason=reason, finished_at=time.time()):
                why = f"its candidate was cancelled: {reason}"
                _cancel_all(db, "repeat_of", exp_id, (Status.queued,), why)
                _after_repeat_ended(db, exp_id)
                return True
        return False

    return await store.write(write)


class Finished(msgspec.Struct, kw_only=True):
    metrics: dict[str, float]
    memory_gb: float | None
    workload_seconds: float | None
    log_tail: str


async def finish(store: Store, exp_id: str, outcome: Outcome, info: Finished) -> Decision | None:
    """Judges the run against the loop's best *as it is now* and records both in one transaction,
    so two experiments finishing together cannot both become best unless the later one wins."""

    def write(db: sqlite3.Connection) -> Decision | None:
        exp = fetch(
            db,
            "SELECT loop_id, seq, kind, snapshot, status, repeat_of FROM experiments WHERE id = ?",
            (exp_id,),
            first=True,
        )
        if exp is None or exp["status"] != Status.running:
            return None  # cancelled meanwhile: the cancel stands
        loop = fetch(db, "SELECT * FROM loops WHERE id = ?", (exp["loop_id"],), first=True)
        config = loop_config(loop["config"])
        if exp["repeat_of"] is not None:
            return _finish_repeat(db, exp_id, exp["repeat_of"], config, outcome, info)
        # A baseline founds the best only while the loop has none; once one succeeded, a baseline
        # re-run (measuring noise) is judged like any candidate and cannot reset the best.
        baseline = exp["kind"] == "baseline" and loop["baseline"] != "ok"
        best = loop["best_metric"] if loop["baseline"] == "ok" else None
        decision = _decide(config, outcome, best=best, baseline=baseline)
        rule = rule_of(config)
        if rule.name != "strict" and best is not None and decision.status in (Status.keep, Status.discard):
            assert outcome.metric is not None
            decision = repeats.first_run(db, loop, config, rule, outcome.metric)
        final = decision.status != Status.confirming
        finish_seq = loop["finished"] + 1 if final else None
        _move(
            db,
            exp_id,
            Status.running,
            decision.status,
            reason=decision.reason,
            finish_seq=finish_seq,
            **_run_fields(outcome, info),
        )
        if final:
            db.execute("UPDATE loops SET finished = ? WHERE id = ?", (finish_seq, exp["loop_id"]))
        else:
            queue_repeats(db, exp_id, rule.confirm_runs, "confirmation")
        if decision.becomes_best:
            repeats.make_best(db, exp["loop_id"], exp_id, exp["snapshot"], outcome.metric)
        elif baseline:
            db.execute(
                "UPDATE loops SET baseline = 'failed', baseline_reason = ? WHERE id = ?",
                (f"baseline {decision.status}: {decision.reason}", exp["loop_id"]),
            )
            _cancel_all(db, "repeat_of", exp_id, (Status.queued,), "the baseline failed")
        if decision.status in repeats.GOOD_RUN:
            repeats.refresh(db, exp_id)
        return decision

    return await store.write(write)


def _decide(config: LoopConfig, outcome: Outcome, *, best: float | None, baseline: bool) -> Decision:
    return decide(
        outcome,
        metric_name=config.metric.name,
        direction=config.metric.direction,
        min_delta=config.metric.min_delta,
        best=best,
        baseline=baseline,
    )


def _run_fields(outcome: Outcome, info: Finished) -> dict[str, Any]:
    """What a finished run records about itself, whatever the verdict."""
    return {
        "metric": outcome.metric,
        "metrics": msgspec.json.encode(info.metrics).decode(),
        "memory_gb": info.memory_gb,
        "exit_code": outcome.exit_code,
        "finished_at": time.time(),
        "workload_seconds": info.workload_seconds,
        "log_tail": info.log_tail,
    }


def _finish_repeat(
    db: sqlite3.Connection,
    exp_id: str,
    primary_id: str,
    config: LoopConfig,
    outcome: Outcome,
    info: Finished,
) -> Decision:
    """A repeat run is judged only for failure; its value joins its candidate's mean."""
    decision = _decide(config, outcome, best=None, baseline=True)  # any finite metric is a measurement
    if decision.status == Status.keep:
        decision = Decision(status=Status.measured, reason=f"{config.metric.name} {outcome.metric:.6f}")
    _move(
        db,
        exp_id,
        Status.running,
        decision.status,
        reason=decision.reason,
        **_run_fields(outcome, info),
    )
    repeats.refresh(db, primary_id)
    settled = _settle(db, primary_id)
    if settled is not None:
        decision = msgspec.structs.replace(decision, settled=settled.status)
    return decision


def _after_repeat_ended(db: sqlite3.Connection, exp_id: str) -> None:
    """A repeat run ended without a value (error, cancel): its candidate may be ready to settle."""
    row = fetch(db, "SELECT repeat_of FROM experiments WHERE id = ?", (exp_id,), first=True)
    if row is not None and row[0] is not None:
        _settle(db, row[0])


def _settle(db: sqlite3.Connection, primary_id: str) -> Decision | None:
    """A confirming candidate whose repeat runs have all ended gets its verdict: the mean of its
    runs against the best's mean, as the loop's rule says."""
    exp = fetch(
        db, "SELECT loop_id, snapshot, status FROM experiments WHERE id = ?", (primary_id,), first=True
    )
    if exp is None or exp["status"] != Status.confirming:
        return None
    runs = fetch(
        db, "SELECT seq, status, reason FROM experiments WHERE repeat_of = ? ORDER BY seq", (primary_id,)
    )
    if any(r["status"] in (Status.queued, Status.running) for r in runs):
        return None
    loop = fetch(db, "SELECT * FROM loops WHERE id = ?", (exp["loop_id"],), first=True)
    config = loop_config(loop["config"])
    rule = rule_of(config)
    values = repeats.group_values(db, primary_id)
    failed = next((r for r in runs if r["status"] in (Status.crash, Status.timeout)), None)
    if failed is not None:
        why = f"run #{failed['seq']} of it ended {failed['status']}: {failed['reason']}"
        decision = Decision(status=Status.discard, reason=f"not reproducible: {why}")
    else:
        best = repeats.incumbent(db, loop)
        decision = repeats.as_decision(repeats.judged(config, rule, values, best, loop["noise_sd"]))
        if decision.status == Status.confirming:
            decision = Decision(
                status=Status.discard,
                reason=f"confirmation incomplete: {len(values)} of {1 + rule.confirm_runs} runs succeeded",
            )
    finish_seq = loop["finished"] + 1
    _move(
        db,
        primary_id,
        Status.confirming,
        decision.status,
        reason=decision.reason[:2000],
        finish_seq=finish_seq,
        finished_at=time.time(),
    )
    db.execute("UPDATE loops SET finished = ? WHERE id = ?", (finish_seq, exp["loop_id"]))
    if decision.becomes_best:
        repeats.make_best(db, exp["loop_id"], primary_id, exp["snapshot"], mean(values))
    return decision


async def set_loop_state(store: Store, loop_id: str, action: str) -> tuple[str, list[str]]:
    """pause / resume / stop. Stop cancels every queued experiment and returns the running ones,
    which the caller must kill. Returns (new state, running experiment ids to kill)."""

    def write(db: sqlite3.Connection) -> tuple[str, list[str]]:
        row = fetch(db, "SELECT state FROM loops WHERE id = ?", (loop_id,), first=True)
        target = LOOP_MOVES[action].get(row["state"])
        if target is None:
            raise Conflict(f"cannot {action} a loop that is {row['state']}")
        db.execute("UPDATE loops SET state = ?, state_reason = NULL WHERE id = ?", (target, loop_id))
        if action == "resume":  # the owner looked: the proposer starts a fresh streak
            db.execute("UPDATE loops SET proposer_streak = 0 WHERE id = ?", (loop_id,))
        running: list[str] = []
        if action == "stop":
            _cancel_all(db, "loop_id", loop_id, (Status.queued, Status.confirming), "loop stopped")
            rows = fetch(
                db, "SELECT id FROM experiments WHERE loop_id = ? AND status = 'running'", (loop_id,)
            )
            running = [r[0] for r in rows]
        return target, running

    return await store.write(write)
