"""The ledger at scale: one loop with 100,000 finished experiments, written straight into a real
SQLite database through the store's own migrations (far faster than submitting them over HTTP),
then served by a real `ratchet serve`.

    .venv/bin/python bench/ledger_scale.py [--experiments 100000] [--requests 40]

Prints p50/p95 of the loop summary, the first and a deep page of the experiment list, and the
full `results.tsv`, each next to a bare `SELECT` of the same rows through sqlite3 in the same run;
and the service's start-up time (process start to /readyz answering 200) with that database next
to the same with an empty one.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import httpx

from service.models import LoopConfig
from service.state import enqueue
from service.state.snapshots import SnapshotStore
from service.state.store import Store

ROOT = Path(__file__).resolve().parent.parent
STATUSES = ["discard"] * 85 + ["crash"] * 10 + ["timeout"] * 3 + ["keep"] * 2


async def populate(data_dir: Path, n: int) -> str:
    """A loop with `n` finished experiments in finishing order; returns the loop id."""
    store = Store(data_dir / "ratchet.db")
    await store.open()
    try:
        snaps = SnapshotStore(data_dir / "blobs")
        root = snaps.put_tree({"train.py": b"print('---')\nprint('val_bpb: 1.0')\n"})
        config = LoopConfig(name="big", command=["python3", "train.py"], editable=["train.py"])
        loop_id, baseline = await enqueue.create_loop(store, config, root.id, root.encode())
        rng = random.Random(7)
        now = time.time()
        rows = []
        for i in range(2, n + 1):
            status = rng.choice(STATUSES)
            metric = None if status in ("crash", "timeout") else 1.0 - i * 1e-6 + rng.random() * 0.01
            rows.append(
                (
                    enqueue.new_id(), loop_id, i, "candidate", f"try #{i}: lr {rng.random():.4f}",
                    root.id, root.id, "--- a/train.py\n+++ b/train.py\n", status, "judged",
                    metric, f'{{"val_bpb": {metric or 0.0}}}', 12.5, 0, now + i, now + i, now + i + 1,
                    i, 300.0, "val_bpb: 1.0\n",
                )
            )  # fmt: skip
        async with store.tx() as db:
            await db.execute(
                "UPDATE experiments SET status = 'keep', metric = 1.0, finish_seq = 1, finished_at = ?"
                " WHERE id = ?",
                (now, baseline),
            )
            await db.executemany(
                "INSERT INTO experiments (id, loop_id, seq, kind, description, parent, snapshot, diff,"
                " status, reason, metric, metrics, memory_gb, exit_code, created_at, started_at,"
                " finished_at, finish_seq, workload_seconds, log_tail)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                rows,
            )
            await db.execute(
                "UPDATE loops SET next_seq = ?, finished = ?, baseline = 'ok', best_snapshot = ?,"
                " best_metric = 1.0, best_experiment = ? WHERE id = ?",
                (n + 1, n, root.id, baseline, loop_id),
            )
        return loop_id
    finally:
        await store.close()


def start_server(data_dir: Path, port: int) -> tuple[subprocess.Popen[bytes], float]:
    """A real `ratchet serve`; returns it and the seconds until /readyz answered 200."""
    env = {**os.environ, "RATCHET_INSTANCE": f"bench-ledger-{port}"}
    t0 = time.monotonic()
    log = open(data_dir / "server.log", "ab")  # noqa: SIM115 - owned by the process
    proc = subprocess.Popen(
        [sys.executable, "-m", "service.cli", "serve", "--port", str(port), "--data-dir", str(data_dir),
         "--slots", "1", "--log-level", "warning"],
        cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=log,
    )  # fmt: skip
    with httpx.Client(timeout=5) as client:
        while time.monotonic() - t0 < 60:
            if proc.poll() is not None:
                raise RuntimeError((data_dir / "server.log").read_text())
            try:
                if client.get(f"http://127.0.0.1:{port}/readyz").status_code == 200:
                    return proc, time.monotonic() - t0
            except httpx.TransportError:
                pass
            time.sleep(0.01)
    raise RuntimeError("service not ready in 60 s")


def stop(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    proc.wait(timeout=60)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def timed(fn: Callable[[], object], n: int) -> list[float]:
    """n timings after one warm-up call, whose time is returned first."""
    t0 = time.perf_counter()
    fn()
    out = [time.perf_counter() - t0]
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--experiments", type=int, default=100_000)
    ap.add_argument("--requests", type=int, default=40)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="ratchet-ledger-") as tmp:
        big, empty = Path(tmp) / "big", Path(tmp) / "empty"
        t0 = time.monotonic()
        loop_id = asyncio.run(populate(big, args.experiments))
        print(f"populated {args.experiments} experiments in {time.monotonic() - t0:.1f} s")
        times: dict[str, list[float]] = {"empty": [], "big": []}
        empty.mkdir()
        for _ in range(3):  # alternating, so neither pays alone for a cold page cache
            for name, d in (("empty", empty), ("big", big)):
                proc, started = start_server(d, free_port())
                times[name].append(started)
                stop(proc)
        starts = {name: statistics.median(t) for name, t in times.items()}
        port = free_port()
        proc, _ = start_server(big, port)
        try:
            measure(big / "ratchet.db", f"http://127.0.0.1:{port}", loop_id, args, starts)
        finally:
            stop(proc)


def measure(db: Path, url: str, loop_id: str, args: argparse.Namespace, starts: dict[str, float]) -> None:
    n = args.requests
    con = sqlite3.connect(db)
    client = httpx.Client(base_url=url, timeout=60)
    deep = args.experiments - 200

    def sql(q: str, *a: object) -> Callable[[], object]:
        return lambda: con.execute(q, a).fetchall()

    def get(path: str) -> Callable[[], object]:
        def call() -> int:
            r = client.get(path)
            r.raise_for_status()
            return len(r.content)

        return call

    ledger_sql = (
        "SELECT snapshot, status, metric, memory_gb, description FROM experiments"
        " WHERE loop_id = ? AND finish_seq IS NOT NULL ORDER BY finish_seq"
    )
    page_sql = "SELECT * FROM experiments WHERE loop_id = ? AND seq > ? ORDER BY seq LIMIT 100"
    cases = [
        ("GET /v1/loops/{id}", get(f"/v1/loops/{loop_id}"),
         sql("SELECT status, COUNT(*) FROM experiments WHERE loop_id = ? GROUP BY status", loop_id)),
        ("GET experiments (first page)", get(f"/v1/loops/{loop_id}/experiments?limit=100"),
         sql(page_sql, loop_id, 0)),
        ("GET experiments (deep page)", get(f"/v1/loops/{loop_id}/experiments?limit=100&after={deep}"),
         sql(page_sql, loop_id, deep)),
        ("GET experiments?status=keep", get(f"/v1/loops/{loop_id}/experiments?limit=100&status=keep"),
         sql(page_sql.replace("seq > ?", "seq > ? AND status = 'keep'"), loop_id, 0)),
        ("GET results.tsv (all rows)", get(f"/v1/loops/{loop_id}/results.tsv"), sql(ledger_sql, loop_id)),
    ]  # fmt: skip
    rows = len(con.execute(ledger_sql, (loop_id,)).fetchall())
    print(f"{args.experiments} experiments in one loop, {rows} ledger rows; {n} requests each, sequential")
    print(f"{'endpoint':<32}{'p50 ms':>9}{'p95 ms':>9}{'bare SELECT p50 ms':>20}{'x SELECT':>10}")
    first = {}
    for name, http_call, sql_call in cases:
        (first[name], *h), (_, *s) = timed(http_call, n), timed(sql_call, n)
        hm, sm = statistics.median(h), statistics.median(s)
        print(f"{name:<32}{hm * 1e3:>9.1f}{pct(h, 0.95) * 1e3:>9.1f}{sm * 1e3:>20.1f}{hm / sm:>10.2f}")
    cold = first["GET results.tsv (all rows)"]
    print(f"{'results.tsv, first after start':<32}{cold * 1e3:>9.1f}{'':>9}{'':>20}{cold / sm:>10.2f}")
    empty, big = starts["empty"], starts["big"]
    print(f"{'start-up, empty database (p50)':<32}{empty * 1e3:>9.0f}")
    print(f"{'start-up, this database (p50)':<32}{big * 1e3:>9.0f}{'':>29}{big / empty:>10.2f}")
    client.close()
    con.close()


if __name__ == "__main__":
    main()
