"""No duplicate work: a candidate whose snapshot already ran in its loop is answered with the
earlier experiment instead of running again. Read inside the write that would queue it, so two
identical submissions arriving together still queue one experiment.

"Already ran" means an experiment of the loop with that snapshot that was not cancelled and did not
end in `error` (those produced no result, so running the snapshot again is not a repeat): queued,
running, confirming or decided. Repeat runs and re-runs share their candidate's snapshot; the
earliest experiment is the one answered. `rerun` is the deliberate way to run a snapshot again."""

from __future__ import annotations

import sqlite3

from .database import fetch

__all__ = ["Duplicate", "find_duplicate"]


class Duplicate(Exception):
    """The candidate already ran in this loop as `experiment_id`; nothing was queued."""

    def __init__(self, experiment_id: str) -> None:
        super().__init__(f"this candidate already ran in the loop as experiment {experiment_id}")
        self.experiment_id = experiment_id


def find_duplicate(db: sqlite3.Connection, loop_id: str, snapshot: str) -> str | None:
    row = fetch(
        db,
        "SELECT id FROM experiments WHERE loop_id = ? AND snapshot = ?"
        " AND status NOT IN ('cancelled', 'error') ORDER BY seq LIMIT 1",
        (loop_id, snapshot),
        first=True,
    )
    return row[0] if row else None
