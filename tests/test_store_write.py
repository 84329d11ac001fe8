"""The store's group-commit write path on a real SQLite file: concurrent submissions are committed
together, each in its own savepoint, so a refused one rolls back alone and the rest stand."""

from __future__ import annotations

import asyncio
import sqlite3

import pytest

from service.models import LoopConfig
from service.state import enqueue
from service.state.snapshots import SnapshotStore
from service.state.store import Store


async def test_concurrent_submissions_commit_together_and_a_refusal_rolls_back_alone(tmp_path):
    store = Store(tmp_path / "ratchet.db")
    await store.open()
    groups: list[int] = []
    commit_group = store._commit_group

    def counting(fns, *rest):  # observes how many writes each commit carried
        groups.append(len(fns))
        return commit_group(fns, *rest)

    try:
        snaps = SnapshotStore(tmp_path / "blobs")
        root = snaps.put_tree({"train.py": b"V = 1\n"})
        open_loop, _ = await enqueue.create_loop(store, LoopConfig(name="open"), root.id, root.encode())
        full = LoopConfig(name="full", max_experiments=1)
        full_loop, _ = await enqueue.create_loop(store, full, root.id, root.encode())
        store._commit_group = counting  # type: ignore[method-assign]
        # none equal to the root: a candidate that already ran would be answered as a duplicate
        children = [snaps.put_tree({"train.py": f"V = {i + 100}\n".encode()}) for i in range(40)]

        async def submit(loop_id: str, i: int) -> str:
            child = children[i]
            return await enqueue.submit(store, loop_id, f"c{i}", root.id, child.id, child.encode(), "")

        calls = [submit(open_loop, i) for i in range(39)] + [submit(full_loop, 39)]
        results = await asyncio.gather(*calls, return_exceptions=True)
        assert isinstance(results[-1], enqueue.Conflict) and "max_experiments" in str(results[-1])
        assert all(isinstance(r, str) for r in results[:-1])
        assert max(groups) > 1  # writes that arrived together were committed together
        assert sum(groups) == 40
        with sqlite3.connect(tmp_path / "ratchet.db") as con:
            rows = con.execute(
                "SELECT seq, id FROM experiments WHERE loop_id = ? AND kind = 'candidate' ORDER BY seq",
                (open_loop,),
            ).fetchall()
            assert sorted(r[1] for r in rows) == sorted(results[:-1])
            assert [r[0] for r in rows] == list(range(2, 41))  # numbers stay dense and unique
            known = {r[0] for r in con.execute("SELECT id FROM snapshots")}
            assert children[39].id not in known  # the refused one left nothing behind
            assert {c.id for c in children[:39]} <= known
        view = await store.get_loop(open_loop)
        assert view is not None and view.counts["queued"] == 40
    finally:
        await store.close()


async def test_a_failed_group_commit_fails_every_write_in_it(tmp_path):
    store = Store(tmp_path / "ratchet.db")
    await store.open()
    try:
        await store.write(lambda db: db.execute("CREATE TABLE t (x INTEGER CHECK (x > 0))"))

        def deferred_violation(db: sqlite3.Connection) -> None:
            db.execute("PRAGMA defer_foreign_keys = ON")
            db.execute(
                "INSERT INTO experiments (id, loop_id, seq, kind, description, snapshot, status, created_at)"
                " VALUES ('e', 'no-such-loop', 1, 'candidate', 'x', 's', 'queued', 0)"
            )

        good = store.write(lambda db: db.execute("INSERT INTO t VALUES (1)").rowcount)
        bad = store.write(deferred_violation)
        results = await asyncio.gather(good, bad, return_exceptions=True)
        assert all(isinstance(r, sqlite3.IntegrityError) for r in results), results
        assert await store.write(lambda db: db.execute("SELECT COUNT(*) FROM t").fetchone()[0]) == 0
        with pytest.raises(sqlite3.IntegrityError):
            await store.write(lambda db: db.execute("INSERT INTO t VALUES (0)"))
    finally:
        await store.close()
