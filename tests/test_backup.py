"""Backup and restore against a real service under load: candidates are submitted and run (2 slots,
real containers) while `ratchet backup` copies the data dir; the copy is restored into a fresh data
dir and a second real service started on it must show the same ledger (byte for byte, for what had
finished), the same snapshots (identical archives) and the same logs, pass its start-up check, and
run the experiments that were running or queued at backup time once resumed."""

from __future__ import annotations

import json
import os
import random
import shutil
import sqlite3
import subprocess
import sys
import threading
import time

from conftest import ROOT
from test_api import HARNESS, TRAIN, make_loop

from service.state.backup import MANIFEST_NAME


def _files(value: str, sleep: float) -> dict[str, str]:
    return {"train.py": TRAIN.replace("V = 1.0", f"V = {value}").replace("SLEEP = 0.0", f"SLEEP = {sleep}")}


def ratchet(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("RATCHET_")}
    return subprocess.run(
        [sys.executable, "-m", "service.cli", *args],
        cwd=ROOT,
        env={**environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=300,
    )


class Load:
    """Submits candidates to a loop until stopped: keeps, discards and crashes, some of them slow,
    so experiments are always queued and running."""

    def __init__(self, server, loop_id: str, seed: int = 7) -> None:
        self.server, self.loop_id = server, loop_id
        self.rng = random.Random(seed)
        self.stop = threading.Event()
        self.submitted = 0
        self.errors: list[str] = []
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        best = 1.0
        while not self.stop.is_set():
            roll = self.rng.random()
            if roll < 0.15:
                value = "1 / 0"  # a crash
            elif roll < 0.5:
                best -= 0.01
                value = f"{best:.4f}"  # may be kept, if it finishes after the one it beats
            else:
                value = f"{best + 0.05 + self.rng.random() / 10:.4f}"
            sleep = self.rng.choice([0.0, 0.5, 2.0, 4.0])
            files = _files(value, sleep)
            files["train.py"] += f"# try {self.submitted + 1}\n"  # a repeat would be a duplicate, not a run
            body = {"description": f"try {self.submitted + 1}: V={value}", "files": files}
            r = self.server.client.post(f"/v1/loops/{self.loop_id}/experiments", json=body)
            if r.status_code != 202:
                self.errors.append(r.text)
            self.submitted += 1
            self.stop.wait(0.3)

    def __enter__(self) -> Load:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(30)


def _ledger_rows(server, loop_id: str) -> list[str]:
    return server.client.get(f"/v1/loops/{loop_id}/results.tsv").text.splitlines()


def _wait_rows(server, loop_id: str, n: int, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while len(_ledger_rows(server, loop_id)) - 1 < n:
        assert time.monotonic() < deadline, f"under {n} results after {timeout} s:\n{server.log()[-3000:]}"
        time.sleep(0.5)


def _experiments(server, loop_id: str) -> dict[str, dict]:
    items = server.client.get(f"/v1/loops/{loop_id}/experiments", params={"limit": 1000}).json()["items"]
    return {x["id"]: x for x in items}


def test_backup_under_load_restores_the_same_ledger_and_snapshots(server_factory, tmp_path):
    original = server_factory(slots=2, name="original")
    body = {
        "name": "busy",
        "workspace": {"files": {"train.py": TRAIN, "prepare.py": HARNESS}},
        "editable": ["train.py"],
        "time_budget_s": 10,
        "timeout_s": 30,
        "resources": {"cpus": 0.5, "memory_mb": 256, "pids": 64, "disk_mb": 64},
    }
    r = original.client.post("/v1/loops", json=body)
    assert r.status_code == 201, r.text
    lid = r.json()["id"]
    dest = tmp_path / "backups" / "one"

    with Load(original, lid) as load:
        _wait_rows(original, lid, 8)
        counts = original.client.get(f"/v1/loops/{lid}").json()["counts"]
        assert counts["running"] >= 1 and counts["running"] + counts["queued"] >= 2, counts  # under load
        # no --data-dir: the CLI asks the running service where its data is
        made = ratchet("--url", original.url, "backup", str(dest))
        assert made.returncode == 0, made.stderr
        time.sleep(3)  # the service keeps working after the backup
    assert not load.errors, load.errors[:3]
    assert "database: 1/1" in made.stderr and "blobs:" in made.stderr and "logs:" in made.stderr
    manifest = json.loads((dest / MANIFEST_NAME).read_text())
    assert manifest["counts"]["running"] + manifest["counts"]["queued"] >= 1, manifest["counts"]
    assert "queued again" in made.stdout
    assert not (dest / "instance-id").exists() and not list(dest.glob("ratchet.db-*"))
    assert oct((dest / "ratchet.db").stat().st_mode & 0o777) == "0o600"

    original.wait_idle(lid, timeout=240)
    final_rows = _ledger_rows(original, lid)
    final_experiments = _experiments(original, lid)

    # restore into a fresh data dir, paused: the ledger can be compared before anything runs
    fresh = tmp_path / "restored-srv"  # where server_factory(name=...) keeps its data
    restored_run = ratchet("restore", str(dest), "--data-dir", str(fresh), "--paused")
    assert restored_run.returncode == 0, restored_run.stderr
    assert "start-up check clean" in restored_run.stdout and "1 loop(s) paused" in restored_run.stdout
    # a new instance id at its first start: no claim on the original's containers
    assert not (fresh / "instance-id").exists()
    with sqlite3.connect(fresh / "ratchet.db") as db:
        left_running = db.execute("SELECT COUNT(*) FROM experiments WHERE status = 'running'").fetchone()[0]
        backed_rows = db.execute("SELECT finished FROM loops WHERE id = ?", (lid,)).fetchone()[0]
    assert left_running == 0
    assert backed_rows >= 8

    restored = server_factory(slots=2, name="restored-srv")
    assert "start-up check: database ok" in restored.log()
    rows = _ledger_rows(restored, lid)
    assert len(rows) - 1 == backed_rows
    # byte-identical to what the original shows for the same results (it went on after the backup)
    assert restored.client.get(f"/v1/loops/{lid}/results.tsv").content == (
        "\n".join(final_rows[: backed_rows + 1]) + "\n"
    ).encode()

    # the same snapshots, with the same archives
    snaps = restored.client.get(f"/v1/loops/{lid}/snapshots").json()
    original_snaps = {s["id"]: s for s in original.client.get(f"/v1/loops/{lid}/snapshots").json()}
    assert snaps and all(s["id"] in original_snaps for s in snaps)
    for snap in snaps:
        mine = restored.client.get(f"/v1/snapshots/{snap['id']}/archive").content
        theirs = original.client.get(f"/v1/snapshots/{snap['id']}/archive").content
        assert mine == theirs, snap["id"]
    loop = restored.client.get(f"/v1/loops/{lid}").json()
    assert loop["state"] == "paused"

    # finished experiments have their logs; those running at backup time are queued again
    mine = _experiments(restored, lid)
    requeued = [x for x in mine.values() if x["status"] == "queued"]
    assert requeued, "nothing was queued or running at backup time"
    for exp in mine.values():
        if exp["status"] in ("keep", "discard", "crash", "timeout"):
            assert exp["status"] == final_experiments[exp["id"]]["status"]
            log = restored.client.get(f"/v1/experiments/{exp['id']}/logs").content
            assert log and log == original.client.get(f"/v1/experiments/{exp['id']}/logs").content

    # resumed, it runs them: each once more, to a verdict
    assert restored.client.post(f"/v1/loops/{lid}/resume").status_code == 200
    restored.wait_idle(lid, timeout=240)
    after = _experiments(restored, lid)
    assert all(after[x["id"]]["status"] in ("keep", "discard", "crash", "timeout") for x in requeued)
    assert len(_ledger_rows(restored, lid)) - 1 == backed_rows + len(requeued)


def test_restore_refuses_a_used_data_dir_and_a_damaged_backup(server, tmp_path):
    lid = make_loop(server, name="small")["id"]
    server.wait_idle(lid)
    dest = tmp_path / "b"
    made = ratchet("backup", str(dest), "--data-dir", str(server.data_dir))
    assert made.returncode == 0, made.stderr
    again = ratchet("backup", str(dest), "--data-dir", str(server.data_dir))
    assert again.returncode == 1 and "already exists and is not empty" in again.stderr

    used = tmp_path / "used"
    used.mkdir()
    (used / "something").write_text("x")
    refused = ratchet("restore", str(dest), "--data-dir", str(used))
    assert refused.returncode == 1 and "is not empty" in refused.stderr
    assert sorted(p.name for p in used.iterdir()) == ["something"]

    damaged = tmp_path / "damaged"
    shutil.copytree(dest, damaged)
    blob = next(p for p in (damaged / "blobs").rglob("*") if p.is_file())
    data = bytearray(blob.read_bytes())
    data[len(data) // 2] ^= 0xFF
    blob.write_bytes(bytes(data))
    target = tmp_path / "from-damaged"
    bad = ratchet("restore", str(damaged), "--data-dir", str(target))
    assert bad.returncode == 1 and "is damaged" in bad.stderr
    assert blob.relative_to(damaged).as_posix() in bad.stderr
    assert not target.exists() and not list(tmp_path.glob(".from-damaged*"))

    (damaged / MANIFEST_NAME).unlink()
    assert "not a Ratchet backup" in ratchet("restore", str(damaged), "--data-dir", str(target)).stderr
    nowhere = ratchet("backup", str(tmp_path / "c"), "--data-dir", str(tmp_path / "nothing-here"))
    assert nowhere.returncode == 1 and "not a Ratchet data dir" in nowhere.stderr


def test_backup_refuses_a_data_dir_missing_a_blob(server, tmp_path):
    lid = make_loop(server, name="gone")["id"]
    server.wait_idle(lid)
    victim = next(p for p in (server.data_dir / "blobs").rglob("*") if p.is_file())
    victim.unlink()
    out = ratchet("backup", str(tmp_path / "b"), "--data-dir", str(server.data_dir))
    assert out.returncode == 1 and "is missing" in out.stderr and "damaged" in out.stderr
    assert not (tmp_path / "b").exists() and not list(tmp_path.glob(".b.partial*"))


def test_backup_copies_only_what_the_database_points_at(tmp_path):
    """An orphan blob (written for a candidate that was then refused) and a stray log stay behind."""
    import asyncio

    from service.models import LoopConfig
    from service.state.backup import backup
    from service.state.enqueue import create_loop
    from service.state.snapshots import SnapshotStore
    from service.state.store import Store

    data = tmp_path / "data"
    snapshots = SnapshotStore(data / "blobs")
    lines = [f"W{n} = {random.Random(n).random()!r}\n".encode() for n in range(400)]
    root = snapshots.put_tree({"train.py": b"".join(lines), "prepare.py": b"H = 2\n"})
    edited = b"".join(lines[:-1]) + b"W399 = 0.5\n"
    child = snapshots.put_tree({"train.py": edited, "prepare.py": b"H = 2\n"}, parent=root)
    orphan = snapshots.put_blob(b"never pointed at\n")

    async def make() -> None:
        store = Store(data / "ratchet.db")
        await store.open()
        try:
            await create_loop(store, LoopConfig(name="x"), child.id, child.encode())
        finally:
            await store.close()

    asyncio.run(make())
    (data / "logs").mkdir()
    (data / "logs" / "0000000000000000.log").write_text("stray\n")
    made = backup(data, tmp_path / "b")
    names = {f.path for f in made.files}
    delta = next(e.blob for e in child.files if e.path == "train.py")
    base = next(e.blob for e in root.files if e.path == "train.py")
    assert snapshots.depth(delta) == 1  # stored as a delta against the root's version...
    assert f"blobs/{base[:2]}/{base[2:]}" in names  # ...whose base is copied though no row names it
    assert f"blobs/{orphan[:2]}/{orphan[2:]}" not in names
    assert not any(n.startswith("logs/") for n in names)
