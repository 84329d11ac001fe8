"""The API fuzzed from its own OpenAPI document: schemathesis generates valid and invalid requests for
every operation against a real service holding real data. No answer may be a 5xx, and every answer
must match the document (status code, content type, body schema).

The service has one slot, held by a loop whose baseline sleeps, so the loops and candidates the fuzzer
creates queue up instead of starting containers; the real loop it also aims at has run a baseline and
a candidate, and the fuzzer's requests use its ids half of the time."""

from __future__ import annotations

import time

import hypothesis.strategies as st
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from schemathesis import GenerationMode
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
)
from schemathesis.core.failures import FailureGroup
from test_api import edit, make_loop

CHECKS = (not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance)
EXAMPLES = 48  # per operation; operations without inputs stop after their few distinct requests
MIN_REQUESTS = 1000
SLEEPER = "import time\ntime.sleep(3600)\n"


def occupy_the_slot(srv) -> None:
    busy = make_loop(
        srv,
        name="busy",
        workspace={"files": {"train.py": SLEEPER}},
        time_budget_s=3000,
        timeout_s=3600,
    )
    deadline = time.monotonic() + 60
    while srv.client.get(f"/v1/loops/{busy['id']}").json()["counts"]["running"] != 1:
        assert time.monotonic() < deadline, "the sleeping baseline did not start"
        time.sleep(0.2)


def real_ids(srv) -> dict[str, str]:
    loop = make_loop(srv, name="fuzzed")
    srv.wait_idle(loop["id"])
    body = {"description": "x", "patch": edit("0.5")}
    r = srv.client.post(f"/v1/loops/{loop['id']}/experiments", json=body)
    assert r.status_code == 202, r.text
    exp = srv.wait_final(r.json()["id"])
    assert exp["status"] == "keep", exp
    token = srv.client.post("/v1/tokens", json={"name": "fuzzed", "scopes": ["read"]}).json()
    return {
        "loop_id": loop["id"],
        "exp_id": exp["id"],
        "snapshot_id": exp["snapshot"],
        "token_id": token["id"],
    }


def fuzz(op, srv, ids: dict[str, str], sent: list[str], failures: dict[str, str]) -> None:
    """Sends EXAMPLES valid and invalid requests for one operation; collects what fails its checks."""
    strategy = st.one_of(
        op.as_strategy(generation_mode=GenerationMode.POSITIVE),
        op.as_strategy(generation_mode=GenerationMode.NEGATIVE),
    )

    @given(case=strategy, real=st.booleans())
    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        database=None,
        phases=[Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    def run(case, real: bool) -> None:
        if real and case.path_parameters:
            case.path_parameters = {k: ids.get(k, v) for k, v in case.path_parameters.items()}
        response = case.call(base_url=srv.url, timeout=60)
        sent.append(op.label)
        try:
            case.validate_response(response, checks=CHECKS)
        except (AssertionError, FailureGroup) as exc:  # collect every failure, then report them all
            first = next((ln for ln in str(exc).splitlines() if ln.startswith("- ")), type(exc).__name__)
            failures.setdefault(f"{op.label}: {first}", f"{exc}\n{case.as_curl_command()}")

    run()


@pytest.mark.timeout(600)
def test_fuzz_the_api_from_its_openapi_document(server_factory):
    # webhooks the fuzzer adds must never reach for a host off this machine (nor resolve one)
    srv = server_factory(slots=1, env={"RATCHET_WEBHOOK_ALLOW_PUBLIC": "false"})
    ids = real_ids(srv)
    occupy_the_slot(srv)
    schema = schemathesis.openapi.from_url(srv.url + "/schema/openapi.json")
    sent: list[str] = []
    failures: dict[str, str] = {}
    for result in schema.get_all_operations():
        fuzz(result.ok(), srv, ids, sent, failures)

    assert not failures, "\n\n".join(f"{k}\n{v}" for k, v in failures.items())
    print(f"{len(sent)} requests over {len(set(sent))} operations")
    assert len(sent) >= MIN_REQUESTS, f"only {len(sent)} requests: {sorted(set(sent))}"
    assert "Traceback" not in srv.log(), srv.log()[-5000:]
