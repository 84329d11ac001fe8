"""The v1 contract over real HTTP against a real service, with a tiny, fast workspace."""

from __future__ import annotations

import base64
import io
import tarfile
import time

import pytest

TRAIN = (
    "import os, sys, time\n"
    "V = 1.0\n"
    "SLEEP = 0.0\n"
    "time.sleep(SLEEP)\n"
    "print('budget', os.environ['RATCHET_TIME_BUDGET_S'], os.environ['RATCHET_LOOP_ID'])\n"
    "print('---')\n"
    "print(f'val_bpb: {V:.6f}')\n"
    "print('num_steps: 7')\n"
)
HARNESS = "SECRET = 1\n"


def make_loop(srv, name: str = "tiny", **overrides) -> dict:
    body = {
        "name": name,
        "workspace": {"files": {"train.py": TRAIN, "prepare.py": HARNESS}},
        "editable": ["train.py"],
        "time_budget_s": 5,
        "timeout_s": 20,
        "resources": {"cpus": 0.5, "memory_mb": 256, "pids": 64, "disk_mb": 64},
        **overrides,
    }
    r = srv.client.post("/v1/loops", json=body)
    assert r.status_code == 201, r.text
    return r.json()


def submit(srv, loop_id: str, description: str, **body) -> dict:
    """Submits a candidate (`patch=...` or `files=...`); the experiment as the 202 returned it."""
    r = srv.client.post(f"/v1/loops/{loop_id}/experiments", json={"description": description, **body})
    assert r.status_code == 202, r.text
    return r.json()


def edit(value: str) -> str:
    return f"--- a/train.py\n+++ b/train.py\n@@ -2 +2 @@\n-V = 1.0\n+V = {value}\n"


def test_loop_lifecycle_and_views(server):
    loop = make_loop(server)
    assert loop["state"] == "active" and loop["baseline"] == "pending"
    assert loop["config"]["image"] == "ratchet/sandbox:latest"
    assert loop["config"]["runtime"] == "runc"
    loop = server.wait_idle(loop["id"])
    assert loop["baseline"] == "ok" and loop["best_metric"] == 1.0
    assert loop["best_snapshot"] == loop["root_snapshot"]
    assert loop["counts"]["keep"] == 1
    listed = server.client.get("/v1/loops").json()
    assert [x["id"] for x in listed] == [loop["id"]]
    base = server.client.get(f"/v1/loops/{loop['id']}/experiments").json()["items"][0]
    assert base["kind"] == "baseline" and base["number"] == 1 and base["status"] == "keep"
    assert base["metrics"] == {"val_bpb": 1.0, "num_steps": 7.0}
    assert base["memory_gb"] is not None and base["memory_gb"] > 0  # container peak memory
    exp = server.client.get(f"/v1/experiments/{base['id']}").json()
    assert f"budget 5 {loop['id']}" in exp["log_tail"]
    logs = server.client.get(f"/v1/experiments/{base['id']}/logs")
    assert logs.status_code == 200 and "val_bpb: 1.000000" in logs.text


def test_candidate_refusals_are_422_and_store_nothing(server):
    loop = make_loop(server)
    lid = loop["id"]
    server.wait_idle(lid)
    bad = {
        "harness edit": {"patch": edit("0.1").replace("train.py", "prepare.py")},
        "absolute path": {"files": {"/etc/passwd": "x"}},
        "dotdot": {"files": {"../train.py": "x"}},
        "git dir": {"files": {".git/config": "x"}},
        "does not apply": {"patch": edit("0.1").replace("-V = 1.0", "-V = 3.0")},
        "empty patch": {"patch": ""},
        "binary": {"patch": "GIT binary patch\nliteral 0\n"},
        "symlink": {
            "patch": "diff --git a/train.py b/train.py\nnew file mode 120000\n"
            "--- /dev/null\n+++ b/x\n@@ -0,0 +1 @@\n+/etc\n"
        },
        "both": {"patch": edit("0.1"), "files": {"train.py": "x"}},
        "neither": {},
        "identical": {"files": {"train.py": TRAIN}},
        "NUL": {"files": {"train.py": "a\x00b"}},
        "unknown parent": {"files": {"train.py": "x"}, "parent": "abcdef0"},
    }
    for name, body in bad.items():
        r = server.client.post(f"/v1/loops/{lid}/experiments", json={"description": name, **body})
        assert r.status_code == 422, (name, r.status_code, r.text)
        assert r.json()["detail"], name
    after = server.client.get(f"/v1/loops/{lid}").json()
    assert sum(after["counts"].values()) == 1  # only the baseline
    # malformed bodies are 400 with the field named
    r = server.client.post(f"/v1/loops/{lid}/experiments", json={"description": "x", "patchh": "y"})
    assert r.status_code == 400 and "patchh" in r.text
    r = server.client.post(f"/v1/loops/{lid}/experiments", content=b"{not json")
    assert r.status_code == 400
    big = "x" * (17 * 1024 * 1024)
    r = server.client.post(
        f"/v1/loops/{lid}/experiments", json={"description": "big", "files": {"train.py": big}}
    )
    assert r.status_code == 413 and "RATCHET_MAX_BODY_BYTES" in r.json()["detail"]


def test_loop_refusals(server):
    cases = [
        ({"name": "bad name!"}, 400),
        ({"metric": {"name": "val_bpb", "direction": "sideways"}}, 400),
        ({"metric": {"name": "val_bpb", "min_delta": -1}}, 400),
        ({"metric": {"name": "val_bpb", "min_value": 1, "max_value": 0}}, 422),
        ({"resources": {"gpus": 1}}, 422),
        ({"time_budget_s": 10, "timeout_s": 5}, 422),
        ({"env": {"RATCHET_SEED": "1"}}, 422),
        ({"image": "ratchet/does-not-exist:latest"}, 422),
        ({"workspace": {"files": {}}}, 422),
        ({"workspace": {"archive": "not base64!"}}, 422),
        ({"runtime": "kata"}, 400),
        ({"runtime": "runsc", "resources": {"pids": 64}}, 422),
    ]
    base = {"name": "x", "workspace": {"files": {"train.py": TRAIN}}}
    for change, code in cases:
        r = server.client.post("/v1/loops", json={**base, **change})
        assert r.status_code == code, (change, r.status_code, r.text)
        assert r.json().get("detail"), change
    assert server.client.get("/v1/loops").json() == []
    make_loop(server, name="dup")
    r = server.client.post("/v1/loops", json={**base, "name": "dup"})
    assert r.status_code == 409


def test_archive_workspace_and_snapshot_archive(server):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, text in {"train.py": TRAIN, "lib/prepare.py": HARNESS}.items():
            info = tarfile.TarInfo(name)
            info.size = len(text.encode())
            tar.addfile(info, io.BytesIO(text.encode()))
    loop = make_loop(server, workspace={"archive": base64.b64encode(buf.getvalue()).decode()})
    r = server.client.get(f"/v1/snapshots/{loop['root_snapshot']}/archive")
    assert r.status_code == 200 and r.headers["content-type"].startswith("application/gzip")
    with tarfile.open(fileobj=io.BytesIO(r.content), mode="r:gz") as tar:
        names = sorted(m.name for m in tar.getmembers())
        assert names == ["lib/prepare.py", "train.py"]
        assert tar.extractfile("lib/prepare.py").read().decode() == HARNESS
    assert server.client.get("/v1/snapshots/" + "0" * 64 + "/archive").status_code == 404


def test_pause_resume_cancel_stop(server):
    loop = make_loop(server)
    lid = loop["id"]
    server.wait_idle(lid)
    assert server.client.post(f"/v1/loops/{lid}/pause").json()["state"] == "paused"
    exp = server.client.post(
        f"/v1/loops/{lid}/experiments", json={"description": "a", "patch": edit("0.5")}
    ).json()
    time.sleep(1.5)
    assert server.client.get(f"/v1/experiments/{exp['id']}").json()["status"] == "queued"
    cancel_me = server.client.post(
        f"/v1/loops/{lid}/experiments", json={"description": "b", "patch": edit("0.4")}
    ).json()
    r = server.client.post(f"/v1/experiments/{cancel_me['id']}/cancel")
    assert r.status_code == 200 and r.json()["status"] == "cancelled"
    assert server.client.post(f"/v1/experiments/{cancel_me['id']}/cancel").status_code == 409
    assert server.client.post(f"/v1/loops/{lid}/resume").json()["state"] == "active"
    assert server.wait_final(exp["id"])["status"] == "keep"
    # a running experiment is killed by cancel
    slow = TRAIN.replace("SLEEP = 0.0", "SLEEP = 60.0")
    running = server.client.post(
        f"/v1/loops/{lid}/experiments", json={"description": "slow", "files": {"train.py": slow}}
    ).json()
    deadline = time.monotonic() + 30
    while server.client.get(f"/v1/experiments/{running['id']}").json()["status"] != "running":
        assert time.monotonic() < deadline
        time.sleep(0.1)
    time.sleep(1.0)
    t0 = time.monotonic()
    assert server.client.post(f"/v1/experiments/{running['id']}/cancel").json()["status"] == "cancelled"
    final = server.wait_final(running["id"], timeout=15)
    assert final["status"] == "cancelled" and time.monotonic() - t0 < 10
    # stop cancels what is queued and running, and refuses new work
    queued = server.client.post(
        f"/v1/loops/{lid}/experiments", json={"description": "q", "files": {"train.py": slow}}
    ).json()
    stopped = server.client.post(f"/v1/loops/{lid}/stop").json()
    assert stopped["state"] == "stopped"
    assert server.wait_final(queued["id"], timeout=15)["status"] == "cancelled"
    r = server.client.post(f"/v1/loops/{lid}/experiments", json={"description": "late", "patch": edit("0.1")})
    assert r.status_code == 409
    assert server.client.post(f"/v1/loops/{lid}/resume").status_code == 409


def test_pagination_and_status_filter(server):
    loop = make_loop(server, max_experiments=8)
    lid = loop["id"]
    server.wait_idle(lid)
    for i in range(6):
        r = server.client.post(
            f"/v1/loops/{lid}/experiments", json={"description": f"c{i}", "patch": edit(f"{2 + i}.0")}
        )
        assert r.status_code == 202
    r = server.client.post(f"/v1/loops/{lid}/experiments", json={"description": "c6", "patch": edit("9.0")})
    assert r.status_code == 202
    r = server.client.post(f"/v1/loops/{lid}/experiments", json={"description": "c7", "patch": edit("9.5")})
    assert r.status_code == 409 and "max_experiments" in r.json()["detail"]
    server.wait_idle(lid)
    seen, after = [], 0
    while True:
        page = server.client.get(f"/v1/loops/{lid}/experiments", params={"limit": 3, "after": after}).json()
        seen += [e["number"] for e in page["items"]]
        if page["next_after"] is None:
            break
        after = page["next_after"]
    assert seen == list(range(1, 9))
    discards = server.client.get(f"/v1/loops/{lid}/experiments", params={"status": "discard"}).json()["items"]
    assert len(discards) == 7 and all(e["status"] == "discard" for e in discards)
    assert server.client.get(f"/v1/loops/{lid}/experiments", params={"limit": 0}).status_code == 400
    huge = server.client.get(f"/v1/loops/{lid}/experiments", params={"after": 10**30})
    assert huge.status_code == 400, huge.text  # not a 500 from an integer SQLite cannot hold
    assert server.client.get(f"/v1/loops/{lid}/experiments", params={"status": "bogus"}).status_code == 400


def test_openapi_health_and_not_found(server):
    doc = server.client.get("/schema/openapi.json").json()
    for path in (
        "/v1/loops",
        "/v1/loops/{loop_id}",
        "/v1/loops/{loop_id}/experiments",
        "/v1/loops/{loop_id}/results.tsv",
        "/v1/loops/{loop_id}/snapshots",
        "/v1/experiments/{exp_id}",
        "/v1/experiments/{exp_id}/logs",
        "/v1/experiments/{exp_id}/cancel",
        "/v1/snapshots/{snapshot_id}/archive",
        "/v1/loops/{loop_id}/stop",
    ):
        assert path in doc["paths"], path
    assert "LoopCreate" in doc["components"]["schemas"]
    assert server.client.get("/healthz").json()["status"] == "ok"
    ready = server.client.get("/readyz").json()
    assert ready == {"status": "ready", "database": True, "engine": True, "detail": None}
    for path in ("/v1/loops/0123456789abcdef", "/v1/experiments/0123456789abcdef"):
        r = server.client.get(path)
        assert r.status_code == 404 and "0123456789abcdef" in r.json()["detail"]


def test_metrics_exposition(server):
    loop = make_loop(server)
    server.wait_idle(loop["id"])
    server.client.post(f"/v1/loops/{loop['id']}/experiments", json={"description": "x", "patch": edit("0.5")})
    server.wait_idle(loop["id"])
    text = server.client.get("/metrics").text
    for needle in (
        'ratchet_experiments_total{loop="tiny",status="keep"} 2.0',
        "ratchet_experiment_duration_seconds_bucket",
        "ratchet_experiment_overhead_seconds_bucket",
        'ratchet_queue_depth{loop="tiny"} 0.0',
        "ratchet_slots_total 2.0",
        "ratchet_slots_busy 0.0",
        'ratchet_loop_best_metric{loop="tiny",metric="val_bpb"} 0.5',
        "ratchet_http_requests_total",
        # labelled by route template, never by the raw path (which would carry ids)
        'ratchet_http_requests_total{app_name="ratchet",method="GET",path="/v1/loops/{loop_id}",'
        'status_code="200"}',
    ):
        assert needle in text, needle
    assert f'path="/v1/loops/{loop["id"]}"' not in text


def test_access_log_is_off_unless_asked_for(server_factory):
    quiet = server_factory(name="quiet")
    loud = server_factory(env={"RATCHET_ACCESS_LOG": "1"}, name="loud")
    for srv in (quiet, loud):
        assert srv.client.get("/healthz").status_code == 200
    line = '"GET /healthz HTTP/1.1" 200'
    deadline = time.monotonic() + 10
    while line not in loud.log() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert line in loud.log()
    assert line not in quiet.log() and "ready" in quiet.log()


@pytest.mark.parametrize(
    "direction,values,expect",
    [
        ("maximize", ["2.0", "0.5"], ["keep", "keep", "discard"]),
        ("minimize", ["1.00", "0.99"], ["keep", "discard", "keep"]),
    ],
)
def test_direction_and_ties(server, direction, values, expect):
    loop = make_loop(
        server,
        name=f"dir-{direction}",
        metric={"name": "val_bpb", "direction": direction},
    )
    lid = loop["id"]
    server.wait_idle(lid)
    for v in values:
        body = {"description": v, "files": {"train.py": TRAIN.replace("V = 1.0", f"V = {v}")}}
        assert server.client.post(f"/v1/loops/{lid}/experiments", json=body).status_code == 202
        server.wait_idle(lid)
    items = server.client.get(f"/v1/loops/{lid}/experiments").json()["items"]
    assert [e["status"] for e in items] == expect


def test_failed_baseline_blocks_candidates_until_rerun(server):
    loop = make_loop(
        server,
        workspace={"files": {"train.py": "import os\nraise SystemExit(0 if os.path.exists('ok') else 3)\n"}},
    )
    lid = loop["id"]
    loop = server.wait_idle(lid)
    assert loop["baseline"] == "failed" and "exited with code 3" in loop["baseline_reason"]
    fix = {"description": "fix", "files": {"train.py": TRAIN}}
    exp = server.client.post(f"/v1/loops/{lid}/experiments", json=fix).json()
    time.sleep(1.5)
    assert server.client.get(f"/v1/experiments/{exp['id']}").json()["status"] == "queued"
    r = server.client.post(f"/v1/loops/{lid}/baseline")
    assert r.status_code == 202
    assert server.wait_final(r.json()["id"])["status"] == "crash"  # still the same failing root
    assert server.client.get(f"/v1/experiments/{exp['id']}").json()["status"] == "queued"


def test_gpu_inventory_sets_slots_and_engine_failure_is_error(server_factory):
    """On a GPU host each slot gets its own device ids. This machine's engine has no way to attach
    GPUs (no NVIDIA container toolkit, no CDI): the run is refused before any container is made,
    naming what to install. That is an infrastructure `error`, never a `crash`."""
    srv = server_factory(slots=None, env={"RATCHET_GPUS": "0,1,2"})
    metrics = srv.client.get("/metrics").text
    assert "ratchet_slots_total 3.0" in metrics
    r = srv.client.post(
        "/v1/loops",
        json={"name": "gpu", "workspace": {"files": {"train.py": TRAIN}}, "resources": {"gpus": 4}},
    )
    assert r.status_code == 422 and "3 GPU" in r.json()["detail"]
    loop = make_loop(srv, name="gpu", resources={"gpus": 2, "memory_mb": 256})
    base = srv.wait_idle(loop["id"])
    exp = srv.client.get(f"/v1/loops/{loop['id']}/experiments").json()["items"][0]
    assert exp["status"] == "error", exp
    assert exp["gpus"] == ["0", "1"]
    assert "cannot give containers GPUs" in exp["reason"], exp["reason"]
    assert "nvidia-container-toolkit" in exp["reason"] and "restart dockerd" in exp["reason"]
    assert base["baseline"] == "pending"  # an infrastructure error says nothing about the baseline
    assert 'ratchet_engine_errors_total{reason="bad_spec"} 1.0' in srv.client.get("/metrics").text
    assert "GPUs 0,1,2 found, but GPU runs will fail" in srv.log()
