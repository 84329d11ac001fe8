"""A torn or damaged data dir is found at start-up: a real service refuses to start on a truncated
or missing snapshot blob, or a damaged database file, and says what is wrong; put right, it starts."""

from __future__ import annotations

import contextlib
import hashlib
import sqlite3

import pytest
from conftest import Server
from test_api import TRAIN, make_loop


def _blob_file(srv: Server, text: str):
    digest = hashlib.sha256(text.encode()).hexdigest()
    return srv.data_dir / "blobs" / digest[:2] / digest[2:]


def _refused(srv: Server) -> str:
    with pytest.raises(RuntimeError, match="server exited early") as info:
        srv.start()
    assert srv.proc is not None and srv.proc.returncode != 0
    assert "refusing to start" in str(info.value)
    return str(info.value)


@pytest.fixture
def stopped(server_factory) -> tuple[Server, dict[str, str]]:
    """A stopped service whose loop has a root, a kept and a discarded snapshot."""
    srv = server_factory(slots=1, name="data")
    lid = make_loop(srv, name="intact")["id"]
    srv.wait_idle(lid)
    texts = {"keep": TRAIN.replace("V = 1.0", "V = 0.5"), "discard": TRAIN.replace("V = 1.0", "V = 0.9")}
    for status, text in texts.items():
        body = {"description": status, "files": {"train.py": text}}
        r = srv.client.post(f"/v1/loops/{lid}/experiments", json=body)
        assert srv.wait_final(r.json()["id"])["status"] == status
    srv.stop()
    return srv, texts


def test_truncated_blob_of_the_best_snapshot_refuses_the_start(stopped):
    srv, texts = stopped
    blob = _blob_file(srv, texts["keep"])
    intact = blob.read_bytes()
    blob.write_bytes(intact[: len(intact) // 2])  # a torn write
    message = _refused(srv)
    assert f"blob {blob.parent.name}{blob.name}" in message and "train.py" in message
    assert "best of loop intact" in message and "RATCHET_VERIFY_BLOBS" in message
    blob.write_bytes(intact)
    srv.start()
    assert srv.client.get("/readyz").status_code == 200


def test_missing_blob_of_any_snapshot_refuses_the_start(stopped):
    srv, texts = stopped
    blob = _blob_file(srv, texts["discard"])  # neither root nor best: only its presence is checked
    intact = blob.read_bytes()
    blob.unlink()
    assert "is missing" in _refused(srv)
    srv.extra_env["RATCHET_VERIFY_BLOBS"] = "off"  # the documented way to serve anyway
    srv.start()
    srv.stop()
    srv.extra_env.pop("RATCHET_VERIFY_BLOBS")
    blob.write_bytes(intact)
    srv.start()


def test_damaged_database_refuses_the_start(stopped):
    srv, _ = stopped
    db = srv.data_dir / "ratchet.db"
    with sqlite3.connect(db) as conn:
        page_size = conn.execute("PRAGMA page_size").fetchone()[0]
        root = conn.execute("SELECT rootpage FROM sqlite_master WHERE name = 'experiments'").fetchone()[0]
    with open(db, "r+b") as fh:  # overwrite the experiments table's root page, as a torn write would
        fh.seek((root - 1) * page_size)
        fh.write(b"\xa5" * page_size)
    message = _refused(srv)
    assert "database" in message and "damaged" in message


def test_leftover_temporary_blobs_of_a_killed_write_are_swept_at_start(server_factory):
    """A write killed between fsyncing a blob under its temporary name and renaming it leaves the
    temporary file behind (nothing points at it); the next start removes it, and only it."""
    srv = server_factory(slots=1, name="torn", env={"RATCHET_FAULT_POINT": "snapshot.blob_tmp"})
    body = {"description": "new blob", "files": {"train.py": TRAIN.replace("V = 1.0", "V = 0.25")}}
    with contextlib.suppress(Exception):  # the service kills itself while answering
        lid = make_loop(srv, name="torn")["id"]  # its root snapshot's first blob is the torn one
        srv.client.post(f"/v1/loops/{lid}/experiments", json=body)
    assert srv.proc is not None
    srv.proc.wait(timeout=30)
    blobs = srv.data_dir / "blobs"
    torn = list(blobs.glob("*/.*.tmp"))
    assert torn, "the fault point left no temporary blob"
    kept = [p for p in blobs.glob("*/*") if not p.name.startswith(".")]
    srv.extra_env.pop("RATCHET_FAULT_POINT")
    srv.start()
    assert not list(blobs.glob("*/.*.tmp"))
    assert all(p.exists() for p in kept)
    assert f"removed {len(torn)} temporary blob file(s)" in srv.log()
