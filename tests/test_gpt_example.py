"""examples/gpt in real ratchet/torch containers, on a CPU.

prepare.py builds the dataset inside the image (uid 1000, read-only root, no network); the loop then
runs through a real service: the dataset declared by the operator and mounted read-only where an
unmodified `~/.cache/ratchet-gpt` finds it, and the candidate edits judged as they must be: the
improving one kept, the worsening one discarded, by margins far wider than the noise of a loaded
machine (see examples/gpt/candidates/README.md).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import tempfile
import uuid
from pathlib import Path

import docker
import pytest
from conftest import ROOT, Server, leftovers, settled_leftovers

pytestmark = pytest.mark.docker

TORCH_IMAGE = "ratchet/torch:latest"
EXAMPLE = ROOT / "examples" / "gpt"
DATA_TARGET = "/home/sandbox/.cache/ratchet-gpt"


@pytest.fixture(scope="module")
def torch_image(docker_client: docker.DockerClient) -> str:
    try:
        docker_client.images.get(TORCH_IMAGE)
    except docker.errors.ImageNotFound:
        msg = f"image {TORCH_IMAGE} missing (build it with `images/build.sh torch`)"
        if os.environ.get("RATCHET_REQUIRE_ENGINE") == "1":
            pytest.fail(msg)
        pytest.skip(msg)
    return TORCH_IMAGE


def _prepare(client: docker.DockerClient, out: Path, label: str) -> str:
    """prepare.py in the image, as the sandbox user, writing only to `out`; returns its output."""
    return client.containers.run(
        TORCH_IMAGE,
        ["python3", "/examples/gpt/prepare.py", "--data-dir", "/out/gpt-data"],
        user="1000:1000",
        network_mode="none",
        read_only=True,
        cap_drop=["ALL"],
        security_opt=["no-new-privileges"],
        tmpfs={"/tmp": "size=64m"},
        volumes={
            str(EXAMPLE.parent): {"bind": "/examples", "mode": "ro"},
            str(out): {"bind": "/out", "mode": "rw"},
        },
        labels={"ratchet.test": label},
        remove=True,
        stdout=True,
        stderr=True,
    ).decode()


@pytest.fixture(scope="module")
def dataset(torch_image: str, docker_client: docker.DockerClient) -> dict:
    label = f"gpt-{uuid.uuid4().hex[:8]}"
    with tempfile.TemporaryDirectory(prefix="gpt-data-") as tmp:
        out = Path(tmp)
        out.chmod(0o777)  # the container writes as uid 1000
        first = _prepare(docker_client, out, label)
        again = _prepare(docker_client, out, label)
        yield {"dir": out / "gpt-data", "first": first, "again": again}
        # files written by uid 1000: remove them as that user, then the directory is ours again
        docker_client.containers.run(
            TORCH_IMAGE,
            ["rm", "-rf", "/out/gpt-data"],
            user="1000:1000",
            network_mode="none",
            volumes={str(out): {"bind": "/out", "mode": "rw"}},
            labels={"ratchet.test": label},
            remove=True,
        )
    assert leftovers(docker_client, f"ratchet.test={label}") == []


def test_prepare_builds_the_dataset_once(dataset: dict) -> None:
    data: Path = dataset["dir"]
    meta = json.loads((data / "meta.json").read_text())
    assert meta["vocab_size"] == 1024
    assert meta["train_tokens"] > 100_000 and meta["val_tokens"] > 16_384
    for name, sha in meta["files"].items():
        digest = subprocess.run(["sha256sum", str(data / name)], capture_output=True, text=True, check=True)
        assert digest.stdout.split()[0] == sha, name
    assert (data / "train.bin").stat().st_size == 2 * meta["train_tokens"]
    assert "tokenizer: 1024 tokens" in dataset["first"], dataset["first"]
    assert "already prepared" in dataset["again"], dataset["again"]


def _patched(name: str | None) -> str:
    source = (EXAMPLE / "train.py").read_text()
    if name is None:
        return source
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "train.py").write_text(source)
        out = subprocess.run(
            ["patch", "-p1", "--fuzz=0", "-i", str(EXAMPLE / "candidates" / f"{name}.patch")],
            cwd=tmp,
            check=True,
            capture_output=True,
            text=True,
        ).stdout
        # exactly where it says: a service applying it strictly must agree
        assert "offset" not in out and "fuzz" not in out, out
        return (Path(tmp) / "train.py").read_text()


def summary(log: str) -> dict[str, float]:
    """The last `---` block's numeric `key: value` pairs."""
    block = log.rsplit("\n---\n", 1)[-1]
    out = {}
    for line in block.splitlines():
        key, _, value = line.partition(":")
        try:
            out[key.strip()] = float(value)
        except ValueError:
            continue
    return out


LOOP_BUDGET_S = 20


@pytest.fixture(scope="module")
def loop_run(
    dataset: dict, docker_client: docker.DockerClient, tmp_path_factory: pytest.TempPathFactory
) -> dict:
    """What CI runs: examples/gpt as a loop of a real service on a CPU, its dataset declared by the
    operator (`--dataset gpt-data=DIR`) and named by the loop, the baseline and both candidate
    patches judged by the service. One slot, so the three runs do not share the CPU (the next one
    is prepared behind its gate meanwhile)."""
    from client import loop_body_from_dir

    env = {"RATCHET_DATASETS": f"gpt-data={dataset['dir']}"}
    srv = Server(tmp_path_factory.mktemp("gpt-loop"), slots=1, env=env).start()
    try:
        body = loop_body_from_dir(
            EXAMPLE,
            time_budget_s=LOOP_BUDGET_S,
            timeout_s=LOOP_BUDGET_S + 120,
            resources={"gpus": 0, "cpus": 1, "memory_mb": 2048, "pids": 256},
        )
        assert sorted(body["workspace"]["files"]) == ["prepare.py", "program.md", "train.py"]
        assert body["datasets"] == [{"name": "gpt-data", "target": DATA_TARGET}]
        r = srv.client.post("/v1/loops", json=body)
        assert r.status_code == 201, r.text
        loop_id = r.json()["id"]
        ids = {"baseline": srv.client.get(f"/v1/loops/{loop_id}/experiments").json()["items"][0]["id"]}
        for name in ("better_lr", "worse_lr"):  # queued at once: they wait for the baseline
            cand = EXAMPLE / "candidates"
            description = (cand / f"{name}.txt").read_text().strip()
            r = srv.client.post(
                f"/v1/loops/{loop_id}/experiments",
                json={"description": description, "patch": (cand / f"{name}.patch").read_text()},
            )
            assert r.status_code == 202, r.text
            ids[name] = r.json()["id"]
        srv.wait_idle(loop_id, timeout=800)
        exps = {name: srv.client.get(f"/v1/experiments/{i}").json() for name, i in ids.items()}
        yield {
            "exps": exps,
            "log": srv.client.get(f"/v1/experiments/{ids['baseline']}/logs").text,
            "loop": srv.client.get(f"/v1/loops/{loop_id}").json(),
            "ledger": srv.client.get(f"/v1/loops/{loop_id}/results.tsv").text,
        }
    finally:
        srv.stop()
    assert settled_leftovers(docker_client, f"ratchet.sandbox={srv.instance}") == []


def test_train_reads_the_mounted_dataset_and_reports(loop_run: dict) -> None:
    base, log = loop_run["exps"]["baseline"], loop_run["log"]
    assert base["status"] == "keep", log[-3000:]
    s = summary(log)
    assert math.isfinite(s["val_bpb"]) and 1.0 < s["val_bpb"] < 4.0, s
    assert s["training_seconds"] >= LOOP_BUDGET_S and s["num_steps"] > 2
    assert s["peak_vram_mb"] > 0 and s["tokens_per_second"] > 0
    assert "device:            cpu" in log
    assert "threads: 1" in log  # the CPU quota, not the host's cores
    # the service took the metric from metrics.json, which agrees with the printed summary
    assert base["metric"] == pytest.approx(s["val_bpb"], abs=1e-6)
    assert base["memory_gb"] == pytest.approx(s["peak_vram_mb"] / 1024, abs=0.01)


def test_candidates_apply_exactly() -> None:
    for name in ("better_lr", "worse_lr"):
        assert _patched(name) != _patched(None)


def test_an_obviously_better_edit_wins_and_a_worse_one_loses(loop_run: dict) -> None:
    exps = loop_run["exps"]
    base, better, worse = exps["baseline"], exps["better_lr"], exps["worse_lr"]
    verdicts = {n: (e["status"], e["metric"], e["metrics"].get("num_steps")) for n, e in exps.items()}
    print(f"\nexamples/gpt through the service (budget {LOOP_BUDGET_S} s, 1 CPU): {verdicts}")
    assert better["status"] == "keep" and better["metric"] < base["metric"] - 0.2, verdicts
    assert worse["status"] == "discard" and worse["metric"] > base["metric"] + 0.2, verdicts
    assert loop_run["loop"]["best_experiment"] == better["id"]
    rows = loop_run["ledger"].splitlines()[1:]
    assert [row.split("\t")[3] for row in rows] == ["keep", "keep", "discard"]
