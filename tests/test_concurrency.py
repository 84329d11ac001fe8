"""Several loops and candidates share a fixed number of slots: never more workloads running than
slots (prepared containers wait behind their gates), every experiment judged correctly, round-robin
across loops."""

from __future__ import annotations

import contextlib
import threading
import time

import docker
from test_api import TRAIN, make_loop

SLOW = TRAIN.replace("SLEEP = 0.0", "SLEEP = 1.5")


def _workloads(client: docker.DockerClient, label: str) -> tuple[int, int]:
    """(containers, containers past their gate): a gated container runs only its PID 1."""
    containers = client.api.containers(filters={"label": label})
    past_gate = 0
    for c in containers:
        with contextlib.suppress(docker.errors.NotFound, docker.errors.APIError):
            past_gate += len(client.api.top(c["Id"]).get("Processes") or []) > 1
    return len(containers), past_gate


def test_two_loops_share_two_slots(server, docker_client):
    seen: list[int] = []
    containers: list[int] = []
    stop = threading.Event()

    def watch() -> None:
        label = f"ratchet.sandbox={server.instance}"
        while not stop.is_set():
            total, running = _workloads(docker_client, label)
            containers.append(total)
            seen.append(running)
            time.sleep(0.05)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        loops = [
            make_loop(server, name=f"loop{i}", workspace={"files": {"train.py": SLOW}}) for i in range(2)
        ]
        for loop in loops:
            server.wait_idle(loop["id"])
        submitted: dict[str, list[tuple[str, float]]] = {}
        for loop in loops:
            ids = []
            for value in (0.9, 0.95, 0.8, 1.2):  # keep, discard-or-keep race, keep, discard
                text = SLOW.replace("V = 1.0", f"V = {value}")
                r = server.client.post(
                    f"/v1/loops/{loop['id']}/experiments",
                    json={"description": f"v={value}", "files": {"train.py": text}},
                )
                assert r.status_code == 202, r.text
                ids.append((r.json()["id"], value))
            submitted[loop["id"]] = ids
        finals = {lid: [server.wait_final(eid) for eid, _ in ids] for lid, ids in submitted.items()}
    finally:
        stop.set()
        watcher.join()
    assert max(seen) <= 2, f"more workloads than slots: {max(seen)}"
    assert max(seen) == 2, "the two slots were never used together"
    assert max(containers) > 2, "nothing was prepared ahead of its turn"
    for lid, exps in finals.items():
        loop = server.client.get(f"/v1/loops/{lid}").json()
        assert all(e["status"] in ("keep", "discard") for e in exps)
        assert loop["best_metric"] == 0.8
        keeps = [e for e in exps if e["status"] == "keep"]
        # The keeps, in finishing order, strictly improve: no two finishing together both won.
        keeps.sort(key=lambda e: e["finished_at"])
        metrics = [e["metric"] for e in keeps]
        assert metrics == sorted(metrics, reverse=True) and len(set(metrics)) == len(metrics)
        assert next(e for e in exps if e["metric"] == 1.2)["status"] == "discard"
        tsv = server.client.get(f"/v1/loops/{lid}/results.tsv").text.splitlines()
        assert len(tsv) == 1 + 1 + 4
    # round-robin: the first candidates of both loops started before either loop's last one
    starts = {lid: sorted(e["started_at"] for e in exps) for lid, exps in finals.items()}
    a, b = starts.values()
    assert a[0] < b[-1] and b[0] < a[-1]


def test_restart_requeues_what_was_running(server_factory, docker_client):
    first = server_factory(slots=1, name="data")
    loop = make_loop(first, workspace={"files": {"train.py": TRAIN.replace("SLEEP = 0.0", "SLEEP = 3.0")}})
    label = f"ratchet.sandbox={first.instance}"
    deadline = time.monotonic() + 30
    while not docker_client.api.containers(filters={"label": label, "status": "running"}):
        assert time.monotonic() < deadline, "the baseline's container never ran"
        time.sleep(0.05)
    first.stop(kill=True)  # kill -9: no graceful shutdown, the container stays behind
    assert docker_client.api.containers(all=True, filters={"label": label}), "expected an orphan container"
    first.start()  # same data dir, same instance id
    final = first.wait_idle(loop["id"], timeout=60)
    assert final["baseline"] == "ok" and final["counts"]["keep"] == 1
    exps = first.client.get(f"/v1/loops/{loop['id']}/experiments").json()["items"]
    assert len(exps) == 1 and exps[0]["status"] == "keep"
