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
            TORCH_IMAGE, ["rm", "-rf", "/out/gpt-data"], user="1000:1000", network_mode="none",
            volumes={str(out): {"bind": "/out", "mode": "rw"}}, labels={"ratchet.test": label}, remove=True,
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
            cwd=tmp, check=True, capture_output=True, text=True,
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
