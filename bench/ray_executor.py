"""The Ray executor against the local one, on a real loopback Ray cluster (a head and two worker
nodes, token authentication on) and the machine's Docker engine.

    .venv/bin/python bench/ray_executor.py [--runs 20] [--n 16] [--duration 5] [--slots 2]

Dispatch overhead: `--runs` experiments one at a time through each executor, alternately (so both
see the same load). A run's overhead is its wall time from `prepare(spec, node)` to the result in
hand, less its workload's own time (the gate's open to the workload's exit, on the node's clock):
prepare (over Ray: the workspace to the node through the object store, the container made there
behind its gate), gate (the `start` call to the workload's first instruction), exit (the workload's
end to `on_exit` in the caller: when the scheduler frees the slot), collect (from there to the
result, outputs collected). The workspace is the charlm example's (~60 KiB of files).

Makespan: a loop of `--n` candidates whose workload sleeps `--duration` seconds (no CPU, so they
fit on 2 cores), run by the real scheduler, store and state machine through the Ray executor on
one worker node's slots, then on both (`--slots` CPU slots each): from the moment they are queued
(the baseline already judged) to the last workload's end, and to the last verdict written (which
adds the last runs' collection: outputs, logs). The scheduler prepares each slot's next run while
the current one works and starts it when the workload exits, as in the service; "prepared" counts
the experiments that started on a run prepared ahead (the first wave cannot).

Targets: 2 nodes at most 0.55 x the makespan of 1 node; the Ray executor's p50 overhead at most
50 ms over the local one's.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

import msgspec

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from sandbox import FileEntry, RunResult, RunSpec  # noqa: E402
from service.models import LoopConfig  # noqa: E402
from service.runs.attempt import Attempt  # noqa: E402
from service.runs.executor import Executor  # noqa: E402
from service.runs.local import LocalExecutor  # noqa: E402
from service.runs.logs import RunLogs  # noqa: E402
from service.runs.ray.executor import RayExecutor  # noqa: E402
from service.runs.ray.localcluster import LocalCluster, Worker  # noqa: E402
from service.runs.scheduler import Scheduler  # noqa: E402
from service.settings import Settings  # noqa: E402
from service.state import enqueue  # noqa: E402
from service.state.snapshots import SnapshotStore  # noqa: E402
from service.state.store import Store  # noqa: E402

IMAGE = "ratchet/sandbox:latest"


def workspace() -> list[FileEntry]:
    root = ROOT / "examples" / "charlm"
    return [
        FileEntry(path=p.relative_to(root).as_posix(), data=p.read_bytes())
        for p in sorted(root.glob("*.py")) + sorted(root.glob("*.md"))
    ]


def spec(argv: list[str], instance: str, timeout_s: float = 120) -> RunSpec:
    return RunSpec(
        image=IMAGE,
        argv=argv,
        files=workspace(),
        timeout_s=timeout_s,
        labels={"ratchet.bench": instance},
    )


async def one(executor: Executor, run_spec: RunSpec, node: str) -> dict[str, float]:
    exit_seen: list[float] = []
    t0 = time.time()
    handle = await executor.prepare(run_spec, node)
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
    await one(local, trivial, "local")  # warm: first container of the image, first actor call
    await one(ray_ex, trivial, "w1")
    for _ in range(runs):
        found["local"].append(await one(local, trivial, "local"))
        found["ray"].append(await one(ray_ex, trivial, "w1"))
    return found


class Span(msgspec.Struct):
    exits: float  # seconds from queueing to the last workload's end (its slot passing on)
    verdicts: float  # ... to the last verdict written
    prepared: str  # how many started on a run prepared ahead


async def makespan(executor: RayExecutor, n: int, duration: float, data: Path) -> Span:
    """The scheduler runs a loop's `n` candidates through `executor`."""
    settings = Settings(data_dir=str(data), prepare_ahead=1, log_level="warning")
    store, snapshots = Store(data / "ratchet.db"), SnapshotStore(data / "blobs")
    await store.open()
    scheduler = Scheduler(settings, store, snapshots, executor, RunLogs(data / "logs"))
    exits: list[float] = []
    freed = scheduler.slot_freed

    def slot_freed(attempt: Attempt) -> None:  # the moment a workload ends
        exits.append(time.time())
        freed(attempt)

    scheduler.slot_freed = slot_freed  # type: ignore[method-assign]
    await scheduler.start()
    try:
        train = f"sleep {duration:g}\necho ---\necho val_bpb: 1.0\n"
        root = snapshots.put_tree({"train.sh": train.encode()})
        config = LoopConfig(name="bench", command=["sh", "train.sh"], time_budget_s=duration + 60)
        loop_id, _ = await enqueue.create_loop(store, config, root.id, root.encode())
        scheduler.wake()
        await until_idle(store)
        t0 = time.time()
        for i in range(n):
            child = snapshots.put_tree({"train.sh": f"{train}# {i}\n".encode()})
            await enqueue.submit(store, loop_id, f"c{i}", root.id, child.id, child.encode(), "")
        hits = scheduler.prepared_hits
        scheduler.wake()
        await until_idle(store)
        exps = await store.list_experiments(loop_id, None, 0, n + 1)
        assert all(e.status.value in ("keep", "discard") for e in exps), [e.reason for e in exps]
        last = max(e.finished_at or t0 for e in exps)
        hits = scheduler.prepared_hits - hits
        return Span(exits=max(exits) - t0, verdicts=last - t0, prepared=f"{hits}/{n}")
    finally:
        await scheduler.stop()  # closes the executor
        await store.close()


async def until_idle(store: Store) -> None:
    while sum((await store.queue_depths()).values()) or await store.running_ids():
        await asyncio.sleep(0.05)


def p50(rows: list[dict[str, float]], key: str) -> float:
    return statistics.median(r[key] for r in rows)


def report_overhead(found: dict[str, list[dict[str, float]]], runs: int) -> None:
    print(f"\nDispatch overhead, {runs} runs each, alternating (seconds, p50):\n")
    print("| executor | prepare | gate | exit | collect | overhead |")
    print("|---|---|---|---|---|---|")
    for name in ("local", "ray"):
        rows = found[name]
        cells = " | ".join(f"{p50(rows, k):.3f}" for k in ("prepare", "gate", "exit", "collect", "overhead"))
        print(f"| {name} | {cells} |")
    extra = p50(found["ray"], "overhead") - p50(found["local"], "overhead")
    paired = statistics.median(
        r["overhead"] - lo["overhead"] for r, lo in zip(found["ray"], found["local"], strict=True)
    )
    verdict = "meets" if extra <= 0.050 else "MISSES"
    print(f"\nRay over local at p50: {extra * 1000:+.0f} ms ({verdict} the ≤ 50 ms target);", end=" ")
    print(f"median of the paired differences (run i of each, back to back): {paired * 1000:+.0f} ms")


def report_makespan(args: argparse.Namespace, single: Span, two: Span) -> None:
    ideal = args.n / args.slots * args.duration
    print(f"\nMakespan of {args.n} experiments of {args.duration:g} s, {args.slots} slots per node, from")
    print("their queueing to the last workload's end, and to the last verdict written (seconds):\n")
    print("| nodes | slots | ideal | to last end | x 1 node | to last verdict | x 1 node | prepared |")
    print("|---|---|---|---|---|---|---|---|")
    for nodes, span in ((1, single), (2, two)):
        cells = f"{span.exits:.2f} | {span.exits / single.exits:.2f} | {span.verdicts:.2f}"
        cells += f" | {span.verdicts / single.verdicts:.2f} | {span.prepared}"
        print(f"| {nodes} | {nodes * args.slots} | {ideal / nodes:.1f} | {cells} |")
    ratio = two.verdicts / single.verdicts
    verdict = "meets" if ratio <= 0.55 else "MISSES"
    print(f"\n2 nodes / 1 node, to the last verdict = {ratio:.3f} ({verdict} the ≤ 0.55 target)")


async def measure(cluster: LocalCluster, args: argparse.Namespace, data: Path) -> None:
    instance = f"bench-ray-{uuid.uuid4().hex[:8]}"
    both = RayExecutor(cluster.address, instance, token_file=cluster.token_path, cpu_slots=args.slots)
    await both.connect(nodes=2)
    nodes = await both.inventory()
    print(f"cluster {cluster.address}: {sum(n.slots for n in nodes)} slots on {[n.name for n in nodes]}")
    if args.part != "makespan":
        local = LocalExecutor(Settings(slots=1, gpus=[]), instance)
        try:
            report_overhead(await overhead(local, both, args.runs, instance), args.runs)
        finally:
            await local.close()
    if args.part == "overhead":
        await both.close()
        return
    two = await makespan(both, args.n, args.duration, data / "two")  # closes the executor
    one_node = RayExecutor(
        cluster.address, instance, token_file=cluster.token_path, cpu_slots=args.slots, only_nodes={"w1"}
    )
    await one_node.connect(nodes=1)
    single = await makespan(one_node, args.n, args.duration, data / "one")
    report_makespan(args, single, two)


def main() -> None:
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=formatter)
    parser.add_argument("--runs", type=int, default=20, help="runs per executor for the overhead")
    parser.add_argument("--n", type=int, default=16, help="experiments for the makespan")
    parser.add_argument("--duration", type=float, default=5.0, help="seconds each experiment sleeps")
    parser.add_argument("--slots", type=int, default=2, help="CPU slots per worker node")
    parser.add_argument("--part", choices=["both", "overhead", "makespan"], default="both")
    args = parser.parse_args()
    t0 = time.monotonic()
    print("starting a Ray cluster on loopback: head + 2 workers ...", flush=True)
    with LocalCluster([Worker(name="w1", cpus=1), Worker(name="w2", cpus=1)]) as cluster:
        print(f"up in {time.monotonic() - t0:.1f} s", flush=True)
        with tempfile.TemporaryDirectory(prefix="ratchet-bench-ray-") as tmp:
            asyncio.run(measure(cluster, args, Path(tmp)))
    print(f"\ndone in {time.monotonic() - t0:.0f} s (cluster stopped)")


if __name__ == "__main__":
    main()
