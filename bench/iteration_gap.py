"""The iteration gap: with candidates queued on one slot, the time from one experiment's workload
ending to the next one's workload starting, next to a plain `docker run --rm` of the same image
and trivial command measured in the same run; and the service's own overhead metric.

    .venv/bin/python bench/iteration_gap.py [--runs 20] [--hold 2 0] [--runtime runc runsc] [--ahead 1]

Drives a real `ratchet serve --slots 1`: a loop whose workload (`sh train.sh`) is the trivial
command after `--hold` seconds that stand in for training, `--runs` candidates submitted at once.
Each workload stamps its own first and last instruction (see harness.py); the gap is the next
one's start stamp minus the previous one's end stamp, in start order. With `--hold 0` the
workloads run back to back and the figure shows what the engine can sustain when nothing is left
to overlap with. `ratchet_experiment_overhead_seconds` (slot time not inside a workload) is read
from /metrics; its quantiles are interpolated within the histogram's buckets like Prometheus does.
"""

from __future__ import annotations

import argparse
import itertools
import statistics

from harness import TRIVIAL, Service, docker_run, histogram_quantile, pct

OVERHEAD = "ratchet_experiment_overhead_seconds"


def measure(runtime: str, hold: float, runs: int, baseline_runs: int, ahead: int) -> dict[str, float]:
    plain = [docker_run(runtime) for _ in range(baseline_runs)]
    service = Service(slots=1, env={"RATCHET_PREPARE_AHEAD": str(ahead)})
    try:
        name = f"gap-{runtime}-{hold:g}"
        loop_id = service.create_loop(name, runtime, hold)
        ids = service.submit(loop_id, hold, runs)
        service.wait_idle(loop_id)
        exps = sorted(service.experiments(ids), key=lambda e: e["metrics"]["t_start"])
        text = service.metrics()
    finally:
        service.close()
    plain += [docker_run(runtime) for _ in range(baseline_runs)]
    gaps = [b["metrics"]["t_start"] - a["metrics"]["t_end"] for a, b in itertools.pairwise(exps)]
    return {
        "docker": statistics.median(plain),
        "gap50": statistics.median(gaps),
        "gap90": pct(gaps, 0.9),
        "gapmax": max(gaps),
        "ov50": histogram_quantile(0.5, text, OVERHEAD, name),
        "ov95": histogram_quantile(0.95, text, OVERHEAD, name),
        "ov99": histogram_quantile(0.99, text, OVERHEAD, name),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=20, help="candidates queued on the slot")
    ap.add_argument("--hold", type=float, nargs="+", default=[2.0, 0.0], help="seconds of 'training' per run")
    ap.add_argument("--ahead", type=int, nargs="+", default=[1], help="RATCHET_PREPARE_AHEAD values")
    ap.add_argument("--runtime", nargs="+", choices=["runc", "runsc"], default=["runc", "runsc"])
    ap.add_argument("--baseline-runs", type=int, default=5, help="plain docker runs before and after")
    args = ap.parse_args()
    print(f"{args.runs} candidates on one slot; workload `sh train.sh` = [sleep HOLD;] {TRIVIAL}")
    head = (
        f"{'runtime':<8}{'ahead':>6}{'hold s':>7}{'docker run':>11}{'gap p50':>9}{'x docker':>9}"
        f"{'gap p90':>9}{'gap max':>9}{'overhead p50':>13}{'p95':>7}{'p99':>7}"
    )
    print(head)
    for runtime, ahead, hold in itertools.product(args.runtime, args.ahead, args.hold):
        r = measure(runtime, hold, args.runs, args.baseline_runs, ahead)
        ratio = r["gap50"] / r["docker"]
        print(
            f"{runtime:<8}{ahead:>6}{hold:>7g}{r['docker']:>11.3f}{r['gap50']:>9.3f}{ratio:>9.2f}"
            f"{r['gap90']:>9.3f}{r['gapmax']:>9.3f}{r['ov50']:>13.3f}{r['ov95']:>7.3f}{r['ov99']:>7.3f}",
            flush=True,
        )


if __name__ == "__main__":
    main()
