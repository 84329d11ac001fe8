"""History as a git bundle and re-runs, over real HTTP, real containers and the real git CLI."""

from __future__ import annotations

import base64
import io
import os
import subprocess
import sys
import tarfile
from pathlib import Path

from test_api import HARNESS, TRAIN, make_loop, submit

SEEDED = TRAIN + "print('seed', os.environ.get('RATCHET_SEED'))\n"
TOOL = "#!/bin/sh\necho tool\n"


def _workspace() -> dict:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for path, text, mode in (
            ("train.py", SEEDED, 0o644),
            ("prepare.py", HARNESS, 0o644),
            ("tools/run.sh", TOOL, 0o755),
        ):
            data = text.encode()
            info = tarfile.TarInfo(path)
            info.size, info.mode = len(data), mode
            tar.addfile(info, io.BytesIO(data))
    return {"archive": base64.b64encode(buf.getvalue()).decode()}


def _v(value: str) -> dict[str, str]:
    return {"train.py": SEEDED.replace("V = 1.0", f"V = {value}")}


def _git(*args: str, cwd: Path | None = None) -> str:
    env = {**os.environ, "GIT_CONFIG_NOSYSTEM": "1", "GIT_CONFIG_GLOBAL": os.devnull}
    done = subprocess.run(["git", *args], cwd=cwd, env=env, capture_output=True, text=True, check=False)
    assert done.returncode == 0, (args, done.stderr)
    return done.stdout


def _submit(srv, lid: str, description: str, **body) -> dict:
    return srv.wait_final(submit(srv, lid, description, **body)["id"])


def _archived(srv, snapshot: str, path: str) -> bytes:
    r = srv.client.get(f"/v1/snapshots/{snapshot}/archive")
    assert r.status_code == 200
    with tarfile.open(fileobj=io.BytesIO(r.content), mode="r:gz") as tar:
        member = tar.extractfile(path)
        assert member is not None
        return member.read()


def test_history_bundle_and_rerun(server, tmp_path: Path):
    loop = make_loop(server, name="hist", workspace=_workspace())
    lid = loop["id"]
    base = server.wait_final(server.client.get(f"/v1/loops/{lid}/experiments").json()["items"][0]["id"])
    assert base["status"] == "keep"
    keep1 = _submit(server, lid, "lower V", files=_v("0.9"))
    assert keep1["status"] == "keep", keep1
    discard = _submit(server, lid, "raise V", files=_v("1.5"))
    assert discard["status"] == "discard", discard
    crash = _submit(server, lid, "break it", files=_v("undefined_name"))
    assert crash["status"] == "crash", crash
    keep2 = _submit(server, lid, "lower V again\n\nwith a second paragraph", files=_v("0.8"))
    assert keep2["status"] == "keep", keep2

    r = server.client.get(f"/v1/loops/{lid}/history.bundle")
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("application/octet-stream")
    assert 'filename="hist.bundle"' in r.headers["content-disposition"]
    again = server.client.get(f"/v1/loops/{lid}/history.bundle")
    assert again.content == r.content  # deterministic for the same ledger

    bundle = tmp_path / "hist.bundle"
    bundle.write_bytes(r.content)
    clone = tmp_path / "clone"
    _git("clone", "-q", str(bundle), str(clone), "-b", "ratchet/hist")
    assert _git("log", "--format=%s", cwd=clone).splitlines() == ["lower V again", "lower V", "baseline"]
    hashes = _git("log", "--reverse", "--format=%H", cwd=clone).split()
    assert len(hashes) == 3
    assert _git("rev-list", "--max-parents=0", "HEAD", cwd=clone).split() == hashes[:1]
    for commit, exp in zip(hashes, (base, keep1, keep2), strict=True):
        shown = subprocess.run(
            ["git", "show", f"{commit}:train.py"], cwd=clone, capture_output=True, check=True
        ).stdout
        assert shown == _archived(server, exp["snapshot"], "train.py")
        body = _git("log", "-1", "--format=%B", commit, cwd=clone)
        assert body.startswith(exp["description"] + "\n\n"), body
        assert f"val_bpb: {exp['metric']:.6f}" in body.splitlines()
        assert "num_steps: 7.000000" in body.splitlines()
        assert f"experiment: {exp['id']}" in body.splitlines()
        assert f"snapshot: {exp['snapshot']}" in body.splitlines()
        who = _git("log", "-1", "--format=%an <%ae>|%cn <%ce>|%at|%ct", commit, cwd=clone).strip()
        stamp = str(int(exp["finished_at"]))
        assert who == f"Ratchet <ratchet@localhost>|Ratchet <ratchet@localhost>|{stamp}|{stamp}"
        tree = _git("ls-tree", "-r", commit, cwd=clone)
        assert "100755 blob" in next(line for line in tree.splitlines() if line.endswith("tools/run.sh"))
        assert "100644 blob" in next(line for line in tree.splitlines() if line.endswith("\ttrain.py"))
    assert (clone / "tools" / "run.sh").stat().st_mode & 0o111
    assert (clone / "train.py").read_text() == SEEDED.replace("V = 1.0", "V = 0.8")

    # re-run the first keep with a seed: identical snapshot, judged again (0.9 no longer beats 0.8)
    r = server.client.post(f"/v1/experiments/{keep1['id']}/rerun", json={"seed": 7})
    assert r.status_code == 202, r.text
    rerun = r.json()
    assert rerun["rerun_of"] == keep1["id"] and rerun["seed"] == 7
    assert rerun["kind"] == "candidate"
    assert rerun["snapshot"] == keep1["snapshot"] and rerun["parent"] == keep1["parent"]
    assert rerun["description"] == f"rerun of #{keep1['number']}: lower V"
    diffs = [server.client.get(f"/v1/experiments/{x['id']}/diff").text for x in (keep1, rerun)]
    assert diffs[0] == diffs[1] and diffs[0]
    done = server.wait_final(rerun["id"])
    assert done["status"] == "discard", done
    assert done["rerun_of"] == keep1["id"] and done["seed"] == 7
    assert "seed 7" in server.client.get(f"/v1/experiments/{rerun['id']}/logs").text
    # without a body: no seed, the workload sees none
    plain = server.client.post(f"/v1/experiments/{keep2['id']}/rerun")
    assert plain.status_code == 202, plain.text
    plain = server.wait_final(plain.json()["id"])
    assert plain["seed"] is None and plain["rerun_of"] == keep2["id"]
    assert "seed None" in server.client.get(f"/v1/experiments/{plain['id']}/logs").text
    # the history is unchanged by discarded re-runs
    assert server.client.get(f"/v1/loops/{lid}/history.bundle").content == again.content

    # a baseline re-run is a baseline
    r = server.client.post(f"/v1/experiments/{base['id']}/rerun")
    assert r.status_code == 202, r.text
    assert r.json()["kind"] == "baseline" and r.json()["rerun_of"] == base["id"]
    best_before = server.client.get(f"/v1/loops/{lid}").json()["best_experiment"]
    rerun_base = server.wait_final(r.json()["id"])
    # judged like a candidate once a baseline succeeded: it cannot reset the best
    assert rerun_base["status"] == "discard", rerun_base
    assert server.client.get(f"/v1/loops/{lid}").json()["best_experiment"] == best_before

    assert server.client.post("/v1/experiments/0123456789abcdef/rerun").status_code == 404
    r = server.client.post(f"/v1/experiments/{keep1['id']}/rerun", json={"seed": "x"})
    assert r.status_code == 400
    assert server.client.post(f"/v1/loops/{lid}/stop").status_code == 200
    r = server.client.post(f"/v1/experiments/{keep1['id']}/rerun", json={"seed": 1})
    assert r.status_code == 409 and "stopped" in r.json()["detail"]


def test_rerun_refused_at_max_experiments(server):
    loop = make_loop(server, name="full", max_experiments=1)
    server.wait_idle(loop["id"])
    base = server.client.get(f"/v1/loops/{loop['id']}/experiments").json()["items"][0]
    r = server.client.post(f"/v1/experiments/{base['id']}/rerun")
    assert r.status_code == 409 and "max_experiments" in r.json()["detail"]


def test_history_409_before_a_successful_baseline(server):
    loop = make_loop(server, name="nobase", command=["python3", "-c", "raise SystemExit(3)"])
    lid = loop["id"]
    r = server.client.get(f"/v1/loops/{lid}/history.bundle")
    assert r.status_code == 409 and "baseline" in r.json()["detail"]
    loop = server.wait_idle(lid)
    assert loop["baseline"] == "failed"
    r = server.client.get(f"/v1/loops/{lid}/history.bundle")
    assert r.status_code == 409 and "no successful baseline" in r.json()["detail"]
    assert server.client.get("/v1/loops/0123456789abcdef/history.bundle").status_code == 404


def test_history_503_without_git(server_factory):
    srv = server_factory(env={"PATH": "/nonexistent"}, name="nogit")
    loop = srv.wait_idle(make_loop(srv, name="nogit")["id"])
    assert loop["baseline"] == "ok"
    r = srv.client.get(f"/v1/loops/{loop['id']}/history.bundle")
    assert r.status_code == 503 and "git" in r.json()["detail"]


def test_delta_stored_snapshots_read_back_identically(server, tmp_path: Path):
    """Accepted edits are stored as deltas against their parent; the archive, `ratchet pull` and the
    history bundle still give back exactly the workspace that was submitted."""
    padding = "".join(f"# padding line {i}: the rest of a realistic training script\n" for i in range(400))
    big = TRAIN + padding
    loop = make_loop(server, name="deltas", workspace={"files": {"train.py": big, "prepare.py": HARNESS}})
    lid = loop["id"]
    server.wait_idle(lid)
    expected = {loop["root_snapshot"]: big}
    text = big
    for value in ("0.9", "0.8", "0.7"):
        text = text.replace(text.splitlines()[1], f"V = {value}")
        exp = _submit(server, lid, f"V {value}", files={"train.py": text})
        assert exp["status"] == "keep", exp
        expected[exp["snapshot"]] = text
    blobs = server.data_dir / "blobs"
    stored = {p.read_bytes()[:4] for p in blobs.rglob("*") if p.is_file()}
    assert b"RTD1" in stored  # the later versions of train.py really are deltas
    for snapshot, train in expected.items():
        assert _archived(server, snapshot, "train.py") == train.encode()
        assert _archived(server, snapshot, "prepare.py") == HARNESS.encode()

    out = tmp_path / "pulled"
    env = {**os.environ, "RATCHET_URL": server.url}
    cmd = [sys.executable, "-m", "service.cli", "pull", "deltas", str(out)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    assert (out / "train.py").read_text() == text and (out / "prepare.py").read_text() == HARNESS

    bundle = tmp_path / "deltas.bundle"
    bundle.write_bytes(server.client.get(f"/v1/loops/{lid}/history.bundle").content)
    clone = tmp_path / "clone"
    _git("clone", "-q", str(bundle), str(clone), "-b", "ratchet/deltas")
    commits = _git("log", "--reverse", "--format=%H", cwd=clone).split()
    shown = [_git("show", f"{c}:train.py", cwd=clone) for c in commits]
    assert shown == list(expected.values())
