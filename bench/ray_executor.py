"""The Ray executor against the local one, on a real loopback Ray cluster (a head and two worker
nodes, token authentication on) and the machine's Docker engine.

    .venv/bin/python bench/ray_executor.py [--runs 20] [--n 16] [--duration 3] [--slots 2]

Dispatch overhead: `--runs` experiments one at a time through each executor, alternately (so both
see the same load). A run's overhead is its wall time from `prepare(spec)` to the result in hand,
less its workload's own time (the gate's open to the workload's exit, on the node's clock):
prepare (over Ray: the workspace to the node through the object store, the container made there
behind its gate), start (the call to the gate opening), finish (the workload's exit to the result,
outputs collected). The workspace is the charlm example's (~60 KiB of files).

Makespan: `--n` experiments of a fixed `--duration` (sleep: no CPU, so they fit on 2 cores) over
the slots of one worker node, then of both (`--slots` CPU slots each), dispatched as the scheduler
does: each slot prepares its next run while the current one works, and starts it when the current
workload exits. The makespan runs from the first prepare to the last workload's exit.

Targets: 2 nodes at most 0.55 x the makespan of 1 node; the Ray executor's p50 overhead at most
50 ms over the local one's.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from sandbox import FileEntry, RunResult, RunSpec, Sandbox  # noqa: E402
from service.cluster.executor import RayExecutor, RayHandle  # noqa: E402
from service.cluster.local import LocalCluster, Worker  # noqa: E402
from service.executor import LocalExecutor  # noqa: E402

IMAGE = "ratchet/sandbox:latest"


def workspace() -> list[FileEntry]:
    root = ROOT / "examples" / "charlm"
    return [
        FileEntry(path=p.relative_to(root).as_posix(), data=p.read_bytes())
        for p in sorted(root.glob("*.py")) + sorted(root.glob("*.md"))
    ]


def spec(argv: list[str], instance: str, timeout_s: float = 120) -> RunSpec:
    return RunSpec(
        image=IMAGE, argv=argv, files=workspace(), timeout_s=timeout_s, labels={"ratchet.bench": instance}
    )


async def one(executor: object, run_spec: RunSpec) -> dict[str, float]:
    exit_seen: list[float] = []
    t0 = time.time()
    handle = await executor.prepare(run_spec)  # type: ignore[attr-defined]
    t1 = time.time()
    result: RunResult = await handle.start(lambda _d: None, lambda _t: exit_seen.append(time.time()))
    t2 = time.time()
    await handle.cleanup()
    timings = result.timings
    assert result.exit_code == 0, result.log
    assert timings.started is not None and timings.finished is not None
    return {
        "prepare": t1 - t0,
        "gate": timings.started - t1,
        "exit": exit_seen[0] - timings.finished,
        "collect": t2 - exit_seen[0],
        "overhead": (t2 - t0) - (timings.finished - timings.started),
    }


async def overhead(local: LocalExecutor, ray_ex: RayExecutor, runs: int, instance: str) -> dict[str, list]:
    trivial = spec(["python3", "-c", "print(1)"], instance)
    found: dict[str, list[dict[str, float]]] = {"local": [], "ray": []}
    await one(local, trivial)  # warm: first container of the image, first actor call
    await one(ray_ex, trivial)
    for _ in range(runs):
        found["local"].append(await one(local, trivial))
        found["ray"].append(await one(ray_ex, trivial))
    return found


async def makespan(executor: RayExecutor, n: int, duration: float, instance: str) -> float:
    """Each slot starts its next run the moment the current workload exits (as the scheduler
    frees a slot at the exit, not at the result), prepared while the current one worked."""
    work = spec(["sleep", f"{duration:g}"], instance)
    left = [n]
    runs: list[asyncio.Task[RunResult]] = []
    cleanups: list[asyncio.Task[None]] = []

    def take() -> bool:
        left[0] -= 1
        return left[0] >= 0

    async def run(handle: RayHandle, exited: asyncio.Event) -> RunResult:
        try:
            return await handle.start(lambda _d: None, lambda _t: exited.set())
        finally:
            exited.set()
            cleanups.append(asyncio.create_task(handle.cleanup()))

    async def slot(key: str) -> None:
        upcoming = asyncio.create_task(executor.prepare(work, slot=key)) if take() else None
        while upcoming is not None:
            handle = await upcoming
            exited = asyncio.Event()
            runs.append(asyncio.create_task(run(handle, exited)))
            upcoming = asyncio.create_task(executor.prepare(work, slot=key)) if take() else None
            await exited.wait()

    t0 = time.time()
    await asyncio.gather(*(slot(s.key) for s in executor.slots))
    results = await asyncio.gather(*runs)
    assert all(r.exit_code == 0 for r in results) and len(results) == n
    await asyncio.gather(*cleanups)
    return max(r.timings.finished or t0 for r in results) - t0  # to the last workload's end


def p50(rows: list[dict[str, float]], key: str) -> float:
    return statistics.median(r[key] for r in rows)


async def measure(cluster: LocalCluster, args: argparse.Namespace) -> None:
    instance = f"bench-ray-{uuid.uuid4().hex[:8]}"
    local = LocalExecutor(Sandbox(instance=instance), threads=8)
    both = RayExecutor(cluster.address, instance, auth_token_path=cluster.token_path, cpu_slots=args.slots)
    await both.connect(nodes=2)
    try:
        print(f"cluster {cluster.address}: {len(both.slots)} slots on {sorted({s.node for s in both.slots})}")
        found = await overhead(local, both, args.runs, instance)
        print(f"\nDispatch overhead, {args.runs} runs each, alternating (seconds, p50):\n")
        print("| executor | prepare | gate | exit | collect | overhead |")
        print("|---|---|---|---|---|---|")
        for name in ("local", "ray"):
            rows = found[name]
            cells = " | ".join(
                f"{p50(rows, k):.3f}" for k in ("prepare", "gate", "exit", "collect", "overhead")
            )
            print(f"| {name} | {cells} |")
        extra = p50(found["ray"], "overhead") - p50(found["local"], "overhead")
        verdict = "meets" if extra <= 0.050 else "MISSES"
        print(f"\nRay over local at p50: {extra * 1000:+.0f} ms ({verdict} the ≤ 50 ms target)")
        two = await makespan(both, args.n, args.duration, instance)
    finally:
        await both.close()
    one_node = RayExecutor(
        cluster.address, instance, auth_token_path=cluster.token_path, cpu_slots=args.slots, only_nodes={"w1"}
    )
    await one_node.connect(nodes=1)
    try:
        one = await makespan(one_node, args.n, args.duration, instance)
    finally:
        await one_node.close()
    await local.close()
    ideal = args.n / args.slots * args.duration
    print(f"\nMakespan of {args.n} experiments of {args.duration:g} s, {args.slots} slots per node:\n")
    print("| nodes | slots | ideal s | makespan s | x 1 node |")
    print("|---|---|---|---|---|")
    print(f"| 1 | {args.slots} | {ideal:.1f} | {one:.2f} | 1.00 |")
    print(f"| 2 | {2 * args.slots} | {ideal / 2:.1f} | {two:.2f} | {two / one:.2f} |")
    verdict = "meets" if two / one <= 0.55 else "MISSES"
    print(f"\n2 nodes / 1 node = {two / one:.2f} ({verdict} the ≤ 0.55 target)")


def main() -> None:
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=formatter)
    parser.add_argument("--runs", type=int, default=20, help="runs per executor for the overhead")
    parser.add_argument("--n", type=int, default=16, help="experiments for the makespan")
    parser.add_argument("--duration", type=float, default=5.0, help="seconds each experiment sleeps")
    parser.add_argument("--slots", type=int, default=2, help="CPU slots per worker node")
    args = parser.parse_args()
    t0 = time.monotonic()
    print("starting a Ray cluster on loopback: head + 2 workers ...", flush=True)
    with LocalCluster([Worker(name="w1", cpus=1), Worker(name="w2", cpus=1)]) as cluster:
        print(f"up in {time.monotonic() - t0:.1f} s", flush=True)
        asyncio.run(measure(cluster, args))
    print(f"\ndone in {time.monotonic() - t0:.0f} s (cluster stopped)")


if __name__ == "__main__":
    main()
