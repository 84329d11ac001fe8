"""The `ratchet` commands on a loop that drives itself: a proposer from ratchet.toml, its runs in
`watch`, `loop show` and `proposals`, their logs through `logs`, and a duplicate submission."""

from __future__ import annotations

import datetime
import re
import time
from pathlib import Path

from test_api import HARNESS, TRAIN
from test_cli import ratchet

TOML = """\
name = "cli-search"
editable = ["train.py"]
time_budget_s = 5
timeout_s = 20
max_experiments = 4
deadline = 2999-01-01T00:00:00Z

[resources]
cpus = 0.5
memory_mb = 256
pids = 64
disk_mb = 64

[proposer]
kind = "search"
seed = 3

[proposer.knobs.V]
min = 0.01
max = 2.0
log = true
"""


def test_a_proposer_from_the_loop_directory_shows_everywhere(server, tmp_path: Path):
    d = tmp_path / "ws"
    d.mkdir()
    (d / "train.py").write_text(TRAIN)
    (d / "prepare.py").write_text(HARNESS)
    (d / "ratchet.toml").write_text(TOML)
    made = ratchet(server, "loop", "create", str(d), "-q")
    assert made.exit_code == 0, made.output
    lid = made.output.strip()
    deadline = time.monotonic() + 120
    while True:
        loop = server.client.get(f"/v1/loops/{lid}").json()
        c = loop["counts"]
        if loop["proposer"]["idle_reason"] == "max_experiments=4 reached" and not (
            c["queued"] or c["running"]
        ):
            break
        assert time.monotonic() < deadline, loop
        time.sleep(0.3)
    assert loop["config"]["deadline"] == "2999-01-01T00:00:00Z"

    listed = ratchet(server, "proposals", "cli-search")
    assert listed.exit_code == 0, listed.output
    assert listed.output.count("proposed") == 3 and "search: V 1.0 ->" in listed.output
    first = re.search(r"\b([0-9a-f]{16})\s+proposed", listed.output)
    assert first is not None
    log = ratchet(server, "logs", first.group(1))
    assert log.exit_code == 0 and log.output.startswith("search #")

    shown = ratchet(server, "loop", "show", "cli-search")
    assert "search · proposed 3 · idle: max_experiments=4 reached" in shown.output, shown.output
    assert "deadline" in shown.output and "2999-01-01" in shown.output
    frame = ratchet(server, "watch", "cli-search", "--once")
    assert frame.exit_code == 0 and "proposer runs, newest first" in frame.output, frame.output

    # a candidate that already ran answers with the earlier experiment
    exps = server.client.get(f"/v1/loops/{lid}/experiments").json()["items"]
    again = exps[1]
    diff = server.client.get(f"/v1/experiments/{again['id']}/diff").text
    patch = tmp_path / "again.patch"
    patch.write_text(diff)
    root = loop["root_snapshot"]
    dup = ratchet(server, "submit", "cli-search", "--patch", str(patch), "--parent", root, "-m", "again")
    assert dup.exit_code == 0, dup.output
    assert f"already ran in loop cli-search as experiment {again['id']} (#2)" in dup.output
    none = ratchet(server, "proposals", "nope")
    assert none.exit_code == 2


def test_a_deadline_is_an_instant_or_a_span_from_now():
    from client.commands.loops import _deadline

    assert _deadline("2026-12-02T08:00:00Z") == "2026-12-02T08:00:00Z"
    ahead = datetime.datetime.fromisoformat(_deadline("8h"))
    now = datetime.datetime.now(datetime.UTC)
    assert ahead.tzinfo is not None and abs((ahead - now).total_seconds() - 8 * 3600) < 5
    assert abs((datetime.datetime.fromisoformat(_deadline("+90m")) - now).total_seconds() - 5400) < 5
