"""Slots that follow the executor's inventory while the service runs, with the in-memory executor
(no engine): a node that joins takes work from the next pass, a node that leaves loses its slots
and GPU ids at once and its running experiment is retried elsewhere and judged once; each
experiment records its node; runs prepared ahead are spread over the nodes whose slots free next.
The same paths on a real Ray cluster: tests/test_ray_executor.py and tests/test_ray_serve.py."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
from fake_executor import FakeExecutor, FakeHandle, summary
from prometheus_client import REGISTRY
from test_scheduler import Tracker, World

from service.models import Status
from service.runs.executor import Node, RunResult
from service.runs.slots import Placement, Slots


@pytest.fixture
async def world(tmp_path: Path) -> AsyncIterator[Callable[..., World]]:
    made: list[World] = []

    async def make(executor: FakeExecutor, **settings: object) -> World:
        w = World(tmp_path / f"w{len(made)}", executor, **settings)
        made.append(w)
        await w.store.open()
        await w.scheduler.start()
        return w

    yield make
    for w in made:
        await w.scheduler.stop()
        await w.store.close()


class Gate:
    """A handler whose runs wait until `open()`, recording where each one ran."""

    def __init__(self) -> None:
        self.opened = asyncio.Event()
        self.running: dict[str, str] = {}  # experiment -> node, while it runs

    def open(self) -> None:
        self.opened.set()

    async def __call__(self, handle: FakeHandle) -> RunResult:
        exp = handle.spec.labels["ratchet.experiment"]
        self.running[exp] = handle.node
        try:
            await self.opened.wait()
            return await summary(handle)
        finally:
            self.running.pop(exp, None)


def gauge(name: str, node: str) -> float | None:
    return REGISTRY.get_sample_value(name, {"node": node})


async def test_a_node_that_leaves_loses_its_slots_and_its_run_is_retried_elsewhere_once(world):
    gate = Gate()
    a, b = Node(name="a", slots=1, gpus=("0",)), Node(name="b", slots=1, gpus=("0",))
    w = await world(FakeExecutor(gate, [a, b]), engine_backoff_s=0.05, prepare_ahead=0)
    loop = await w.loop("leave", resources={"gpus": 1})
    gate.open()
    await w.idle(loop)
    gate.opened.clear()
    first, second = await w.submit(loop, 2)
    await w.until("both to run, one per node", lambda: sorted(gate.running.values()) == ["a", "b"])
    assert gauge("ratchet_node_slots_busy", "b") == 1
    victim = next(exp for exp, node in gate.running.items() if node == "b")
    await w.executor.set_nodes([a])
    await w.until("b's slot to go", lambda: w.scheduler.slots.total == 1)
    assert [s.node for s in w.scheduler.slots.all] == ["a"]
    assert gauge("ratchet_node_slots", "b") is None and gauge("ratchet_node_slots", "a") == 1
    assert REGISTRY.get_sample_value("ratchet_slots_total") == 1
    await w.until("its run to fail over", lambda: victim not in gate.running)
    await asyncio.sleep(0.3)  # past the back-off: still nowhere to run while a is busy
    assert await w.status(victim) == Status.queued
    assert list(gate.running) == [first if victim == second else second]
    gate.open()
    counts = await w.idle(loop)
    view = await w.store.get_experiment(victim)
    assert view is not None and view.status in (Status.keep, Status.discard)
    assert view.attempts == 2 and view.node == "a" and view.gpus == ["0"]
    assert counts["keep"] + counts["discard"] == 3  # the baseline and both candidates, once each
    runs = [h.node for h in w.executor.started if h.spec.labels["ratchet.experiment"] == victim]
    assert runs == ["b", "a"]


async def test_a_node_that_joins_gets_work_at_once(world):
    gate = Gate()
    w = await world(FakeExecutor(gate, [Node(name="a", slots=1)]), prepare_ahead=0)
    loop = await w.loop("join")
    gate.open()
    await w.idle(loop)
    gate.opened.clear()
    ids = await w.submit(loop, 3)
    await w.until("one to run on a", lambda: list(gate.running.values()) == ["a"])
    await w.executor.set_nodes([Node(name="a", slots=1), Node(name="c", slots=2)])
    await w.until("c to take two", lambda: sorted(gate.running.values()) == ["a", "c", "c"])
    assert w.scheduler.slots.total == 3 and gauge("ratchet_node_slots_busy", "c") == 2
    gate.open()
    await w.idle(loop)
    nodes = [(await w.store.get_experiment(i)).node for i in ids]  # type: ignore[union-attr]
    assert sorted(nodes) == ["a", "c", "c"]  # type: ignore[type-var]


async def test_runs_prepared_ahead_are_made_on_the_nodes_whose_slots_free_next(world):
    tracker = Tracker(seconds=0.15)
    nodes = [Node(name="a", slots=1), Node(name="b", slots=1)]
    w = await world(FakeExecutor(tracker, nodes), prepare_ahead=1)
    loop = await w.loop("spread")
    await w.idle(loop)
    before = w.scheduler.dispatched, w.scheduler.prepared_hits
    await w.submit(loop, 12)
    await w.idle(loop)
    dispatched = w.scheduler.dispatched - before[0]
    hits = w.scheduler.prepared_hits - before[1]
    # All but the first two (dispatched before anything was prepared) found their run made on
    # the node that freed; bound to one node only, every other one would start from scratch.
    assert hits >= dispatched - 3, (hits, dispatched)
    assert {h.node for h in w.executor.started} == {"a", "b"}


def test_slots_follow_the_inventory() -> None:
    a, b = Node(name="a", slots=2, gpus=("0", "1")), Node(name="b", slots=1)
    slots = Slots([a, b])
    held = slots.claim(1, None)
    assert held is not None
    slot, placement, _ = held
    slot.exp_id = "x"
    assert placement == Placement("a", ("0",))
    assert slots.update([b]) == ([], ["a"])
    assert slots.total == 1 and slots.busy == 0 and slots.max_gpus == 0
    assert slots.claim(1, None) is None  # a's GPUs went with it
    slots.release(slot, placement)  # the run that was there gives its ids back to nothing
    assert slots.update([b, a]) == (["a"], [])
    assert [(s.node, s.index) for s in slots.all] == [("b", 2), ("a", 3), ("a", 4)]
    assert slots.pools["a"].free_ids == ["0", "1"]
    bigger = Node(name="b", slots=3)
    assert slots.update([bigger, a]) == (["b"], ["b"])  # changed: left and joined
    assert slots.per_node() == {"b": (3, 0), "a": (2, 0)}
    assert slots.update([]) == ([], ["b", "a"]) and slots.total == 0
    assert slots.bindable(0, [], []) is None


def test_cpu_runs_prepared_ahead_wait_for_the_runs_in_start_order() -> None:
    slots = Slots([Node(name="a", slots=2), Node(name="b", slots=1)])
    for slot in slots.all:
        slot.exp_id = f"running on {slot.node}"
    holding = [Placement("b"), Placement("a"), Placement("a")]
    promised: list[Placement] = []
    for _ in range(6):
        place = slots.bindable(0, promised, holding)
        assert place is not None
        promised.append(place)
    # one for each run in the order they end, then by fewest promised per slot
    assert [p.node for p in promised[:3]] == ["b", "a", "a"]
    assert sorted(p.node for p in promised) == ["a"] * 4 + ["b"] * 2
    with pytest.raises(ValueError, match="distinct"):
        slots.update([Node(name="a", slots=1), Node(name="a", slots=2)])
