"""Acceptance rules on simulated loops: what each rule buys, at equal run budget.

Drives the service's own decision code (`service.rules.acceptance.judge` and `pooled_sd`, which are pure)
over thousands of simulated loops. The model (all values in units of the run-to-run noise sd, metric
minimised):

- every candidate is an edit of the current best with an additive true effect: a no-op (0), harmful
  (+U(lo, hi)) or helpful (-U(lo, hi)) in the proportions of the mix;
- one run measures true quality + N(0, sd); a run budget per loop (default 300) pays for baseline
  runs, first runs and confirmation runs alike;
- idle-slot re-measurement: slots that would sit idle re-run the best (up to the rule's
  `remeasure_runs` runs of it). With one agent writing one candidate at a time on a 2-slot box, one
  slot idles while a candidate runs and both idle while the agent writes the next one: `--idle 2`
  re-measure runs per candidate run (default). They use idle time, so they do not count against the
  budget; rows without re-measurement show what it adds.

Reported per rule: final true quality (lower is better), keep precision (share of keeps that were
truly helpful), bias of the reported best (truth - reported: > 0 means the ledger claims a better
best than it has) and its mean absolute error.

    python bench/acceptance_sim.py                 # the full table (a few minutes)
    python bench/acceptance_sim.py --loops 200     # quicker, noisier
"""

from __future__ import annotations

import argparse
import math
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import msgspec

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from service.rules.acceptance import PRESETS, Rule, judge, mean, pooled_sd


@dataclass(frozen=True)
class Mix:
    name: str
    noop: float
    harmful: float
    helpful: float
    lo: float  # effect sizes, in sd
    hi: float


MIXES = [
    Mix("reference: 70/20/10, effects 0.5-3sd", 0.7, 0.2, 0.1, 0.5, 3.0),
    Mix("small effects: 70/20/10, 0.2-1sd", 0.7, 0.2, 0.1, 0.2, 1.0),
    Mix("rich: 50/20/30, 0.5-3sd", 0.5, 0.2, 0.3, 0.5, 3.0),
    Mix("barren: 70/27/3, 0.5-3sd", 0.7, 0.27, 0.03, 0.5, 3.0),
]


@dataclass
class Result:
    quality: float
    keeps: int
    good_keeps: int
    bias: float  # truth - reported


def effect(rng: random.Random, mix: Mix) -> float:
    u = rng.random()
    if u < mix.noop:
        return 0.0
    size = rng.uniform(mix.lo, mix.hi)
    return size if u < mix.noop + mix.harmful else -size


def simulate(rule: Rule, mix: Mix, budget: int, idle: int, rng: random.Random) -> Result:
    truth = 0.0
    incumbent = [rng.gauss(0.0, 1.0) for _ in range(rule.baseline_runs)]
    groups: list[list[float]] = [incumbent]
    left = budget - rule.baseline_runs
    keeps = good = 0
    judged = dict(direction="minimize", min_delta=0.0, metric_name="m")
    noise = pooled_sd(groups)

    def run(true: float) -> float:
        # while a candidate's run holds one slot, `idle` other slots re-measure the best
        nonlocal noise
        for _ in range(idle):
            if len(incumbent) >= rule.remeasure_runs:
                break
            if len(incumbent) == 1:
                groups.append(incumbent)
            incumbent.append(truth + rng.gauss(0.0, 1.0))
            noise = pooled_sd(groups)
        return true + rng.gauss(0.0, 1.0)

    while left > 0:
        e = effect(rng, mix)
        runs = [run(truth + e)]
        left -= 1
        verdict = judge(rule, runs, incumbent, noise, **judged)
        while verdict.verdict == "confirm" and left > 0:
            runs.append(run(truth + e))
            left -= 1
            verdict = judge(rule, runs, incumbent, noise, **judged)
        if len(runs) > 1:
            groups.append(runs)
            noise = pooled_sd(groups)
        if verdict.verdict == "keep":
            keeps += 1
            good += e < 0
            truth += e
            incumbent = runs
    return Result(quality=truth, keeps=keeps, good_keeps=good, bias=truth - mean(incumbent))


RULES: list[tuple[str, Rule]] = [
    ("strict", PRESETS["strict"]),
    ("strict + re-measure", msgspec.structs.replace(PRESETS["strict"], remeasure_runs=16)),
    ("confirm, no re-measure", msgspec.structs.replace(PRESETS["confirm"], remeasure_runs=0)),
    ("confirm (default)", PRESETS["confirm"]),
    ("significant, no re-measure", msgspec.structs.replace(PRESETS["significant"], remeasure_runs=0)),
    ("significant", PRESETS["significant"]),
]


def main() -> int:
    raw = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=raw)
    parser.add_argument("--loops", type=int, default=300, help="simulated loops per rule and mix")
    parser.add_argument("--budget", type=int, default=300, help="runs per loop")
    parser.add_argument("--idle", type=int, default=2, help="re-measure runs per candidate run (see above)")
    parser.add_argument("--seed", type=int, default=20261126)
    args = parser.parse_args()
    t0 = time.perf_counter()
    calls = 0
    failed: list[str] = []
    for mix in MIXES:
        print(f"\n{mix.name}; {args.loops} loops of {args.budget} runs; values in sd")
        print(
            f"{'rule':28} {'final quality':>13} {'vs strict':>9} {'keeps':>6} {'precision':>9}"
            f" {'best bias':>9} {'vs strict':>9} {'|error|':>8}"
        )
        stats: dict[str, tuple[float, float, float, float]] = {}
        for label, rule in RULES:
            rng = random.Random(f"{args.seed}/{mix.name}")  # the same candidate stream for every rule
            results = [simulate(rule, mix, args.budget, args.idle, rng) for _ in range(args.loops)]
            calls += args.loops
            n = len(results)
            quality = sum(r.quality for r in results) / n
            keeps = sum(r.keeps for r in results)
            precision = sum(r.good_keeps for r in results) / keeps if keeps else math.nan
            bias = sum(r.bias for r in results) / n
            error = sum(abs(r.bias) for r in results) / n
            stats[label] = (quality, precision, bias, error)
            sq, _, sb, _ = stats["strict"]
            print(
                f"{label:28} {quality:13.2f} {quality / sq:9.0%} {keeps / n:6.1f} {precision:9.2f}"
                f" {bias:9.2f} {bias / sb:9.0%} {error:8.2f}"
            )
        failed += check(mix, stats)
    print(f"\n{calls} simulated loops in {time.perf_counter() - t0:.0f} s")
    print("\ntargets (reference mix): confirm quality >= 95 % of strict's and best bias <= 50 % of strict's;")
    print("significant precision >= 0.85; with re-measurement, reported best - truth <= 0.3sd on average")
    for line in failed:
        print(f"MISSED: {line}")
    if not failed:
        print("all targets met")
    return 1 if failed else 0


def check(mix: Mix, stats: dict[str, tuple[float, float, float, float]]) -> list[str]:
    if not mix.name.startswith("reference"):
        return []
    strict_q, _, strict_bias, _ = stats["strict"]
    q, _, bias, _ = stats["confirm (default)"]
    missed = []
    if q / strict_q < 0.95:
        missed.append(f"confirm reaches {q / strict_q:.0%} of strict's quality")
    if bias > 0.5 * strict_bias:
        missed.append(f"confirm's best bias is {bias / strict_bias:.0%} of strict's")
    if stats["significant"][1] < 0.85:
        missed.append(f"significant's precision is {stats['significant'][1]:.2f}")
    if bias > 0.3:
        missed.append(f"confirm's reported best is {bias:.2f}sd better than the truth on average")
    return missed


if __name__ == "__main__":
    sys.exit(main())
