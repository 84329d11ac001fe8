"""The built-in `search` proposer improves the bundled example loop (examples/charlm), with nobody
submitting anything: the demo's own proposer settings, a real NumPy model, real containers."""

from __future__ import annotations

import importlib.util
import time

import pytest
from conftest import ROOT

from client import loop_body_from_dir

EXAMPLE = ROOT / "examples" / "charlm"


def _demo_search() -> dict:
    spec = importlib.util.spec_from_file_location("demo", ROOT / "examples" / "demo.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.SEARCH


@pytest.mark.docker
@pytest.mark.timeout(400)
def test_search_improves_the_example_loop(server_factory):
    srv = server_factory(slots=1)
    body = loop_body_from_dir(
        EXAMPLE,
        name="charlm-search",
        time_budget_s=4,
        timeout_s=25,
        max_experiments=5,
        proposer=_demo_search(),
    )
    r = srv.client.post("/v1/loops", json=body)
    assert r.status_code == 201, r.text
    lid = r.json()["id"]
    deadline = time.monotonic() + 300
    while True:
        loop = srv.client.get(f"/v1/loops/{lid}").json()
        c = loop["counts"]
        if loop["proposer"]["idle_reason"] and not (c["queued"] or c["running"]):
            break
        assert time.monotonic() < deadline, (loop, srv.log()[-3000:])
        time.sleep(1)
    assert loop["proposer"]["idle_reason"] == "max_experiments=5 reached"
    exps = srv.client.get(f"/v1/loops/{lid}/experiments").json()["items"]
    baseline, candidates = exps[0], exps[1:]
    assert baseline["status"] == "keep" and len(candidates) == 4
    assert all(e["proposal_id"] and e["description"].startswith("search: ") for e in candidates)
    assert {e["status"] for e in candidates} <= {"keep", "discard"}, [e["reason"] for e in candidates]
    # the search found an edit that beats the baseline: the chart steps down with it, labelled
    assert loop["best_metric"] < baseline["metric"], [(e["description"], e["metric"]) for e in exps]
    kept = [e for e in candidates if e["status"] == "keep"]
    svg = srv.client.get(f"/v1/loops/{lid}/progress.svg").text
    assert kept and all(k["description"][:20] in svg for k in kept)
    diff = srv.client.get(f"/v1/experiments/{kept[0]['id']}/diff").text
    assert diff.startswith("--- a/train.py\n+++ b/train.py\n")
