"""The OpenAPI document as real clients read it: valid OpenAPI 3.1, operation ids a person would
choose, and a Python client generated from the live document that drives a loop end to end."""

from __future__ import annotations

import importlib
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from openapi_spec_validator import validate
from test_api import HARNESS, TRAIN, edit

OPERATIONS = {
    ("post", "/v1/loops"): "createLoop",
    ("get", "/v1/loops"): "listLoops",
    ("get", "/v1/loops/{loop_id}"): "getLoop",
    ("post", "/v1/loops/{loop_id}/pause"): "pauseLoop",
    ("post", "/v1/loops/{loop_id}/resume"): "resumeLoop",
    ("post", "/v1/loops/{loop_id}/stop"): "stopLoop",
    ("post", "/v1/loops/{loop_id}/baseline"): "rerunBaseline",
    ("post", "/v1/loops/{loop_id}/experiments"): "submitCandidate",
    ("get", "/v1/loops/{loop_id}/experiments"): "listExperiments",
    ("get", "/v1/loops/{loop_id}/results.tsv"): "getResults",
    ("get", "/v1/loops/{loop_id}/history.bundle"): "getHistoryBundle",
    ("get", "/v1/loops/{loop_id}/progress.svg"): "getProgressChart",
    ("get", "/v1/loops/{loop_id}/snapshots"): "listSnapshots",
    ("delete", "/v1/loops/{loop_id}/cache"): "clearCache",
    ("post", "/v1/loops/{loop_id}/cache/fill"): "fillCache",
    ("get", "/v1/datasets"): "listDatasets",
    ("get", "/v1/experiments/{exp_id}"): "getExperiment",
    ("get", "/v1/experiments/{exp_id}/logs"): "followLogs",
    ("get", "/v1/experiments/{exp_id}/diff"): "getExperimentDiff",
    ("post", "/v1/experiments/{exp_id}/rerun"): "rerunExperiment",
    ("post", "/v1/experiments/{exp_id}/cancel"): "cancelExperiment",
    ("get", "/v1/snapshots/{snapshot_id}/archive"): "getSnapshotArchive",
    ("get", "/v1/loops/{loop_id}/proposals"): "listProposals",
    ("get", "/v1/proposals/{proposal_id}"): "getProposal",
    ("get", "/v1/proposals/{proposal_id}/logs"): "followProposalLogs",
    ("post", "/v1/proposals/{proposal_id}/cancel"): "cancelProposal",
    ("post", "/v1/tokens"): "createToken",
    ("get", "/v1/tokens"): "listTokens",
    ("delete", "/v1/tokens/{token_id}"): "revokeToken",
    ("post", "/v1/loops/{loop_id}/webhooks"): "addLoopWebhook",
    ("get", "/v1/webhooks"): "listWebhooks",
    ("delete", "/v1/webhooks/{webhook_id}"): "deleteWebhook",
    ("get", "/v1/webhooks/deliveries"): "listWebhookDeliveries",
    ("post", "/v1/webhooks/deliveries/{delivery_id}/retry"): "retryWebhookDelivery",
    ("get", "/v1/service"): "getServiceInfo",
    ("get", "/healthz"): "getHealth",
    ("get", "/readyz"): "getReadiness",
}
# The generator reads only a few response types; these two are files to it.
GENERATOR_CONFIG = {
    "post_hooks": [],
    "content_type_overrides": {
        "image/svg+xml": "application/octet-stream",
        "application/gzip": "application/octet-stream",
    },
}


@pytest.fixture
def document(server) -> dict:
    r = server.client.get("/schema/openapi.json")
    assert r.status_code == 200
    return r.json()


def test_the_document_is_valid_openapi_3_1(document):
    assert document["openapi"].startswith("3.1")
    validate(document)  # raises, naming the place, on anything 3.1 does not allow


def test_operation_ids_are_the_ones_a_client_would_choose(document):
    found = {
        (method, path): op.get("operationId")
        for path, ops in document["paths"].items()
        for method, op in ops.items()
    }
    assert found == OPERATIONS
    ids = list(found.values())
    assert len(set(ids)) == len(ids)
    assert all(re.fullmatch(r"[a-z]+(?:[A-Z][a-z]+)*", i) for i in ids), ids


def test_the_log_stream_stays_documented(document):
    content = document["paths"]["/v1/experiments/{exp_id}/logs"]["get"]["responses"]["200"]["content"]
    stream = content["text/event-stream"]
    assert stream["schema"]["type"] == "object"  # one event, as SSE-aware tools read it under 3.1
    assert set(stream["schema"]["properties"]) == {"event", "data"}
    assert "text/plain" in content


def test_a_nullable_literal_is_one_enum(document):
    runtime = document["components"]["schemas"]["LoopCreate"]["properties"]["runtime"]
    assert {"$ref": "#/components/schemas/Runtime"} in runtime["oneOf"]
    assert document["components"]["schemas"]["Runtime"]["enum"] == ["runc", "runsc"]


def _generate(url: str, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    config = out.parent / "generator.json"
    config.write_text(json.dumps(GENERATOR_CONFIG))
    generator = Path(sys.executable).with_name("openapi-python-client")
    proc = subprocess.run(
        [
            str(generator),
            "generate",
            "--url",
            f"{url}/schema/openapi.json",
            "--meta",
            "none",
            "--output-path",
            str(out),
            "--config",
            str(config),
        ],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # Nothing of the document may be left out of the client.
    assert "Warning" not in proc.stdout + proc.stderr, proc.stdout + proc.stderr


def test_a_generated_client_drives_a_loop(server, tmp_path, monkeypatch):
    package = tmp_path / "gen" / "ratchet_api"
    _generate(server.url, package)
    models = {p.stem for p in (package / "models").glob("*.py")}
    assert "runtime" in models and not any(m.startswith("loop_create_runtime") for m in models), models
    monkeypatch.syspath_prepend(str(package.parent))
    api = importlib.import_module("ratchet_api")
    from ratchet_api.api.experiments import get_experiment
    from ratchet_api.api.loops import create_loop, get_loop, get_results, submit_candidate
    from ratchet_api.models import CandidateCreate, LoopCreate, Runtime

    client = api.Client(base_url=server.url, raise_on_unexpected_status=True, timeout=60)
    body = LoopCreate.from_dict(
        {
            "name": "generated",
            "workspace": {"files": {"train.py": TRAIN, "prepare.py": HARNESS}},
            "editable": ["train.py"],
            "time_budget_s": 5,
            "timeout_s": 20,
            "resources": {"cpus": 0.5, "memory_mb": 256, "pids": 64, "disk_mb": 64},
        }
    )
    body.runtime = Runtime.RUNC
    loop = create_loop.sync(client=client, body=body)
    assert loop.name == "generated" and loop.config.runtime == Runtime.RUNC

    def verdict(exp_id: str) -> str:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            exp = get_experiment.sync(exp_id, client=client)
            if exp.status.value not in ("queued", "running", "confirming"):
                return exp.status.value
            time.sleep(0.2)
        raise AssertionError(f"{exp_id} did not finish")

    candidate = submit_candidate.sync(
        loop.id, client=client, body=CandidateCreate(description="smaller V", patch=edit("0.5"))
    )
    assert candidate.status.value == "queued"
    assert verdict(candidate.id) == "keep"
    shown = get_loop.sync(loop.id, client=client)
    assert shown.best_metric == 0.5
    tsv = get_results.sync(loop.id, client=client)
    rows = [line.split("\t") for line in tsv.strip().splitlines()]
    assert rows[0] == ["commit", "val_bpb", "memory_gb", "status", "description"]
    assert [(r[1], r[3], r[4]) for r in rows[1:]] == [
        ("1.000000", "keep", "baseline"),
        ("0.500000", "keep", "smaller V"),
    ]
