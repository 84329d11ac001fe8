"""The scheduler against the in-memory executor (`fake_executor`): real SQLite, real snapshots, real
state machine, no container engine. What dispatch promises — slots and GPU ids never shared, loops
served in turn, prepared runs used, cancels and engine outages handled, the applied timeout in the
verdict — is checked here in seconds; the real-engine tests prove the same paths with containers."""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import msgspec
import pytest
from fake_executor import FakeExecutor, FakeHandle, summary

from service.models import EvaluateSpec, LoopConfig, Status
from service.runs.executor import Node, RunResult, SandboxError
from service.runs.logs import RunLogs
from service.runs.scheduler import Scheduler
from service.settings import Settings
from service.state import enqueue, transitions
from service.state.snapshots import SnapshotStore
from service.state.store import Store

TRAIN = b"print('---'); print('val_bpb: 1.0')\n"


class World:
    """A scheduler on a fresh data dir, dispatching to `executor`."""

    def __init__(self, tmp: Path, executor: FakeExecutor, **settings: object) -> None:
        self.settings = Settings(data_dir=str(tmp), **settings)  # type: ignore[arg-type]
        self.store = Store(tmp / "ratchet.db")
        self.snapshots = SnapshotStore(tmp / "blobs")
        self.executor = executor
        self.scheduler = Scheduler(self.settings, self.store, self.snapshots, executor, RunLogs(tmp / "logs"))

    async def loop(self, name: str, **config: object) -> str:
        root = self.snapshots.put_tree({"train.py": TRAIN})
        cfg = LoopConfig(name=name, **config)  # type: ignore[arg-type]
        loop_id, _ = await enqueue.create_loop(self.store, cfg, root.id, root.encode())
        self.scheduler.wake()
        return loop_id

    async def submit(self, loop_id: str, n: int) -> list[str]:
        ids = []
        for i in range(n):
            child = self.snapshots.put_tree({"train.py": TRAIN + f"# {loop_id} {i}\n".encode()})
            parent = (await self.store.get_loop(loop_id, counts=False)).root_snapshot  # type: ignore[union-attr]
            ids.append(
                await enqueue.submit(self.store, loop_id, f"c{i}", parent, child.id, child.encode(), "")
            )
        self.scheduler.wake()
        return ids

    async def until(self, what: str, done: Callable[[], object], timeout: float = 20) -> None:
        deadline = time.monotonic() + timeout
        while not ((await ok) if inspect.isawaitable(ok := done()) else ok):
            assert time.monotonic() < deadline, f"timed out waiting for {what}"
            await asyncio.sleep(0.01)

    async def idle(self, loop_id: str) -> dict[str, int]:
        async def settled() -> bool:
            counts = await self.store.counts(loop_id)
            return not (counts["queued"] or counts["running"] or counts["confirming"])

        await self.until("the loop to settle", settled)
        return await self.store.counts(loop_id)

    async def status(self, exp_id: str) -> Status:
        exp = await self.store.get_experiment(exp_id)
        assert exp is not None
        return exp.status


@pytest.fixture
async def world(tmp_path: Path) -> AsyncIterator[Callable[..., World]]:
    made: list[World] = []

    async def make(executor: FakeExecutor | None = None, **settings: object) -> World:
        w = World(tmp_path / f"w{len(made)}", executor or FakeExecutor(), **settings)
        made.append(w)
        await w.store.open()
        await w.scheduler.start()
        return w

    yield make
    for w in made:
        await w.scheduler.stop()
        await w.store.close()


class Tracker:
    """A handler that holds each run `seconds` and records who ran where, and how many at once."""

    def __init__(self, seconds: float = 0.02) -> None:
        self.seconds = seconds
        self.now: list[tuple[str, str, tuple[str, ...]]] = []  # (experiment, node, gpus) running
        self.most = 0
        self.started: list[str] = []
        self.clashes: list[str] = []

    async def __call__(self, handle: FakeHandle) -> RunResult:
        spec, node = handle.spec, handle.node
        me = (spec.labels["ratchet.experiment"], node, tuple(spec.gpus))
        held = {(n, g) for _, n, gs in self.now for g in gs}
        self.clashes += [f"{me} while {held}" for g in spec.gpus if (node, g) in held]
        self.now.append(me)
        self.started.append(spec.labels["ratchet.loop"])
        self.most = max(self.most, len(self.now))
        try:
            await asyncio.sleep(self.seconds)
            return await summary(handle)
        finally:
            self.now.remove(me)


async def test_never_more_runs_than_slots_and_loops_take_turns(world):
    tracker = Tracker()
    w = await world(FakeExecutor(tracker, [Node(name="n", slots=3)]))
    a, b = await w.loop("a"), await w.loop("b")
    await w.idle(a), await w.idle(b)
    tracker.started.clear()
    await w.submit(a, 12), await w.submit(b, 12)
    counts = await w.idle(a), await w.idle(b)
    assert [c["keep"] + c["discard"] for c in counts] == [13, 13]
    assert tracker.most == 3
    # round-robin: neither loop ever runs four ahead of the other
    lead = [tracker.started[: i + 1].count(a) - tracker.started[: i + 1].count(b) for i in range(24)]
    assert max(abs(x) for x in lead) <= 3, tracker.started


async def test_gpu_ids_are_never_shared_and_a_run_stays_on_one_node(world):
    tracker = Tracker(seconds=0.03)
    nodes = [Node(name="x", slots=2, gpus=("0", "1", "2")), Node(name="y", slots=2, gpus=("0", "1"))]
    w = await world(FakeExecutor(tracker, nodes))
    assert w.scheduler.slots.max_gpus == 3
    one, two = await w.loop("one", resources={"gpus": 1}), await w.loop("two", resources={"gpus": 2})
    await w.submit(one, 10), await w.submit(two, 6)
    await w.idle(one), await w.idle(two)
    assert not tracker.clashes
    places = {(h.node, len(h.spec.gpus)) for h in w.executor.started}
    assert {n for n, _ in places} == {"x", "y"}  # both nodes were used
    ids = {n.name: set(n.gpus) for n in nodes}
    assert all(set(h.spec.gpus) <= ids[h.node] for h in w.executor.started)
    assert tracker.most <= 4


async def test_the_next_run_is_prepared_ahead_and_every_run_is_cleaned_up(world):
    w = await world(FakeExecutor(Tracker(seconds=0.05)), prepare_ahead=1)
    loop = await w.loop("ahead")
    await w.idle(loop)
    ids = await w.submit(loop, 6)
    await w.idle(loop)
    assert w.scheduler.prepared_hits >= 4  # the first may start before anything was prepared
    await w.until("removals", lambda: all(h.cleaned for h in w.executor.prepared))
    started = [h.spec.labels["ratchet.experiment"] for h in w.executor.started]
    assert sorted(set(started) - {started[0]}) == sorted(ids) and len(started) == len(set(started))


async def test_cancel_kills_the_running_experiment(world):
    async def forever(handle: FakeHandle) -> RunResult:
        await asyncio.sleep(3600)
        raise AssertionError("not cancelled")

    w = await world(FakeExecutor(forever))
    loop = await w.loop("cancel", time_budget_s=3600)
    (exp,) = await w.store.experiment_ids(loop, ["queued", "running"])
    await w.until("the baseline to run", lambda: w.executor.started)
    assert await w.scheduler.cancel(exp)
    await w.idle(loop)
    assert await w.status(exp) == Status.cancelled
    await w.until("its removal", lambda: w.executor.started[0].cleaned)


async def test_nothing_is_dispatched_while_the_engine_is_down_and_the_queue_waits(world):
    w = await world()
    w.executor.up = False
    loop = await w.loop("outage")
    (exp,) = await w.store.experiment_ids(loop, ["queued"])
    await asyncio.sleep(1.5)  # more than one tick of the scheduler's loop
    assert await w.status(exp) == Status.queued and not w.executor.prepared
    w.executor.up = True
    w.scheduler.wake()
    await w.idle(loop)
    assert await w.status(exp) == Status.keep


async def test_an_unreachable_engine_is_retried_with_back_off_then_ends_as_error(world):
    async def broken(handle: FakeHandle) -> RunResult:
        raise SandboxError("attach: engine unreachable (fake)", "unreachable")

    w = await world(FakeExecutor(broken), engine_retries=2, engine_backoff_s=0.05)
    loop = await w.loop("retry")
    (exp,) = await w.store.experiment_ids(loop, ["queued", "running"])
    await w.idle(loop)
    view = await w.store.get_experiment(exp)
    assert view is not None and view.status == Status.error and view.attempts == 3
    assert "gave up after 3 attempts" in (view.reason or "")
    assert len(w.executor.started) == 3


async def test_the_hard_timeout_that_applied_comes_back_with_the_result(world):
    async def slow_evaluation(handle: FakeHandle) -> RunResult:
        if handle.spec.labels.get("ratchet.phase") == "evaluate":
            await asyncio.sleep(3600)
        return await summary(handle)

    w = await world(FakeExecutor(slow_evaluation))
    plain = await w.loop("plain", time_budget_s=0.05, timeout_s=0.2)
    judged = await w.loop(
        "judged",
        evaluate=msgspec.convert({"command": ["python3", "evaluate.py"], "timeout_s": 0.3}, EvaluateSpec),
    )
    await w.idle(plain), await w.idle(judged)
    (train,) = await w.store.list_experiments(judged, None, 0, 10)
    assert train.status == Status.timeout
    assert train.reason == "evaluation killed at its hard timeout of 0.3 s"

    async def hang(handle: FakeHandle) -> RunResult:
        await asyncio.sleep(3600)
        raise AssertionError("not timed out")

    w.executor.handler = hang
    (exp,) = await w.submit(plain, 1)
    await w.idle(plain)
    view = await w.store.get_experiment(exp)
    assert view is not None and view.reason == "killed at the hard timeout of 0.2 s"


async def test_a_pause_between_the_queue_read_and_the_start_starts_nothing(world):
    """The pass reads a loop's queue, the loop is paused, then the pass writes the start: the start
    checks the loop's state in its own guarded write, so the experiment stays queued until resumed."""
    tracker = Tracker()
    w = await world(FakeExecutor(tracker, [Node(name="n", slots=1)]))
    loop_id = await w.loop("racy")
    await w.idle(loop_id)
    read_queue = w.store.queue_head
    paused: list[str] = []

    async def queue_head_then_pause(lid: str, *args: object) -> list[str]:
        heads = await read_queue(lid, *args)  # type: ignore[arg-type]
        if heads and not paused:
            paused.append(heads[0])
            await transitions.set_loop_state(w.store, lid, "pause")  # lands right after the read
        return heads

    w.store.queue_head = queue_head_then_pause  # type: ignore[method-assign]
    tracker.started.clear()
    (exp_id,) = await w.submit(loop_id, 1)
    await w.until("the pass to read the queue", lambda: paused)
    await asyncio.sleep(0.3)  # passes come and go: none may start it
    assert await w.status(exp_id) == Status.queued
    assert tracker.started == [] and w.scheduler.busy == 0 and w.scheduler.slots.free()
    w.store.queue_head = read_queue  # type: ignore[method-assign]
    await transitions.set_loop_state(w.store, loop_id, "resume")
    w.scheduler.wake()
    await w.idle(loop_id)
    assert await w.status(exp_id) in (Status.keep, Status.discard) and tracker.started == [loop_id]


async def test_start_refuses_an_experiment_of_a_paused_loop(world):
    w = await world(FakeExecutor(Tracker(seconds=5), [Node(name="n", slots=1)]))
    loop_id = await w.loop("paused")
    await w.until("the baseline to run", lambda: w.scheduler.busy)
    (exp_id,) = await w.submit(loop_id, 1)  # queued behind the baseline
    await transitions.set_loop_state(w.store, loop_id, "pause")
    assert await transitions.start(w.store, exp_id, []) is False
    assert await w.status(exp_id) == Status.queued
    await transitions.set_loop_state(w.store, loop_id, "resume")
    assert await transitions.start(w.store, exp_id, []) is True
