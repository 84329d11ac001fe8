"""The proposal state machine. Every change of a proposal's status is one function here and one
guarded write (`UPDATE ... WHERE status = :expected`), committed before the driver acts on it.

    (new) ──open──> running ──propose──> proposed    its candidate queued in the same write
      queued ─start─┘   │                duplicate   its candidate had already run: `duplicate_of`
         ^              │                cancelled   the loop stopped, filled up, passed its deadline
         └──requeue─────┤──fail────────> failed      the proposer's fault: counts towards the streak
           (restart)    ├──error───────> error       the infrastructure's fault: does not count
                        └──cancel──────> cancelled

`propose` is where a restart could double-submit, and cannot: the candidate is inserted in the
write that moves the proposal out of `running`, guarded by that status, and an experiment's
`proposal_id` is unique. A proposal cut off by a restart is still `running` with no candidate; the
next start puts it back to `queued` and runs it again (`attempts` counts its starts).

A failure (and a duplicate) adds one to the loop's `proposer_streak`; reaching the proposer's
`max_failures` pauses the loop in the same write, with the reason in `state_reason`. A proposed
candidate resets the streak, as does resuming the loop.
"""

from __future__ import annotations

import sqlite3
import time
from typing import Any

import msgspec

from ..ops_models import WebhookEvent
from ..proposal_models import ProposalStatus as P
from . import webhooks
from .database import fetch
from .enqueue import Conflict, Duplicate, insert_candidate, new_id
from .store import Store, loop_config

__all__ = [
    "ALLOWED",
    "Candidate",
    "Finished",
    "add_tokens",
    "cancel",
    "cancel_open",
    "error",
    "fail",
    "open_proposal",
    "propose",
    "requeue_running",
    "reserve_request",
    "start",
]

ALLOWED: dict[P, frozenset[P]] = {
    P.queued: frozenset({P.running, P.cancelled}),
    P.running: frozenset({P.proposed, P.duplicate, P.failed, P.error, P.cancelled, P.queued}),
}


class TransitionRefused(Exception):
    """A move the state machine does not allow: a bug, never user input."""


def _move(db: sqlite3.Connection, pid: str, expected: P, new: P, **fields: Any) -> bool:
    if new not in ALLOWED.get(expected, frozenset()):
        raise TransitionRefused(f"proposal {expected} -> {new} is not a transition")
    sets = ", ".join(f"{k} = ?" for k in ("status", *fields))
    cur = db.execute(
        f"UPDATE proposals SET {sets} WHERE id = ? AND status = ?",
        (new.value, *fields.values(), pid, expected.value),
    )
    return cur.rowcount == 1


class Finished(msgspec.Struct, kw_only=True):
    """What a proposer run recorded about itself, whatever came of it."""

    exit_code: int | None = None
    log_tail: str | None = None


class Candidate(msgspec.Struct, kw_only=True, frozen=True):
    """A proposal's candidate, its blobs already durable (like a REST submission's)."""

    description: str
    parent: str
    snapshot: str
    manifest: bytes
    diff: str


async def open_proposal(store: Store, loop_id: str, kind: str, parent: str) -> tuple[str, int]:
    """A new proposal of the loop, `running` from its first write. Returns (its id, its number)."""

    def write(db: sqlite3.Connection) -> tuple[str, int]:
        pid = new_id()
        db.execute("UPDATE loops SET proposal_seq = proposal_seq + 1 WHERE id = ?", (loop_id,))
        now = time.time()
        db.execute(
            "INSERT INTO proposals (id, loop_id, seq, kind, status, parent, attempts, created_at, started_at)"
            " SELECT ?, id, proposal_seq, ?, 'running', ?, 1, ?, ? FROM loops WHERE id = ?",
            (pid, kind, parent, now, now, loop_id),
        )
        return pid, fetch(db, "SELECT seq FROM proposals WHERE id = ?", (pid,), first=True)[0]

    return await store.write(write)


async def start(store: Store, pid: str) -> bool:
    """queued -> running (a proposal cut off by a restart, run again)."""

    def write(db: sqlite3.Connection) -> bool:
        moved = _move(db, pid, P.queued, P.running, started_at=time.time())
        if moved:
            db.execute("UPDATE proposals SET attempts = attempts + 1 WHERE id = ?", (pid,))
        return moved

    return await store.write(write)


async def requeue_running(store: Store) -> list[str]:
    """At start-up: proposals a previous process left `running` go back to the queue."""

    def write(db: sqlite3.Connection) -> list[str]:
        rows = fetch(db, "SELECT id FROM proposals WHERE status = 'running'")
        return [r[0] for r in rows if _move(db, r[0], P.running, P.queued, started_at=None)]

    return await store.write(write)


def _streak(db: sqlite3.Connection, loop_id: str, why: str) -> str | None:
    """One more failure in a row; pauses an active loop at its proposer's `max_failures`. Returns
    the pause reason when this write paused it."""
    db.execute("UPDATE loops SET proposer_streak = proposer_streak + 1 WHERE id = ?", (loop_id,))
    row = fetch(db, "SELECT state, config, proposer_streak FROM loops WHERE id = ?", (loop_id,), first=True)
    proposer = loop_config(row["config"]).proposer
    if proposer is None or row["state"] != "active" or row["proposer_streak"] < proposer.max_failures:
        return None
    reason = f"proposer failed {row['proposer_streak']} times in a row; last: {why}"[:2000]
    return reason if _pause(db, loop_id, reason) else None


def _pause(db: sqlite3.Connection, loop_id: str, reason: str) -> bool:
    """Pauses an active loop with `reason`; its webhooks hear of it in the same write."""
    cur = db.execute(
        "UPDATE loops SET state = 'paused', state_reason = ? WHERE id = ? AND state = 'active'",
        (reason, loop_id),
    )
    if cur.rowcount:
        webhooks.emit_in(db, loop_id, WebhookEvent.loop_paused, reason)
    return bool(cur.rowcount)


def _loop_of(db: sqlite3.Connection, pid: str) -> str:
    return fetch(db, "SELECT loop_id FROM proposals WHERE id = ?", (pid,), first=True)[0]


async def propose(store: Store, pid: str, candidate: Candidate, info: Finished) -> tuple[P, str | None]:
    """Ends a running proposal with its candidate: queued as a new experiment in this very write
    (-> proposed), or answered by the experiment that already ran it (-> duplicate), or refused
    because the loop takes no more (-> cancelled). Returns (status, experiment id or reason)."""

    def write(db: sqlite3.Connection) -> tuple[P, str | None]:
        row = fetch(db, "SELECT loop_id, status FROM proposals WHERE id = ?", (pid,), first=True)
        if row is None or row["status"] != P.running:
            return P(row["status"]) if row else P.cancelled, None  # cancelled meanwhile: that stands
        loop_id, now = row["loop_id"], time.time()
        done = {"finished_at": now, "exit_code": info.exit_code, "log_tail": info.log_tail}
        try:
            exp_id = insert_candidate(
                db,
                loop_id,
                candidate.description,
                candidate.parent,
                candidate.snapshot,
                candidate.manifest,
                candidate.diff,
                proposal_id=pid,
            )
        except Duplicate as dup:
            _move(
                db,
                pid,
                P.running,
                P.duplicate,
                duplicate_of=dup.experiment_id,
                description=candidate.description,
                failure="duplicate",
                reason=f"the same candidate already ran as experiment {dup.experiment_id}",
                **done,
            )
            _streak(db, loop_id, f"duplicate of experiment {dup.experiment_id}")
            return P.duplicate, dup.experiment_id
        except Conflict as exc:
            _move(db, pid, P.running, P.cancelled, reason=str(exc), description=candidate.description, **done)
            return P.cancelled, str(exc)
        _move(db, pid, P.running, P.proposed, experiment_id=exp_id, description=candidate.description, **done)
        db.execute("UPDATE loops SET proposer_streak = 0 WHERE id = ?", (loop_id,))
        return P.proposed, exp_id

    return await store.write(write)


async def fail(
    store: Store, pid: str, code: str, reason: str, info: Finished, pause: bool = False
) -> tuple[bool, str | None]:
    """running -> failed, counted in the loop's streak; with `pause` (a spent budget) the loop is
    paused at once. Returns (moved, the pause reason if this write paused the loop)."""

    def write(db: sqlite3.Connection) -> tuple[bool, str | None]:
        moved = _move(
            db,
            pid,
            P.running,
            P.failed,
            failure=code,
            reason=reason[:2000],
            finished_at=time.time(),
            exit_code=info.exit_code,
            log_tail=info.log_tail,
        )
        if not moved:
            return False, None
        loop_id = _loop_of(db, pid)
        webhooks.emit_in(db, loop_id, WebhookEvent.proposer_failed, f"{code}: {reason}"[:2000])
        paused = _streak(db, loop_id, reason)
        if pause and paused is None:
            paused = f"proposer stopped: {reason}"[:2000]
            paused = paused if _pause(db, loop_id, paused) else None
        return True, paused

    return await store.write(write)


async def error(store: Store, pid: str, reason: str, info: Finished | None = None) -> bool:
    """running -> error: the infrastructure failed; the streak is left alone."""
    info = info or Finished()

    def write(db: sqlite3.Connection) -> bool:
        return _move(
            db,
            pid,
            P.running,
            P.error,
            reason=reason[:2000],
            finished_at=time.time(),
            exit_code=info.exit_code,
            log_tail=info.log_tail,
        )

    return await store.write(write)


async def cancel(store: Store, pid: str, reason: str = "cancelled") -> bool:
    def write(db: sqlite3.Connection) -> bool:
        return any(
            _move(db, pid, expected, P.cancelled, reason=reason, finished_at=time.time())
            for expected in (P.queued, P.running)
        )

    return await store.write(write)


async def cancel_open(store: Store, loop_id: str, reason: str) -> list[str]:
    """Cancels every queued and running proposal of a loop; returns those that were running (the
    caller stops their runs)."""

    def write(db: sqlite3.Connection) -> list[str]:
        rows = fetch(
            db,
            "SELECT id, status FROM proposals WHERE loop_id = ? AND status IN ('queued', 'running')",
            (loop_id,),
        )
        now = time.time()
        for r in rows:
            _move(db, r[0], P(r[1]), P.cancelled, reason=reason, finished_at=now)
        return [r[0] for r in rows if r[1] == P.running]

    return await store.write(write)


async def reserve_request(
    store: Store, loop_id: str, pid: str, max_requests: int | None, max_tokens: int | None
) -> str | None:
    """Counts one chat request against the loop's budget before it is sent; returns why not when
    the budget is spent (nothing is counted then)."""

    def write(db: sqlite3.Connection) -> str | None:
        row = fetch(db, "SELECT llm_requests, llm_tokens FROM loops WHERE id = ?", (loop_id,), first=True)
        if max_requests is not None and row[0] >= max_requests:
            return f"the loop's request budget is spent ({row[0]} of max_requests={max_requests})"
        if max_tokens is not None and row[1] >= max_tokens:
            return f"the loop's token budget is spent ({row[1]} of max_total_tokens={max_tokens})"
        db.execute("UPDATE loops SET llm_requests = llm_requests + 1 WHERE id = ?", (loop_id,))
        db.execute("UPDATE proposals SET requests = requests + 1 WHERE id = ?", (pid,))
        return None

    return await store.write(write)


async def add_tokens(store: Store, loop_id: str, pid: str, tokens: int) -> None:
    def write(db: sqlite3.Connection) -> None:
        db.execute("UPDATE loops SET llm_tokens = llm_tokens + ? WHERE id = ?", (tokens, loop_id))
        db.execute("UPDATE proposals SET tokens = tokens + ? WHERE id = ?", (tokens, pid))

    await store.write(write)
