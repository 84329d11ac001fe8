"""Shared fixtures. Tests that need the container engine use the real one: a local Docker engine
with the `ratchet/sandbox:latest` image (scripts/setup.sh provides both). Without it they are
skipped with the reason — unless RATCHET_REQUIRE_ENGINE=1 (set by scripts/test.sh and so by CI),
where a missing engine fails them instead."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import docker
import httpx
import pytest
from fake_gpu_engine import FakeGpuEngine

SANDBOX_IMAGE = "ratchet/sandbox:latest"
ROOT = Path(__file__).resolve().parent.parent


def _engine_problem() -> str | None:
    try:
        client = docker.from_env(timeout=10)
        client.ping()
        client.images.get(SANDBOX_IMAGE)
    except docker.errors.ImageNotFound:
        return f"image {SANDBOX_IMAGE} missing (build it with images/build.sh)"
    except Exception as exc:
        return f"no Docker engine reachable ({exc.__class__.__name__}); run scripts/setup.sh"
    return None


@pytest.fixture(scope="session")
def docker_client() -> docker.DockerClient:
    problem = _engine_problem()
    if problem:
        if os.environ.get("RATCHET_REQUIRE_ENGINE") == "1":
            pytest.fail(f"container engine required: {problem}")
        pytest.skip(f"needs the container engine: {problem}")
    return docker.from_env(timeout=120)


def _second_engine_problem() -> str | None:
    if shutil.which("dockerd") is None:
        return "dockerd is not installed (scripts/setup.sh installs docker.io)"
    if os.geteuid() != 0:
        return "starting a second dockerd needs root"
    return None


@pytest.fixture(scope="session")
def fake_gpu_engine(docker_client: docker.DockerClient) -> Iterator[FakeGpuEngine]:
    """A second engine of the tests' own whose `nvidia` device driver works without a GPU (see
    tests/fake_gpu_engine.py), with the sandbox image loaded; stopped and removed afterwards."""
    problem = _second_engine_problem()
    if problem:
        if os.environ.get("RATCHET_REQUIRE_ENGINE") == "1":
            pytest.fail(f"the fake GPU engine is required: {problem}")
        pytest.skip(f"needs a second container engine: {problem}")
    engine = FakeGpuEngine(image=SANDBOX_IMAGE)
    try:
        engine.start(docker_client)
        yield engine
    finally:
        engine.stop()


def leftovers(client: docker.DockerClient, label: str) -> list[str]:
    """Containers and volumes still carrying `label` (key=value)."""
    found = [f"container {c['Id'][:12]}" for c in client.api.containers(all=True, filters={"label": label})]
    found += [f"volume {v.name}" for v in client.volumes.list(filters={"label": label})]
    return found


def settled_leftovers(client: docker.DockerClient, label: str, timeout: float = 30) -> list[str]:
    """`leftovers` once the service's background removals had time to finish: containers are
    removed after the slot is free and the verdict written, so right after a verdict some remain."""
    deadline = time.monotonic() + timeout
    while (found := leftovers(client, label)) and time.monotonic() < deadline:
        time.sleep(0.25)
    return found


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A real `ratchet serve` process on a free loopback port with its own data dir."""

    def __init__(self, data_dir: Path, slots: int | None = 2, env: dict[str, str] | None = None) -> None:
        self.data_dir = data_dir
        self.instance = f"test-{uuid.uuid4().hex[:10]}"
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.slots = slots
        self.extra_env = env or {}
        self.proc: subprocess.Popen[bytes] | None = None
        self.client = httpx.Client(base_url=self.url, timeout=60)

    def start(self) -> Server:
        env = {**os.environ, "RATCHET_INSTANCE": self.instance, **self.extra_env}
        self.data_dir.mkdir(parents=True, exist_ok=True)
        log = open(self.data_dir / "server.log", "ab")  # noqa: SIM115 - owned by the process
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "service.cli",
                "serve",
                "--port",
                str(self.port),
                "--data-dir",
                str(self.data_dir),
                "--log-level",
                "info",
                *(["--slots", str(self.slots)] if self.slots else []),
            ],
            cwd=ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited early:\n{self.log()}")
            try:
                if self.client.get("/readyz").status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"server not ready in 60 s:\n{self.log()}")

    def stop(self, kill: bool = False) -> None:
        if self.proc and self.proc.poll() is None:
            if kill:
                self.proc.kill()
            else:
                self.proc.terminate()
            self.proc.wait(timeout=60)

    def log(self) -> str:
        path = self.data_dir / "server.log"
        return path.read_text(errors="replace") if path.exists() else ""

    # -- conveniences --------------------------------------------------------------------------

    def wait_final(self, exp_id: str, timeout: float = 120) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            exp = self.client.get(f"/v1/experiments/{exp_id}").json()
            if exp["status"] not in ("queued", "running", "confirming"):
                return exp
            time.sleep(0.2)
        raise AssertionError(f"experiment {exp_id} did not finish in {timeout} s:\n{self.log()[-3000:]}")

    def wait_idle(self, loop_id: str, timeout: float = 180) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            loop = self.client.get(f"/v1/loops/{loop_id}").json()
            counts = loop["counts"]
            if counts["queued"] == 0 and counts["running"] == 0 and counts["confirming"] == 0:
                return loop
            time.sleep(0.2)
        raise AssertionError(f"loop {loop_id} still busy after {timeout} s:\n{self.log()[-3000:]}")


@pytest.fixture
def server_factory(docker_client: docker.DockerClient, tmp_path: Path) -> Iterator:
    """Starts servers on demand; on teardown stops them and checks nothing of theirs is left."""
    started: list[Server] = []

    def make(slots: int | None = 2, env: dict[str, str] | None = None, name: str = "srv") -> Server:
        server = Server(tmp_path / name, slots=slots, env=env)
        started.append(server)
        return server.start()

    yield make
    for server in started:
        server.stop()
    for server in started:
        left = leftovers(docker_client, f"ratchet.sandbox={server.instance}")
        assert not left, f"left behind by {server.instance}: {left}"


@pytest.fixture
def server(server_factory) -> Server:
    return server_factory()


def example_files(name: str = "charlm") -> dict[str, str]:
    """The example workspace as {path: text}, as a client would send it."""
    root = ROOT / "examples" / name
    files = {}
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root).as_posix()
        if path.is_file() and not rel.startswith(("candidates/", "README", "ratchet.json")):
            files[rel] = path.read_text()
    return files
