"""examples/gpt in real ratchet/torch containers, on a CPU.

prepare.py builds the dataset inside the image (uid 1000, read-only root, no network); train.py then
runs through the sandbox with its real hardening, the dataset mounted read-only where an unmodified
`~/.cache/ratchet-gpt` finds it, and the candidate edits come out in the order they must: the
improving one below the baseline, the worsening one above, by margins far wider than the noise of a
loaded machine (see examples/gpt/candidates/README.md).
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
from conftest import ROOT, leftovers

from sandbox import FileEntry, Limits, Mount, RunResult, RunSpec, Sandbox

pytestmark = pytest.mark.docker

TORCH_IMAGE = "ratchet/torch:latest"
EXAMPLE = ROOT / "examples" / "gpt"
DATA_TARGET = "/home/sandbox/.cache/ratchet-gpt"
BUDGET_S = 15


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


@pytest.fixture(scope="module")
def runs(dataset: dict, docker_client: docker.DockerClient) -> dict[str, RunResult]:
    """The baseline and both candidates, one after another, as the service would run them."""
    instance = f"test-gpt-{uuid.uuid4().hex[:8]}"
    sbx = Sandbox(docker_client, instance=instance)
    results = {}
    try:
        for name in (None, "better_lr", "worse_lr"):
            spec = RunSpec(
                image=TORCH_IMAGE,
                argv=["python3", "train.py"],
                files=[
                    FileEntry(path="train.py", data=_patched(name).encode(), writable=True),
                    FileEntry(path="prepare.py", data=(EXAMPLE / "prepare.py").read_bytes()),
                ],
                env={"RATCHET_TIME_BUDGET_S": str(BUDGET_S)},
                mounts=[Mount(source=str(dataset["dir"]), target=DATA_TARGET)],
                limits=Limits(cpus=1.0, memory_mb=2048, pids=128, disk_mb=64, tmp_mb=256),
                timeout_s=BUDGET_S + 90,
                labels={"ratchet.test": instance},
            )
            results[name or "baseline"] = sbx.run(spec)
        yield results
    finally:
        sbx.remove_labelled({"ratchet.test": instance})
    assert leftovers(docker_client, f"ratchet.test={instance}") == []


def test_train_reads_the_mounted_dataset_and_reports(runs: dict[str, RunResult]) -> None:
    base = runs["baseline"]
    assert base.exit_code == 0 and not base.timed_out, base.log[-3000:]
    s = summary(base.log)
    assert math.isfinite(s["val_bpb"]) and 1.0 < s["val_bpb"] < 4.0, s
    assert s["training_seconds"] >= BUDGET_S and s["num_steps"] > 2
    assert s["peak_vram_mb"] > 0 and s["tokens_per_second"] > 0
    assert "device:            cpu" in base.log
    assert "threads: 1" in base.log  # the CPU quota, not the host's cores
    metrics = json.loads(base.output_files["metrics.json"])
    assert metrics["val_bpb"] == pytest.approx(s["val_bpb"], abs=1e-6)


def test_an_obviously_better_edit_wins_and_a_worse_one_loses(runs: dict[str, RunResult]) -> None:
    for name, r in runs.items():
        assert r.exit_code == 0, f"{name}: {r.log[-3000:]}"
    bpb = {name: summary(r.log)["val_bpb"] for name, r in runs.items()}
    steps = {name: summary(r.log)["num_steps"] for name, r in runs.items()}
    assert bpb["better_lr"] < bpb["baseline"] - 0.2, (bpb, steps)
    assert bpb["worse_lr"] > bpb["baseline"] + 0.2, (bpb, steps)


LOOP_BUDGET_S = 20


@pytest.mark.timeout(900)
def test_the_example_loop_through_the_service(dataset: dict, server_factory) -> None:
    """What CI runs: examples/gpt as a loop of a real service on a CPU, its dataset declared by the
    operator and named by the loop, the baseline and both candidates judged by the service.
    One slot, so the three runs do not share the CPU (the candidates are prepared behind it)."""
    from client import loop_body_from_dir

    srv = server_factory(slots=1, env={"RATCHET_DATASETS": f"gpt-data={dataset['dir']}"})
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
    ids = {}
    for name in ("better_lr", "worse_lr"):  # queued at once: they wait for the baseline
        cand = EXAMPLE / "candidates"
        r = srv.client.post(
            f"/v1/loops/{loop_id}/experiments",
            json={
                "description": (cand / f"{name}.txt").read_text().strip(),
                "patch": (cand / f"{name}.patch").read_text(),
            },
        )
        assert r.status_code == 202, r.text
        ids[name] = r.json()["id"]
    srv.wait_idle(loop_id, timeout=800)
    exps = {e["description"]: e for e in srv.client.get(f"/v1/loops/{loop_id}/experiments").json()["items"]}
    base = next(e for e in exps.values() if e["kind"] == "baseline")
    better = srv.client.get(f"/v1/experiments/{ids['better_lr']}").json()
    worse = srv.client.get(f"/v1/experiments/{ids['worse_lr']}").json()
    verdicts = {n: (e["status"], e["metric"], e["metrics"].get("num_steps")) for n, e in
                (("baseline", base), ("better_lr", better), ("worse_lr", worse))}  # fmt: skip
    assert base["status"] == "keep", (verdicts, base["log_tail"])
    assert better["status"] == "keep" and better["metric"] < base["metric"] - 0.2, verdicts
    assert worse["status"] == "discard" and worse["metric"] > base["metric"] + 0.2, verdicts
    assert base["metrics"]["training_seconds"] >= LOOP_BUDGET_S and base["metrics"]["num_steps"] > 2
    loop = srv.client.get(f"/v1/loops/{loop_id}").json()
    assert loop["best_experiment"] == better["id"]
    ledger = srv.client.get(f"/v1/loops/{loop_id}/results.tsv").text.splitlines()
    assert [line.split("\t")[3] for line in ledger[1:]] == ["keep", "keep", "discard"]
    print(f"\nexamples/gpt through the service (budget {LOOP_BUDGET_S} s, 1 CPU): {verdicts}")
