"""Scaling: N queued experiments of fixed duration d on K slots, for K = 1, 2, 4, 8, against the
ideal (N/K)·d measured by the workloads' own stamps in the same run.

    .venv/bin/python bench/scaling.py [--per-slot 4] [--duration 5] [--slots 1 2 4 8]

For each K: a real `ratchet serve --slots K`, a loop whose workload sleeps d seconds (sleep-style:
it needs no CPU, so 8 slots fit on 2 cores), its baseline run, then N = per-slot·K candidates
submitted at once. The makespan runs from the first submission to the last verdict written (what a
user waits for); the bound is (N/K)·d·1.03 + 1 s. Utilisation is workload time over K·makespan.
"First wave" is the time from the first submission until all K slots have started a workload (the
first runs cannot be prepared before they are submitted); "idle while queued" adds up, from then
to the last workload start (work was queued all along), the slot-seconds in which fewer than K
workloads ran.
"""

from __future__ import annotations

import argparse
import time

from harness import Service


def idle_slot_seconds(spans: list[tuple[float, float]], slots: int, t0: float) -> float:
    """Slot-seconds with fewer than `slots` workloads running, from t0 to the last start."""
    if t0 >= max(s for s, _ in spans):
        return 0.0
    last_start = max(s for s, _ in spans)
    events = sorted([(s, 1) for s, _ in spans] + [(e, -1) for _, e in spans] + [(last_start, 0)])
    idle, running, now = 0.0, 0, t0
    for at, step in events:
        at = min(max(at, t0), last_start)
        idle += (slots - min(running, slots)) * (at - now)
        now, running = at, running + step
    return idle


def measure(slots: int, n: int, duration: float, runtime: str) -> dict[str, float]:
    service = Service(slots=slots)
    try:
        loop_id = service.create_loop(f"scale-{slots}", runtime, duration, timeout_s=duration + 60)
        t0 = time.time()
        ids = service.submit(loop_id, duration, n)
        service.wait_idle(loop_id)
        exps = service.experiments(ids)
    finally:
        service.close()
    spans = [(e["metrics"]["t_start"], e["metrics"]["t_end"]) for e in exps]
    makespan = max(e["finished_at"] for e in exps) - t0
    busy = sum(end - start for start, end in spans)
    full = sorted(start for start, _ in spans)[slots - 1]  # every slot has started a workload
    return {
        "wave": full - t0,
        "ideal": n / slots * duration,
        "bound": n / slots * duration * 1.03 + 1,
        "makespan": makespan,
        "util": busy / (slots * makespan),
        "idle": idle_slot_seconds(spans, slots, full),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--per-slot", type=int, default=4, help="experiments per slot (N = per-slot·K)")
    ap.add_argument("--duration", type=float, default=5.0, help="seconds each workload sleeps")
    ap.add_argument("--slots", type=int, nargs="+", default=[1, 2, 4, 8])
    ap.add_argument("--runtime", choices=["runc", "runsc"], default="runc")
    args = ap.parse_args()
    print(f"N = {args.per_slot}·K experiments of d = {args.duration:g} s (sleep), runtime {args.runtime}")
    print(
        f"{'K':>3}{'N':>5}{'ideal s':>9}{'bound s':>9}{'makespan s':>12}{'x ideal':>9}{'within':>8}"
        f"{'slot util':>11}{'first wave s':>14}{'idle while queued s':>21}"
    )
    for k in args.slots:
        n = args.per_slot * k
        r = measure(k, n, args.duration, args.runtime)
        ok = "yes" if r["makespan"] <= r["bound"] else "NO"
        print(
            f"{k:>3}{n:>5}{r['ideal']:>9.1f}{r['bound']:>9.2f}{r['makespan']:>12.2f}"
            f"{r['makespan'] / r['ideal']:>9.3f}{ok:>8}{r['util']:>11.1%}"
            f"{r['wave']:>14.2f}{r['idle']:>21.2f}",
            flush=True,
        )


if __name__ == "__main__":
    main()
