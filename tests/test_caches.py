"""A loop's cache through a real service and real containers: the unmodified baseline fills it,
every run works on a private copy, and what a candidate writes into its copy reaches no other run.
It can be cleared and filled again; over its bound it is not kept, and the loop view says so."""

from __future__ import annotations

import json

import pytest
from test_api import submit

pytestmark = pytest.mark.docker

TRAIN = r"""
import json, os
ROLE = "baseline"
c = os.environ["RATCHET_CACHE_DIR"]
seen = {}
for root, _, files in os.walk(c):
    for name in files:
        path = os.path.join(root, name)
        seen[os.path.relpath(path, c)] = open(path).read()
ind = os.environ["TORCHINDUCTOR_CACHE_DIR"]
hub = os.path.join(os.environ["HF_HOME"], "hub")
if ROLE == "baseline":  # what a first compile and a first download would leave
    os.makedirs(ind, exist_ok=True)
    os.makedirs(hub, exist_ok=True)
    open(os.path.join(ind, "kernel.py"), "w").write("baseline kernel")
    open(os.path.join(hub, "model.bin"), "w").write("weights")
elif ROLE == "poison":  # a hostile candidate: change, add and delete in its copy
    open(os.path.join(ind, "kernel.py"), "w").write("POISONED")
    open(os.path.join(ind, "evil.py"), "w").write("import os; os.system('x')")
    os.unlink(os.path.join(hub, "model.bin"))
elif ROLE == "big":
    os.makedirs(ind, exist_ok=True)
    open(os.path.join(ind, "big.bin"), "w").write("x" * 1_500_000)
env = {k: os.environ.get(k) for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE",
                                     "TORCHINDUCTOR_CACHE_DIR", "XDG_CACHE_HOME")}
print("SEEN " + json.dumps({"cache": c, "files": seen, "env": env}), flush=True)
print("---")
print("val_bpb: " + ("1.0" if ROLE == "baseline" else "2.0"))
"""


def role(name: str) -> str:
    return TRAIN.replace('ROLE = "baseline"', f'ROLE = "{name}"')


def seen(srv, exp_id: str) -> dict:
    log = srv.client.get(f"/v1/experiments/{exp_id}/logs").text
    return json.loads(next(line for line in log.splitlines() if line.startswith("SEEN "))[5:])


def make_loop(srv, train: str = TRAIN) -> dict:
    body = {
        "name": "cached",
        "workspace": {"files": {"train.py": train}},
        "editable": ["train.py"],
        "time_budget_s": 5,
        "timeout_s": 30,
        "resources": {"cpus": 0.5, "memory_mb": 256, "pids": 64, "disk_mb": 32},
    }
    r = srv.client.post("/v1/loops", json=body)
    assert r.status_code == 201, r.text
    return r.json()


def run(srv, loop_id: str, description: str, train: str) -> dict:
    exp = submit(srv, loop_id, description, files={"train.py": train})
    done = srv.wait_final(exp["id"], timeout=120)
    assert done["status"] in ("keep", "discard"), done
    srv.wait_idle(loop_id)
    return done


BASELINE_FILES = {"torchinductor/kernel.py": "baseline kernel", "huggingface/hub/model.bin": "weights"}


def test_a_candidate_writing_into_its_cache_copy_changes_nothing_for_the_next_run(server_factory):
    srv = server_factory(slots=1)
    loop = make_loop(srv)
    lid = loop["id"]
    assert loop["cache"] is None
    srv.wait_idle(lid)
    base = srv.client.get(f"/v1/loops/{lid}/experiments").json()["items"][0]
    first = seen(srv, base["id"])
    assert first["files"] == {} and first["cache"] == "/sandbox/cache"
    assert first["env"] == {
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "TORCHINDUCTOR_CACHE_DIR": "/sandbox/cache/torchinductor",
        "XDG_CACHE_HOME": "/sandbox/cache",
    }
    cache = srv.client.get(f"/v1/loops/{lid}").json()["cache"]
    assert cache["state"] == "filled" and cache["experiment"] == base["id"]
    assert cache["files"] == 2 and cache["bytes"] == len("baseline kernel") + len("weights")

    poison = run(srv, lid, "poison the cache", role("poison"))
    assert seen(srv, poison["id"])["files"] == BASELINE_FILES  # it got the baseline's cache...
    reader = run(srv, lid, "read the cache", role("reader"))
    assert seen(srv, reader["id"])["files"] == BASELINE_FILES  # ...and the next run still does
    r = srv.client.post(f"/v1/loops/{lid}/baseline")
    assert r.status_code == 202, r.text
    srv.wait_idle(lid)
    assert seen(srv, r.json()["id"])["files"] == BASELINE_FILES  # a baseline re-run refills nothing
    assert srv.client.get(f"/v1/loops/{lid}").json()["cache"] == cache

    # cleared: the next run starts empty; filled again by a fresh baseline run
    r = srv.client.delete(f"/v1/loops/{lid}/cache")
    assert r.status_code == 200 and r.json()["cache"] is None, r.text
    # each reader is a snapshot of its own: a repeat would be answered as a duplicate
    empty = run(srv, lid, "after clearing", role("reader after clearing"))
    assert seen(srv, empty["id"])["files"] == {}
    r = srv.client.post(f"/v1/loops/{lid}/cache/fill")
    assert r.status_code == 202, r.text
    fill = r.json()
    assert fill["kind"] == "baseline" and fill["description"] == "baseline (fills the cache)"
    srv.wait_idle(lid)
    again = srv.client.get(f"/v1/loops/{lid}").json()["cache"]
    assert again["state"] == "filled" and again["experiment"] == fill["id"] and again["files"] == 2
    after = run(srv, lid, "after refilling", role("reader after refilling"))
    assert seen(srv, after["id"])["files"] == BASELINE_FILES


def test_a_cache_over_the_bound_is_not_kept_and_the_loop_says_so(server_factory):
    srv = server_factory(slots=1, env={"RATCHET_CACHE_MAX_MB": "1"})
    loop = make_loop(srv, role("big"))
    srv.wait_idle(loop["id"])
    cache = srv.client.get(f"/v1/loops/{loop['id']}").json()["cache"]
    assert cache["state"] == "too_large" and cache["bytes"] == 1_500_000 and cache["files"] == 1
    nxt = run(srv, loop["id"], "next", role("reader"))
    assert seen(srv, nxt["id"])["files"] == {}


def test_filling_needs_caches_on(server_factory):
    srv = server_factory(env={"RATCHET_CACHE_MAX_MB": "0"})
    loop = make_loop(
        srv, "import os\nprint(os.environ.get('RATCHET_CACHE_DIR'))\nprint('---')\nprint('val_bpb: 1')\n"
    )
    r = srv.client.post(f"/v1/loops/{loop['id']}/cache/fill")
    assert r.status_code == 409 and "RATCHET_CACHE_MAX_MB=0" in r.json()["detail"]
    srv.wait_idle(loop["id"])
    base = srv.client.get(f"/v1/loops/{loop['id']}/experiments").json()["items"][0]
    assert srv.client.get(f"/v1/experiments/{base['id']}/logs").text.startswith("None")


def test_the_command_line_shows_fills_and_clears_a_cache(server_factory, tmp_path):
    from test_cli import ratchet

    srv = server_factory(slots=1, env={"RATCHET_DATASETS": f"corpus={tmp_path}"})
    loop = make_loop(srv)
    srv.wait_idle(loop["id"])
    shown = ratchet(srv, "loop", "show", "cached")
    assert shown.exit_code == 0 and "cache" in shown.output and "filled by" in shown.output, shown.output
    cleared = ratchet(srv, "cache", "clear", "cached")
    assert cleared.exit_code == 0 and "none yet" in cleared.output, cleared.output
    filled = ratchet(srv, "cache", "fill", "cached", "--wait")
    assert filled.exit_code == 0, filled.output
    assert (
        "queued to fill the cache" in filled.output and "discard; cache 0.0 MB in 2 files" in filled.output
    )  # a re-run never beats itself
    listed = ratchet(srv, "datasets")
    assert (
        listed.exit_code == 0 and listed.output.split() == ["corpus"] and str(tmp_path) not in listed.output
    )
