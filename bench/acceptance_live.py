"""The acceptance rules wired end to end: one loop per rule on a real `ratchet serve`, real containers.

Every loop gets the same stream of candidates from a serial "agent" that waits for each verdict
before it submits the next edit of the current best. The workload's metric is its true value `V`
plus Gaussian noise (sd 0.1; seeded by RATCHET_SEED when the service passes one, else fresh), so the
truth behind every verdict is known. Printed per rule: runs used, keeps, keep precision, the true
value of the final best, what the loop reports as its best, and the gap between the two.

    .venv/bin/python bench/acceptance_live.py [--candidates 12] [--slots 2]

A few candidates cannot show the averages of bench/acceptance_sim.py; this run shows the wiring:
confirmation runs, the noise estimate, the best reported as a mean, idle slots re-measuring it.
"""

from __future__ import annotations

import argparse
import os
import random
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
NOISE_SD = 0.1

TRAIN = """import os, random
V = {value!r}
seed = os.environ.get("RATCHET_SEED")
rng = random.Random(int(seed) * 7919 + {salt} if seed is not None else None)
print("---")
print(f"val_bpb: {{V + rng.gauss(0.0, {noise}):.6f}}")
"""


def train(value: float, salt: int) -> str:
    return TRAIN.format(value=round(value, 6), salt=salt, noise=NOISE_SD)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve(data_dir: Path, slots: int) -> tuple[subprocess.Popen[bytes], httpx.Client]:
    port = free_port()
    argv = ["serve", "--port", str(port), "--data-dir", str(data_dir), "--slots", str(slots)]
    proc = subprocess.Popen(
        [sys.executable, "-m", "service.cli", *argv],
        cwd=ROOT,
        env={**os.environ, "RATCHET_INSTANCE": f"bench-acceptance-{port}"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60)
    for _ in range(300):
        try:
            if client.get("/readyz").status_code == 200:
                return proc, client
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    proc.kill()
    raise SystemExit("ratchet serve did not become ready")


def wait(client: httpx.Client, exp_id: str) -> dict:
    while True:
        exp = client.get(f"/v1/experiments/{exp_id}").json()
        if exp["status"] not in ("queued", "running", "confirming"):
            return exp
        time.sleep(0.2)


def run_loop(client: httpx.Client, rule: str, effects: list[float], settle_s: float) -> dict:
    body = {
        "name": f"acceptance-{rule}",
        "workspace": {"files": {"train.py": train(1.0, 0)}},
        "time_budget_s": 5,
        "timeout_s": 60,
        "resources": {"cpus": 0.5, "memory_mb": 256, "pids": 64, "disk_mb": 64},
        "acceptance": {"rule": rule},
    }
    r = client.post("/v1/loops", json=body)
    r.raise_for_status()
    loop_id = r.json()["id"]
    truth, keeps, good = 1.0, 0, 0
    baseline = client.get(f"/v1/loops/{loop_id}/experiments").json()["items"][0]
    wait(client, baseline["id"])
    for i, effect in enumerate(effects, start=1):
        files = {"train.py": train(truth + effect, i)}
        r = client.post(f"/v1/loops/{loop_id}/experiments", json={"description": f"e{i}", "files": files})
        r.raise_for_status()
        if wait(client, r.json()["id"])["status"] == "keep":
            keeps += 1
            good += effect < 0
            truth += effect
    time.sleep(settle_s)  # idle slots re-measure the best meanwhile
    deadline = time.monotonic() + 120
    while (loop := client.get(f"/v1/loops/{loop_id}").json())["counts"]["running"]:
        if time.monotonic() > deadline:
            break
        time.sleep(0.2)
    client.post(f"/v1/loops/{loop_id}/stop")
    runs = sum(v for k, v in loop["counts"].items() if k not in ("queued", "cancelled"))
    return {
        "runs": runs,
        "keeps": keeps,
        "precision": good / keeps if keeps else float("nan"),
        "truth": truth,
        "reported": loop["best_metric"],
        "best_runs": loop["best_runs"],
        "noise": loop["noise_sd"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--candidates", type=int, default=12)
    ap.add_argument("--slots", type=int, default=2)
    ap.add_argument("--settle", type=float, default=8.0, help="seconds of idle time after the last verdict")
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()
    rng = random.Random(args.seed)
    # the mix of bench/acceptance_sim.py's reference, effects in units of the noise sd
    effects = []
    for _ in range(args.candidates):
        u = rng.random()
        size = rng.uniform(0.5, 3.0) * NOISE_SD
        effects.append(0.0 if u < 0.7 else size if u < 0.9 else -size)
    with tempfile.TemporaryDirectory(prefix="ratchet-bench-") as tmp:
        proc, client = serve(Path(tmp), args.slots)
        try:
            t0 = time.monotonic()
            results = {rule: run_loop(client, rule, effects, args.settle) for rule in ("strict", "confirm")}
            took = time.monotonic() - t0
        finally:
            proc.terminate()
            proc.wait(30)
    helpful = sum(e < 0 for e in effects)
    print(f"{args.candidates} candidates ({helpful} truly helpful), noise sd {NOISE_SD}, {args.slots} slots")
    print(
        f"{'rule':10}{'runs':>6}{'keeps':>7}{'precision':>11}{'true best':>11}{'reported':>10}"
        f"{'of runs':>9}{'reported-true':>15}{'noise sd':>10}"
    )
    for rule, r in results.items():
        noise = f"{r['noise']:.3f}" if r["noise"] is not None else "-"
        print(
            f"{rule:10}{r['runs']:>6}{r['keeps']:>7}{r['precision']:>11.2f}{r['truth']:>11.3f}"
            f"{r['reported']:>10.3f}{r['best_runs']:>9}{r['reported'] - r['truth']:>15.3f}{noise:>10}"
        )
    print(f"({took:.0f} s)")


if __name__ == "__main__":
    main()
