"""The main job: run the bundled example loop end to end against a running Ratchet service.

Creates the `charlm` loop from examples/charlm (its baseline runs first), submits every candidate
edit in examples/charlm/candidates, waits for the decisions, prints the ledger and saves the best
workspace. Usage: python examples/demo.py --url http://127.0.0.1:8080 [--budget 10]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from client import ApiError, RatchetClient, loop_body_from_dir

HERE = Path(__file__).resolve().parent


def _say(msg: str) -> None:
    print(f"==> {msg}", flush=True)


def _description(patch: Path) -> str:
    note = patch.with_suffix(".txt")
    return note.read_text().strip().splitlines()[0] if note.exists() else patch.stem.replace("_", " ")


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
    ap.add_argument("--out", default="data", help="where to save the best workspace")
    args = ap.parse_args()

    client = RatchetClient(args.url)
    example = Path(args.example)
    overrides: dict[str, object] = {"name": f"{example.name}-{time.strftime('%Y%m%d-%H%M%S')}"}
    if args.budget:
        overrides["time_budget_s"] = args.budget
    if args.timeout:
        overrides["timeout_s"] = args.timeout
    try:
        loop = client.create_loop(loop_body_from_dir(example, **overrides))
    except ApiError as exc:
        print(f"could not create the loop: {exc}", file=sys.stderr)
        return 1
    cfg = loop["config"]
    _say(
        f"loop {loop['name']} ({loop['id']}):"
        f" budget {cfg['time_budget_s']:g} s, metric {cfg['metric']['name']}"
    )
    exps = [client.http.get(f"/v1/loops/{loop['id']}/experiments").json()["items"][0]]  # the baseline
    for patch in sorted((example / "candidates").glob("*.patch")):
        try:
            exp = client.submit(loop["id"], _description(patch), patch=patch.read_text())
        except ApiError as exc:
            _say(f"refused {patch.name}: {exc}")
            continue
        exps.append(exp)
        _say(f"submitted #{exp['number']} {exp['description']!r}")
    _say("waiting for the baseline, then every candidate (side by side when slots allow)")
    for exp in exps:
        done = client.wait(exp["id"])
        metric = f"{done['metric']:.6f}" if done["metric"] is not None else "-"
        _say(
            f"#{done['number']:<3} {done['status']:<8} {metric:>10}"
            f"  {done['description']}  ({done['reason']})"
        )
    final = client.loop(loop["id"])
    print()
    print(client.results(loop["id"]), end="")
    print()
    _say(f"best {cfg['metric']['name']} {final['best_metric']} from snapshot {final['best_snapshot'][:7]}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    target = out / f"{loop['name']}-best.tar.gz"
    target.write_bytes(client.archive(final["best_snapshot"]))
    _say(f"best workspace saved to {target}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
