"""What one sandboxed run costs, next to a plain `docker run --rm` of the same image and command
measured in the same run.

    .venv/bin/python bench/sandbox_overhead.py [--runs 15] [--runtime runc|runsc]

Prints, per phase, the median and p90 over the runs: prepare (volume + container created, started
behind the gate, workspace copied in), workload (gate opened -> workload exited), collect + remove
(outputs and peak memory read, container and volume removed), and the total, with its ratio to
the plain `docker run`.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import time

from sandbox import FileEntry, RunSpec, Sandbox

IMAGE = "ratchet/sandbox:latest"
ARGV = ["python3", "-c", "print(1)"]


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=15)
    ap.add_argument("--runtime", choices=["runc", "runsc"], default="runc")
    args = ap.parse_args()
    sandbox = Sandbox(instance="bench-overhead")
    spec = RunSpec(
        image=IMAGE,
        argv=ARGV,
        files=[FileEntry(path="train.py", data=b"print(1)\n", writable=True)],
        runtime=args.runtime,
        labels={"ratchet.bench": "overhead"},
    )
    phases: dict[str, list[float]] = {"prepare": [], "workload": [], "collect + remove": [], "total": []}
    plain: list[float] = []
    for _ in range(args.runs):
        t0 = time.time()
        t = sandbox.run(spec).timings
        assert t.ready and t.started and t.finished and t.released
        phases["prepare"].append(t.ready - t0)
        phases["workload"].append(t.finished - t.started)
        phases["collect + remove"].append(t.released - t.finished)
        phases["total"].append(t.released - t0)
        t0 = time.monotonic()
        cmd = ["docker", "run", "--rm", "--network", "none", "--runtime", args.runtime, IMAGE, *ARGV]
        subprocess.run(cmd, check=True, capture_output=True)
        plain.append(time.monotonic() - t0)
    base = statistics.median(plain)
    print(f"{args.runs} runs, runtime {args.runtime}, `{' '.join(ARGV)}` in {IMAGE}")
    print(f"{'phase':<20}{'p50 s':>9}{'p90 s':>9}{'x docker run':>14}")
    print(f"{'docker run --rm':<20}{base:>9.3f}{_pct(plain, 0.9):>9.3f}{1.0:>14.2f}")
    for name, values in phases.items():
        med = statistics.median(values)
        print(f"{name:<20}{med:>9.3f}{_pct(values, 0.9):>9.3f}{med / base:>14.2f}")


if __name__ == "__main__":
    main()
