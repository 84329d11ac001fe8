"""The scheduler's own capacity, with the engine taken away: the real scheduler, store (a SQLite
file) and state machine dispatching to the in-memory executor of the tests (`tests/fake_executor.py`),
whose runs end at once (or after `--run-ms`), so what is measured is Ratchet's own work per run.

    .venv/bin/python bench/scheduler_capacity.py [--loops 100] [--per-loop 100] [--slots 64] [--run-ms 0]

Set-up: `--loops` loops, each baseline run and kept, then `--per-loop` candidates queued in each
(10,000 by default) while the scheduler is stopped. Measured: a fresh scheduler started on that
queue until it is empty. Dispatches/s is experiments started over the time from start to the last
verdict; dispatch latency is, per run, the time from its slot freeing (the previous run's end; or
the experiment becoming next in line, if later) to its gate opening. The baseline, in the same run
on the same database: the two guarded writes each experiment needs (`start`, `finish`), done one
after another with no scheduler around them.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from fake_executor import FakeExecutor, FakeHandle, summary  # noqa: E402

from service.models import LoopConfig  # noqa: E402
from service.rules.decisions import Outcome  # noqa: E402
from service.runs.executor import Node, RunResult  # noqa: E402
from service.runs.logs import RunLogs  # noqa: E402
from service.runs.scheduler import Scheduler  # noqa: E402
from service.settings import Settings  # noqa: E402
from service.state import enqueue, transitions  # noqa: E402
from service.state.snapshots import SnapshotStore  # noqa: E402
from service.state.store import Store  # noqa: E402

TRAIN = b"print('---'); print('val_bpb: 1.0')\n"


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


class World:
    def __init__(self, data: Path, slots: int, run_s: float) -> None:
        self.settings = Settings(data_dir=str(data), log_level="warning")
        self.store = Store(data / "ratchet.db")
        self.snapshots = SnapshotStore(data / "blobs")
        self.logs = RunLogs(data / "logs")
        self.nodes = [Node(name="bench", slots=slots)]
        self.run_s = run_s
        self.latency: list[float] = []
        self.scheduler: Scheduler | None = None

    async def run(self, handle: FakeHandle) -> RunResult:
        assert self.scheduler is not None
        attempt = self.scheduler.attempt(handle.spec.labels["ratchet.experiment"])
        # A slot's first run has no previous one to follow (it waited in the queue instead).
        if attempt is not None and attempt.slot.freed_at:
            self.latency.append(time.time() - attempt.handed_at)
        if self.run_s:
            await asyncio.sleep(self.run_s)
        return await summary(handle)

    def new_scheduler(self) -> Scheduler:
        executor = FakeExecutor(self.run, self.nodes)
        self.scheduler = Scheduler(self.settings, self.store, self.snapshots, executor, self.logs)
        return self.scheduler

    async def until_idle(self) -> None:
        while sum((await self.store.queue_depths()).values()) or await self.store.running_ids():
            await asyncio.sleep(0.02)


def _alias(snapshot: str, k: int) -> str:
    """A snapshot id of its own for the same files: a snapshot that already ran in a loop would be
    answered as a duplicate instead of queued."""
    return hashlib.sha256(f"{snapshot}:{k}".encode()).hexdigest()


async def populate(world: World, loops: int, per_loop: int) -> list[str]:
    root = world.snapshots.put_tree({"train.py": TRAIN})
    ids = []
    for i in range(loops):
        loop_id, _ = await enqueue.create_loop(world.store, LoopConfig(name=f"l{i}"), root.id, root.encode())
        ids.append(loop_id)
    scheduler = world.new_scheduler()
    await scheduler.start()
    scheduler.wake()
    await world.until_idle()  # every baseline kept
    await scheduler.stop()
    for n, loop_id in enumerate(ids):
        child = world.snapshots.put_tree({"train.py": TRAIN + f"# {n}\n".encode()})
        await asyncio.gather(
            *(
                enqueue.submit(
                    world.store, loop_id, f"c{k}", root.id, _alias(child.id, k), child.encode(), ""
                )
                for k in range(per_loop)
            )
        )
    return ids


async def dispatch_all(world: World, queued: int) -> dict[str, float]:
    world.latency.clear()
    scheduler = world.new_scheduler()
    t0 = time.perf_counter()
    await scheduler.start()
    scheduler.wake()
    await world.until_idle()
    took = time.perf_counter() - t0
    await scheduler.stop()
    assert scheduler.dispatched == queued, (scheduler.dispatched, queued)
    return {"rate": queued / took, "took": took, "hits": scheduler.prepared_hits / queued}


async def writes_alone(world: World, n: int) -> float:
    """start + finish of `n` experiments of a fresh loop, back to back: the writes' own rate."""
    root = world.snapshots.put_tree({"train.py": TRAIN + b"# alone\n"})
    loop_id, base = await enqueue.create_loop(world.store, LoopConfig(name="alone"), root.id, root.encode())
    ids = [base] + [
        await enqueue.submit(world.store, loop_id, f"a{k}", root.id, _alias(root.id, k), root.encode(), "")
        for k in range(n - 1)
    ]
    outcome = Outcome(exit_code=0, metric=1.0)
    info = transitions.Finished(metrics={"val_bpb": 1.0}, memory_gb=None, workload_seconds=0.0, log_tail="")
    t0 = time.perf_counter()
    for exp_id in ids:
        await transitions.start(world.store, exp_id, [])
        await transitions.finish(world.store, exp_id, outcome, info)
    return n / (time.perf_counter() - t0)


async def main_async(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory(prefix="ratchet-bench-") as tmp:
        world = World(Path(tmp), args.slots, args.run_ms / 1000)
        await world.store.open()
        try:
            t0 = time.perf_counter()
            await populate(world, args.loops, args.per_loop)
            setup = time.perf_counter() - t0
            queued = args.loops * args.per_loop
            result = await dispatch_all(world, queued)
            alone = await writes_alone(world, 2000)
        finally:
            await world.store.close()
    lat = [x * 1e3 for x in world.latency]
    print(
        f"{queued} queued experiments over {args.loops} loops, {args.slots} slots, runs of {args.run_ms:g} ms"
        f" (set-up {setup:.0f} s)"
    )
    print(f"{'measure':<44}{'value':>12}{'x baseline':>12}")
    print(f"{'baseline: start + finish writes alone /s':<44}{alone:>12.0f}{1.0:>12.2f}")
    print(
        f"{'dispatches/s (start to last verdict)':<44}{result['rate']:>12.0f}{result['rate'] / alone:>12.2f}"
    )
    print(f"{'dispatch latency p50 ms':<44}{statistics.median(lat):>12.1f}")
    print(f"{'dispatch latency p95 ms':<44}{pct(lat, 0.95):>12.1f}")
    print(f"{'dispatch latency max ms':<44}{max(lat):>12.1f}")
    print(f"{'runs found prepared ahead':<44}{result['hits']:>12.0%}")
    print(f"{'needed: 10,000 GPUs on 5-minute runs /s':<44}{10_000 / 300:>12.0f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--loops", type=int, default=100)
    parser.add_argument("--per-loop", type=int, default=100)
    parser.add_argument("--slots", type=int, default=64)
    parser.add_argument("--run-ms", type=float, default=0.0, help="how long each fake run lasts")
    asyncio.run(main_async(parser.parse_args()))


if __name__ == "__main__":
    main()
