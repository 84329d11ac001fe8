"""The experiment state machine. Every change of status is one function here and one guarded
write (`UPDATE ... WHERE status = :expected`) in its own transaction, committed before the
scheduler acts on it.

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
experiment of its own; its value joins its candidate's mean (`runs`, `mean`, `m2` on the candidate),
and the candidate waits in `confirming` until its last confirmation run ends, then `settle`s.
"""

from __future__ import annotations

import secrets
import sqlite3
import time
from typing import Any

import aiosqlite
import msgspec

from ..models import FINAL, LoopConfig, LoopState, Status
from ..rules.acceptance import Judgement, Rule, judge, mean, pooled, resolve, sum_squares
from ..rules.decisions import Decision, Outcome, Verdict, decide
from .store import Store

__all__ = [
    "ALLOWED",
    "Conflict",
    "TransitionRefused",
    "cancel",
    "create_loop",
    "fail",
    "finish",
    "new_id",
    "queue_baseline",
    "queue_remeasure",
    "requeue",
    "rerun",
    "retry",
    "rule_of",
    "set_loop_state",
    "start",
    "submit",
]

ALLOWED: dict[Status, frozenset[Status]] = {
    Status.queued: frozenset({Status.running, Status.cancelled}),
    Status.running: frozenset(FINAL | {Status.queued, Status.confirming}),
    Status.confirming: frozenset({Status.keep, Status.discard, Status.cancelled}),
}
GOOD_RUN = ("keep", "discard", "confirming")  # a candidate's own run that produced its value
LOOP_MOVES: dict[str, dict[str, str]] = {
    "pause": {LoopState.active: LoopState.paused, LoopState.paused: LoopState.paused},
    "resume": {LoopState.paused: LoopState.active, LoopState.active: LoopState.active},
    "stop": {
        LoopState.active: LoopState.stopped,
        LoopState.paused: LoopState.stopped,
        LoopState.stopped: LoopState.stopped,
    },
}


class Conflict(Exception):
    """The request is valid but the current state forbids it (HTTP 409)."""


class TransitionRefused(Exception):
    """A transition that the state machine does not allow: a bug, never user input."""


def new_id() -> str:
    return secrets.token_hex(8)


async def _rows(db: aiosqlite.Connection, sql: str, args: Any = (), *, first: bool = False) -> Any:
    rows = await db.execute_fetchall(sql, args)
    return (rows[0] if rows else None) if first else rows


async def _move(db: aiosqlite.Connection, exp_id: str, expected: Status, new: Status, **fields: Any) -> bool:
    if new not in ALLOWED.get(expected, frozenset()):
        raise TransitionRefused(f"{expected} -> {new} is not a transition")
    sets = ", ".join(f"{k} = ?" for k in ("status", *fields))
    cur = await db.execute(
        f"UPDATE experiments SET {sets} WHERE id = ? AND status = ?",
        (new.value, *fields.values(), exp_id, expected.value),
    )
    return cur.rowcount == 1


_INSERT_EXPERIMENT = (
    "INSERT INTO experiments (id, loop_id, seq, kind, description, parent, snapshot, diff, status,"
    " created_at, rerun_of, seed, repeat_of)"
    " SELECT ?1, id, next_seq, ?2, ?3, ?4, ?5, ?6, 'queued', ?7, ?8, ?9, ?10 FROM loops WHERE id = ?11"
)
# repeat runs do not count against max_experiments: `repeats` says how many of the numbers are theirs
_NEXT_SEQ = "UPDATE loops SET next_seq = next_seq + 1, repeats = repeats + ?2 WHERE id = ?1"


async def _insert_experiment(
    db: aiosqlite.Connection,
    loop_id: str,
    kind: str,
    description: str,
    parent: str | None,
    snapshot: str,
    diff: str | None,
    *,
    rerun_of: str | None = None,
    seed: int | None = None,
    repeat_of: str | None = None,
) -> str:
    exp_id = new_id()
    values = (
        exp_id,
        kind,
        description,
        parent,
        snapshot,
        diff,
        time.time(),
        rerun_of,
        seed,
        repeat_of,
        loop_id,
    )
    await db.execute(_INSERT_EXPERIMENT, values)
    await db.execute(_NEXT_SEQ, (loop_id, 1 if repeat_of is not None else 0))
    return exp_id


def rule_of(config: LoopConfig) -> Rule:
    a = config.acceptance
    return resolve(
        a.rule,
        baseline_runs=a.baseline_runs,
        confirm_runs=a.confirm_runs,
        k=a.k,
        remeasure_runs=a.remeasure_runs,
    )


_RUN_AGAIN = "SELECT loop_id, seq, kind, description, parent, snapshot, diff FROM experiments WHERE id = ?"


async def _run_again(db: aiosqlite.Connection, exp: aiosqlite.Row, description: str, **links: Any) -> str:
    """Queues the identical snapshot of `exp` (a `_RUN_AGAIN` row: same kind, parent and diff)."""
    return await _insert_experiment(
        db,
        exp["loop_id"],
        exp["kind"],
        description[:2000],
        exp["parent"],
        exp["snapshot"],
        exp["diff"],
        **links,
    )


async def _queue_repeats(db: aiosqlite.Connection, primary_id: str, count: int, why: str) -> list[str]:
    """`count` more runs of `primary_id`'s snapshot, each with a seed of its own (1, 2, ... over
    all of the candidate's repeats), as the workload's RATCHET_SEED."""
    exp = await _rows(db, _RUN_AGAIN, (primary_id,), first=True)
    done = await _rows(db, "SELECT COUNT(*) FROM experiments WHERE repeat_of = ?", (primary_id,), first=True)
    ids = []
    for seed in range(done[0] + 1, done[0] + count + 1):
        description = f"{why} of #{exp['seq']} (seed {seed}): {exp['description']}"
        ids.append(await _run_again(db, exp, description, seed=seed, repeat_of=primary_id))
    return ids


async def create_loop(store: Store, config: LoopConfig, root: str, manifest: bytes) -> tuple[str, str]:
    """Stores the loop with its root snapshot and queues the baseline. Returns (loop id, baseline id)."""
    loop_id = new_id()
    async with store.tx() as db:
        await store.put_snapshot(db, root, manifest)
        await db.execute(
            "INSERT INTO loops (id, name, config, state, root_snapshot, created_at)"
            " VALUES (?, ?, ?, ?, ?, ?)",
            (
                loop_id,
                config.name,
                msgspec.json.encode(config).decode(),
                LoopState.active.value,
                root,
                time.time(),
            ),
        )
        exp_id = await _insert_experiment(db, loop_id, "baseline", "baseline", None, root, None)
        await _queue_repeats(db, exp_id, rule_of(config).baseline_runs - 1, "noise run")
    return loop_id, exp_id


_CAPACITY = "SELECT state, config, next_seq, repeats FROM loops WHERE id = ?"


def _refuse_if_full(row: Any) -> None:
    if row["state"] == LoopState.stopped:
        raise Conflict("the loop is stopped; create a new loop to run more experiments")
    config = msgspec.json.decode(row["config"], type=LoopConfig)
    submitted = row["next_seq"] - 1 - row["repeats"]  # repeat runs do not count against the limit
    if config.max_experiments is not None and submitted >= config.max_experiments:
        raise Conflict(f"the loop has reached max_experiments={config.max_experiments}")


async def _check_capacity(db: aiosqlite.Connection, loop_id: str) -> None:
    _refuse_if_full(await _rows(db, _CAPACITY, (loop_id,), first=True))


async def submit(
    store: Store, loop_id: str, description: str, parent: str, snapshot: str, manifest: bytes, diff: str
) -> str:
    """Queues a candidate. The hot write: it goes through the store's group commit, so the whole
    transaction runs on the writer's thread (see `Store.write`)."""
    exp_id, now = new_id(), time.time()

    def write(db: sqlite3.Connection) -> str:
        _refuse_if_full(db.execute(_CAPACITY, (loop_id,)).fetchone())
        db.execute(Store.PUT_SNAPSHOT, (snapshot, manifest.decode(), now))
        values = (exp_id, "candidate", description, parent, snapshot, diff, now, None, None, None, loop_id)
        db.execute(_INSERT_EXPERIMENT, values)
        db.execute(_NEXT_SEQ, (loop_id, 0))
        return exp_id

    return await store.write(write)


async def _check_no_pending_baseline(db: aiosqlite.Connection, loop_id: str) -> None:
    pending = await _rows(
        db,
        "SELECT 1 FROM experiments WHERE loop_id = ? AND kind = 'baseline'"
        " AND status IN ('queued', 'running')",
        (loop_id,),
        first=True,
    )
    if pending:
        raise Conflict("a baseline of this loop is already queued or running")


async def queue_baseline(store: Store, loop_id: str) -> str:
    """Runs the unmodified root snapshot again (e.g. after a failed baseline)."""
    async with store.tx() as db:
        await _check_capacity(db, loop_id)
        row = await _rows(db, "SELECT root_snapshot FROM loops WHERE id = ?", (loop_id,), first=True)
        await _check_no_pending_baseline(db, loop_id)
        exp_id = await _insert_experiment(db, loop_id, "baseline", "baseline (re-run)", None, row[0], None)
        config = await _rows(db, "SELECT config FROM loops WHERE id = ?", (loop_id,), first=True)
        runs = rule_of(msgspec.json.decode(config[0], type=LoopConfig)).baseline_runs
        await _queue_repeats(db, exp_id, runs - 1, "noise run")
        return exp_id


async def rerun(store: Store, exp_id: str, seed: int | None = None) -> str:
    """Queues the identical snapshot (same parent, same diff) of `exp_id` again, linked to it and
    judged like any other experiment of its kind. Returns the new experiment id."""
    async with store.tx() as db:
        exp = await _rows(db, _RUN_AGAIN, (exp_id,), first=True)
        if exp is None:
            raise LookupError(exp_id)
        await _check_capacity(db, exp["loop_id"])
        if exp["kind"] == "baseline":
            await _check_no_pending_baseline(db, exp["loop_id"])
        description = f"rerun of #{exp['seq']}: {exp['description']}"
        return await _run_again(db, exp, description, rerun_of=exp_id, seed=seed)


async def start(store: Store, exp_id: str, gpus: list[str]) -> bool:
    async with store.tx() as db:
        moved = await _move(
            db, exp_id, Status.queued, Status.running, started_at=time.time(), gpus=",".join(gpus)
        )
        if moved:
            await db.execute("UPDATE experiments SET attempts = attempts + 1 WHERE id = ?", (exp_id,))
        return moved


async def requeue(store: Store, exp_id: str) -> bool:
    async with store.tx() as db:
        return await _move(db, exp_id, Status.running, Status.queued, started_at=None, gpus=None)


async def retry(store: Store, exp_id: str, reason: str, not_before: float) -> bool:
    """Back to the queue after an infrastructure failure; `reason` says why until it runs again."""
    async with store.tx() as db:
        return await _move(
            db,
            exp_id,
            Status.running,
            Status.queued,
            started_at=None,
            gpus=None,
            reason=reason[:2000],
            not_before=not_before,
        )


async def fail(store: Store, exp_id: str, reason: str, log_tail: str | None = None) -> bool:
    async with store.tx() as db:
        moved = await _move(
            db,
            exp_id,
            Status.running,
            Status.error,
            reason=reason[:2000],
            finished_at=time.time(),
            log_tail=log_tail,
        )
        if moved:
            await _after_repeat_ended(db, exp_id)
        return moved


async def cancel(store: Store, exp_id: str, reason: str = "cancelled") -> bool:
    """Cancels a queued, running or confirming experiment (a confirming one with its queued repeat
    runs; running ones are the caller's to kill); False when it had already finished."""
    async with store.tx() as db:
        for expected in (Status.queued, Status.running, Status.confirming):
            if await _move(db, exp_id, expected, Status.cancelled, reason=reason, finished_at=time.time()):
                await db.execute(
                    "UPDATE experiments SET status = 'cancelled', reason = ?, finished_at = ?"
                    " WHERE repeat_of = ? AND status = 'queued'",
                    (f"its candidate was cancelled: {reason}"[:2000], time.time(), exp_id),
                )
                await _after_repeat_ended(db, exp_id)
                return True
    return False


async def queue_remeasure(store: Store, loop_id: str) -> str | None:
    """One more run of the loop's best, for a slot that would otherwise sit idle: its mean becomes
    more honest with every run. None when the loop needs none (inactive, no best, enough runs)."""
    async with store.tx() as db:
        loop = await _rows(db, "SELECT * FROM loops WHERE id = ?", (loop_id,), first=True)
        if loop is None or loop["state"] != LoopState.active or loop["best_experiment"] is None:
            return None
        rule = rule_of(msgspec.json.decode(loop["config"], type=LoopConfig))
        best = loop["best_experiment"]
        tried = await _rows(
            db,
            "SELECT COUNT(*) FROM experiments WHERE repeat_of = ? AND status != 'cancelled'",
            (best,),
            first=True,
        )
        if 1 + tried[0] >= rule.remeasure_runs:
            return None
        (exp_id,) = await _queue_repeats(db, best, 1, "re-measure")
        return exp_id


class Finished(msgspec.Struct, kw_only=True):
    metrics: dict[str, float]
    memory_gb: float | None
    workload_seconds: float | None
    log_tail: str


async def finish(store: Store, exp_id: str, outcome: Outcome, info: Finished) -> Decision | None:
    """Judges the run against the loop's best *as it is now* and records both in one transaction,
    so two experiments finishing together cannot both become best unless the later one wins."""
    async with store.tx() as db:
        exp = await _rows(
            db,
            "SELECT loop_id, seq, kind, snapshot, status, repeat_of FROM experiments WHERE id = ?",
            (exp_id,),
            first=True,
        )
        if exp is None or exp["status"] != Status.running:
            return None  # cancelled meanwhile: the cancel stands
        loop = await _rows(db, "SELECT * FROM loops WHERE id = ?", (exp["loop_id"],), first=True)
        config = msgspec.json.decode(loop["config"], type=LoopConfig)
        if exp["repeat_of"] is not None:
            return await _finish_repeat(db, exp_id, exp["repeat_of"], config, outcome, info)
        # A baseline founds the best only while the loop has none; once one succeeded, a baseline
        # re-run (measuring noise) is judged like any candidate and cannot reset the best.
        baseline = exp["kind"] == "baseline" and loop["baseline"] != "ok"
        best = loop["best_metric"] if loop["baseline"] == "ok" else None
        decision = _decide(config, outcome, best=best, baseline=baseline)
        rule = rule_of(config)
        if rule.name != "strict" and best is not None and decision.status in (Verdict.keep, Verdict.discard):
            assert outcome.metric is not None
            decision = await _first_run(db, loop, config, rule, outcome.metric)
        final = decision.status != Verdict.confirming
        finish_seq = loop["finished"] + 1 if final else None
        await _move(
            db,
            exp_id,
            Status.running,
            Status(decision.status),
            reason=decision.reason,
            finish_seq=finish_seq,
            **_run_fields(outcome, info),
        )
        if final:
            await db.execute("UPDATE loops SET finished = ? WHERE id = ?", (finish_seq, exp["loop_id"]))
        else:
            await _queue_repeats(db, exp_id, rule.confirm_runs, "confirmation")
        if decision.becomes_best:
            await _make_best(db, exp["loop_id"], exp_id, exp["snapshot"], outcome.metric)
        elif baseline:
            await db.execute(
                "UPDATE loops SET baseline = 'failed', baseline_reason = ? WHERE id = ?",
                (f"baseline {decision.status}: {decision.reason}", exp["loop_id"]),
            )
            await db.execute(
                "UPDATE experiments SET status = 'cancelled', reason = 'the baseline failed', finished_at = ?"
                " WHERE repeat_of = ? AND status = 'queued'",
                (time.time(), exp_id),
            )
        if decision.status in GOOD_RUN:
            await _refresh_group(db, exp_id)
        return decision


async def _first_run(
    db: aiosqlite.Connection, loop: aiosqlite.Row, config: LoopConfig, rule: Rule, value: float
) -> Decision:
    verdict = _judge(config, rule, [value], await _incumbent(db, loop), loop["noise_sd"])
    return _as_decision(verdict)


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


async def _incumbent(db: aiosqlite.Connection, loop: aiosqlite.Row) -> list[float]:
    """The metric of every run of the loop's best (its one stored value if its runs are gone)."""
    return await _group_values(db, loop["best_experiment"]) or [loop["best_metric"]]


def _judge(
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


def _as_decision(j: Judgement) -> Decision:
    status = {"keep": Verdict.keep, "discard": Verdict.discard, "confirm": Verdict.confirming}[j.verdict]
    return Decision(status=status, reason=j.reason, becomes_best=j.verdict == "keep")


async def _make_best(
    db: aiosqlite.Connection, loop_id: str, exp_id: str, snapshot: str, metric: float | None
) -> None:
    await db.execute(
        "UPDATE loops SET best_snapshot = ?, best_metric = ?, best_experiment = ?,"
        " baseline = 'ok', baseline_reason = NULL WHERE id = ?",
        (snapshot, metric, exp_id, loop_id),
    )


async def _finish_repeat(
    db: aiosqlite.Connection,
    exp_id: str,
    primary_id: str,
    config: LoopConfig,
    outcome: Outcome,
    info: Finished,
) -> Decision:
    """A repeat run is judged only for failure; its value joins its candidate's mean."""
    decision = _decide(config, outcome, best=None, baseline=True)  # any finite metric is a measurement
    if decision.status == Verdict.keep:
        decision = Decision(status=Verdict.measured, reason=f"{config.metric.name} {outcome.metric:.6f}")
    await _move(
        db,
        exp_id,
        Status.running,
        Status(decision.status),
        reason=decision.reason,
        **_run_fields(outcome, info),
    )
    await _refresh_group(db, primary_id)
    settled = await _settle(db, primary_id)
    if settled is not None:
        decision = msgspec.structs.replace(decision, settled=settled.status)
    return decision


async def _after_repeat_ended(db: aiosqlite.Connection, exp_id: str) -> None:
    """A repeat run ended without a value (error, cancel): its candidate may be ready to settle."""
    row = await _rows(db, "SELECT repeat_of FROM experiments WHERE id = ?", (exp_id,), first=True)
    if row is not None and row[0] is not None:
        await _settle(db, row[0])


async def _group_values(db: aiosqlite.Connection, primary_id: str | None) -> list[float]:
    """The metric of every successful run of a candidate: its own and its repeats', in run order."""
    if primary_id is None:
        return []
    rows = await _rows(
        db,
        "SELECT metric FROM experiments WHERE metric IS NOT NULL AND ("
        f" (id = ? AND status IN ({','.join('?' * len(GOOD_RUN))}))"
        " OR (repeat_of = ? AND status = 'measured')) ORDER BY seq",
        (primary_id, *GOOD_RUN, primary_id),
    )
    return [r[0] for r in rows]


async def _refresh_group(db: aiosqlite.Connection, primary_id: str) -> None:
    """Recomputes the candidate's runs/mean/m2, its share of the loop's pooled noise, and the
    loop's best metric when this candidate is the best (the best is the mean of all its runs)."""
    values = await _group_values(db, primary_id)
    row = await _rows(db, "SELECT loop_id, m2, runs FROM experiments WHERE id = ?", (primary_id,), first=True)
    if not values:
        return
    m2 = sum_squares(values)
    centre = mean(values)
    old_m2, old_dof = row["m2"] or 0.0, max(0, (row["runs"] or 1) - 1)
    await db.execute(
        "UPDATE experiments SET runs = ?, mean = ?, m2 = ? WHERE id = ?",
        (len(values), centre, m2, primary_id),
    )
    loop = await _rows(
        db,
        "SELECT noise_ss, noise_dof, best_experiment FROM loops WHERE id = ?",
        (row["loop_id"],),
        first=True,
    )
    ss = max(0.0, loop["noise_ss"] - old_m2 + m2)
    dof = loop["noise_dof"] - old_dof + len(values) - 1
    await db.execute(
        "UPDATE loops SET noise_ss = ?, noise_dof = ?, noise_sd = ? WHERE id = ?",
        (ss, dof, pooled(ss, dof), row["loop_id"]),
    )
    if loop["best_experiment"] == primary_id:
        await db.execute("UPDATE loops SET best_metric = ? WHERE id = ?", (centre, row["loop_id"]))


async def _settle(db: aiosqlite.Connection, primary_id: str) -> Decision | None:
    """A confirming candidate whose repeat runs have all ended gets its verdict: the mean of its
    runs against the best's mean, as the loop's rule says."""
    exp = await _rows(
        db, "SELECT loop_id, snapshot, status FROM experiments WHERE id = ?", (primary_id,), first=True
    )
    if exp is None or exp["status"] != Status.confirming:
        return None
    repeats = await _rows(
        db, "SELECT seq, status, reason FROM experiments WHERE repeat_of = ? ORDER BY seq", (primary_id,)
    )
    if any(r["status"] in ("queued", "running") for r in repeats):
        return None
    loop = await _rows(db, "SELECT * FROM loops WHERE id = ?", (exp["loop_id"],), first=True)
    config = msgspec.json.decode(loop["config"], type=LoopConfig)
    rule = rule_of(config)
    values = await _group_values(db, primary_id)
    failed = next((r for r in repeats if r["status"] in ("crash", "timeout")), None)
    if failed is not None:
        why = f"run #{failed['seq']} of it ended {failed['status']}: {failed['reason']}"
        decision = Decision(status=Verdict.discard, reason=f"not reproducible: {why}")
    else:
        decision = _as_decision(_judge(config, rule, values, await _incumbent(db, loop), loop["noise_sd"]))
        if decision.status == Verdict.confirming:
            decision = Decision(
                status=Verdict.discard,
                reason=f"confirmation incomplete: {len(values)} of {1 + rule.confirm_runs} runs succeeded",
            )
    finish_seq = loop["finished"] + 1
    await _move(
        db,
        primary_id,
        Status.confirming,
        Status(decision.status),
        reason=decision.reason[:2000],
        finish_seq=finish_seq,
        finished_at=time.time(),
    )
    await db.execute("UPDATE loops SET finished = ? WHERE id = ?", (finish_seq, exp["loop_id"]))
    if decision.becomes_best:
        await _make_best(db, exp["loop_id"], primary_id, exp["snapshot"], mean(values))
    return decision


async def set_loop_state(store: Store, loop_id: str, action: str) -> tuple[str, list[str]]:
    """pause / resume / stop. Stop cancels every queued experiment and returns the running ones,
    which the caller must kill. Returns (new state, running experiment ids to kill)."""
    async with store.tx() as db:
        row = await _rows(db, "SELECT state FROM loops WHERE id = ?", (loop_id,), first=True)
        target = LOOP_MOVES[action].get(row["state"])
        if target is None:
            raise Conflict(f"cannot {action} a loop that is {row['state']}")
        await db.execute("UPDATE loops SET state = ? WHERE id = ?", (target, loop_id))
        running: list[str] = []
        if action == "stop":
            now = time.time()
            await db.execute(
                "UPDATE experiments SET status = 'cancelled', reason = 'loop stopped', finished_at = ?"
                " WHERE loop_id = ? AND status IN ('queued', 'confirming')",
                (now, loop_id),
            )
            rows = await _rows(
                db, "SELECT id FROM experiments WHERE loop_id = ? AND status = 'running'", (loop_id,)
            )
            running = [r[0] for r in rows]
        return target, running
