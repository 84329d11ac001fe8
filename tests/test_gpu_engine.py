"""GPUs through a real engine on a machine without a GPU.

A real `ratchet serve` detects 4 GPUs (a fake `nvidia-smi` on its PATH), makes 2 slots of 2, and
runs a loop whose experiments ask for 2 GPUs each on a second engine of the tests' own whose
`nvidia` device driver is registered (a fake `nvidia-container-runtime-hook` on its PATH; see
tests/fake_gpu_engine.py). Evidence comes from three independent places:

- the hook, run by the engine for every container that asked for devices, records the spec the
  engine made (the engine's own NVIDIA_VISIBLE_DEVICES included); engine events tie each
  container to its labels (experiment, service instance);
- the workload prints what it saw — its container id, its environment, `nvidia-smi -L` (which
  the hook made for exactly that container's devices) — and the instants its use of the GPUs
  began and ended;
- the service's API says which GPUs each experiment held.

"No id in two running workloads at once" is checked on the workloads' own spans. A container's
life is the wrong interval: a prepared run is started behind its gate, with its GPUs attached,
while the previous run on those GPUs still works (nothing untrusted runs, and no CUDA context
exists, until the gate opens).
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import SANDBOX_IMAGE, Server, leftovers
from fake_gpu_engine import FakeGpuEngine, HookCall, fake_gpu_uuid

from sandbox import GpuUnavailable, RunSpec, Sandbox

PAIRS = [("0", "1"), ("2", "3")]  # 4 GPUs, 2 per slot
TRAIN = """\
import json, os, re, subprocess, time
V = 1.0
HOLD = 0.4


def container_id():
    # runc: the container's cgroup and its /etc/hostname bind mount name it (gVisor hides both)
    for path in ("/proc/self/cgroup", "/proc/self/mountinfo"):
        try:
            found = re.search(r"[0-9a-f]{64}", open(path).read())
        except OSError:
            found = None
        if found:
            return found.group(0)
    return ""


start = time.time()
smi = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True)
time.sleep(HOLD)  # "uses" its GPUs from start to end
seen = {k: os.environ.get(k) for k in (
    "CUDA_VISIBLE_DEVICES", "NVIDIA_VISIBLE_DEVICES", "RATCHET_GPU_IDS", "RATCHET_EXPERIMENT_ID")}
seen.update(container=container_id(), smi=smi.stdout.splitlines(), smi_rc=smi.returncode)
print("GPU-RUN " + json.dumps({**seen, "start": start, "end": time.time()}))
print("---")
print(f"val_bpb: {V:.6f}")
"""


def train(value: float) -> str:
    return TRAIN.replace("V = 1.0", f"V = {value}")


def overlaps(spans: list[tuple[str, float, float, str]]) -> list[tuple[str, str, str]]:
    """(gpu, start, end, experiment) spans -> (gpu, experiment, experiment) for each GPU held by
    two experiments at once."""
    found = []
    by_gpu: dict[str, list[tuple[float, float, str]]] = {}
    for gpu, start, end, exp in spans:
        by_gpu.setdefault(gpu, []).append((start, end, exp))
    for gpu, held in by_gpu.items():
        last_end, last = float("-inf"), ""  # the span reaching furthest so far
        for start, end, exp in sorted(held):
            if start < last_end:
                found.append((gpu, last, exp))
            if end > last_end:
                last_end, last = end, exp
    return found


def test_overlap_check_finds_a_shared_gpu():
    ok = [("0", 1.0, 2.0, "a"), ("0", 2.0, 3.0, "b"), ("2", 1.5, 2.5, "c")]
    assert overlaps(ok) == []
    assert overlaps([*ok, ("0", 2.9, 3.5, "d")]) == [("0", "b", "d")]
    nested = [("1", 0.0, 9.0, "long"), ("1", 3.0, 4.0, "in"), ("1", 5.0, 6.0, "later")]
    assert overlaps(nested) == [("1", "long", "in"), ("1", "long", "later")]


@pytest.fixture
def gpu_server(fake_gpu_engine: FakeGpuEngine, tmp_path: Path) -> Iterator[Server]:
    """`ratchet serve` on the fake GPU engine: 4 GPUs detected, 2 per slot."""
    env = {**fake_gpu_engine.service_env(), "RATCHET_GPUS_PER_SLOT": "2"}
    server = Server(tmp_path / "srv", slots=None, env=env)
    try:
        yield server.start()
    finally:
        server.stop()
    left = leftovers(fake_gpu_engine.client, f"ratchet.sandbox={server.instance}")
    assert not left, f"left behind on the fake GPU engine: {left}"


def experiments(srv: Server, loop_id: str) -> list[dict]:
    return srv.client.get(f"/v1/loops/{loop_id}/experiments", params={"limit": 1000}).json()["items"]


def gpu_run(srv: Server, exp_id: str) -> dict:
    log = srv.client.get(f"/v1/experiments/{exp_id}/logs").text
    lines = [line for line in log.splitlines() if line.startswith("GPU-RUN ")]
    assert len(lines) == 1, f"{exp_id}: {log[-2000:]}"
    return json.loads(lines[0].removeprefix("GPU-RUN "))


@pytest.mark.timeout(600)
@pytest.mark.parametrize(("runtime", "count"), [("runc", 20), ("runsc", 6)])
def test_gpu_slots_through_the_engine(fake_gpu_engine, gpu_server, runtime, count):
    srv, engine = gpu_server, fake_gpu_engine
    if runtime not in engine.client.info()["Runtimes"]:
        pytest.skip(f"{runtime} is not installed")
    assert "ratchet_slots_total 2.0" in srv.client.get("/metrics").text
    assert "GPUs 0,1,2,3, attached by the engine's nvidia device driver" in srv.log()
    body = {
        "name": f"gpu-{runtime}",
        "workspace": {"files": {"train.py": TRAIN}},
        "editable": ["train.py"],
        "time_budget_s": 10,
        "timeout_s": 60,
        "runtime": runtime,
        "resources": {"gpus": 2, "cpus": 0.5, "memory_mb": 256, "pids": 128, "disk_mb": 32},
    }
    r = srv.client.post("/v1/loops", json=body)
    assert r.status_code == 201, r.text
    loop_id = r.json()["id"]
    for i in range(count - 1):  # the baseline is the first experiment
        value = 0.9 - i / 100 if i % 3 == 0 else 1.1 + i / 100  # distinct; some better, most worse
        r = srv.client.post(
            f"/v1/loops/{loop_id}/experiments",
            json={"description": f"V={value:.2f}", "files": {"train.py": train(value)}},
        )
        assert r.status_code == 202, r.text
    srv.wait_idle(loop_id, timeout=400)

    exps = experiments(srv, loop_id)
    assert len(exps) == count
    bad = [(e["number"], e["status"], e["reason"]) for e in exps if e["status"] not in ("keep", "discard")]
    assert not bad, f"{bad}\n{srv.log()[-3000:]}"

    calls = [
        c
        for c in engine.hook_calls()
        if engine.labels_of(c.container_id).get("ratchet.sandbox") == srv.instance
    ]
    by_container = {c.container_id: c for c in calls}
    assert len(by_container) == len(calls), "the hook ran twice for one container"
    check_every_request(engine, calls)

    spans: list[tuple[str, float, float, str]] = []
    for exp in exps:
        ids = tuple(exp["gpus"])
        run = gpu_run(srv, exp["id"])
        assert ids in PAIRS, exp  # exactly one slot's ids
        assert run["RATCHET_EXPERIMENT_ID"] == exp["id"]
        assert run["NVIDIA_VISIBLE_DEVICES"] == ",".join(ids), run
        assert run["RATCHET_GPU_IDS"] == ",".join(ids), run
        assert run["CUDA_VISIBLE_DEVICES"] == "0,1", run  # renumbered from 0
        # nvidia-smi came from the hook's run for this very container, and lists just its devices
        assert run["smi_rc"] == 0 and run["smi"] == [
            f"GPU {n}: Fake GPU (UUID: {fake_gpu_uuid(g)})" for n, g in enumerate(ids)
        ], run
        mine = [c for c in calls if engine.labels_of(c.container_id).get("ratchet.experiment") == exp["id"]]
        assert any(c.visible == ",".join(ids) for c in mine), (exp["id"], [c.visible for c in mine])
        if runtime == "runc":  # the workload knows its container: tie it to the hook's record
            call = by_container.get(run["container"])
            assert call is not None, f"no hook call for the container of {exp['id']}: {run['container']}"
            assert call.visible == ",".join(ids)
            assert engine.labels_of(call.container_id)["ratchet.experiment"] == exp["id"]
        spans += [(g, run["start"], run["end"], exp["id"]) for g in ids]

    assert overlaps(spans) == [], overlaps(spans)
    # Not vacuous: both slots were used, and their runs did overlap in time.
    used = {tuple(e["gpus"]) for e in exps}
    assert used == set(PAIRS), used
    first = [(s, e) for g, s, e, _ in spans if g == "0"]
    second = [(s, e) for g, s, e, _ in spans if g == "2"]
    assert any(s1 < e2 and s2 < e1 for s1, e1 in first for s2, e2 in second), (
        "the two slots never ran together"
    )


def check_every_request(engine: FakeGpuEngine, calls: list[HookCall]) -> None:
    """Every container the service made with devices asked for one slot's ids, and the engine
    (not only Ratchet) put those ids into its spec; the route probe asked for none."""
    runs = [c for c in calls if "ratchet.experiment" in engine.labels_of(c.container_id)]
    probes = [c for c in calls if "ratchet.probe" in engine.labels_of(c.container_id)]
    assert runs and len(runs) + len(probes) == len(calls)
    for call in runs:
        assert call.argv[1:] == ["prestart"]
        assert tuple((call.visible or "").split(",")) in PAIRS, call.visible
        # Ratchet's value, then the one the engine's nvidia driver appended from the request
        assert call.values("NVIDIA_VISIBLE_DEVICES") == [call.visible, call.visible], call.env
        assert call.values("CUDA_VISIBLE_DEVICES") == ["0,1"]
    for call in probes:
        assert call.values("NVIDIA_VISIBLE_DEVICES") == ["void"]  # asks the driver for nothing


def test_probe_finds_the_nvidia_driver_on_the_fake_engine(fake_gpu_engine):
    sandbox = Sandbox(client=fake_gpu_engine.client, instance=f"probe-{uuid.uuid4().hex[:8]}")
    passive = sandbox.probe()  # without an image the driver is not tried
    assert passive.route == "none" and passive.nvidia_driver is None and "not tried" in passive.reason
    probe = sandbox.probe(SANDBOX_IMAGE)
    assert probe.route == "nvidia" and probe.nvidia_driver is True, probe
    assert probe.engine_major > 0 and probe.api_version
    assert "--nvproxy" in probe.runtimes.get("runsc", ["--nvproxy"])
    assert not leftovers(fake_gpu_engine.client, f"ratchet.sandbox={sandbox.instance}")


def test_engine_without_a_gpu_route_refuses_gpu_runs(docker_client):
    """The shared engine has neither NVIDIA's hook nor CDI: a GPU run is refused, naming what to
    install, and leaves nothing behind; a run without GPUs is not affected."""
    sandbox = Sandbox(client=docker_client, instance=f"nogpu-{uuid.uuid4().hex[:8]}")
    probe = sandbox.probe(SANDBOX_IMAGE)
    if probe.route != "none":
        pytest.skip(f"this engine can attach GPUs ({probe.reason})")
    assert probe.nvidia_driver is False
    spec = RunSpec(image=SANDBOX_IMAGE, argv=["true"], gpus=["0"])
    with pytest.raises(GpuUnavailable, match="NVIDIA's container toolkit") as caught:
        sandbox.run(spec)
    assert "nvidia-container-runtime-hook" in str(caught.value)
    assert sandbox.run(RunSpec(image=SANDBOX_IMAGE, argv=["true"])).exit_code == 0
    assert not leftovers(docker_client, f"ratchet.sandbox={sandbox.instance}")
