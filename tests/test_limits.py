"""Every size limit bites at its setting, answers a 4xx that names the limit and how to get under it,
and stores nothing: body size, workspace bytes and files (for loops and for candidates), the log tail
and the page size."""

from __future__ import annotations

from test_api import HARNESS, make_loop

LIMITS = {
    "RATCHET_MAX_BODY_BYTES": "16384",
    "RATCHET_MAX_WORKSPACE_BYTES": "4096",
    "RATCHET_MAX_WORKSPACE_FILES": "3",
    "RATCHET_LOG_TAIL_BYTES": "64",
    "RATCHET_MAX_PAGE_SIZE": "2",
}
NOISY = (
    "for i in range(200):\n    print('line', i)\nprint('---')\nprint('val_bpb: 1.0')\nprint('num_steps: 7')\n"
)


def refused(r, status: int, *words: str) -> str:
    assert r.status_code == status, r.text
    detail = r.json()["detail"]
    for word in words:
        assert word in detail, (word, detail)
    return detail


def test_limits_bite_and_say_how_to_fix(server_factory):
    srv = server_factory(slots=1, env=LIMITS)
    loop = make_loop(srv, workspace={"files": {"train.py": NOISY, "prepare.py": HARNESS}}, editable=["*.py"])
    lid = loop["id"]
    base = srv.wait_final(srv.client.get(f"/v1/loops/{lid}/experiments").json()["items"][0]["id"])
    assert base["status"] == "keep", base
    # log tail: the newest 64 bytes; the full log is still there
    assert len(base["log_tail"].encode()) <= 64 and base["log_tail"].endswith("num_steps: 7\n")
    assert "line 0\n" in srv.client.get(f"/v1/experiments/{base['id']}/logs").text
    srv.client.post(f"/v1/loops/{lid}/pause")

    submit = f"/v1/loops/{lid}/experiments"
    huge = {"description": "huge", "files": {"train.py": "x" * 20000}}
    refused(srv.client.post(submit, json=huge), 413, "16384 bytes", "RATCHET_MAX_BODY_BYTES")
    big = {"description": "big", "files": {"big.py": "x" * 5000}}
    refused(srv.client.post(submit, json=big), 422, "4096 bytes", "RATCHET_MAX_WORKSPACE_BYTES", "smaller")
    many = {"description": "many", "files": {"a.py": "1", "b.py": "2"}}
    refused(srv.client.post(submit, json=many), 422, "3 files", "RATCHET_MAX_WORKSPACE_FILES")

    ws_big = {"files": {"train.py": "x" * 5000}}
    detail = refused(make(srv, "big", ws_big), 422, "the limit is 4096", "RATCHET_MAX_WORKSPACE_BYTES")
    assert "leave out data" in detail
    ws_many = {"files": {f"f{i}.py": "x" for i in range(4)}}
    refused(make(srv, "many", ws_many), 422, "the limit is 3", "RATCHET_MAX_WORKSPACE_FILES")
    refused(make(srv, "huge", {"files": {"train.py": "x" * 20000}}), 413, "RATCHET_MAX_BODY_BYTES")
    # nothing of the refused requests was stored
    assert [lp["id"] for lp in srv.client.get("/v1/loops").json()] == [lid]
    assert sum(srv.client.get(f"/v1/loops/{lid}").json()["counts"].values()) == 1

    for value in ("0.5", "0.25"):
        body = {"description": value, "files": {"train.py": NOISY.replace("1.0", value)}}
        assert srv.client.post(submit, json=body).status_code == 202
    listing = f"/v1/loops/{lid}/experiments"
    refused(srv.client.get(listing, params={"limit": 3}), 400, "largest page of 2", "next_after")
    page = srv.client.get(listing, params={"limit": 2}).json()
    assert [x["number"] for x in page["items"]] == [1, 2] and page["next_after"] == 2
    page = srv.client.get(listing, params={"limit": 2, "after": 2}).json()
    assert [x["number"] for x in page["items"]] == [3] and page["next_after"] is None
    assert [x["number"] for x in srv.client.get(listing).json()["items"]] == [1, 2]  # default clamps
    srv.client.post(f"/v1/loops/{lid}/stop")


def make(srv, name: str, workspace: dict):
    return srv.client.post("/v1/loops", json={"name": name, "workspace": workspace})
