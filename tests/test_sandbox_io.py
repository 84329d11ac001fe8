"""What a run may get besides its workspace, against the real engine: read-only inputs beside the
workspace, the workspace handed back after the run (`collect`), and network through an
allow-listing proxy (`egress`) that reaches exactly the allowed endpoint and nothing else."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator

import docker
import pytest
from conftest import SANDBOX_IMAGE, leftovers
from egress_net import PROBE, EgressNet

from sandbox import Egress, FileEntry, Limits, RunSpec, Sandbox, SpecError

pytestmark = pytest.mark.docker


@pytest.fixture
def sbx(docker_client: docker.DockerClient) -> Iterator[Sandbox]:
    box = Sandbox(instance=f"test-io-{uuid.uuid4().hex[:8]}")
    yield box
    assert leftovers(docker_client, f"ratchet.sandbox={box.instance}") == []


@pytest.fixture
def egress_net(docker_client: docker.DockerClient) -> Iterator[EgressNet]:
    net = EgressNet(docker_client)
    yield net
    net.close()


EDIT = r"""
import json, os
inp = os.environ["RATCHET_INPUT_DIR"]
seen = {"input": open(os.path.join(inp, "notes/ledger.tsv")).read()}
for target in (os.path.join(inp, "notes/ledger.tsv"), "lib/prepare.py"):
    try:
        open(target, "a").write("x")
        seen[target] = "written"
    except OSError as e:
        seen[target] = type(e).__name__
with open("src/train.py", "a") as f:
    f.write("# edited\n")
os.makedirs("src/sub", exist_ok=True)
open("src/sub/new.py", "w").write("N = 1\n")
os.symlink("/etc/passwd", "src/link")
print(json.dumps(seen))
"""


def test_inputs_are_read_only_and_the_workspace_comes_back(sbx: Sandbox) -> None:
    spec = RunSpec(
        image=SANDBOX_IMAGE,
        argv=["python3", "-c", EDIT],
        files=[
            FileEntry(path="src/train.py", data=b"V = 1\n", writable=True),
            FileEntry(path="lib/prepare.py", data=b"H = 1\n"),
        ],
        inputs=[FileEntry(path="notes/ledger.tsv", data=b"commit\tval\n")],
        collect=["."],
        limits=Limits(memory_mb=256, disk_mb=16),
        timeout_s=30,
    )
    result = sbx.run(spec)
    assert result.exit_code == 0, result.log
    seen = json.loads(result.log.strip().splitlines()[-1])
    assert seen["input"] == "commit\tval\n"
    assert seen["lib/prepare.py"] == "PermissionError"
    assert seen[next(k for k in seen if k.endswith("ledger.tsv") and k != "input")] in (
        "PermissionError",
        "OSError",
    )
    assert result.workspace_files == {
        "src/train.py": b"V = 1\n# edited\n",
        "lib/prepare.py": b"H = 1\n",
        "src/sub/new.py": b"N = 1\n",
    }
    assert result.workspace_skipped == ["src/link"]  # a link is listed, never followed


def test_collecting_one_file_and_a_missing_path(sbx: Sandbox) -> None:
    spec = RunSpec(
        image=SANDBOX_IMAGE,
        argv=["sh", "-c", "echo 2 > train.py"],
        files=[FileEntry(path="train.py", data=b"1\n", writable=True)],
        collect=["train.py", "nothing/here"],
        limits=Limits(memory_mb=128, disk_mb=8),
        timeout_s=30,
    )
    result = sbx.run(spec)
    assert result.exit_code == 0
    assert result.workspace_files == {"train.py": b"2\n"}


def test_egress_reaches_the_allowed_endpoint_and_nothing_else(sbx: Sandbox, egress_net: EgressNet) -> None:
    net = egress_net
    args = [net.gateway, str(net.gateway_port), str(net.loopback_port), net.server_ip]
    spec = RunSpec(
        image=SANDBOX_IMAGE,
        argv=["python3", "-c", PROBE, *args],
        egress=Egress(allow=["fakeapi:8000"], network=net.name, image=SANDBOX_IMAGE),
        limits=Limits(memory_mb=256, disk_mb=16),
        timeout_s=60,
        labels=net.labels,
    )
    result = sbx.run(spec)
    assert result.exit_code == 0, result.log
    out = json.loads(result.log.strip().splitlines()[-1])
    assert out["interfaces"] == ["lo"]
    assert out["proxy"] == "http://127.0.0.1:3128"
    assert out["allowed"] == "200 hello 8000 /v1/models"
    assert out["other_port"] == "403"  # the same host on another port
    assert out["gateway_via_proxy"] == "403"
    assert out["connect_gateway"] == "HTTP/1.1 403 Forbidden"
    # directly: no route anywhere; 127.0.0.1 is the run's own loopback, where only the relay listens
    assert set(out["direct"].values()) <= {"OSError", "ConnectionRefusedError", "TimeoutError"}, out
    assert "CONNECTED" not in out["direct"].values()
    log = result.egress_log
    assert "allow GET fakeapi:8000" in log
    assert "deny GET fakeapi:8001" in log
    assert f"deny CONNECT {net.gateway}:{net.gateway_port}" in log


def test_egress_is_refused_where_it_cannot_hold() -> None:
    base = {"image": SANDBOX_IMAGE, "argv": ["true"]}
    for egress, runtime, why in [
        (Egress(allow=["api.example.com:443"]), "runsc", "runc"),
        (Egress(allow=[]), "runc", "empty"),
        (Egress(allow=["api.example.com"]), "runc", "host:port"),
        (Egress(allow=["a:99999"]), "runc", "host:port"),
        (Egress(allow=["a:1"], network="host"), "runc", "named engine network"),
    ]:
        with pytest.raises(SpecError, match=why):
            RunSpec(**base, egress=egress, runtime=runtime).validate()
