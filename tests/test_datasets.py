"""Datasets: declared by the operator, named by loops, mounted read-only. Pure checks first, then a
real service with real containers: training reads its dataset where `~` finds it, cannot write it,
and sees neither the datasets it did not name nor the evaluation's."""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path

import msgspec
import pytest
from test_api import submit

from service.models import DatasetMount, ExperimentView, LoopView
from service.rules.datasets import check_datasets
from service.rules.patches import CandidateError
from service.runs.executor import SpecError
from service.runs.runspec import train_spec
from service.settings import Settings, SettingsError, load_settings, parse_datasets
from service.state.store import loop_config

# -- declaring --------------------------------------------------------------------------------------


def test_datasets_from_flags_and_environment(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert parse_datasets(["gpt=/srv/gpt", "held=volume:held-v1", "rel=data/x"]) == {
        "gpt": "/srv/gpt",
        "held": "volume:held-v1",
        "rel": str(tmp_path / "data" / "x"),  # taken from where the service starts
    }
    s = load_settings({}, {"RATCHET_DATASETS": "a=/x, b=volume:v,"})
    assert s.datasets == {"a": "/x", "b": "volume:v"}
    flags = load_settings({"datasets": {"c": "/y"}}, {"RATCHET_DATASETS": "a=/x"})
    assert flags.datasets == {"c": "/y"}  # flags win, as for every setting
    assert Settings().datasets == {}


@pytest.mark.parametrize(
    ("item", "why"),
    [
        ("gpt", "expected NAME=PATH or NAME=volume:VOLUME"),
        ("gpt=", "expected NAME=PATH or NAME=volume:VOLUME"),
        ("/etc=/etc", "a name is 1-64 letters"),
        ("g p t=/x", "a name is 1-64 letters"),
        ("v=volume:/etc", "not a volume name"),
    ],
)
def test_bad_declarations_fail_naming_the_flag(item, why):
    with pytest.raises(SettingsError, match=f"invalid dataset .* \\(--dataset\\): {why}"):
        parse_datasets([item])
    with pytest.raises(SettingsError, match="RATCHET_DATASETS"):
        load_settings({}, {"RATCHET_DATASETS": item})


def test_a_name_declared_twice_is_refused():
    with pytest.raises(SettingsError, match="'a' is declared twice"):
        parse_datasets(["a=/x", "a=/y"])


# -- naming ----------------------------------------------------------------------------------------

DECLARED = {"gpt", "held"}


def refused(*mounts: tuple[str, str]) -> str:
    with pytest.raises(CandidateError) as info:
        check_datasets("datasets", [DatasetMount(name=n, target=t) for n, t in mounts], DECLARED)
    return str(info.value)


def test_good_targets_pass():
    check_datasets(
        "datasets",
        [
            DatasetMount(name="gpt", target="/home/sandbox/.cache/ratchet-gpt"),
            DatasetMount(name="held", target="/data/held"),
        ],
        DECLARED,
    )


@pytest.mark.parametrize("name", ["/etc", "/home/u/.ssh", "./data", "~/.cache", "a/b", "volume:secret"])
def test_a_host_path_for_a_name_is_refused_naming_the_flag(name):
    msg = refused((name, "/data"))
    assert f"datasets[0].name {name!r} is a host path or volume" in msg
    assert "ratchet serve --dataset NAME=PATH" in msg


def test_an_undeclared_name_is_refused_naming_the_flag():
    msg = refused(("gpt", "/a"), ("imagenet", "/b"))
    assert msg == (
        "datasets[1].name 'imagenet' is not a dataset of this service (declared: gpt, held); the"
        " operator declares it with `ratchet serve --dataset imagenet=PATH` (or RATCHET_DATASETS)"
    )


@pytest.mark.parametrize(
    ("target", "why"),
    [
        ("relative", "must be an absolute path"),
        ("/", "it would cover the whole file system"),
        ("/sandbox", "it would cover the run's workspace, harness files or output (/sandbox)"),
        ("/sandbox/workspace/prepare.py", "it would cover the run's workspace, harness files or output"),
        ("/sandbox/output", "it would cover the run's workspace"),
        ("/tmp", "it is at or under /tmp"),
        ("/tmp/data", "it is at or under /tmp"),
        ("/x/../tmp", "it is at or under /tmp"),
        ("//sandbox", "it would cover the run's workspace"),
        ("/etc/ssl", "it is at or under /etc"),
        ("/usr/lib/python3", "it is at or under /usr"),
        ("/proc/self", "it is at or under /proc"),
        ("/home/sandbox", "it would hide the home /home/sandbox"),
        ("/home", "it would hide the home /home/sandbox"),
        ("/data/a b", "a target may hold only letters"),
    ],
)
def test_bad_targets_are_refused(target, why):
    msg = refused(("gpt", target))
    assert msg.startswith("datasets[0].target") and why in msg, msg


def test_overlapping_targets_are_refused():
    assert "overlaps another dataset's target '/data'" in refused(("gpt", "/data"), ("held", "/data/x"))
    assert "overlaps" in refused(("gpt", "/data"), ("held", "/data/"))


# -- loops stored before datasets ------------------------------------------------------------------


def test_a_stored_loop_with_the_removed_evaluate_mounts_still_reads_and_its_runs_say_why():
    raw = json.dumps(
        {
            "name": "old",
            "evaluate": {
                "command": ["python3", "eval.py"],
                "mounts": [{"source": "/srv/held", "target": "/h"}],
            },
        }
    )
    config = loop_config(raw)
    assert config.evaluate is not None and config.evaluate.mounts[0].source == "/srv/held"
    loop = LoopView(
        id="l" * 16, name="old", state="active", baseline="pending", config=config,
        root_snapshot="s", created_at=0.0,
    )  # fmt: skip
    exp = msgspec.convert(
        {"id": "e" * 16, "loop_id": "l" * 16, "number": 1, "kind": "baseline", "description": "b",
         "status": "running", "snapshot": "s", "commit": "s", "created_at": 0.0},
        ExperimentView,
    )  # fmt: skip
    with pytest.raises(SpecError, match=r"evaluate.mounts .* no longer mounted.*--dataset"):
        train_spec(exp, loop, {}, set(), gpus=[], attempt=1, instance="i", settings=Settings())


# -- a real service ---------------------------------------------------------------------------------

TRAIN = r"""
import errno, json, os
home = os.path.expanduser("~")
out = {"home": home}
def t(name, fn):
    try:
        out[name] = fn()
    except OSError as e:
        out[name] = errno.errorcode.get(e.errno, str(e.errno))
t("read", lambda: open(os.path.expanduser("~/.cache/gpt/tokens.txt")).read().strip())
t("write", lambda: open(os.path.expanduser("~/.cache/gpt/new.txt"), "w").write("x") and "OK")
t("append", lambda: open(os.path.expanduser("~/.cache/gpt/tokens.txt"), "a").write("x") and "OK")
t("cache_beside", lambda: os.makedirs(os.path.expanduser("~/.cache/torch")) or "OK")
# what a candidate could look for: the other declared datasets, wherever they might be
out["visible"] = sorted(
    p for p in ("/data/other", "/heldout", "/home/sandbox/.cache/other") if os.path.exists(p)
)
with open("/proc/self/mountinfo") as f:
    out["mounts"] = sorted(line.split()[4] for line in f if "secret" in line or "/data" in line.split()[4])
print("SEEN " + json.dumps(out), flush=True)
print("---")
print("val_bpb: " + os.environ.get("V", "1.0"))
"""
EVAL = r"""
import os
print("eval sees heldout: " + open("/heldout/answer.txt").read().strip())
print("eval sees gpt: " + str(os.path.exists(os.path.expanduser("~/.cache/gpt"))))
print("---")
print("val_bpb: 1.0")
"""


def _dir(root: Path, name: str, files: dict[str, str]) -> Path:
    """World-writable on the host: only the read-only mount can stop a write."""
    d = root / name
    d.mkdir()
    for fname, text in files.items():
        (d / fname).write_text(text)
        (d / fname).chmod(0o666)
    d.chmod(0o777)
    return d


@pytest.fixture
def declared(tmp_path: Path, docker_client) -> dict[str, str]:
    """Three datasets the operator declared: two directories and a named volume."""
    root = tmp_path / "datasets"
    root.mkdir()
    root.chmod(0o755)
    tmp_path.chmod(0o755)
    gpt = _dir(root, "gpt", {"tokens.txt": "the tokens"})
    other = _dir(root, "other-secret", {"secret.txt": "not for this loop"})
    volume = f"ratchet-test-held-{uuid.uuid4().hex[:8]}"
    docker_client.volumes.create(volume, labels={"ratchet.test": volume})
    docker_client.containers.run(
        "ratchet/sandbox:latest", ["sh", "-c", "echo 42 > /v/answer.txt"], user="0", network_mode="none",
        volumes={volume: {"bind": "/v", "mode": "rw"}}, remove=True,
    )  # fmt: skip
    yield {"gpt": str(gpt), "other": str(other), "held": f"volume:{volume}"}
    docker_client.volumes.get(volume).remove(force=True)
    assert (gpt / "tokens.txt").read_text() == "the tokens" and sorted(os.listdir(gpt)) == ["tokens.txt"]


def test_training_reads_its_dataset_cannot_write_it_and_sees_nothing_else(server_factory, declared):
    env = {"RATCHET_DATASETS": ",".join(f"{k}={v}" for k, v in declared.items())}
    srv = server_factory(env=env)
    assert srv.client.get("/v1/datasets").json() == [{"name": "gpt"}, {"name": "held"}, {"name": "other"}]
    assert (
        "/srv" not in srv.client.get("/v1/datasets").text
        and "volume" not in srv.client.get("/v1/datasets").text
    )
    body = {
        "name": "data",
        "workspace": {"files": {"train.py": TRAIN, "eval.py": EVAL}},
        "editable": ["train.py"],
        "time_budget_s": 5,
        "timeout_s": 30,
        "resources": {"cpus": 0.5, "memory_mb": 256, "pids": 64, "disk_mb": 32},
        "datasets": [{"name": "gpt", "target": "/home/sandbox/.cache/gpt"}],
        "evaluate": {
            "command": ["python3", "eval.py"],
            "datasets": [{"name": "held", "target": "/heldout"}],
            "timeout_s": 20,
        },
    }
    r = srv.client.post("/v1/loops", json=body)
    assert r.status_code == 201, r.text
    loop = r.json()
    assert loop["config"]["datasets"] == [{"name": "gpt", "target": "/home/sandbox/.cache/gpt"}]
    exp = srv.client.get(f"/v1/loops/{loop['id']}/experiments").json()["items"][0]
    # a candidate that goes looking is just another run with the same mounts
    cand = submit(srv, loop["id"], "look around", files={"train.py": TRAIN.replace('"1.0"', '"0.5"')})
    for exp_id, status in ((exp["id"], "keep"), (cand["id"], "discard")):  # the evaluation scores
        done = srv.wait_final(exp_id, timeout=120)
        assert done["status"] == status, done
        log = srv.client.get(f"/v1/experiments/{exp_id}/logs").text
        seen = json.loads(next(line for line in log.splitlines() if line.startswith("SEEN "))[5:])
        assert seen["home"] == "/home/sandbox"
        assert seen["read"] == "the tokens"  # an unmodified ~/.cache/... path finds the data
        assert seen["write"] == "EROFS" and seen["append"] == "EROFS"
        assert seen["cache_beside"] == "OK"  # ~/.cache stays writable beside the dataset
        assert seen["visible"] == [] and seen["mounts"] == []  # neither `other` nor the evaluation's
        assert "eval sees heldout: 42" in log and "eval sees gpt: False" in log


@pytest.mark.parametrize(
    ("datasets", "detail"),
    [
        ([{"name": "nope", "target": "/data"}], "'nope' is not a dataset of this service (declared: gpt)"),
        ([{"name": "/etc", "target": "/data"}], "is a host path or volume"),
        (
            [{"name": "gpt", "target": "/sandbox/workspace"}],
            "datasets[0].target '/sandbox/workspace' is refused",
        ),
        ([{"name": "gpt", "target": "/tmp/x"}], "it is at or under /tmp"),
    ],
)
def test_bad_datasets_are_422_and_store_nothing(server_factory, tmp_path, datasets, detail):
    srv = server_factory(env={"RATCHET_DATASETS": f"gpt={tmp_path}"})
    body = {"name": "bad", "workspace": {"files": {"train.py": "print(1)\n"}}, "datasets": datasets}
    r = srv.client.post("/v1/loops", json=body)
    assert r.status_code == 422, r.text
    assert detail in r.json()["detail"]
    assert srv.client.get("/v1/loops").json() == []
