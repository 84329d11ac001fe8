"""The main job: run the bundled example loop end to end against a running Ratchet service, with
nobody submitting anything: the loop carries Ratchet's built-in `search` proposer, which keeps
proposing edits of train.py's hyperparameters from the current best until the loop is full.

Creates the `charlm` loop from examples/charlm with SEARCH below as its proposer (its baseline runs
first), follows the experiments as they are decided, prints the ledger, saves the progress chart
and the best workspace, and says where to look. `--candidates` instead submits the hand-written
edits in examples/charlm/candidates over REST, as an external agent would.

Usage: python examples/demo.py --url http://127.0.0.1:8080 [--budget 10] [--experiments 16]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

from client import ApiError, RatchetClient, loop_body_from_dir

HERE = Path(__file__).resolve().parent

# The built-in search over charlm's hyperparameters: each proposal moves one or two of these
# top-level assignments of train.py (log-scale ranges step multiplicatively) from the current best.
SEARCH: dict[str, Any] = {
    "kind": "search",
    "file": "train.py",
    "seed": 3,
    "knobs": {
        "LEARNING_RATE": {"min": 1e-4, "max": 3e-2, "log": True},
        "HIDDEN_DIM": {"min": 32, "max": 512, "log": True, "integer": True},
        "BATCH_SIZE": {"min": 16, "max": 256, "log": True, "integer": True},
        "WARMDOWN_FRAC": {"min": 0.0, "max": 0.6},
    },
}


def _say(msg: str) -> None:
    print(f"==> {msg}", flush=True)


def _description(patch: Path) -> str:
    note = patch.with_suffix(".txt")
    return note.read_text().strip().splitlines()[0] if note.exists() else patch.stem.replace("_", " ")


def _metric(exp: dict[str, Any]) -> str:
    return f"{exp['metric']:.6f}" if exp.get("metric") is not None else "-"


def _show(exp: dict[str, Any]) -> None:
    star = "  <- new best" if exp["status"] == "keep" and exp["kind"] != "baseline" else ""
    _say(f"#{exp['number']:<3} {exp['status']:<8} {_metric(exp):>10}  {exp['description']}{star}")


def _submit_candidates(client: RatchetClient, loop: dict[str, Any], example: Path) -> None:
    for patch in sorted((example / "candidates").glob("*.patch")):
        try:
            exp = client.submit(loop["id"], _description(patch), patch=patch.read_text())
        except ApiError as exc:
            _say(f"refused {patch.name}: {exc}")
            continue
        _say(f"submitted #{exp['number']} {exp['description']!r}")


def _follow(client: RatchetClient, loop_id: str, want: int | None) -> dict[str, Any]:
    """Prints each experiment as it is decided; returns the loop once nothing is left to do."""
    shown: set[str] = set()
    while True:
        loop = client.loop(loop_id)
        for exp in client.all_experiments(loop_id):
            if exp["id"] not in shown and exp["status"] not in ("queued", "running", "confirming"):
                shown.add(exp["id"])
                _show(exp)
        counts = loop["counts"]
        busy = counts["queued"] + counts["running"] + counts["confirming"]
        proposer = loop.get("proposer") or {}
        proposing = (proposer.get("counts") or {}).get("running", 0)
        if loop["baseline"] == "failed":
            _say(f"the baseline failed: {loop['baseline_reason']}")
            return loop
        if not busy and not proposing and (want is None or proposer.get("idle_reason") or len(shown) >= want):
            return loop
        time.sleep(1.0)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", default="http://127.0.0.1:8080")
    ap.add_argument("--example", default=str(HERE / "charlm"), help="example directory")
    ap.add_argument(
        "--budget", type=float, default=10.0, help="time_budget_s (default 10; 0 keeps ratchet.json's)"
    )
    ap.add_argument(
        "--timeout", type=float, default=30.0, help="timeout_s (default 30; 0 keeps ratchet.json's)"
    )
    ap.add_argument("--experiments", type=int, default=16, help="max_experiments, the baseline included")
    ap.add_argument(
        "--candidates", action="store_true", help="submit examples/charlm/candidates over REST instead"
    )
    ap.add_argument("--out", default="data", help="where to save the chart and the best workspace")
    args = ap.parse_args()

    client = RatchetClient(args.url)
    example = Path(args.example)
    overrides: dict[str, object] = {"name": f"{example.name}-{time.strftime('%Y%m%d-%H%M%S')}"}
    if args.budget:
        overrides["time_budget_s"] = args.budget
    if args.timeout:
        overrides["timeout_s"] = args.timeout
    if not args.candidates:
        overrides["proposer"] = SEARCH
        overrides["max_experiments"] = args.experiments
    try:
        loop = client.create_loop(loop_body_from_dir(example, **overrides))
    except ApiError as exc:
        print(f"could not create the loop: {exc}", file=sys.stderr)
        return 1
    cfg = loop["config"]
    page = f"{args.url}/loops/{loop['id']}"
    _say(
        f"loop {loop['name']} ({loop['id']}): budget {cfg['time_budget_s']:g} s, metric"
        f" {cfg['metric']['name']} ({cfg['metric']['direction']})"
    )
    if args.candidates:
        _submit_candidates(client, loop, example)
    else:
        knobs = ", ".join(SEARCH["knobs"])
        _say(f"proposer: built-in search over {knobs}; {args.experiments} experiments, the baseline first")
    _say(f"watch it live: {page}  (or: ratchet watch {loop['name']})")
    final = _follow(client, loop["id"], None if args.candidates else args.experiments)
    print()
    print(client.results(loop["id"]), end="")
    print()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    chart = out / f"{loop['name']}-progress.svg"
    chart.write_bytes(client.http.get(f"/v1/loops/{loop['id']}/progress.svg").content)
    base = client.experiments(loop["id"], limit=1)["items"][0]
    if final.get("best_snapshot") is None:
        _say("no successful baseline: nothing to save")
        return 1
    _say(
        f"best {cfg['metric']['name']} {final['best_metric']:.6f} (baseline {_metric(base)}) from snapshot"
        f" {final['best_snapshot'][:7]}"
    )
    target = out / f"{loop['name']}-best.tar.gz"
    target.write_bytes(client.archive(final["best_snapshot"]))
    _say(f"progress chart saved to {chart} (live: {args.url}/v1/loops/{loop['id']}/progress.svg)")
    _say(f"best workspace saved to {target}")
    _say(f"the loop page: {page}; the ledger: {args.url}/v1/loops/{loop['id']}/results.tsv")
    return 0


if __name__ == "__main__":
    sys.exit(main())
