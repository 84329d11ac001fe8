"""When proposals run, against the in-memory executor (`fake_executor`): real SQLite, real state
machines, real scheduler and proposer driver, no engine. A proposal only fills a slot nothing queued
will take, so proposers never starve experiments; with K spare slots up to `parallel` proposals run
at once, each from the best as it is then."""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
from fake_executor import FakeExecutor, FakeHandle, summary

from service.models import LoopConfig
from service.proposal_models import CommandProposer
from service.runs.executor import Node, RunResult
from service.runs.logs import RunLogs
from service.runs.proposing import Proposers
from service.runs.scheduler import Scheduler
from service.settings import Settings
from service.state import enqueue
from service.state.proposal_reads import list_proposals
from service.state.snapshots import SnapshotStore
from service.state.store import Store

TRAIN = b"V = 1.0\nprint('---'); print(f'val_bpb: {V}')\n"


class Work:
    """Runs proposers and experiments; records how many of each ran at once."""

    def __init__(self, seconds: float = 0.05) -> None:
        self.seconds = seconds
        self.proposing = 0
        self.training = 0
        self.most_proposing = 0
        self.most_together = 0
        self.parents: list[str] = []
        self.queued_when_proposing: list[int] = []
        self.queued = lambda: 0

    async def __call__(self, handle: FakeHandle) -> RunResult:
        spec = handle.spec
        files = {f.path: f.data for f in spec.files}
        if "ratchet.proposal" in spec.labels:
            self.proposing += 1
            self.most_proposing = max(self.most_proposing, self.proposing)
            self.most_together = max(self.most_together, self.proposing + self.training)
            self.parents.append(spec.env["RATCHET_PARENT"])
            self.queued_when_proposing.append(self.queued())
            try:
                await asyncio.sleep(self.seconds)
                n = int(spec.env["RATCHET_PROPOSAL_NUMBER"])
                text = re.sub(rb"V = .*", f"V = {1.0 - n / 1000}".encode(), files["train.py"])
                return RunResult(exit_code=0, exit_reported=True, workspace_files={**files, "train.py": text})
            finally:
                self.proposing -= 1
        self.training += 1
        self.most_together = max(self.most_together, self.proposing + self.training)
        try:
            await asyncio.sleep(self.seconds)
            value = float(re.search(rb"V = (.*)", files["train.py"]).group(1))  # type: ignore[union-attr]
            return await summary(handle, value)
        finally:
            self.training -= 1


class World:
    def __init__(self, tmp: Path, work: Work, slots: int) -> None:
        self.settings = Settings(data_dir=str(tmp))
        self.store = Store(tmp / "ratchet.db")
        self.snapshots = SnapshotStore(tmp / "blobs")
        self.executor = FakeExecutor(work, nodes=[Node(name="fake", slots=slots)])
        logs = RunLogs(tmp / "logs")
        self.scheduler = Scheduler(self.settings, self.store, self.snapshots, self.executor, logs)
        self.proposers = Proposers(
            self.settings, self.store, self.snapshots, self.executor, logs, self.scheduler
        )

    async def loop(self, name: str, **config: object) -> str:
        root = self.snapshots.put_tree({"train.py": TRAIN})
        cfg = LoopConfig(name=name, **config)  # type: ignore[arg-type]
        loop_id, _ = await enqueue.create_loop(self.store, cfg, root.id, root.encode())
        self.scheduler.wake()
        return loop_id

    async def until(self, what: str, done: Callable[[], object], timeout: float = 20) -> None:
        deadline = time.monotonic() + timeout
        while not await done():  # type: ignore[misc]
            assert time.monotonic() < deadline, f"timed out waiting for {what}"
            await asyncio.sleep(0.01)


@pytest.fixture
async def world(tmp_path: Path) -> AsyncIterator[Callable[..., World]]:
    made: list[World] = []

    async def make(work: Work, slots: int) -> World:
        w = World(tmp_path / f"w{len(made)}", work, slots)
        made.append(w)
        await w.store.open()
        await w.scheduler.start()
        await w.proposers.start()
        return w

    yield make
    for w in made:
        await w.proposers.stop()
        await w.scheduler.stop()
        await w.store.close()


def proposer(parallel: int) -> CommandProposer:
    return CommandProposer(command=["propose"], parallel=parallel, timeout_s=30)


async def test_a_wave_fills_the_spare_slots_and_never_more(world):
    work = Work()
    w = await world(work, slots=3)
    lid = await w.loop("wave", proposer=proposer(3), max_experiments=13)

    async def done() -> bool:
        loop = await w.store.get_loop(lid)
        return loop is not None and loop.counts["keep"] + loop.counts["discard"] == 13

    await w.until("12 candidates", done)
    assert work.most_proposing == 3  # the first wave: three at once
    assert work.most_together <= 3  # a proposal never runs beside more experiments than slots allow
    root = (await w.store.get_loop(lid)).root_snapshot  # type: ignore[union-attr]
    assert work.parents[:3] == [root] * 3  # the wave started from the best of its time
    assert len(set(work.parents)) > 1  # later ones from the bests that followed


async def test_parallel_bounds_the_proposals_of_a_loop(world):
    work = Work()
    w = await world(work, slots=3)
    lid = await w.loop("single", proposer=proposer(1), max_experiments=6)

    async def done() -> bool:
        return len(await list_proposals(w.store, lid, ["proposed"], 0, 100)) == 5

    await w.until("5 proposals", done)
    assert work.most_proposing == 1


async def test_queued_experiments_go_first(world):
    work = Work(seconds=0.03)
    w = await world(work, slots=1)
    busy = await w.loop("busy")
    root = (await w.store.get_loop(busy)).root_snapshot  # type: ignore[union-attr]
    for i in range(6):
        child = w.snapshots.put_tree({"train.py": TRAIN + f"# {i}\n".encode()})
        await enqueue.submit(w.store, busy, f"c{i}", root, child.id, child.encode(), "")

    async def queued() -> int:
        return (await w.store.counts(busy))["queued"]

    holder: list[int] = []
    work.queued = lambda: holder[0] if holder else -1
    lid = await w.loop("driven", proposer=proposer(1), max_experiments=3)

    async def track() -> None:
        while True:
            holder[:] = [await queued()]
            await asyncio.sleep(0.002)

    tracker = asyncio.create_task(track())
    try:

        async def done() -> bool:
            return len(await list_proposals(w.store, lid, ["proposed"], 0, 100)) == 2

        await w.until("the driven loop's proposals", done)
    finally:
        tracker.cancel()
    # no proposal ran while the other loop still had experiments waiting for the one slot
    assert work.queued_when_proposing and set(work.queued_when_proposing) == {0}, work.queued_when_proposing
