"""The Ray executor on a real Ray cluster: a head and two worker nodes on loopback (token
authentication on), each worker with two logical GPUs, real containers on the tests' fake-GPU
engine (`fake_gpu_engine`; the nodes share it, as nodes on one machine share the machine's, and
every container carries its node's label).

One cluster serves the module; each test has its own executor and instance label, and ends with
nothing of that instance left on the engine. The node-failure test kills a worker (every process
of it) and brings it back, so it runs last. The whole service on such a cluster:
tests/test_ray_serve.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterator

import msgspec
import pytest
from conftest import ROOT, SANDBOX_IMAGE, leftovers
from egress_net import EgressNet
from fake_gpu_engine import FakeGpuEngine

from sandbox import Egress, FileEntry, RunResult, RunSpec, SandboxError, SpecError
from service.runs.executor import Node

ray = pytest.importorskip("ray", reason="Ray is not installed (pip install -r requirements/ray.txt)")

from nodeagent.protocol import LABEL_NODE  # noqa: E402
from service.runs.ray.executor import RayExecutor, RayHandle  # noqa: E402
from service.runs.ray.localcluster import LocalCluster, Worker, off_loopback, tcp_pids  # noqa: E402

pytestmark = [pytest.mark.docker, pytest.mark.timeout(600)]


@pytest.fixture(scope="module")
def cluster(fake_gpu_engine: FakeGpuEngine) -> Iterator[LocalCluster]:
    workers = [Worker(name=n, gpus=2, docker_host=fake_gpu_engine.docker_host) for n in ("w1", "w2")]
    with LocalCluster(workers) as c:
        yield c


@pytest.fixture
async def executor(cluster: LocalCluster, fake_gpu_engine: FakeGpuEngine) -> AsyncIterator[RayExecutor]:
    instance = f"raytest-{uuid.uuid4().hex[:8]}"
    ex = RayExecutor(cluster.address, instance, token_file=cluster.token_path, poll_s=0.5)
    await ex.connect(nodes=2)
    yield ex
    await ex.close()
    assert _settled(fake_gpu_engine, instance) == []


def _settled(engine: FakeGpuEngine, instance: str, timeout: float = 30) -> list[str]:
    deadline = time.monotonic() + timeout
    while (left := leftovers(engine.client, f"ratchet.sandbox={instance}")) and time.monotonic() < deadline:
        time.sleep(0.25)
    return left


def _spec(script: str, gpus: list[str] | None = None, timeout_s: float = 60, **labels: str) -> RunSpec:
    return RunSpec(
        image=SANDBOX_IMAGE,
        argv=["sh", "-c", script],
        gpus=gpus or [],
        timeout_s=timeout_s,
        labels={"ratchet.experiment": labels.get("experiment", "e"), **labels},
    )


class _Watch:
    """Collects a run's live output; `seen(text)` waits until it arrived."""

    def __init__(self) -> None:
        self.chunks: list[tuple[float, bytes]] = []
        self._event = asyncio.Event()

    def output(self, data: bytes) -> None:
        self.chunks.append((time.time(), data))
        self._event.set()

    def exited(self, _timings: object) -> None:
        pass

    @property
    def text(self) -> str:
        return b"".join(d for _, d in self.chunks).decode()

    async def seen(self, text: str, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while text not in self.text:
            self._event.clear()
            left = deadline - time.monotonic()
            assert left > 0, f"{text!r} not in the live output: {self.text!r}"
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._event.wait(), left)


async def _run(handle: RayHandle, watch: _Watch | None = None) -> RunResult:
    watch = watch or _Watch()
    return await handle.start(watch.output, watch.exited)


async def _next_inventory(watch: AsyncIterator[list[Node]], want: set[str], timeout: float = 60) -> None:
    async with asyncio.timeout(timeout):
        while {n.name for n in await anext(watch)} != want:
            pass


def test_cluster_is_on_loopback_and_needs_its_token(cluster: LocalCluster, tmp_path) -> None:
    nodes = [n for n in cluster.nodes() if n["Alive"]]
    assert len(nodes) == 3
    assert {n["NodeManagerAddress"] for n in nodes} == {"127.0.0.1"}
    cluster.verify()  # every socket of every process of the cluster on loopback
    wrong = tmp_path / "token"
    wrong.write_text("0" * 64)
    code = (
        "from service.runs.ray.loopback import pin; pin(); import ray; "
        f"ray.init(address={cluster.address!r}, _node_ip_address='127.0.0.1', log_to_driver=False)"
    )
    # One try to connect, not Ray's twenty a second apart.
    env = {**cluster.env(), "RAY_AUTH_TOKEN_PATH": str(wrong), "RAY_gcs_server_port_wait_time_s": "1"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode != 0
    assert "Authentication token is missing or incorrect" in out.stderr


async def test_no_token_no_start(cluster: LocalCluster, monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.ray/auth_token either
    for name in ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        monkeypatch.delenv(name, raising=False)
    ex = RayExecutor(cluster.address, "raytest-notoken")
    with pytest.raises(SandboxError, match="no Ray authentication token"):
        await ex.connect(nodes=2, timeout=30)
    await ex.close()


async def test_inventory_covers_both_nodes_and_their_gpus(executor: RayExecutor) -> None:
    assert await executor.inventory() == [
        Node(name="w1", slots=2, gpus=("0", "1")),
        Node(name="w2", slots=2, gpus=("0", "1")),
    ]
    assert await executor.ping()
    # This process, Ray's driver, talks to the cluster over loopback only.
    assert os.getpid() in tcp_pids()
    assert off_loopback({os.getpid()}) == []
    assert await executor.has_image(SANDBOX_IMAGE) is True
    assert await executor.has_image("ratchet/absent:1") is False
    reports = await executor.nodes_report([SANDBOX_IMAGE, "ratchet/absent:1"])
    assert [(r.name, r.slots, r.gpus, r.engine, r.problem) for r in reports] == [
        ("w1", 2, ["0", "1"], True, None),
        ("w2", 2, ["0", "1"], True, None),
    ]
    for report in reports:
        assert report.gpu_route == "nvidia" and {"runc", "runsc"} <= set(report.runtimes)
        assert report.missing_images == ["ratchet/absent:1"] and report.engine_version


async def test_runs_spread_over_both_nodes_with_their_own_gpu_ids(
    executor: RayExecutor, fake_gpu_engine: FakeGpuEngine
) -> None:
    script = 'echo "nv=$NVIDIA_VISIBLE_DEVICES ids=$RATCHET_GPU_IDS cuda=$CUDA_VISIBLE_DEVICES"; sleep 2'
    places = [(node.name, gpu) for node in await executor.inventory() for gpu in node.gpus]
    handles = await asyncio.gather(*(executor.prepare(_spec(script, [gpu]), node) for node, gpu in places))
    # Prepared on the node that will run them, labelled with it.
    for (node, _), handle in zip(places, handles, strict=True):
        assert handle.node == node
        assert fake_gpu_engine.client.containers.get(handle.container_id).labels[LABEL_NODE] == node
    results = await asyncio.gather(*(_run(h) for h in handles))
    for (_, gpu), result in zip(places, results, strict=True):
        assert result.exit_code == 0, result.log
        assert f"nv={gpu} ids={gpu} cuda=0" in result.log
    # All four ran at once: two per node.
    starts = [r.timings.started for r in results]
    ends = [r.timings.finished for r in results]
    assert max(starts) < min(ends)  # type: ignore[type-var]
    await asyncio.gather(*(h.cleanup() for h in handles))


async def test_live_output_arrives_while_the_run_goes_on(executor: RayExecutor) -> None:
    handle = await executor.prepare(_spec("echo one; sleep 1.5; echo two; sleep 1.5; echo three"), "w1")
    watch = _Watch()
    run = asyncio.create_task(_run(handle, watch))
    await watch.seen("one")
    assert "two" not in watch.text
    result = await run
    assert result.exit_code == 0
    assert watch.text == "one\ntwo\nthree\n" == result.log
    first, last = watch.chunks[0][0], watch.chunks[-1][0]
    assert last - first > 2.5  # chunks came as written, not all at the end
    await handle.cleanup()


async def test_a_workspace_past_rays_inline_limit_arrives_whole(executor: RayExecutor) -> None:
    data = os.urandom(3 * 1024 * 1024)  # through Ray's object store, not inline in the call
    spec = msgspec.structs.replace(
        _spec("sha256sum big.bin"), files=[FileEntry(path="big.bin", data=data)]
    )
    handle = await executor.prepare(spec, "w2")
    result = await _run(handle)
    assert result.exit_code == 0 and hashlib.sha256(data).hexdigest() in result.log
    await handle.cleanup()


async def test_deadline_kills_the_container_on_its_node(
    executor: RayExecutor, fake_gpu_engine: FakeGpuEngine
) -> None:
    handle = await executor.prepare(_spec("echo started; sleep 120", ["1"], timeout_s=2), "w2")
    result = await _run(handle)
    assert result.timed_out and not result.cancelled
    assert result.workload_seconds is not None and result.workload_seconds < 10
    state = fake_gpu_engine.client.api.inspect_container(handle.container_id)["State"]
    assert not state["Running"]  # killed at the deadline, before any clean-up
    await handle.cleanup()
    assert leftovers(fake_gpu_engine.client, f"ratchet.sandbox={executor.instance}") == []


async def test_cancel_kills_a_running_run_and_stops_a_prepared_one(
    executor: RayExecutor, fake_gpu_engine: FakeGpuEngine
) -> None:
    running = await executor.prepare(_spec("echo started; sleep 120", ["0"]), "w1")
    watch = _Watch()
    task = asyncio.create_task(_run(running, watch))
    await watch.seen("started")
    await running.cancel()
    result = await asyncio.wait_for(task, 30)
    assert result.cancelled and not result.timed_out
    prepared = await executor.prepare(_spec("echo should-not-run", ["0"]), "w2")
    await prepared.cancel()
    never = await _run(prepared)
    assert never.cancelled and never.timings.started is None and "should-not-run" not in never.log
    await asyncio.gather(running.cleanup(), prepared.cleanup())
    assert leftovers(fake_gpu_engine.client, f"ratchet.sandbox={executor.instance}") == []


async def test_a_spec_that_fits_no_node_is_refused(executor: RayExecutor) -> None:
    with pytest.raises(SpecError):
        await executor.prepare(_spec("true", ["7"]), "w1")  # no such device there
    with pytest.raises(SandboxError) as info:
        await executor.prepare(_spec("true", ["0"]), "w9")  # no such node
    assert info.value.reason == "unreachable"


async def test_cleanup_of_one_experiment_sweeps_every_node(executor: RayExecutor) -> None:
    handles = [
        await executor.prepare(_spec("true", [gpu], experiment=exp), node)
        for node, gpu, exp in (("w1", "0", "a"), ("w2", "0", "a"), ("w2", "1", "b"))
    ]
    assert await executor.cleanup("a") == 4  # two containers, two volumes
    assert await executor.cleanup() == 2
    for handle in handles:
        await handle.cleanup()  # already gone: nothing to do, nothing raised


# A command proposer's run in miniature: it reads its context, asks its model's endpoint (and one it
# may not reach), edits the workspace and writes its description.
PROPOSER = r"""
import json, os, sys, urllib.request, urllib.error
inp = os.environ["RATCHET_INPUT_DIR"]
out = {"program": open(os.path.join(inp, "program.md")).read()}
try:
    open(os.path.join(inp, "program.md"), "a").write("x")
    out["input_write"] = "written"
except OSError as e:
    out["input_write"] = type(e).__name__
def get(url):
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return f"{r.status} {r.read().decode()}"
    except urllib.error.HTTPError as e:
        return str(e.code)
    except Exception as e:
        return f"error {type(e).__name__}"
out["allowed"] = get(f"http://{sys.argv[1]}/v1/models")
out["other"] = get("http://fakeapi:8000/v1/models")
open("train.py", "w").write("LR = 0.5\n")
with open(os.path.join(os.environ["RATCHET_OUTPUT_DIR"], "description.txt"), "w") as f:
    f.write("halve the learning rate\n")
print(json.dumps(out))
"""


async def test_a_proposer_run_crosses_to_its_node_and_back_whole(
    executor: RayExecutor, fake_gpu_engine: FakeGpuEngine
) -> None:
    """What a command proposer needs from the sandbox works on a node of the cluster: read-only
    inputs beside the workspace, the workspace handed back after the run, and a network through
    the allow-listing proxy (made on the node's engine) to exactly the allowed endpoint. The
    endpoint is the test's server on the network's gateway: the host's firewall (the shared engine's
    FORWARD policy) drops traffic between containers on this engine's bridge, not traffic to the host."""
    net = EgressNet(fake_gpu_engine.client)
    endpoint = f"{net.gateway}:{net.gateway_port}"
    try:
        spec = RunSpec(
            image=SANDBOX_IMAGE,
            argv=["python3", "-c", PROPOSER, endpoint],
            files=[FileEntry(path="train.py", data=b"LR = 1\n", writable=True)],
            inputs=[FileEntry(path="program.md", data=b"lower the loss\n")],
            collect=["."],
            egress=Egress(allow=[endpoint], network=net.name, image=SANDBOX_IMAGE),
            timeout_s=60,
            labels={"ratchet.proposal": "p1", **net.labels},
        )
        handle = await executor.prepare(spec, "w2")
        result = await _run(handle)
        await handle.cleanup()
    finally:
        net.close()
    assert result.exit_code == 0, result.log
    out = msgspec.json.decode(result.log.strip().splitlines()[-1])
    assert out["program"] == "lower the loss\n"
    assert out["input_write"] in ("PermissionError", "OSError")
    assert out["allowed"] == "200 host secret", result.egress_log
    assert out["other"] == "403"  # a server the node's engine could reach, but not on the list
    assert result.workspace_files == {"train.py": b"LR = 0.5\n"}
    assert result.output_files == {"description.txt": b"halve the learning rate\n"}
    assert f"allow GET {endpoint}" in result.egress_log
    assert "deny GET fakeapi:8000" in result.egress_log


def test_a_restarted_executor_sweeps_what_a_killed_one_left(
    cluster: LocalCluster, fake_gpu_engine: FakeGpuEngine
) -> None:
    instance = f"raytest-{uuid.uuid4().hex[:8]}"
    code = f"""
import asyncio
from service.runs.ray.executor import RayExecutor
from sandbox import RunSpec
async def main():
    ex = RayExecutor({cluster.address!r}, {instance!r}, token_file={cluster.token_path!r})
    await ex.connect(nodes=2)
    for node in ("w1", "w2"):
        await ex.prepare(RunSpec(image={SANDBOX_IMAGE!r}, argv=["sleep", "60"], gpus=["0"]), node)
    print("prepared", flush=True)
    await asyncio.sleep(600)
asyncio.run(main())
"""
    proc = subprocess.Popen(
        [sys.executable, "-c", code], cwd=ROOT, env=cluster.env(), stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "prepared"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    client = fake_gpu_engine.client
    found = client.containers.list(all=True, filters={"label": f"ratchet.sandbox={instance}"})
    assert sorted(c.labels[LABEL_NODE] for c in found) == ["w1", "w2"]

    async def restart() -> None:
        ex = RayExecutor(cluster.address, instance, token_file=cluster.token_path)
        await ex.connect(nodes=2)  # each node's new agent sweeps the node first
        await ex.close()

    asyncio.run(restart())
    assert leftovers(client, f"ratchet.sandbox={instance}") == []


async def test_an_agent_that_dies_is_replaced_and_its_runs_fail_over(
    executor: RayExecutor, fake_gpu_engine: FakeGpuEngine
) -> None:
    """The agent's process dies (the node stays): its run fails as an engine failure, the node
    leaves the inventory and comes back with a new agent, which first removes the dead one's
    container."""
    watch_nodes = executor.watch_inventory()
    assert {n.name for n in await anext(watch_nodes)} == {"w1", "w2"}
    handle = await executor.prepare(_spec("echo started; sleep 300", ["0"]), "w2")
    watch = _Watch()
    task = asyncio.create_task(_run(handle, watch))
    await watch.seen("started")
    (old,) = [a.info.pid for a in executor.agents.ready() if a.name == "w2"]
    os.kill(old, signal.SIGKILL)
    with pytest.raises(SandboxError) as info:
        await asyncio.wait_for(task, 60)
    assert info.value.reason == "unreachable"
    await _next_inventory(watch_nodes, {"w1"})
    await _next_inventory(watch_nodes, {"w1", "w2"})
    (new,) = [a.info.pid for a in executor.agents.ready() if a.name == "w2"]
    assert new != old
    assert _settled(fake_gpu_engine, executor.instance) == []
    await handle.cleanup()
    await watch_nodes.aclose()


async def test_a_node_killed_mid_run_fails_the_run_and_leaves_the_inventory_at_once(
    executor: RayExecutor, cluster: LocalCluster, fake_gpu_engine: FakeGpuEngine
) -> None:
    """The run on the killed node ends in SandboxError("unreachable") — the scheduler's retry
    path, never a result — the node leaves the inventory, the retry runs on the other node, and
    the orphaned container is removed when the node comes back."""
    watch_nodes = executor.watch_inventory()
    await anext(watch_nodes)
    handle = await executor.prepare(_spec("echo started; sleep 300", ["1"], experiment="x"), "w1")
    watch = _Watch()
    task = asyncio.create_task(_run(handle, watch))
    await watch.seen("started")
    killed = time.monotonic()
    cluster.kill("w1")
    with pytest.raises(SandboxError) as info:
        await asyncio.wait_for(task, 60)
    assert info.value.reason == "unreachable"
    await _next_inventory(watch_nodes, {"w2"})
    noticed = time.monotonic() - killed
    assert noticed < 30, f"the node's loss took {noticed:.1f} s to notice"
    # The engine still runs the orphan (the node's processes are gone, the container is not).
    client = fake_gpu_engine.client
    assert client.api.inspect_container(handle.container_id)["State"]["Running"]
    await handle.cleanup()  # nothing to reach: must return, not raise

    retry = await executor.prepare(_spec("echo retried", ["1"], experiment="x"), "w2")
    result = await _run(retry)
    assert result.exit_code == 0 and result.log == "retried\n"
    await retry.cleanup()

    cluster.restart("w1")
    await _next_inventory(watch_nodes, {"w1", "w2"})
    assert leftovers(client, f"ratchet.sandbox={executor.instance}") == []
    await watch_nodes.aclose()
