"""kill -9 of a real service while a command proposer works, at the named points of a proposal's
life, restarted on the same data dir: the proposal is not lost (it runs again, or its committed
candidate stands) and never submits twice."""

from __future__ import annotations

import signal
import threading
import time

import docker
import pytest
from conftest import settled_leftovers
from proposer_scripts import SLOW
from test_api import make_loop
from test_proposers import SMALL, experiments, proposals, settled, wait_loop

pytestmark = pytest.mark.docker

POINTS = {
    "propose.prepared": 2,  # its container is up behind the gate: it runs again
    "propose.before_commit": 2,  # inside the write that queues its candidate: it runs again
    "propose.after": 1,  # its candidate is committed: it stands, nothing runs again
}


def _watch_proposer_starts(client: docker.DockerClient) -> list[dict]:
    """Every start of a proposer container from now on, as the engine reports it."""
    seen: list[dict] = []
    stream = client.events(
        decode=True, filters={"type": "container", "event": "start", "label": "ratchet.proposal"}
    )

    def pump() -> None:
        for ev in stream:
            seen.append(ev["Actor"]["Attributes"])

    threading.Thread(target=pump, daemon=True).start()
    return seen


@pytest.mark.timeout(240)
@pytest.mark.parametrize("point", list(POINTS))
def test_kill_9_during_a_proposal_loses_nothing_and_submits_once(point, server_factory, docker_client):
    starts = _watch_proposer_starts(docker_client)
    srv = server_factory(slots=1, env={"RATCHET_FAULT_POINT": point})
    proposer = {
        "kind": "command",
        "command": ["python3", "-c", SLOW],
        "env": {"THINK_S": "1"},
        "resources": SMALL,
        "timeout_s": 60,
    }
    lp = make_loop(srv, name="restarted", max_experiments=4, proposer=proposer)
    lid = lp["id"]
    assert srv.proc is not None
    srv.proc.wait(timeout=60)
    assert srv.proc.returncode == -signal.SIGKILL, srv.log()[-3000:]
    assert f"fault point {point} reached" in srv.log()

    srv.extra_env.pop("RATCHET_FAULT_POINT")
    srv.start()
    loop = wait_loop(srv, lid, settled, timeout=150)
    assert loop["proposer"]["idle_reason"] == "max_experiments=4 reached"

    props = proposals(srv, lid)
    assert [(p["number"], p["status"], p["description"]) for p in props] == [
        (1, "proposed", "edit 1"),
        (2, "proposed", "edit 2"),
        (3, "proposed", "edit 3"),
    ], props
    assert props[0]["attempts"] == POINTS[point] and all(p["attempts"] == 1 for p in props[1:])
    # each proposal made exactly one candidate, and each candidate names its proposal
    cands = experiments(srv, lid)[1:]
    assert sorted((e["proposal_id"], e["id"]) for e in cands) == sorted(
        (p["id"], p["experiment_id"]) for p in props
    )
    assert [e["metric"] for e in cands] == [0.9, 0.8, 0.7] and {e["status"] for e in cands} == {"keep"}
    # the engine's own record: the cut-off proposal's container started once per attempt, others once
    time.sleep(1)
    mine = [s for s in starts if s.get("ratchet.sandbox") == srv.instance]
    per = {
        p["id"]: sorted(int(s["ratchet.attempt"]) for s in mine if s["ratchet.proposal"] == p["id"])
        for p in props
    }
    assert per[props[0]["id"]] == list(range(1, POINTS[point] + 1)), per
    assert all(per[p["id"]] == [1] for p in props[1:]), per
    assert "recovered: 1 proposal(s) queued again" in srv.log() or POINTS[point] == 1
    assert not settled_leftovers(docker_client, f"ratchet.sandbox={srv.instance}")
