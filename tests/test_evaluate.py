"""The trusted evaluation phase: pure checks, then a real service with real containers."""

from __future__ import annotations

import os

import pytest
from test_api import submit

from service.models import EvalMount, EvaluateSpec
from service.rules.decisions import Outcome, decide
from service.rules.evaluate import check_evaluate, eval_tree
from service.rules.patches import CandidateError

# -- pure ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "command",
    [
        ["python3", "train.py"],
        ["python3", "./train.py"],
        ["python3", "-u", "train.py", "--x"],
        ["./train.sh"],
        ["python3", "models/new.py"],  # not in the tree yet, but a candidate could create it
        ["python3", "-m", "models.net"],
    ],
)
def test_evaluate_refuses_editable_files(command):
    spec = EvaluateSpec(command=command)
    with pytest.raises(CandidateError, match="editable"):
        check_evaluate(spec, ["train.py", "train.sh", "models/*"], ["train.py", "train.sh", "eval.py"])


@pytest.mark.parametrize(
    "command",
    [["python3", "eval.py"], ["python3", "-u", "./eval.py", "--data", "/heldout"], ["sh", "-c", "x"]],
)
def test_evaluate_accepts_non_editable_commands(command):
    check_evaluate(EvaluateSpec(command=command), ["train.py"], ["train.py", "eval.py"])


@pytest.mark.parametrize("target", ["/sandbox", "/sandbox/x", "//sandbox/x", "/tmp/data", "/", "/a/../tmp"])
def test_evaluate_refuses_mount_targets(target):
    spec = EvaluateSpec(command=["python3", "eval.py"], mounts=[EvalMount(source="vol", target=target)])
    with pytest.raises(CandidateError, match="mounts"):
        check_evaluate(spec, ["train.py"], ["eval.py"])


def test_eval_tree_keeps_only_non_editable_files_and_the_output():
    tree = {"train.py": b"t", "eval.py": b"e", "lib/util.py": b"u"}
    out, skipped = eval_tree(tree, ["train.py"], {"params.npz": b"p", "../x": b"bad", "a/b.txt": b"ok"})
    assert out == {
        "eval.py": b"e",
        "lib/util.py": b"u",
        "train_output/params.npz": b"p",
        "train_output/a/b.txt": b"ok",
    }
    assert skipped == ["../x"]


def test_evaluation_reasons_name_the_phase():
    kw = dict(metric_name="val_bpb", direction="minimize", min_delta=0.0, best=1.0, baseline=False)
    crash = decide(Outcome(exit_code=1, phase="evaluation"), **kw)
    assert crash.status == "crash" and crash.reason == "evaluation: exited with code 1"
    missing = decide(Outcome(exit_code=0, metric_problem="no summary", phase="evaluation"), **kw)
    assert missing.status == "crash" and missing.reason.startswith("evaluation: ")
    late = decide(Outcome(exit_code=None, timed_out=True, timeout_s=4, phase="evaluation"), **kw)
    assert late.status == "timeout" and late.reason.startswith("evaluation killed at")
    keep = decide(Outcome(exit_code=0, metric=0.5, phase="evaluation"), **kw)
    assert keep.status == "keep" and not keep.reason.startswith("evaluation")


# -- real service --------------------------------------------------------------------------------

TRAIN = (
    "import json, os\n"
    "V = 2.0\n"
    "print('heldout_visible=' + str(os.path.exists('/heldout')), flush=True)\n"
    "with open(os.path.join(os.environ['RATCHET_OUTPUT_DIR'], 'model.json'), 'w') as f:\n"
    "    json.dump({'v': V}, f)\n"
    "print('---')\n"
    "print('val_bpb: 7.5')\n"
    "print('num_steps: 3')\n"
)
EVAL = (
    "import json, os, sys, time\n"
    "out = os.environ['RATCHET_TRAIN_OUTPUT_DIR']\n"
    "path = os.path.join(out, 'model.json')\n"
    "print('eval_sees_heldout=' + str(os.path.exists('/heldout/valid.txt')))\n"
    "print('eval_sees_train=' + str(os.path.exists('train.py')))\n"
    "if os.path.getsize(path) > 1_000_000:\n"
    "    sys.exit('checkpoint too large')\n"
    "v = float(json.load(open(path))['v'])\n"
    "if v == 99:\n"
    "    time.sleep(60)\n"
    "offset = float(open('/heldout/valid.txt').read())\n"
    "print('---')\n"
    "print(f'val_bpb: {v + offset:.6f}')\n"
)


def _train(body: str) -> dict:
    return {"train.py": body}


@pytest.fixture
def heldout(tmp_path):
    d = tmp_path / "heldout"
    d.mkdir()
    (d / "valid.txt").write_text("0.25\n")
    os.chmod(tmp_path, 0o755)
    os.chmod(d, 0o755)
    os.chmod(d / "valid.txt", 0o644)
    return str(d)


def _loop(srv, heldout: str, **overrides) -> dict:
    body = {
        "name": "evaluated",
        "workspace": {"files": {"train.py": TRAIN, "eval.py": EVAL}},
        "editable": ["train.py"],
        "time_budget_s": 3,
        "timeout_s": 20,
        "resources": {"cpus": 0.5, "memory_mb": 256, "pids": 64, "disk_mb": 64},
        "evaluate": {
            "command": ["python3", "eval.py"],
            "mounts": [{"source": heldout, "target": "/heldout"}],
            "timeout_s": 5,
        },
        **overrides,
    }
    r = srv.client.post("/v1/loops", json=body)
    assert r.status_code == 201, r.text
    return r.json()


def _submit(srv, loop_id: str, description: str, train: str) -> str:
    return submit(srv, loop_id, description, files={"train.py": train})["id"]


def _log(srv, exp_id: str) -> str:
    r = srv.client.get(f"/v1/experiments/{exp_id}/logs")
    assert r.status_code == 200
    return r.text


def test_metric_comes_from_the_trusted_evaluation_only(server, heldout):
    loop = server.wait_idle(_loop(server, heldout)["id"])
    assert loop["baseline"] == "ok" and loop["best_metric"] == pytest.approx(2.25), loop
    base = server.client.get(f"/v1/loops/{loop['id']}/experiments").json()["items"][0]
    assert base["metric"] == pytest.approx(2.25)
    assert base["metrics"]["val_bpb"] == pytest.approx(2.25)
    assert base["metrics"]["train.val_bpb"] == 7.5 and base["metrics"]["train.num_steps"] == 3
    log = _log(server, base["id"])
    assert "heldout_visible=False" in log  # the training container never sees the held-out data
    assert "===== evaluation =====" in log
    assert "eval_sees_heldout=True" in log and "eval_sees_train=False" in log

    # Claims a perfect score without training: no checkpoint, so the evaluation fails.
    cheat = _submit(server, loop["id"], "skip training", "print('---')\nprint('val_bpb: 0.000001')\n")
    # Peeks for held-out data, then trains honestly and better.
    better = _submit(server, loop["id"], "smaller v", TRAIN.replace("V = 2.0", "V = 1.0"))
    # Bloated checkpoint beyond the evaluation's size check / the output cap.
    huge = _submit(
        server,
        loop["id"],
        "huge checkpoint",
        TRAIN.replace("json.dump({'v': V}, f)", "f.write(' ' * 2_000_000 + '{\"v\": 0.0}')"),
    )
    garbage = _submit(
        server,
        loop["id"],
        "garbage checkpoint",
        TRAIN.replace("json.dump({'v': V}, f)", "f.write('garbage')"),
    )
    slow = _submit(server, loop["id"], "slow evaluation", TRAIN.replace("V = 2.0", "V = 99"))

    exp = server.wait_final(cheat)
    assert exp["status"] == "crash" and exp["reason"].startswith("evaluation: "), exp
    assert exp["metric"] is None and exp["metrics"].get("train.val_bpb") == 0.000001
    exp = server.wait_final(better)
    assert exp["status"] == "keep" and exp["metric"] == pytest.approx(1.25), exp
    assert "heldout_visible=False" in _log(server, better)
    for exp_id in (huge, garbage):
        exp = server.wait_final(exp_id)
        assert exp["status"] == "crash" and exp["reason"].startswith("evaluation: "), exp
    exp = server.wait_final(slow)
    assert exp["status"] == "timeout" and exp["reason"].startswith("evaluation killed at"), exp
    loop = server.client.get(f"/v1/loops/{loop['id']}").json()
    assert loop["best_metric"] == pytest.approx(1.25)


def test_failed_training_skips_the_evaluation(server, heldout):
    loop = _loop(server, heldout, workspace={"files": {"train.py": "raise SystemExit(3)\n", "eval.py": EVAL}})
    loop = server.wait_idle(loop["id"])
    base = server.client.get(f"/v1/loops/{loop['id']}/experiments").json()["items"][0]
    assert base["status"] == "crash" and base["reason"] == "exited with code 3", base
    assert "===== evaluation =====" not in _log(server, base["id"])


@pytest.mark.parametrize(
    "evaluate",
    [
        {"command": ["python3", "train.py"]},
        {"command": ["python3", "./train.py"]},
        {"command": ["python3", "eval.py"], "mounts": [{"source": "v", "target": "/sandbox/data"}]},
    ],
)
def test_evaluate_running_editable_files_is_422(server, heldout, evaluate):
    body = {
        "name": "refused",
        "workspace": {"files": {"train.py": TRAIN, "eval.py": EVAL}},
        "editable": ["train.py"],
        "evaluate": evaluate,
    }
    r = server.client.post("/v1/loops", json=body)
    assert r.status_code == 422, r.text
    assert server.client.get("/v1/loops").json() == []


def test_charlm_eval_example_through_the_service(server, docker_client, tmp_path):
    """The bundled variant end to end: held-out text in a Docker volume only the evaluation mounts;
    the baseline is scored by evaluate.py, and a candidate that skips training to print a perfect
    score is not kept."""
    import uuid
    from pathlib import Path

    from client import loop_body_from_dir

    example = Path(__file__).resolve().parent.parent / "examples" / "charlm-eval"
    volume = f"ratchet-test-heldout-{uuid.uuid4().hex[:8]}"
    docker_client.volumes.create(volume)
    try:
        docker_client.containers.run(
            "ratchet/sandbox:latest",
            ["sh", "-c", "cat /src/valid.txt > /h/valid.txt"],
            user="0",
            volumes={
                volume: {"bind": "/h", "mode": "rw"},
                str(example / "heldout"): {"bind": "/src", "mode": "ro"},
            },
            network_mode="none",
            remove=True,
        )
        body = loop_body_from_dir(example, name="charlm-eval-e2e", time_budget_s=4, timeout_s=40)
        assert not any(p.startswith("heldout/") for p in body["workspace"]["files"])
        body["evaluate"]["mounts"] = [{"source": volume, "target": "/heldout"}]
        r = server.client.post("/v1/loops", json=body)
        assert r.status_code == 201, r.text
        lid = r.json()["id"]
        base = server.client.get(f"/v1/loops/{lid}/experiments").json()["items"][0]
        base = server.wait_final(base["id"], timeout=180)
        assert base["status"] == "keep", base
        assert 0.5 < base["metric"] < 8.0 and "train.val_bpb" in base["metrics"]
        cheat = "print('---')\nprint('val_bpb: 0.000001')\n"
        r = server.client.post(
            f"/v1/loops/{lid}/experiments",
            json={"description": "skip training", "files": {"train.py": cheat}},
        )
        assert r.status_code == 202, r.text
        done = server.wait_final(r.json()["id"], timeout=180)
        assert done["status"] == "crash" and done["reason"].startswith("evaluation"), done
        assert server.client.get(f"/v1/loops/{lid}").json()["best_metric"] == base["metric"]
    finally:
        server.stop()
        docker_client.volumes.get(volume).remove(force=True)


def test_charlm_eval_runs_charlm_s_own_files():
    """The two examples share train.py and prepare.py: charlm-eval's are copies of charlm's (a loop
    directory is sent as it is, and links are never followed), and only its ratchet.json differs
    in what training does (CHARLM_SAVE_PARAMS: save the checkpoint its evaluation scores)."""
    import json
    from pathlib import Path

    examples = Path(__file__).resolve().parent.parent / "examples"
    for name in ("train.py", "prepare.py"):
        assert (examples / "charlm-eval" / name).read_bytes() == (examples / "charlm" / name).read_bytes(), (
            f"examples/charlm-eval/{name} must be a copy of examples/charlm/{name}: cp it over"
        )
    spec = json.loads((examples / "charlm-eval" / "ratchet.json").read_text())
    assert (
        spec["env"] == {"CHARLM_SAVE_PARAMS": "1"}
        and "CHARLM_SAVE_PARAMS" in (examples / "charlm" / "train.py").read_text()
    )


def test_a_checkpoint_over_the_output_cap_is_left_out_and_the_reason_says_so(server, heldout):
    """The training output reaches the evaluation only up to the output cap (16 MiB in all): a
    bigger checkpoint is left out, the evaluation fails for want of it, and the verdict's reason
    and the log name it, rather than leave the operator guessing why a good run crashed."""
    loop = server.wait_idle(_loop(server, heldout)["id"])
    assert loop["baseline"] == "ok", loop
    padded = "f.write(json.dumps({'v': 1.0}) + ' ' * (17 * 2**20))"  # 17 MiB of valid JSON
    exp_id = _submit(server, loop["id"], "big checkpoint", TRAIN.replace("json.dump({'v': V}, f)", padded))
    exp = server.wait_final(exp_id)
    assert exp["status"] == "crash", exp
    reason = exp["reason"]
    assert reason.startswith("evaluation: exited with code 1"), reason
    assert "model.json" in reason and "over the 16 MiB output cap" in reason, reason
    assert exp["metrics"].get("train.val_bpb") == 7.5  # the training itself ran and reported
    log = _log(server, exp_id)
    assert "===== evaluation =====\n[ratchet: training output left out of train_output/" in log
    assert "FileNotFoundError" in log  # what the evaluation did without it
