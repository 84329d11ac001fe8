"""The experiment state machine. Every change of status is one function here and one guarded
write (`UPDATE ... WHERE status = :expected`) in its own transaction, committed before the
scheduler acts on it.

    queued ──start──> running ──finish──> keep | discard | crash | timeout
      │                  ├──fail────────> error
      │                  ├──cancel──────> cancelled
      │                  └──requeue─────> queued      (service restarted mid-run)
      └──cancel──> cancelled
"""

from __future__ import annotations

import secrets
import sqlite3
import time
from typing import Any

import aiosqlite
import msgspec

from .decisions import Decision, Outcome, decide
from .models import FINAL, LoopConfig, LoopState, Status
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
    "requeue",
    "rerun",
    "set_loop_state",
    "start",
    "submit",
]

ALLOWED: dict[Status, frozenset[Status]] = {
    Status.queued: frozenset({Status.running, Status.cancelled}),
    Status.running: frozenset(FINAL | {Status.queued}),
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
    " created_at, rerun_of, seed) SELECT ?1, id, next_seq, ?2, ?3, ?4, ?5, ?6, 'queued', ?7, ?8, ?9"
    " FROM loops WHERE id = ?10"
)
_NEXT_SEQ = "UPDATE loops SET next_seq = next_seq + 1 WHERE id = ?"


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
) -> str:
    exp_id = new_id()
    values = (exp_id, kind, description, parent, snapshot, diff, time.time(), rerun_of, seed, loop_id)
    await db.execute(_INSERT_EXPERIMENT, values)
    await db.execute(_NEXT_SEQ, (loop_id,))
    return exp_id


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
    return loop_id, exp_id


_CAPACITY = "SELECT state, config, next_seq FROM loops WHERE id = ?"


def _refuse_if_full(row: Any) -> None:
    if row["state"] == LoopState.stopped:
        raise Conflict("the loop is stopped; create a new loop to run more experiments")
    config = msgspec.json.decode(row["config"], type=LoopConfig)
    if config.max_experiments is not None and row["next_seq"] - 1 >= config.max_experiments:
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
        values = (exp_id, "candidate", description, parent, snapshot, diff, now, None, None, loop_id)
        db.execute(_INSERT_EXPERIMENT, values)
        db.execute(_NEXT_SEQ, (loop_id,))
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
        return await _insert_experiment(db, loop_id, "baseline", "baseline (re-run)", None, row[0], None)


async def rerun(store: Store, exp_id: str, seed: int | None = None) -> str:
    """Queues the identical snapshot (same parent, same diff) of `exp_id` again, linked to it and
    judged like any other experiment of its kind. Returns the new experiment id."""
    async with store.tx() as db:
        exp = await _rows(
            db,
            "SELECT loop_id, seq, kind, description, parent, snapshot, diff FROM experiments WHERE id = ?",
            (exp_id,),
            first=True,
        )
        if exp is None:
            raise LookupError(exp_id)
        await _check_capacity(db, exp["loop_id"])
        if exp["kind"] == "baseline":
            await _check_no_pending_baseline(db, exp["loop_id"])
        description = f"rerun of #{exp['seq']}: {exp['description']}"[:2000]
        return await _insert_experiment(
            db,
            exp["loop_id"],
            exp["kind"],
            description,
            exp["parent"],
            exp["snapshot"],
            exp["diff"],
            rerun_of=exp_id,
            seed=seed,
        )


async def start(store: Store, exp_id: str, gpus: list[str]) -> bool:
    async with store.tx() as db:
        return await _move(
            db, exp_id, Status.queued, Status.running, started_at=time.time(), gpus=",".join(gpus)
        )


async def requeue(store: Store, exp_id: str) -> bool:
    async with store.tx() as db:
        return await _move(db, exp_id, Status.running, Status.queued, started_at=None, gpus=None)


async def fail(store: Store, exp_id: str, reason: str, log_tail: str | None = None) -> bool:
    async with store.tx() as db:
        return await _move(
            db,
            exp_id,
            Status.running,
            Status.error,
            reason=reason[:2000],
            finished_at=time.time(),
            log_tail=log_tail,
        )


async def cancel(store: Store, exp_id: str, reason: str = "cancelled") -> bool:
    """Cancels a queued or running experiment; False when it had already finished."""
    async with store.tx() as db:
        for expected in (Status.queued, Status.running):
            if await _move(db, exp_id, expected, Status.cancelled, reason=reason, finished_at=time.time()):
                return True
    return False


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
            db, "SELECT loop_id, kind, snapshot, status FROM experiments WHERE id = ?", (exp_id,), first=True
        )
        if exp is None or exp["status"] != Status.running:
            return None  # cancelled meanwhile: the cancel stands
        loop = await _rows(db, "SELECT * FROM loops WHERE id = ?", (exp["loop_id"],), first=True)
        config = msgspec.json.decode(loop["config"], type=LoopConfig)
        # A baseline founds the best only while the loop has none; once one succeeded, a baseline
        # re-run (measuring noise) is judged like any candidate and cannot reset the best.
        baseline = exp["kind"] == "baseline" and loop["baseline"] != "ok"
        decision = decide(
            outcome,
            metric_name=config.metric.name,
            direction=config.metric.direction,
            min_delta=config.metric.min_delta,
            best=loop["best_metric"] if loop["baseline"] == "ok" else None,
            baseline=baseline,
        )
        finish_seq = loop["finished"] + 1
        await _move(
            db,
            exp_id,
            Status.running,
            Status(decision.status),
            reason=decision.reason,
            metric=outcome.metric,
            metrics=msgspec.json.encode(info.metrics).decode(),
            memory_gb=info.memory_gb,
            exit_code=outcome.exit_code,
            finished_at=time.time(),
            finish_seq=finish_seq,
            workload_seconds=info.workload_seconds,
            log_tail=info.log_tail,
        )
        await db.execute("UPDATE loops SET finished = ? WHERE id = ?", (finish_seq, exp["loop_id"]))
        if decision.becomes_best:
            await db.execute(
                "UPDATE loops SET best_snapshot = ?, best_metric = ?, best_experiment = ?,"
                " baseline = 'ok', baseline_reason = NULL WHERE id = ?",
                (exp["snapshot"], outcome.metric, exp_id, exp["loop_id"]),
            )
        elif baseline:
            await db.execute(
                "UPDATE loops SET baseline = 'failed', baseline_reason = ? WHERE id = ?",
                (f"baseline {decision.status}: {decision.reason}", exp["loop_id"]),
            )
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
                " WHERE loop_id = ? AND status = 'queued'",
                (now, loop_id),
            )
            rows = await _rows(
                db, "SELECT id FROM experiments WHERE loop_id = ? AND status = 'running'", (loop_id,)
            )
            running = [r[0] for r in rows]
        return target, running
