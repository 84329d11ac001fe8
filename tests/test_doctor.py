"""`ratchet doctor` as an operator runs it: the real command against the shared engine, against
images built here to be broken, and against the fake-GPU engine (4 GPUs, 2 per slot), where it
must run `nvidia-smi -L` in a sandbox pinned to each slot and see exactly that slot's GPUs."""

from __future__ import annotations

import asyncio
import io
import os
import subprocess
import sys
import uuid
from pathlib import Path

import docker
import pytest
from conftest import ROOT, SANDBOX_IMAGE, leftovers
from fake_executor import FakeExecutor, FakeHandle
from fake_gpu_engine import FakeGpuEngine

from service.doctor import diagnose, render
from service.runs.executor import Node, RunResult
from service.settings import Settings


def smi(seen: dict[str, str]):
    """A fake run of `nvidia-smi -L` that sees host GPU `seen.get(id, id)` for each id it asked for."""

    async def handler(handle: FakeHandle) -> RunResult:
        ids = [seen.get(g, g) for g in handle.spec.gpus]
        log = "".join(f"GPU {i}: Fake GPU (UUID: GPU-fake-{g})\n" for i, g in enumerate(ids))
        return RunResult(exit_code=0, exit_reported=True, log=log)

    return handler


def test_a_slot_that_sees_the_wrong_gpus_is_a_problem():
    """Engine-free: the executor's runs are judged by what they print (the engine tests below
    show the right GPUs arriving; this shows a wrong one would be caught)."""
    nodes = [Node(name="n1", slots=2, gpus=("0", "1", "2", "3"))]
    settings = Settings(gpus_per_slot=2)
    good = render(asyncio.run(diagnose(settings, FakeExecutor(smi({}), nodes))))
    assert (
        "slot 1 (GPUs 2,3) saw: GPU 0: Fake GPU (UUID: GPU-fake-2) | GPU 1: Fake GPU (UUID: GPU-fake-3)"
        in good
    )
    assert good.endswith("all checks passed"), good
    bad = render(asyncio.run(diagnose(settings, FakeExecutor(smi({"3": "0"}), nodes))))
    assert (
        "slot 1 (GPUs 2,3) saw: GPU 0: Fake GPU (UUID: GPU-fake-2) | GPU 1: Fake GPU (UUID: GPU-fake-0);"
        in bad
    )
    assert "expected GPU-fake-2, GPU-fake-3" in bad and bad.endswith("1 problem(s): GPUs"), bad


pytestmark = pytest.mark.docker


def doctor(*args: str, env: dict[str, str] | None = None) -> tuple[int, str]:
    proc = subprocess.run(
        [sys.executable, "-m", "service.cli", "doctor", *args],
        cwd=ROOT,
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=300,
    )
    return proc.returncode, proc.stdout + proc.stderr


def line(out: str, topic: str) -> str:
    """The report line of a topic, with its detail lines."""
    lines = out.splitlines()
    start = next(i for i, text in enumerate(lines) if text[4:].startswith(topic + " "))
    end = next((i for i in range(start + 1, len(lines)) if not lines[i].startswith(" ")), len(lines))
    return "\n".join(lines[start:end])


def no_doctor_leftovers(client: docker.DockerClient) -> None:
    # Sparse: the shared engine's other containers come and go while this lists them.
    left = [
        c["Names"]
        for c in client.api.containers(all=True, filters={"label": "ratchet.sandbox"})
        if c["Labels"].get("ratchet.sandbox", "").startswith("doctor-")
    ]
    assert left == [], left


def test_doctor_on_this_engine(docker_client, tmp_path: Path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "a.bin").write_bytes(b"x")
    tmp_path.chmod(0o755)
    data.chmod(0o755)
    code, out = doctor("--dataset", f"tokens={data}", "--image", SANDBOX_IMAGE)
    assert code == 0, out
    assert out.rstrip().endswith("all checks passed"), out
    info = docker_client.version()
    assert line(out, "engine").startswith(
        f"ok  engine     Docker {info['Version']} (API {info['ApiVersion']})"
    )
    runtimes = line(out, "runtimes")
    assert "runc: a sandbox ran" in runtimes
    if "runsc" in docker_client.info()["Runtimes"]:
        assert "runsc (--network=none): a sandbox ran" in runtimes
    assert line(out, "GPUs").startswith("--  GPUs       none found")
    assert f"{SANDBOX_IMAGE} (the default): present" in line(out, "images")
    assert f"tokens ({data}): readable by uid 1000: a directory of 1 entries" in line(out, "datasets")
    assert "local: Docker" in line(out, "nodes") and "missing: nothing" in line(out, "nodes")
    image = line(out, "image")
    assert image.startswith(f"ok  image      {SANDBOX_IMAGE} as a sandbox"), image
    assert "uid 1000 (sandbox, home /home/sandbox), the /sandbox layout, python3 3." in image
    no_doctor_leftovers(docker_client)


def test_doctor_names_what_is_wrong_and_exits_1(docker_client, tmp_path: Path):
    private = tmp_path / "private"
    private.mkdir()
    private.chmod(0o700)  # root's: the sandbox user cannot read it
    volume = f"ratchet-test-missing-{uuid.uuid4().hex[:8]}"
    code, out = doctor(
        "--dataset", f"gone={tmp_path / 'nothing'}", "--dataset", f"closed={private}",
        "--dataset", f"vol=volume:{volume}", "--image", "ratchet-test/not-built:never",
        env={"RATCHET_RUNTIME": "runc"},
    )  # fmt: skip
    assert code == 1, out
    datasets = line(out, "datasets")
    assert datasets.startswith("!!") and "bind source path does not exist" in datasets
    assert f"closed ({private}): a directory uid 1000 cannot read" in datasets
    assert f"volume '{volume}' (to mount at /ratchet-dataset) does not exist" in datasets
    assert "ratchet-test/not-built:never: MISSING" in line(out, "images")
    assert "missing: ratchet-test/not-built:never, closed, gone, vol" in line(out, "nodes")
    assert line(out, "image").startswith("!!  image      ratchet-test/not-built:never as a sandbox")
    assert out.rstrip().endswith("4 problem(s): images, datasets, nodes, image"), out
    no_doctor_leftovers(docker_client)


BROKEN = {
    # no shell: the gate that holds every run back is /bin/sh
    "no-shell": 'FROM {base}\nUSER root\nRUN ["/bin/rm", "-f", "/usr/bin/sh", "/bin/sh"]\nUSER 1000:1000\n',
    # no python3, and uid 1000 is nobody with a home elsewhere
    "no-python": (
        "FROM {base}\nUSER root\n"
        "RUN rm -f /usr/bin/python3* /usr/local/bin/python3* "
        "&& sed -i 's#^sandbox:x:1000:1000::/home/sandbox:#other:x:1000:1000::/srv/other:#' /etc/passwd\n"
        "USER 1000:1000\n"
    ),
}


@pytest.fixture(scope="module")
def broken_images(docker_client: docker.DockerClient):
    tag = uuid.uuid4().hex[:8]
    built = {}
    try:
        for name, dockerfile in BROKEN.items():
            ref = f"ratchet-test/broken-{name}:{tag}"
            docker_client.images.build(
                fileobj=io.BytesIO(dockerfile.format(base=SANDBOX_IMAGE).encode()),
                tag=ref, rm=True, forcerm=True, network_mode="none", labels={"ratchet.test": tag},
            )  # fmt: skip
            built[name] = ref
        yield built
    finally:
        for ref in built.values():
            docker_client.images.remove(ref, force=True)


def test_doctor_checks_images_as_sandboxes(docker_client, broken_images):
    code, out = doctor("--image", broken_images["no-shell"])
    assert code == 1, out
    image = line(out, "image")
    assert image.startswith("!!") and "cannot run as a sandbox" in image and "/bin/sh" in image, image
    code, out = doctor("--image", broken_images["no-python"])
    assert code == 1, out
    image = line(out, "image")
    assert "!! no python3 on PATH" in image, image
    assert "!! uid 1000 (other) has the home /srv/other, not /home/sandbox" in image, image
    assert out.rstrip().endswith("1 problem(s): image"), out
    try:
        docker_client.images.get("ratchet/torch:latest")
    except docker.errors.ImageNotFound:
        return  # the rest needs the torch image (scripts/setup.sh builds it)
    code, out = doctor("--image", "ratchet/torch:latest")
    assert code == 0, out
    assert "python3 3." in line(out, "image") and "torch 2." in line(out, "image")
    no_doctor_leftovers(docker_client)


def test_doctor_with_gpus_runs_nvidia_smi_in_each_slot(fake_gpu_engine: FakeGpuEngine):
    env = {**fake_gpu_engine.service_env(), "RATCHET_GPUS_PER_SLOT": "2"}
    before = len(fake_gpu_engine.hook_calls())  # the engine serves the whole session
    code, out = doctor(env=env)
    assert code == 0, out
    assert "ok  GPU route" in out and "nvidia: the engine's nvidia device driver" in line(out, "GPU route")
    gpus = line(out, "GPUs")
    assert "4 GPU(s) 0, 1, 2, 3: 2 slot(s) of 2" in gpus, gpus
    assert (
        "slot 0 (GPUs 0,1) saw: GPU 0: Fake GPU (UUID: GPU-fake-0) | GPU 1: Fake GPU (UUID: GPU-fake-1)"
        in gpus
    )
    assert (
        "slot 1 (GPUs 2,3) saw: GPU 0: Fake GPU (UUID: GPU-fake-2) | GPU 1: Fake GPU (UUID: GPU-fake-3)"
        in gpus
    )
    assert "GPUs 0, 1, 2, 3; 2 slot(s)" in line(out, "nodes")
    assert leftovers(fake_gpu_engine.client, "ratchet.phase=doctor") == []
    pinned = [c for c in fake_gpu_engine.hook_calls()[before:] if c.visible not in (None, "void")]
    assert sorted(c.visible for c in pinned) == ["0,1", "2,3"]  # one pinned run per slot, nothing else


def test_doctor_with_gpus_but_no_way_to_attach_them_says_what_to_install(fake_gpu_engine: FakeGpuEngine):
    # the fake nvidia-smi on the PATH, but the shared engine, which has no nvidia device driver
    env = {"PATH": fake_gpu_engine.service_env()["PATH"]}
    code, out = doctor(env=env)
    assert code == 1, out
    route = line(out, "GPU route")
    assert (
        route.startswith("!!") and "none: no nvidia device driver" in route and "container toolkit" in route
    )
