"""The `ratchet` client commands against a real service (and the real engine behind it)."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
from click.testing import CliRunner, Result
from conftest import ROOT, free_port
from test_api import HARNESS, TRAIN

from client import RatchetClient
from service.cli import cli

TOML = """\
name = "cli-tiny"
editable = ["train.py"]
command = "python3 train.py"
time_budget_s = 30
timeout_s = 20
exclude = ["notes/"]

[metric]
name = "val_bpb"
direction = "minimize"

[resources]
cpus = 0.5
memory_mb = 256
pids = 64
disk_mb = 64
"""


def ratchet(server, *args: str, input: str | None = None) -> Result:
    return CliRunner().invoke(cli, ["--url", server.url, *args], input=input, catch_exceptions=False)


def loop_dir(tmp_path: Path) -> Path:
    d = tmp_path / "ws"
    (d / "notes").mkdir(parents=True)
    (d / "__pycache__").mkdir()
    (d / "train.py").write_text(TRAIN)
    (d / "prepare.py").write_text(HARNESS)
    (d / "ratchet.toml").write_text(TOML)
    (d / "notes" / "idea.txt").write_text("not part of the workspace\n")
    (d / "__pycache__" / "train.cpython-311.pyc").write_bytes(b"\x00\x01")
    (d / ".hidden").write_text("clutter\n")
    return d


def create(server, tmp_path: Path, *flags: str) -> str:
    result = ratchet(server, "loop", "create", str(loop_dir(tmp_path)), "--budget", "5", "-q", *flags)
    assert result.exit_code == 0, result.output
    return result.stdout.strip()


def with_value(value: str, sleep: str = "0.0") -> str:
    return TRAIN.replace("V = 1.0", f"V = {value}").replace("SLEEP = 0.0", f"SLEEP = {sleep}")


def archive_files(data: bytes) -> dict[str, str]:
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
        return {m.name: tar.extractfile(m).read().decode() for m in tar if m.isfile()}


def test_loop_create_from_toml_list_show_and_control(server, tmp_path):
    lid = create(server, tmp_path, "--cpus", "0.25", "--maximize")
    loop = server.client.get(f"/v1/loops/{lid}").json()
    cfg = loop["config"]
    assert loop["name"] == "cli-tiny"
    assert cfg["command"] == ["python3", "train.py"]  # a TOML string, split
    assert cfg["time_budget_s"] == 5 and cfg["timeout_s"] == 20  # flag over file; file kept
    assert cfg["resources"]["cpus"] == 0.25 and cfg["resources"]["memory_mb"] == 256
    assert cfg["metric"] == {
        "name": "val_bpb",
        "direction": "maximize",
        "min_delta": 0.0,
        "min_value": None,
        "max_value": None,
    }
    archive = server.client.get(f"/v1/snapshots/{loop['root_snapshot']}/archive").content
    assert archive_files(archive) == {"train.py": TRAIN, "prepare.py": HARNESS}
    server.wait_idle(lid)

    listed = ratchet(server, "loop", "list")
    assert listed.exit_code == 0
    row = next(line for line in listed.stdout.splitlines() if lid in line)
    assert "cli-tiny" in row and "active" in row and "1.000000" in row

    shown = ratchet(server, "loop", "show", "cli-tiny")  # by name
    assert shown.exit_code == 0, shown.output
    assert lid in shown.stdout and "baseline val_bpb 1.000000" in shown.stdout
    assert "val_bpb, maximize" in shown.stdout

    for action, state in (("pause", "paused"), ("resume", "active"), ("stop", "stopped")):
        result = ratchet(server, "loop", action, "cli-tiny" if action != "stop" else lid[:8])
        assert result.exit_code == 0, result.output
        assert result.stdout.strip().endswith(f": {state}")
        assert server.client.get(f"/v1/loops/{lid}").json()["state"] == state

    missing = ratchet(server, "loop", "show", "no-such-loop")
    assert missing.exit_code == 2
    assert "no loop 'no-such-loop'" in missing.stderr and "Traceback" not in missing.output
    # a stopped loop refuses candidates: the service's own message, one line, exit 1
    refused = ratchet(server, "submit", lid, "--patch", "-", "-m", "late", input="x")
    assert refused.exit_code == 1 and "(HTTP 409)" in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1


def test_submit_wait_results_pull_logs_and_diff(server, tmp_path, monkeypatch):
    lid = create(server, tmp_path)
    server.wait_idle(lid)
    edited = tmp_path / "edit"
    edited.mkdir()
    (edited / "train.py").write_text(with_value("0.5"))

    monkeypatch.chdir(edited)  # --file paths are relative to the current directory by default
    kept = ratchet(server, "submit", "cli-tiny", "--file", "train.py", "-m", "smaller V", "--wait")
    assert kept.exit_code == 0, kept.output
    assert ": keep  val_bpb 0.500000" in kept.stdout and "beats best 1.000000" in kept.stdout
    keep_id = kept.stdout.split()[2]

    crash_patch = tmp_path / "crash.patch"
    crash_patch.write_text("--- a/train.py\n+++ b/train.py\n@@ -2 +2 @@\n-V = 0.5\n+V = (\n")
    crashed = ratchet(server, "submit", lid, "--patch", str(crash_patch), "-m", "typo", "--wait")
    assert crashed.exit_code == 3, crashed.output
    assert ": crash" in crashed.stdout and "SyntaxError" in crashed.stdout

    discard = "--- a/train.py\n+++ b/train.py\n@@ -2 +2 @@\n-V = 0.5\n+V = 0.7\n"
    discarded = ratchet(server, "submit", lid, "--patch", "-", "-m", "bigger V", "--wait", input=discard)
    assert discarded.exit_code == 0 and ": discard  val_bpb 0.700000" in discarded.stdout

    # sent as edit/train.py: a path candidates may not touch
    whole = str(edited / "train.py")
    refused = ratchet(server, "submit", lid, "--root", str(tmp_path), "--file", whole, "-m", "x")
    assert refused.exit_code == 1 and "read-only" in refused.stderr and "(HTTP 422)" in refused.stderr

    results = ratchet(server, "results", "cli-tiny")
    assert results.exit_code == 0
    assert results.stdout == server.client.get(f"/v1/loops/{lid}/results.tsv").text
    assert [line.split("\t")[3] for line in results.stdout.splitlines()[1:]] == [
        "keep",
        "keep",
        "crash",
        "discard",
    ]

    out = tmp_path / "best"
    pulled = ratchet(server, "pull", "cli-tiny", str(out))
    assert pulled.exit_code == 0, pulled.output
    assert (out / "train.py").read_text() == with_value("0.5")
    assert (out / "prepare.py").read_text() == HARNESS
    again = ratchet(server, "pull", "cli-tiny", str(out))
    assert again.exit_code == 2 and "not empty" in again.stderr
    baseline_commit = results.stdout.splitlines()[1].split("\t")[0]
    older = ratchet(server, "pull", "cli-tiny", "--snapshot", baseline_commit, "--force", str(out))
    assert older.exit_code == 0, older.output
    assert (out / "train.py").read_text() == TRAIN

    logs = ratchet(server, "logs", keep_id)
    assert logs.exit_code == 0 and "val_bpb: 0.500000" in logs.stdout
    diff = ratchet(server, "diff", keep_id)
    assert "-V = 1.0\n+V = 0.5\n" in diff.stdout


def _running(server, lid: str, exp_id: str) -> None:
    deadline = time.monotonic() + 60
    while server.client.get(f"/v1/experiments/{exp_id}").json()["status"] != "running":
        assert time.monotonic() < deadline, "the slow experiment never started"
        time.sleep(0.1)


def test_watch_once_and_logs_follow_while_running(server, tmp_path):
    lid = create(server, tmp_path)
    server.wait_idle(lid)
    client = RatchetClient(server.url)
    ok = client.submit(lid, "smaller V", files={"train.py": with_value("0.5")})
    bad = client.submit(lid, "typo", files={"train.py": "V = (\n"})
    server.wait_final(ok["id"])
    server.wait_final(bad["id"])
    slow = client.submit(lid, "slow one", files={"train.py": with_value("0.25", sleep="3.0")})
    _running(server, lid, slow["id"])
    time.sleep(1.0)  # a bar drawn at 0.1 s of 5 s is only a half cell ("╸"); let it grow a full one

    frame = ratchet(server, "watch", "cli-tiny", "--once")
    assert frame.exit_code == 0, frame.output
    text = frame.stdout
    assert "best" in text and "0.500000  #2" in text  # the best so far, with its experiment
    for status in ("keep", "crash", "running"):
        assert status in text, status
    lines = text.splitlines()
    running = "\n".join(lines[lines.index("running") : lines.index("running") + 6])
    assert slow["id"] in running and "/ 5s" in running and "━" in running  # a bar against the 5 s budget

    # -f while it runs: the whole log arrives, then the verdict on stderr
    assert client.experiment(slow["id"])["status"] == "running"
    followed = ratchet(server, "logs", "-f", slow["id"])
    assert followed.exit_code == 0, followed.output
    assert followed.stdout == client.logs(slow["id"])
    assert "val_bpb: 0.250000" in followed.stdout
    assert f"experiment {slow['id']} ended: keep" in followed.stderr


def test_log_polling_fallback_follows_to_the_end(server, tmp_path):
    """The fallback for services without a streaming log endpoint, driven directly."""
    lid = create(server, tmp_path)
    client = RatchetClient(server.url)
    base = client.experiments(lid)["items"][0]
    chunks = list(client.poll_logs(base["id"], poll=0.1))
    assert client.experiment(base["id"])["status"] == "keep"
    assert "".join(chunks) == client.logs(base["id"])
    assert "val_bpb: 1.000000" in "".join(chunks)


@pytest.mark.parametrize("via_env", [False, True])
def test_server_down_is_one_clear_line(tmp_path, via_env):
    url = f"http://127.0.0.1:{free_port()}"
    args = ["loop", "list"] if via_env else ["--url", url, "loop", "list"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("RATCHET_")}
    if via_env:
        env["RATCHET_URL"] = url
    proc = subprocess.run(
        [sys.executable, "-m", "service.cli", *args], cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert proc.returncode == 1
    assert proc.stdout == ""
    assert proc.stderr.strip() == (
        f"Error: cannot reach Ratchet at {url}: connection refused — is `ratchet serve` running?"
    )


def test_loop_create_with_an_acceptance_rule(server, tmp_path):
    lid = create(server, tmp_path, "--acceptance", "confirm")
    loop = server.wait_idle(lid)
    assert loop["config"]["acceptance"]["rule"] == "confirm"
    assert 3 <= loop["best_runs"] <= 16  # the baseline, its two noise runs, re-measurements
    shown = ratchet(server, "loop", "show", "cli-tiny")
    assert shown.exit_code == 0 and "measured" in shown.stdout, shown.output
    bad = ratchet(server, "loop", "create", str(tmp_path / "loop"), "--acceptance", "lenient")
    assert bad.exit_code == 2 and "lenient" in bad.output
