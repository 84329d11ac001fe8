"""New experiments in the queue: a loop and its baseline, candidates, re-runs, and the repeat runs
of noise-aware acceptance (the baseline's noise runs, a promising candidate's confirmation runs,
re-measurements of the best). Each insert is `queued`; what happens next is `transitions`'.

A repeat run (`repeat_of` = the candidate it repeats) is an experiment of its own with a seed of its
own; its value joins its candidate's mean (see `repeats`). Repeat runs do not count against a loop's
`max_experiments`.
"""

from __future__ import annotations

import secrets
import sqlite3
import time
from typing import Any

import msgspec

from ..models import LoopConfig, LoopState
from ..rules.acceptance import Rule, resolve
from .database import fetch
from .duplicates import Duplicate, find_duplicate
from .store import Store, loop_config

__all__ = [
    "Conflict",
    "Duplicate",
    "check_capacity",
    "create_loop",
    "insert_candidate",
    "new_id",
    "queue_baseline",
    "queue_remeasure",
    "queue_repeats",
    "rerun",
    "rule_of",
    "submit",
]


class Conflict(Exception):
    """The request is valid but the current state forbids it (HTTP 409)."""


def new_id() -> str:
    return secrets.token_hex(8)


def rule_of(config: LoopConfig) -> Rule:
    a = config.acceptance
    return resolve(
        a.rule,
        baseline_runs=a.baseline_runs,
        confirm_runs=a.confirm_runs,
        k=a.k,
        remeasure_runs=a.remeasure_runs,
    )


_INSERT_EXPERIMENT = (
    "INSERT INTO experiments (id, loop_id, seq, kind, description, parent, snapshot, diff, status,"
    " created_at, rerun_of, seed, repeat_of)"
    " SELECT ?1, id, next_seq, ?2, ?3, ?4, ?5, ?6, 'queued', ?7, ?8, ?9, ?10 FROM loops WHERE id = ?11"
)
# repeat runs do not count against max_experiments: `repeats` says how many of the numbers are theirs
_NEXT_SEQ = "UPDATE loops SET next_seq = next_seq + 1, repeats = repeats + ?2 WHERE id = ?1"


def _insert_experiment(
    db: sqlite3.Connection,
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
    db.execute(_INSERT_EXPERIMENT, values)
    db.execute(_NEXT_SEQ, (loop_id, 1 if repeat_of is not None else 0))
    return exp_id


_RUN_AGAIN = "SELECT loop_id, seq, kind, description, parent, snapshot, diff FROM experiments WHERE id = ?"


def _run_again(db: sqlite3.Connection, exp: sqlite3.Row, description: str, **links: Any) -> str:
    """Queues the identical snapshot of `exp` (a `_RUN_AGAIN` row: same kind, parent and diff)."""
    return _insert_experiment(
        db,
        exp["loop_id"],
        exp["kind"],
        description[:2000],
        exp["parent"],
        exp["snapshot"],
        exp["diff"],
        **links,
    )


def queue_repeats(db: sqlite3.Connection, primary_id: str, count: int, why: str) -> list[str]:
    """`count` more runs of `primary_id`'s snapshot, each with a seed of its own (1, 2, ... over
    all of the candidate's repeats), as the workload's RATCHET_SEED."""
    exp = fetch(db, _RUN_AGAIN, (primary_id,), first=True)
    done = fetch(db, "SELECT COUNT(*) FROM experiments WHERE repeat_of = ?", (primary_id,), first=True)
    ids = []
    for seed in range(done[0] + 1, done[0] + count + 1):
        description = f"{why} of #{exp['seq']} (seed {seed}): {exp['description']}"
        ids.append(_run_again(db, exp, description, seed=seed, repeat_of=primary_id))
    return ids


async def create_loop(store: Store, config: LoopConfig, root: str, manifest: bytes) -> tuple[str, str]:
    """Stores the loop with its root snapshot and queues the baseline. Returns (loop id, baseline id)."""
    loop_id = new_id()

    def write(db: sqlite3.Connection) -> tuple[str, str]:
        db.execute(Store.PUT_SNAPSHOT, (root, manifest.decode(), time.time()))
        db.execute(
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
        exp_id = _insert_experiment(db, loop_id, "baseline", "baseline", None, root, None)
        queue_repeats(db, exp_id, rule_of(config).baseline_runs - 1, "noise run")
        return loop_id, exp_id

    return await store.write(write)


def _check_capacity(db: sqlite3.Connection, loop_id: str) -> LoopConfig:
    """The loop's config, unless it is stopped, full or past its deadline."""
    row = fetch(db, "SELECT state, config, next_seq, repeats FROM loops WHERE id = ?", (loop_id,), first=True)
    if row["state"] == LoopState.stopped:
        raise Conflict("the loop is stopped; create a new loop to run more experiments")
    config = loop_config(row["config"])
    submitted = row["next_seq"] - 1 - row["repeats"]  # repeat runs do not count against the limit
    if config.max_experiments is not None and submitted >= config.max_experiments:
        raise Conflict(f"the loop has reached max_experiments={config.max_experiments}")
    if config.deadline is not None and time.time() >= config.deadline.timestamp():
        raise Conflict(f"the loop's deadline ({config.deadline.isoformat()}) has passed")
    return config


check_capacity = _check_capacity


def insert_candidate(
    db: sqlite3.Connection,
    loop_id: str,
    description: str,
    parent: str,
    snapshot: str,
    manifest: bytes,
    diff: str,
    proposal_id: str | None = None,
) -> str:
    """Inside a write: the candidate queued, unless it already ran (`Duplicate`, answered even by a
    full loop: it asks for nothing new) or the loop takes none (`Conflict`)."""
    earlier = find_duplicate(db, loop_id, snapshot)
    if earlier is not None:
        raise Duplicate(earlier)
    _check_capacity(db, loop_id)
    db.execute(Store.PUT_SNAPSHOT, (snapshot, manifest.decode(), time.time()))
    exp_id = _insert_experiment(db, loop_id, "candidate", description, parent, snapshot, diff)
    if proposal_id is not None:
        db.execute("UPDATE experiments SET proposal_id = ? WHERE id = ?", (proposal_id, exp_id))
    return exp_id


async def submit(
    store: Store, loop_id: str, description: str, parent: str, snapshot: str, manifest: bytes, diff: str
) -> str:
    """Queues a candidate (the hot write: many arrive together, and commit together). Raises
    `Duplicate` with the earlier experiment when its snapshot already ran in the loop."""

    def write(db: sqlite3.Connection) -> str:
        return insert_candidate(db, loop_id, description, parent, snapshot, manifest, diff)

    return await store.write(write)


def _check_no_pending_baseline(db: sqlite3.Connection, loop_id: str) -> None:
    pending = fetch(
        db,
        "SELECT 1 FROM experiments WHERE loop_id = ? AND kind = 'baseline'"
        " AND status IN ('queued', 'running')",
        (loop_id,),
        first=True,
    )
    if pending:
        raise Conflict("a baseline of this loop is already queued or running")


async def queue_baseline(store: Store, loop_id: str, description: str = "baseline (re-run)") -> str:
    """Runs the unmodified root snapshot again (e.g. after a failed baseline)."""

    def write(db: sqlite3.Connection) -> str:
        config = _check_capacity(db, loop_id)
        row = fetch(db, "SELECT root_snapshot FROM loops WHERE id = ?", (loop_id,), first=True)
        _check_no_pending_baseline(db, loop_id)
        exp_id = _insert_experiment(db, loop_id, "baseline", description, None, row[0], None)
        queue_repeats(db, exp_id, rule_of(config).baseline_runs - 1, "noise run")
        return exp_id

    return await store.write(write)


async def rerun(store: Store, exp_id: str, seed: int | None = None) -> str:
    """Queues the identical snapshot (same parent, same diff) of `exp_id` again, linked to it and
    judged like any other experiment of its kind. Returns the new experiment id."""

    def write(db: sqlite3.Connection) -> str:
        exp = fetch(db, _RUN_AGAIN, (exp_id,), first=True)
        if exp is None:
            raise LookupError(exp_id)
        _check_capacity(db, exp["loop_id"])
        if exp["kind"] == "baseline":
            _check_no_pending_baseline(db, exp["loop_id"])
        description = f"rerun of #{exp['seq']}: {exp['description']}"
        return _run_again(db, exp, description, rerun_of=exp_id, seed=seed)

    return await store.write(write)


async def queue_remeasure(store: Store, loop_id: str) -> str | None:
    """One more run of the loop's best, for a slot that would otherwise sit idle: its mean becomes
    more honest with every run. None when the loop needs none (inactive, no best, enough runs)."""

    def write(db: sqlite3.Connection) -> str | None:
        loop = fetch(
            db, "SELECT state, best_experiment, config FROM loops WHERE id = ?", (loop_id,), first=True
        )
        if loop is None or loop["state"] != LoopState.active or loop["best_experiment"] is None:
            return None
        rule = rule_of(loop_config(loop["config"]))
        best = loop["best_experiment"]
        tried = fetch(
            db,
            "SELECT COUNT(*) FROM experiments WHERE repeat_of = ? AND status != 'cancelled'",
            (best,),
            first=True,
        )
        if 1 + tried[0] >= rule.remeasure_runs:
            return None
        (exp_id,) = queue_repeats(db, best, 1, "re-measure")
        return exp_id

    return await store.write(write)
