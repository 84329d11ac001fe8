"""End to end over HTTP on the bundled example: a real NumPy model trained in real containers."""

from __future__ import annotations

import io
import re
import subprocess
import tarfile
import tempfile
from pathlib import Path

from conftest import settled_leftovers

from client import loop_body_from_dir

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "charlm"
CANDIDATES = EXAMPLE / "candidates"
ROW = re.compile(r"^[0-9a-f]{7}\t\d+\.\d{6}\t\d+\.\d\t(keep|discard|crash)\t[^\t\n]*$")


def _one(prefix: str) -> Path:
    found = sorted(CANDIDATES.glob(f"{prefix}*.patch"))
    assert found, f"no candidate {prefix}*.patch in {CANDIDATES}"
    return found[0]


def _patched(patch: Path) -> str:
    """train.py after `patch -p1`, computed with the real patch tool as the reference."""
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "train.py").write_text((EXAMPLE / "train.py").read_text())
        subprocess.run(["patch", "-s", "-p1", "-i", str(patch)], cwd=tmp, check=True)
        return (Path(tmp) / "train.py").read_text()


def test_example_loop_end_to_end(server, docker_client):
    body = loop_body_from_dir(EXAMPLE, name="charlm-e2e", time_budget_s=8, timeout_s=25)
    assert set(body["workspace"]["files"]) >= {"train.py", "prepare.py", "program.md"}
    r = server.client.post("/v1/loops", json=body)
    assert r.status_code == 201, r.text
    loop = r.json()
    lid = loop["id"]
    base = server.client.get(f"/v1/loops/{lid}/experiments").json()["items"][0]
    base = server.wait_final(base["id"], timeout=120)
    assert base["status"] == "keep", base
    assert 0.5 < base["metric"] < 8.0

    # an edit of the read-only harness is refused and stores nothing
    harness = (
        "--- a/prepare.py\n+++ b/prepare.py\n@@ -1 +1 @@\n-"
        + (EXAMPLE / "prepare.py").read_text().splitlines()[0]
        + "\n+# x\n"
    )
    r = server.client.post(f"/v1/loops/{lid}/experiments", json={"description": "harness", "patch": harness})
    assert r.status_code == 422 and "read-only" in r.json()["detail"]

    subs = {}
    for kind in ("better", "worse", "raise", "hang"):
        patch = _one(kind)
        r = server.client.post(
            f"/v1/loops/{lid}/experiments",
            json={"description": f"{kind}: {patch.stem}", "patch": patch.read_text()},
        )
        assert r.status_code == 202, r.text
        subs[kind] = r.json()
    done = {kind: server.wait_final(e["id"], timeout=180) for kind, e in subs.items()}

    assert done["better"]["status"] == "keep", done["better"]
    assert done["better"]["metric"] < base["metric"]
    assert done["worse"]["status"] == "discard", done["worse"]
    assert done["worse"]["metric"] > base["metric"]
    assert done["raise"]["status"] == "crash" and "exited with code" in done["raise"]["reason"]
    assert "Traceback" in server.client.get(f"/v1/experiments/{done['raise']['id']}/logs").text
    assert done["hang"]["status"] == "timeout" and "25 s" in done["hang"]["reason"]
    # removal runs after the verdict, off the critical path: give it the time it takes
    assert settled_leftovers(docker_client, f"ratchet.experiment={subs['hang']['id']}") == []

    loop = server.client.get(f"/v1/loops/{lid}").json()
    assert loop["best_experiment"] == subs["better"]["id"]
    assert loop["best_metric"] == done["better"]["metric"]
    assert loop["counts"] == {
        "queued": 0,
        "running": 0,
        "keep": 2,
        "discard": 1,
        "crash": 1,
        "timeout": 1,
        "cancelled": 0,
        "error": 0,
        "confirming": 0,
        "measured": 0,
    }

    # the ledger, byte for byte in its header and field formats
    tsv = server.client.get(f"/v1/loops/{lid}/results.tsv")
    assert tsv.headers["content-type"].startswith("text/tab-separated-values")
    lines = tsv.text.split("\n")
    assert lines[0] == "commit\tval_bpb\tmemory_gb\tstatus\tdescription"
    assert lines[-1] == ""
    rows = lines[1:-1]
    assert len(rows) == 5 and all(ROW.match(r) for r in rows), rows
    by_desc = {r.split("\t")[4].split(":")[0]: r.split("\t") for r in rows}
    assert by_desc["baseline"][0] == loop["root_snapshot"][:7] and by_desc["baseline"][3] == "keep"
    assert by_desc["baseline"][1] == f"{base['metric']:.6f}"
    assert by_desc["better"][0] == done["better"]["snapshot"][:7]
    assert by_desc["raise"][1:4] == ["0.000000", "0.0", "crash"]
    assert by_desc["hang"][1:4] == ["0.000000", "0.0", "crash"]  # a timeout counts as crash
    assert rows[0].split("\t")[4] == "baseline"  # finishing order: the baseline first

    # the best snapshot's archive holds exactly the kept edit
    snaps = server.client.get(f"/v1/loops/{lid}/snapshots").json()
    assert [s["experiment_id"] for s in snaps] == [subs["better"]["id"], base["id"]]
    archive = server.client.get(f"/v1/snapshots/{loop['best_snapshot']}/archive")
    with tarfile.open(fileobj=io.BytesIO(archive.content), mode="r:gz") as tar:
        train = tar.extractfile("train.py").read().decode()
        assert train == _patched(_one("better"))
        assert tar.extractfile("prepare.py").read().decode() == (EXAMPLE / "prepare.py").read_text()
    diff = server.client.get(f"/v1/experiments/{subs['better']['id']}/diff").text
    assert diff.startswith("--- a/train.py\n+++ b/train.py\n")
