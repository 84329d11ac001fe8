"""Experiments prepared ahead of their turn: the order they run in, the deadline counting from the
gate, and that a prepared container never outlives the reason it was made (cancel, pause, stop,
restart) — all against the real engine and a real `ratchet serve`."""

from __future__ import annotations

import time

import docker
import pytest
from conftest import SANDBOX_IMAGE, leftovers
from test_api import TRAIN, make_loop, submit

from sandbox import FileEntry, RunSpec, Sandbox
from service.runs.executor import Node
from service.runs.slots import Placement, Slots, dispatch_order


def sleeper(seconds: float, value: float = 0.9) -> str:
    return TRAIN.replace("SLEEP = 0.0", f"SLEEP = {seconds}").replace("V = 1.0", f"V = {value}")


# -- dispatch order (pure) ------------------------------------------------------------------------


def test_dispatch_order_is_fifo_per_loop_and_round_robin_across_loops():
    queued = [("a", "a1"), ("a", "a2"), ("a", "a3"), ("b", "b1"), ("c", "c1"), ("c", "c2")]
    assert dispatch_order(queued, {}) == [
        ("a", "a1"),
        ("b", "b1"),
        ("c", "c1"),
        ("a", "a2"),
        ("c", "c2"),
        ("a", "a3"),
    ]
    # the loop served most recently goes last; never-served loops keep the queue's order
    assert [e for _, e in dispatch_order(queued, {"a": 5.0, "c": 2.0})][:3] == ["b1", "c1", "a1"]
    assert dispatch_order([], {"a": 1.0}) == []


# -- the sandbox's side -------------------------------------------------------------------------


def test_prepared_run_deadline_counts_from_the_gate(docker_client: docker.DockerClient) -> None:
    """A run held behind its gate for longer than its timeout still gets its whole timeout; the
    exit hook fires before the run is collected, and `release=False` leaves removal to the caller."""
    sandbox = Sandbox(instance=f"test-pipeline-{time.monotonic_ns()}")
    spec = RunSpec(
        image=SANDBOX_IMAGE,
        argv=["python3", "-c", "import time; time.sleep(1); print('slept')"],
        files=[FileEntry(path="train.py", data=b"\n", writable=True)],
        timeout_s=2.5,
    )
    run = sandbox.prepare(spec)
    try:
        time.sleep(3.0)  # longer than the timeout, behind the gate
        exits: list[bool] = []
        result = run.execute(on_exit=lambda t: exits.append(t.finished is not None), release=False)
        assert not result.timed_out and result.exit_code == 0 and "slept" in result.log
        assert exits == [True]
        assert result.workload_seconds is not None and 1.0 <= result.workload_seconds < 2.5
        assert leftovers(docker_client, f"ratchet.sandbox={sandbox.instance}"), "removed too early"
    finally:
        run.release()
    assert not leftovers(docker_client, f"ratchet.sandbox={sandbox.instance}")


# -- the service's side -------------------------------------------------------------------------


def _containers_of(client: docker.DockerClient, exp_id: str) -> list[str]:
    return leftovers(client, f"ratchet.experiment={exp_id}")


def _gated(client: docker.DockerClient, exp_id: str) -> bool:
    """A container of `exp_id` is up (started, behind its gate, or past it)."""
    return bool(client.api.containers(filters={"label": f"ratchet.experiment={exp_id}", "status": "running"}))


def _wait_for(predicate, what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def _status(server, exp_id: str) -> str:
    return server.client.get(f"/v1/experiments/{exp_id}").json()["status"]


def _submit(server, loop_id: str, text: str, description: str) -> str:
    return submit(server, loop_id, description, files={"train.py": text})["id"]


def _one_running_one_prepared(server, docker_client, first_s: float = 4.0) -> tuple[str, str, str]:
    """A loop on one slot with candidate A running and candidate B prepared behind its gate."""
    loop = make_loop(server)
    server.wait_idle(loop["id"])
    a = _submit(server, loop["id"], sleeper(first_s, 0.9), "a")
    b = _submit(server, loop["id"], sleeper(0.2, 0.8), "b")
    _wait_for(lambda: server.client.get(f"/v1/experiments/{a}").json()["status"] == "running", "A to run")
    _wait_for(lambda: _gated(docker_client, b), "B to be prepared")
    assert server.client.get(f"/v1/experiments/{b}").json()["status"] == "queued"
    return loop["id"], a, b


@pytest.fixture
def one_slot(server_factory):
    return server_factory(slots=1)


def test_cancel_of_a_prepared_candidate_removes_its_container(one_slot, docker_client):
    _, a, b = _one_running_one_prepared(one_slot, docker_client)
    r = one_slot.client.post(f"/v1/experiments/{b}/cancel")
    assert r.status_code == 200 and r.json()["status"] == "cancelled"
    _wait_for(lambda: not _containers_of(docker_client, b), "B's container to go", timeout=15)
    assert one_slot.wait_final(a)["status"] in ("keep", "discard")
    assert one_slot.client.get(f"/v1/experiments/{b}").json()["status"] == "cancelled"
    assert not _containers_of(docker_client, b)


def test_pause_removes_prepared_runs_and_resume_runs_them(one_slot, docker_client):
    loop_id, a, b = _one_running_one_prepared(one_slot, docker_client)
    assert one_slot.client.post(f"/v1/loops/{loop_id}/pause").status_code == 200
    _wait_for(lambda: not _containers_of(docker_client, b), "B's container to go", timeout=15)
    assert one_slot.wait_final(a)["status"] in ("keep", "discard")
    time.sleep(1.0)  # a paused loop holds no slot: B stays queued with nothing prepared
    assert one_slot.client.get(f"/v1/experiments/{b}").json()["status"] == "queued"
    assert not _containers_of(docker_client, b)
    assert one_slot.client.post(f"/v1/loops/{loop_id}/resume").status_code == 200
    assert one_slot.wait_final(b)["status"] == "keep"


def test_stop_removes_prepared_runs(one_slot, docker_client):
    loop_id, a, b = _one_running_one_prepared(one_slot, docker_client)
    assert one_slot.client.post(f"/v1/loops/{loop_id}/stop").status_code == 200
    _wait_for(lambda: not _containers_of(docker_client, b), "B's container to go", timeout=15)
    _wait_for(lambda: not _containers_of(docker_client, a), "A's container to go", timeout=30)
    assert one_slot.wait_final(a)["status"] == "cancelled"
    assert one_slot.wait_final(b)["status"] == "cancelled"


def test_restart_removes_prepared_runs_and_runs_them_again(one_slot, docker_client):
    _, a, b = _one_running_one_prepared(one_slot, docker_client)
    old = set(_containers_of(docker_client, b))
    one_slot.stop(kill=True)  # no graceful shutdown: the prepared container stays behind
    assert set(_containers_of(docker_client, b)) == old
    one_slot.start()
    assert one_slot.wait_final(a)["status"] in ("keep", "discard")
    assert one_slot.wait_final(b)["status"] == "keep"
    assert not set(_containers_of(docker_client, b)) & old


def test_budget_counts_from_the_gate_not_the_prepare(one_slot, docker_client):
    """B (hard timeout 4 s) waits prepared behind its gate for longer than that while A (another
    loop's, 6 s) holds the only slot; counted from the gate, B's 1.5 s run is well inside it."""
    long_loop = make_loop(one_slot, name="long", time_budget_s=6, timeout_s=30)
    short_loop = make_loop(one_slot, name="short", time_budget_s=2, timeout_s=4)
    one_slot.wait_idle(long_loop["id"])
    one_slot.wait_idle(short_loop["id"])
    a = _submit(one_slot, long_loop["id"], sleeper(6.0, 0.9), "a")
    b = _submit(one_slot, short_loop["id"], sleeper(1.5, 0.8), "b")
    _wait_for(lambda: _gated(docker_client, b), "B to be prepared")
    prepared_at = time.time()
    final_a, final_b = one_slot.wait_final(a), one_slot.wait_final(b)
    assert final_a["status"] in ("keep", "discard"), final_a
    held = final_b["started_at"] - prepared_at
    assert held > 4.0, f"B was held only {held:.1f} s behind its gate: the test proves nothing"
    assert final_b["status"] == "keep", final_b
    assert 1.5 <= final_b["workload_seconds"] < 4.0


# -- GPU binding of prepared runs (bookkeeping only: no engine, no database) ----------------------


def test_prepared_runs_are_made_for_one_slots_gpus_and_never_share_them():
    slots = Slots([Node(name="local", slots=2, gpus=("0", "1", "2"))])
    held = slots.pools["local"].allocate(2)
    assert held == ["0", "1"]
    holding = [Placement("local", tuple(held))]  # experiment x runs on them
    promised: list[Placement] = []  # where runs prepared earlier were bound, in order

    def bind(n: int) -> list[str] | None:
        place = slots.bindable(n, promised, holding)
        return None if place is None else list(place.gpus)

    first = bind(2)
    assert first == ["0", "1"]  # the slot that will hand them over
    promised.append(Placement("local", tuple(first)))
    assert bind(2) is None  # only one free id left, and 0/1 are promised
    second = bind(1)
    assert second == ["2"]  # a free id nobody was promised
    promised.append(Placement("local", tuple(second)))
    assert bind(1) is None
    assert bind(0) == []
    assert slots.pools["local"].free == 1  # binding takes nothing from the pool
