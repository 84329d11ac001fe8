"""`compose.yaml` on first start: the ratchet service alone (Prometheus' and Grafana's images cannot
be pulled here), brought up with docker-compose (Debian's) or the compose plugin under a project
name of its own on a free port, from the service image with this checkout's code laid over it.
With no admin token configured the first start makes one and logs it once; with it a loop is
created and its baseline runs, as a sibling container on the host's engine. With RATCHET_ADMIN_TOKEN
in the env file, that token works and nothing is printed. Everything is torn down afterwards."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from conftest import ROOT, free_port
from test_api import HARNESS, TRAIN

BASE_IMAGE = "ratchet/service:latest"


def _compose_command() -> list[str] | None:
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    if (
        shutil.which("docker")
        and subprocess.run(["docker", "compose", "version"], capture_output=True).returncode == 0
    ):
        return ["docker", "compose"]
    return None


@pytest.fixture(scope="module")
def service_image(docker_client) -> Iterator[str]:
    """The service image with this checkout's packages in place of the ones it was built with (the
    locked dependencies are the same), under a tag of its own, removed afterwards."""
    try:
        docker_client.images.get(BASE_IMAGE)
    except Exception:
        pytest.skip(f"needs {BASE_IMAGE}: build it with images/build.sh service")
    tag = f"ratchet/service:compose-test-{uuid.uuid4().hex[:8]}"
    context = Path(os.environ.get("TMPDIR", "/tmp")) / f"ratchet-compose-{uuid.uuid4().hex[:8]}"
    context.mkdir()
    try:
        for package in ("service", "sandbox", "client"):
            shutil.copytree(ROOT / package, context / package, ignore=shutil.ignore_patterns("__pycache__"))
        (context / "Dockerfile").write_text(
            f"FROM {BASE_IMAGE}\nUSER root\nCOPY service /tmp/src/service\nCOPY sandbox /tmp/src/sandbox\n"
            "COPY client /tmp/src/client\n"
            "RUN set -e; site=$(/opt/ratchet/bin/python -c 'import os, service;"
            " print(os.path.dirname(os.path.dirname(service.__file__)))'); for p in service sandbox client;"
            ' do rm -rf "$site/$p"; cp -r "/tmp/src/$p" "$site/$p"; done; rm -rf /tmp/src\n'
            "USER 10001:10001\n"
        )
        docker_client.images.build(path=str(context), tag=tag, network_mode="none", rm=True)
    finally:
        shutil.rmtree(context, ignore_errors=True)
    try:
        yield tag
    finally:
        docker_client.images.remove(tag, force=True)


class Project:
    """One compose project: its own name, port and env file; `down -v` at the end."""

    def __init__(self, command: list[str], image: str, tmp: Path, env: dict[str, str]) -> None:
        self.name = f"ratchet-test-{uuid.uuid4().hex[:8]}"
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env_file = tmp / f"{self.name}.env"
        self.env_file.write_text("".join(f"{k}={v}\n" for k, v in env.items()))
        gid = os.stat("/var/run/docker.sock").st_gid
        self.environ = {
            **{k: v for k, v in os.environ.items() if not k.startswith("RATCHET_")},
            "RATCHET_SERVICE_IMAGE": image,
            "RATCHET_PUBLISH_PORT": str(self.port),
            "RATCHET_BIND": "127.0.0.1",
            "RATCHET_SLOTS": "1",
            "DOCKER_GID": str(gid),
        }
        self.base = [
            *command,
            "-p",
            self.name,
            "-f",
            str(ROOT / "compose.yaml"),
            "--env-file",
            str(self.env_file),
        ]

    def run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        done = subprocess.run(
            [*self.base, *args], cwd=ROOT, env=self.environ, capture_output=True, text=True, timeout=300
        )
        if check:
            assert done.returncode == 0, f"{args}: {done.stdout}\n{done.stderr}"
        return done

    def logs(self) -> str:
        done = self.run("logs", "--no-color", "ratchet", check=False)
        return done.stdout + done.stderr

    def wait_ready(self, timeout: float = 90) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{self.url}/readyz", timeout=5).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.5)
        raise AssertionError(f"the composed service was not ready in {timeout} s:\n{self.logs()[-4000:]}")

    def down(self) -> None:
        self.run("down", "-v", "--remove-orphans", "--timeout", "30", check=False)


@pytest.fixture
def compose(service_image, tmp_path) -> Iterator:
    command = _compose_command()
    if command is None:
        pytest.skip("needs docker-compose or the compose plugin (scripts/setup.sh installs docker-compose)")
    projects: list[Project] = []

    def make(env: dict[str, str] | None = None) -> Project:
        project = Project(command, service_image, tmp_path, env or {})
        projects.append(project)
        project.run("up", "-d", "--no-build", "ratchet")
        project.wait_ready()
        return project

    yield make
    for project in projects:
        project.down()


def _loop_body() -> dict:
    return {
        "name": "composed",
        "workspace": {"files": {"train.py": TRAIN, "prepare.py": HARNESS}},
        "time_budget_s": 5,
        "timeout_s": 30,
        "resources": {"cpus": 0.5, "memory_mb": 256, "pids": 64, "disk_mb": 64},
    }


def test_first_start_makes_and_shows_an_admin_token(compose, docker_client):
    project = compose()
    assert httpx.get(f"{project.url}/v1/loops").status_code == 401  # tokens are on: not open to all
    logs = project.logs()
    found = re.findall(r"RATCHET_TOKEN=(rt_[A-Za-z0-9_-]+)", logs)
    assert len(found) == 1, logs[-3000:]
    token = found[0]
    auth = {"Authorization": f"Bearer {token}"}

    r = httpx.post(f"{project.url}/v1/loops", json=_loop_body(), headers=auth, timeout=60)
    assert r.status_code == 201, r.text
    lid = r.json()["id"]
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        loop = httpx.get(f"{project.url}/v1/loops/{lid}", headers=auth).json()
        if loop["baseline"] != "pending":
            break
        time.sleep(0.5)
    assert loop["baseline"] == "ok" and loop["best_metric"] == 1.0, (loop, project.logs()[-3000:])
    tokens = httpx.get(f"{project.url}/v1/tokens", headers=auth).json()
    assert [t["name"] for t in tokens] == ["first-admin"] and "secret" not in tokens[0]

    # a restart shows no token again, and the one made still works
    project.run("restart", "ratchet")
    project.wait_ready()
    assert len(re.findall(r"RATCHET_TOKEN=rt_", project.logs())) == 1
    assert httpx.get(f"{project.url}/v1/loops/{lid}", headers=auth).status_code == 200

    project.down()
    left = docker_client.api.containers(all=True, filters={"label": f"ratchet.loop={lid}"})
    assert not left, left


def test_admin_token_from_the_env_file(compose):
    admin = "env-file-token-" + uuid.uuid4().hex
    project = compose({"RATCHET_ADMIN_TOKEN": admin})
    assert "RATCHET_TOKEN=" not in project.logs()
    r = httpx.get(f"{project.url}/v1/tokens", headers={"Authorization": f"Bearer {admin}"})
    assert r.status_code == 200 and r.json() == []
