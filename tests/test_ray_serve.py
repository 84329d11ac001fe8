"""`ratchet serve --executor ray` end to end: a real service whose experiments run on a real loopback
Ray cluster (a head and two worker nodes with two logical GPUs each, token authentication on, real
containers on the tests' fake-GPU engine, which the nodes share):

- a loop's experiments spread over both nodes, each on GPU ids of its own node, and say where they
  ran; /metrics and the loop page show the nodes; a deadline ends as `timeout` and a cancel as
  `cancelled`, with nothing left behind;
- a loop's command proposer runs on a node like its experiments do, and drives the loop;
- a service killed with a run on each node, started again, joins the cluster, every node's agent
  removes what the dead process left there, and the runs are run again and judged;
- a node killed under a running experiment sends it back to the queue: it runs on the other node
  and is judged once (attempts 2); a node that joins mid-loop gets work at once; the killed node's
  orphaned container is removed when it comes back (this one changes the cluster: it runs last).
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator

import pytest
from conftest import SANDBOX_IMAGE, leftovers, settled_leftovers
from fake_gpu_engine import FakeGpuEngine
from proposer_scripts import IMPROVER
from test_api import TRAIN, make_loop, submit
from test_proposers import SMALL, experiments, proposals, settled, wait_loop

ray = pytest.importorskip("ray", reason="Ray is not installed (pip install -r requirements/ray.txt)")

from service.runs.ray.localcluster import LocalCluster, Worker  # noqa: E402

pytestmark = [pytest.mark.docker, pytest.mark.timeout(600)]


def train(value: float, sleep: float) -> dict[str, str]:
    return {"train.py": TRAIN.replace("V = 1.0", f"V = {value}").replace("SLEEP = 0.0", f"SLEEP = {sleep}")}


@pytest.fixture(scope="module")
def cluster(fake_gpu_engine: FakeGpuEngine) -> Iterator[LocalCluster]:
    workers = [Worker(name=n, gpus=2, docker_host=fake_gpu_engine.docker_host) for n in ("w1", "w2")]
    with LocalCluster(workers) as c:
        yield c


@pytest.fixture
def ray_server(cluster: LocalCluster, server_factory, fake_gpu_engine: FakeGpuEngine) -> Iterator:
    srv = server_factory(
        slots=None,
        env={
            "RATCHET_EXECUTOR": "ray",
            "RATCHET_RAY_ADDRESS": cluster.address,
            "RATCHET_RAY_TOKEN_FILE": cluster.token_path,
            "RATCHET_ENGINE_BACKOFF_S": "0.5",
        },
    )
    yield srv
    srv.stop()
    label = f"ratchet.sandbox={srv.instance}"
    assert settled_leftovers(fake_gpu_engine.client, label, timeout=60) == []


def node_gauges(srv) -> dict[tuple[str, str], float]:
    """(metric, node) -> value of the per-node slot gauges."""
    text = srv.client.get("/metrics").text
    found = re.findall(r'^(ratchet_node_slots(?:_busy)?)\{node="([^"]+)"\} (\S+)$', text, re.M)
    return {(name, node): float(value) for name, node, value in found}


def wait_for(what: str, check, timeout: float = 60):
    deadline = time.monotonic() + timeout
    while not (found := check()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)
    return found


def test_a_loop_spreads_over_the_nodes_with_their_gpus_and_says_where_each_ran(
    ray_server, fake_gpu_engine: FakeGpuEngine
) -> None:
    srv = ray_server
    log = srv.log()
    assert "node w1 joined: 2 slot(s), GPUs 0,1" in log and "node w2 joined" in log
    loop = make_loop(srv, image=SANDBOX_IMAGE, resources={"gpus": 1, "cpus": 0.25, "memory_mb": 256})
    srv.wait_idle(loop["id"])
    ids = [submit(srv, loop["id"], f"v{v}", files=train(v, 3))["id"] for v in (0.9, 0.8, 0.7, 0.6)]
    busy = lambda: sum(v for (m, _), v in node_gauges(srv).items() if m.endswith("busy"))  # noqa: E731
    wait_for("four busy slots", lambda: busy() == 4)
    assert node_gauges(srv) == {
        ("ratchet_node_slots", "w1"): 2,
        ("ratchet_node_slots", "w2"): 2,
        ("ratchet_node_slots_busy", "w1"): 2,
        ("ratchet_node_slots_busy", "w2"): 2,
    }
    srv.wait_idle(loop["id"])
    exps = [srv.client.get(f"/v1/experiments/{i}").json() for i in ids]
    assert {e["status"] for e in exps} <= {"keep", "discard"}
    # The four ran at once, on four distinct (node, GPU) pairs: two per node.
    places = sorted((e["node"], *e["gpus"]) for e in exps)
    assert places == [("w1", "0"), ("w1", "1"), ("w2", "0"), ("w2", "1")]
    page = srv.client.get(f"/loops/{loop['id']}").text
    assert '<td class="node">w1</td>' in page and '<td class="node">w2</td>' in page

    # Deadline and cancel are Ratchet's, on the node: the container goes either way.
    slow = make_loop(srv, name="slow", image=SANDBOX_IMAGE, time_budget_s=1, timeout_s=2)
    srv.wait_idle(slow["id"])
    late = submit(srv, slow["id"], "late", files=train(0.5, 60))["id"]
    assert srv.wait_final(late)["status"] == "timeout"
    assert settled_leftovers(fake_gpu_engine.client, f"ratchet.experiment={late}") == []
    doomed = submit(srv, slow["id"], "doomed", files=train(0.4, 60))["id"]  # not a duplicate of late
    wait_for("it to run", lambda: leftovers(fake_gpu_engine.client, f"ratchet.experiment={doomed}"))
    assert srv.client.post(f"/v1/experiments/{doomed}/cancel").status_code == 200
    assert srv.wait_final(doomed)["status"] == "cancelled"
    assert settled_leftovers(fake_gpu_engine.client, f"ratchet.experiment={doomed}") == []


def test_a_restarted_service_reattaches_and_sweeps_every_node(
    ray_server, fake_gpu_engine: FakeGpuEngine
) -> None:
    """kill -9 with runs on both nodes: their containers outlive the service (its agents die with
    it); started again on the same data dir, it joins the cluster, each node's new agent removes
    what the dead process left there, and the experiments run again and are judged."""
    srv, engine = ray_server, fake_gpu_engine.client
    loop = make_loop(srv, image=SANDBOX_IMAGE, resources={"gpus": 1, "cpus": 0.25, "memory_mb": 256})
    srv.wait_idle(loop["id"])
    ids = [submit(srv, loop["id"], f"r{v}", files=train(v, 10))["id"] for v in (0.8, 0.7, 0.6, 0.5)]
    label = f"ratchet.sandbox={srv.instance}"

    def nodes_of(everything: bool) -> set[str]:
        found = engine.containers.list(all=everything, filters={"label": label})
        return {c.labels["ratchet.node"] for c in found}

    wait_for("runs on both nodes", lambda: nodes_of(everything=False) == {"w1", "w2"})
    time.sleep(2)  # their gates open (a gate whose agent dies closes: its container exits)
    srv.stop(kill=True)
    assert nodes_of(everything=True) == {"w1", "w2"}  # what it made outlives it
    srv.start()
    log = srv.log()
    assert re.search(r"node w1 joined: .* removed \d+ container", log), log[-3000:]
    assert re.search(r"node w2 joined: .* removed \d+ container", log), log[-3000:]
    srv.wait_idle(loop["id"], timeout=300)
    for exp_id in ids:
        exp = srv.client.get(f"/v1/experiments/{exp_id}").json()
        assert exp["status"] in ("keep", "discard") and exp["attempts"] == 2, exp


def test_a_command_proposer_drives_a_loop_on_the_cluster(ray_server, fake_gpu_engine: FakeGpuEngine) -> None:
    """A command proposer's sandbox goes through the Ray executor like an experiment's: it runs on
    a node, gets its context, hands its edit back; its candidates run on the nodes' GPUs; nothing
    of it is left on the node."""
    srv = ray_server
    proposer = {"kind": "command", "command": ["python3", "-c", IMPROVER], "parallel": 2, "resources": SMALL}
    loop = make_loop(
        srv,
        name="driven",
        image=SANDBOX_IMAGE,
        resources={"gpus": 1, "cpus": 0.25, "memory_mb": 256},
        max_experiments=7,
        proposer=proposer,
    )
    lid = loop["id"]
    loop = wait_loop(srv, lid, settled, timeout=300)
    assert loop["proposer"]["idle_reason"] == "max_experiments=7 reached"
    exps = experiments(srv, lid)
    made = [p for p in proposals(srv, lid) if p["status"] == "proposed"]
    assert len(exps) == 7 and len(made) == 6
    assert {e["proposal_id"] for e in exps[1:]} == {p["id"] for p in made}
    assert all(e["status"] in ("keep", "discard") and e["node"] in ("w1", "w2") for e in exps[1:]), exps
    assert loop["best_metric"] < 1.0
    log = srv.client.get(f"/v1/proposals/{made[0]['id']}/logs").text
    assert "context: loop.json recent.json recent.md results.tsv" in log, log
    assert settled_leftovers(fake_gpu_engine.client, f"ratchet.loop={lid}") == []


def test_a_node_lost_mid_run_sends_its_experiment_elsewhere_and_a_new_node_gets_work(
    ray_server, cluster: LocalCluster, fake_gpu_engine: FakeGpuEngine
) -> None:
    srv, engine = ray_server, fake_gpu_engine.client
    loop = make_loop(srv, image=SANDBOX_IMAGE, resources={"gpus": 1, "cpus": 0.25, "memory_mb": 256})
    srv.wait_idle(loop["id"])

    # A slow candidate; once its container runs, the node it runs on goes down.
    victim = submit(srv, loop["id"], "slow", files=train(0.5, 8))["id"]
    label = f"ratchet.experiment={victim}"
    (running,) = wait_for("its container", lambda: engine.containers.list(filters={"label": label}))
    node = running.labels["ratchet.node"]
    other = ({"w1", "w2"} - {node}).pop()
    time.sleep(1)  # the workload has started
    cluster.kill(node)
    wait_for(f"{node}'s slots to go", lambda: ("ratchet_node_slots", node) not in node_gauges(srv))
    exp = srv.wait_final(victim, timeout=180)
    assert exp["status"] == "keep", exp
    assert exp["attempts"] == 2 and exp["node"] == other, exp  # one engine failure, then elsewhere
    assert re.search(rf"node {node} (left the cluster|stopped answering)", srv.log())
    # Judged once: one row in the ledger.
    ledger = srv.client.get(f"/v1/loops/{loop['id']}/results.tsv").text
    assert sum(1 for row in ledger.splitlines() if "\tslow" in row) == 1

    # A node that joins mid-loop gets work at once.
    cluster.add(Worker(name="w3", gpus=2, docker_host=fake_gpu_engine.docker_host))
    wait_for("w3's slots", lambda: node_gauges(srv).get(("ratchet_node_slots", "w3")) == 2)
    ids = [submit(srv, loop["id"], f"n{i}", files=train(0.9 + i / 100, 3))["id"] for i in range(4)]
    srv.wait_idle(loop["id"])
    nodes = sorted(srv.client.get(f"/v1/experiments/{i}").json()["node"] for i in ids)
    assert nodes == sorted([other, other, "w3", "w3"]), nodes

    cluster.restart(node)  # its new agent removes the orphaned container
    wait_for(f"{node} back", lambda: node_gauges(srv).get(("ratchet_node_slots", node)) == 2)
    assert settled_leftovers(engine, label, timeout=60) == []

