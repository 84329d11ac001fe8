"""`ratchet serve --executor ray` end to end: a real service whose experiments run on a real
loopback Ray cluster (a head and two worker nodes, one slot each, on the machine's engine): a loop
runs to its verdicts over both nodes, and a node killed under a running experiment sends that
experiment back to the queue; it runs on the other node and is judged once."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
from conftest import SANDBOX_IMAGE, leftovers, settled_leftovers
from test_api import TRAIN, make_loop, submit

ray = pytest.importorskip("ray", reason="Ray is not installed (pip install -e '.[ray]')")

from service.cluster.local import LocalCluster, Worker  # noqa: E402

pytestmark = [pytest.mark.docker, pytest.mark.timeout(600)]


def train(value: float, sleep: float) -> dict[str, str]:
    return {"train.py": TRAIN.replace("V = 1.0", f"V = {value}").replace("SLEEP = 0.0", f"SLEEP = {sleep}")}


@pytest.fixture(scope="module")
def cluster(docker_client) -> Iterator[LocalCluster]:
    with LocalCluster([Worker(name="w1"), Worker(name="w2")]) as c:
        yield c


def test_a_loop_runs_on_the_cluster_and_survives_a_node_lost_mid_run(
    cluster: LocalCluster, server_factory, docker_client
) -> None:
    srv = server_factory(
        slots=None,
        env={
            "RATCHET_EXECUTOR": "ray",
            "RATCHET_RAY_ADDRESS": cluster.address,
            "RATCHET_RAY_TOKEN_FILE": cluster.token_path,
            "RATCHET_ENGINE_BACKOFF_S": "0.5",
        },
    )
    log = srv.log()
    assert "node w1 joined" in log and "node w2 joined" in log and "2 slot(s)" in log
    loop = make_loop(srv, image=SANDBOX_IMAGE)
    srv.wait_idle(loop["id"])
    ids = [submit(srv, loop["id"], f"v{v}", files=train(v, 2))["id"] for v in (0.9, 0.8)]
    assert srv.wait_idle(loop["id"])["best_metric"] == 0.8
    # Both ran (at once, one per node); whichever was judged second against the new best
    statuses = {srv.client.get(f"/v1/experiments/{i}").json()["status"] for i in ids}
    assert statuses <= {"keep", "discard"} and "keep" in statuses

    # A slow candidate; once its container runs, the node it runs on goes down.
    victim = submit(srv, loop["id"], "slow", files=train(0.5, 8))["id"]
    label = f"ratchet.experiment={victim}"
    deadline = time.monotonic() + 120
    while not (running := docker_client.containers.list(filters={"label": label})):
        assert time.monotonic() < deadline, srv.log()[-3000:]
        time.sleep(0.2)
    node = running[0].labels["ratchet.node"]
    time.sleep(1)  # the workload has started
    cluster.kill(node)
    exp = srv.wait_final(victim, timeout=180)
    assert exp["status"] == "keep", exp
    assert exp["attempts"] == 2, exp  # one engine failure, then the retry on the other node
    assert f"node {node} left the cluster" in srv.log() or f"node {node} stopped answering" in srv.log()

    cluster.restart(node)  # its new agent removes the orphaned container
    assert settled_leftovers(docker_client, f"ratchet.sandbox={srv.instance}", timeout=60) == []
    assert leftovers(docker_client, label) == []
