"""Datasets, caches and `ratchet doctor` on a real Ray cluster: a head and two worker nodes on loopback
(token authentication on) whose engines differ, as two machines' do: w1 runs on the shared engine
(no GPUs, one CPU slot), w2 on the tests' fake-GPU engine (two logical GPUs). Two datasets are
declared: `tokens`, a host directory both engines can mount, and `heldout`, a named volume that
exists only on w1's engine.

- each node's inventory says which datasets its engine can mount; a volume made on w2's engine
  later is seen at the next check, and w2 keeps its slots meanwhile; a run sent to w2 anyway fails
  with the engine's reason;
- a run's cache travels with it: seeded on the node before the gate opens, collected after;
- `ratchet doctor --executor ray` checks every node (engine, runtimes, GPUs per slot with
  `nvidia-smi -L`, images, datasets read as the sandbox user) and names what w2 lacks;
- through the service, a loop naming `heldout` runs only on w1 while w2 is idle, and a loop naming
  a dataset no node has is refused with 422 naming what each node lacks.
"""

from __future__ import annotations

import asyncio
import io
import os
import re
import subprocess
import sys
import tarfile
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path

import docker
import msgspec
import pytest
from conftest import ROOT, SANDBOX_IMAGE, leftovers, settled_leftovers
from fake_gpu_engine import FakeGpuEngine
from test_api import make_loop, submit

from sandbox import Limits, Mount, RunSpec, SpecError

ray = pytest.importorskip("ray", reason="Ray is not installed (pip install -r requirements/ray.txt)")

from service.runs.ray.executor import RayExecutor  # noqa: E402
from service.runs.ray.localcluster import LocalCluster, Worker  # noqa: E402

pytestmark = [pytest.mark.docker, pytest.mark.timeout(600)]


class Data(msgspec.Struct):
    tokens: Path  # a host directory: every engine on this machine can mount it
    heldout: str  # a volume on the shared engine only (w1's)
    absent: str  # a volume on no engine

    def declared(self) -> str:
        """RATCHET_DATASETS."""
        return f"tokens={self.tokens},heldout=volume:{self.heldout},absent=volume:{self.absent}"


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory, docker_client: docker.DockerClient) -> Iterator[Data]:
    tokens = tmp_path_factory.mktemp("tokens")
    (tokens / "v.txt").write_text("0.5\n")
    tokens.chmod(0o755)
    tag = uuid.uuid4().hex[:8]
    heldout = f"ratchet-test-heldout-{tag}"
    docker_client.volumes.create(heldout, labels={"ratchet.test": tag})
    docker_client.containers.run(
        SANDBOX_IMAGE, ["sh", "-c", "echo 0.25 > /v/v.txt"], user="0",
        volumes={heldout: {"bind": "/v", "mode": "rw"}}, network_mode="none", remove=True,
    )  # fmt: skip
    yield Data(tokens=tokens, heldout=heldout, absent=f"ratchet-test-absent-{tag}")
    docker_client.volumes.get(heldout).remove(force=True)


@pytest.fixture(scope="module")
def cluster(fake_gpu_engine: FakeGpuEngine) -> Iterator[LocalCluster]:
    workers = [Worker(name="w1"), Worker(name="w2", gpus=2, docker_host=fake_gpu_engine.docker_host)]
    with LocalCluster(workers) as c:
        yield c


@pytest.fixture
async def executor(cluster: LocalCluster, data: Data) -> AsyncIterator[RayExecutor]:
    instance = f"raydata-{uuid.uuid4().hex[:8]}"
    sources = {"tokens": str(data.tokens), "heldout": data.heldout}
    ex = RayExecutor(
        cluster.address, instance, token_file=cluster.token_path, poll_s=0.5,
        default_image=SANDBOX_IMAGE, datasets=sources, datasets_poll_s=0.5,
    )  # fmt: skip
    await ex.connect(nodes=2)
    yield ex
    await ex.close()


async def _datasets(ex: RayExecutor) -> dict[str, frozenset[str] | None]:
    return {n.name: n.datasets for n in await ex.inventory()}


async def _until(what: str, check: Callable[[], Awaitable[bool]], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not await check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.1)


async def test_each_node_says_which_datasets_its_engine_can_mount(
    executor: RayExecutor, data: Data, fake_gpu_engine: FakeGpuEngine
) -> None:
    assert await _datasets(executor) == {"w1": {"tokens", "heldout"}, "w2": {"tokens"}}
    slots = [(n.name, n.slots, n.gpus) for n in await executor.inventory()]
    # A run sent to w2 anyway (the scheduler does not) fails there, saying why, before anything starts.
    spec = RunSpec(image=SANDBOX_IMAGE, argv=["true"], mounts=[Mount(source=data.heldout, target="/data")])
    with pytest.raises(SpecError, match=f"volume '{data.heldout}' .*does not exist"):
        await executor.prepare(spec, "w2")
    # The data arrives on w2's engine: seen at the next check, with w2's slots as they were.
    volume = fake_gpu_engine.client.volumes.create(data.heldout, labels={"ratchet.test": "heldout"})
    try:

        async def both() -> bool:
            return (await _datasets(executor))["w2"] == {"tokens", "heldout"}

        await _until("w2 to have heldout", both)
        assert [(n.name, n.slots, n.gpus) for n in await executor.inventory()] == slots
    finally:
        volume.remove(force=True)

    async def gone() -> bool:
        return (await _datasets(executor))["w2"] == {"tokens"}

    await _until("w2 to lose heldout", gone)
    # The mount checks leave nothing behind on either engine.
    label = f"ratchet.sandbox={executor.instance}"
    assert leftovers(fake_gpu_engine.client, label) == [] and leftovers(docker.from_env(), label) == []


async def test_a_runs_cache_is_seeded_and_collected_on_its_node(executor: RayExecutor) -> None:
    seed = io.BytesIO()
    with tarfile.open(fileobj=seed, mode="w") as tar:
        folder = tarfile.TarInfo("kernels")
        folder.type, folder.mode = tarfile.DIRTYPE, 0o755
        tar.addfile(folder)
        info = tarfile.TarInfo("kernels/a.so")
        info.size = 3
        tar.addfile(info, io.BytesIO(b"abc"))
    script = 'cat "$RATCHET_CACHE_DIR/kernels/a.so"; echo; echo new > "$RATCHET_CACHE_DIR/kernels/b.so"'
    spec = RunSpec(
        image=SANDBOX_IMAGE,
        argv=["sh", "-c", script],
        limits=Limits(cache_mb=8),
        cache=seed.getvalue(),
        collect_cache=True,
        labels={"ratchet.experiment": "cache"},
    )
    handle = await executor.prepare(spec, "w2")
    try:
        result = await handle.start(on_output=lambda _: None, on_exit=lambda _: None)
    finally:
        await handle.cleanup()
    assert result.exit_code == 0 and result.log.startswith("abc"), result.log
    assert result.cache is not None
    with tarfile.open(fileobj=io.BytesIO(result.cache)) as tar:
        assert sorted(tar.getnames()) == ["kernels", "kernels/a.so", "kernels/b.so"]


def _line(out: str, topic: str) -> str:
    lines = out.splitlines()
    start = next(i for i, text in enumerate(lines) if text[4:].startswith(topic + " "))
    end = next((i for i in range(start + 1, len(lines)) if not lines[i].startswith(" ")), len(lines))
    return "\n".join(lines[start:end])


def test_doctor_checks_every_node_of_the_cluster(
    cluster: LocalCluster, data: Data, fake_gpu_engine: FakeGpuEngine, docker_client: docker.DockerClient
) -> None:
    env = {
        **os.environ,
        "RATCHET_RAY_TOKEN_FILE": cluster.token_path,
        "RATCHET_DATASETS": f"tokens={data.tokens},heldout=volume:{data.heldout}",
        "RATCHET_RUNTIME": "runc",
    }
    argv = [sys.executable, "-m", "service.cli", "doctor", "--executor", "ray"]
    argv += ["--ray-address", cluster.address]
    proc = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1, out
    assert f"can the Ray cluster at {cluster.address} run experiments?" in out
    engine = _line(out, "engine")
    assert engine.startswith("ok  engine     w1: Docker ") and "; w2: Docker " in engine, engine
    runtimes = _line(out, "runtimes")
    assert re.search(r"w1: runc: a sandbox ran \(\d+\.\d s\)", runtimes), runtimes
    assert re.search(r"w2: runc: a sandbox ran \(\d+\.\d s\)", runtimes), runtimes
    assert "w1: none (no GPUs there)" in _line(out, "GPU route")
    gpus = _line(out, "GPUs")
    assert "w1: no GPUs: 1 slot(s) for CPU runs" in gpus and "w2: 2 GPU(s) 0, 1: 2 slot(s) of 1" in gpus, gpus
    assert "slot 0 (GPUs 0) saw: GPU 0: Fake GPU (UUID: GPU-fake-0)" in gpus
    assert "slot 1 (GPUs 1) saw: GPU 0: Fake GPU (UUID: GPU-fake-1)" in gpus
    datasets = _line(out, "datasets")
    assert datasets.startswith("!!") and "go only to the nodes that have all it names" in datasets
    assert f"w1: tokens ({data.tokens}): readable by uid 1000: a directory of 1 entries" in datasets
    assert f"w1: heldout (volume:{data.heldout}): readable by uid 1000: a directory of 1 entries" in datasets
    assert f"w2: tokens ({data.tokens}): readable by uid 1000" in datasets
    lacking = f"volume '{data.heldout}' (to mount at /ratchet-dataset) does not exist"
    assert f"w2: heldout (volume:{data.heldout}): {lacking}" in datasets, datasets
    w1, w2 = _line(out, "nodes").split("w2: ")
    assert "w1: Docker" in w1 and "1 slot(s)" in w1 and "heldout" not in w1
    assert "GPUs 0, 1; 2 slot(s)" in w2 and w2.rstrip().endswith("heldout"), w2
    for client in (docker_client, fake_gpu_engine.client):
        assert [c for c in client.api.containers(all=True, filters={"label": "ratchet.phase=doctor"})
                if c["Labels"].get("ratchet.sandbox", "").startswith("doctor-")] == []  # fmt: skip


TRAIN = (
    "import os\n"
    "V = 1.0\n"
    "held = float(open(os.path.expanduser('~/.cache/heldout/v.txt')).read())\n"
    "print('---')\n"
    "print(f'val_bpb: {V + held:.6f}')\n"
)


def test_a_loop_runs_only_where_its_datasets_are(
    cluster: LocalCluster, data: Data, server_factory, fake_gpu_engine: FakeGpuEngine
) -> None:
    srv = server_factory(
        slots=None,
        env={
            "RATCHET_EXECUTOR": "ray",
            "RATCHET_RAY_ADDRESS": cluster.address,
            "RATCHET_RAY_TOKEN_FILE": cluster.token_path,
            "RATCHET_DATASETS": data.declared(),
        },
    )
    log = srv.log()
    assert "node w2 lacks dataset heldout" in log and "node w2 lacks dataset absent" in log, log[-3000:]
    mount = {"name": "heldout", "target": "/home/sandbox/.cache/heldout"}
    loop = make_loop(
        srv, name="held", image=SANDBOX_IMAGE, datasets=[mount], workspace={"files": {"train.py": TRAIN}}
    )
    srv.wait_idle(loop["id"])
    ids = [
        submit(srv, loop["id"], f"v{v}", files={"train.py": TRAIN.replace("V = 1.0", f"V = {v}")})["id"]
        for v in (0.9, 0.8, 0.7)
    ]
    srv.wait_idle(loop["id"])
    exps = srv.client.get(f"/v1/loops/{loop['id']}/experiments").json()["items"]
    assert len(exps) == 4 and {e["id"] for e in exps} >= set(ids)
    assert {e["status"] for e in exps} <= {"keep", "discard"}, exps
    assert {e["node"] for e in exps} == {"w1"}  # w2 had two free slots all along
    best = srv.client.get(f"/v1/loops/{loop['id']}").json()
    assert best["best_metric"] == pytest.approx(0.95)  # 0.7 + the 0.25 read from heldout on w1
    # No node has `absent`: refused, saying what each node lacks.
    r = srv.client.post(
        "/v1/loops",
        json={
            "name": "nowhere",
            "workspace": {"files": {"train.py": TRAIN}},
            "datasets": [{"name": "absent", "target": "/data"}],
        },
    )
    assert r.status_code == 422, r.text
    assert "w1 lacks absent; w2 lacks absent" in r.text and "ratchet doctor" in r.text, r.text
    srv.stop()
    label = f"ratchet.sandbox={srv.instance}"
    assert settled_leftovers(fake_gpu_engine.client, label, timeout=60) == []
