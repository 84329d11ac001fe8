"""The scheduler's bookkeeping of where runs go: slots on nodes (from the executor's inventory, as
it changes), the GPU ids of each node, and the order queued experiments get slots in. Pure: no
I/O, no clock."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Collection

import msgspec

from .executor import Node
from .gpus import GpuPool

__all__ = ["Placement", "Slot", "Slots", "dispatch_order"]


def dispatch_order(queued: list[tuple[str, str]], rotation: dict[str, float]) -> list[tuple[str, str]]:
    """The order experiments will get slots in: each loop's own order (as `queued` lists them,
    loop by loop), interleaved round-robin, the loop served least recently first."""
    per_loop: dict[str, list[str]] = {}
    for loop_id, exp_id in queued:
        per_loop.setdefault(loop_id, []).append(exp_id)
    loops = sorted(per_loop, key=lambda lid: rotation.get(lid, 0.0))
    order: list[tuple[str, str]] = []
    for place in range(max((len(v) for v in per_loop.values()), default=0)):
        order += [(lid, per_loop[lid][place]) for lid in loops if place < len(per_loop[lid])]
    return order


class Placement(msgspec.Struct, frozen=True):
    """A node and GPU ids on it: where a run goes, or was prepared for."""

    node: str
    gpus: tuple[str, ...] = ()


class Slot(msgspec.Struct, kw_only=True):
    index: int
    node: str
    pool: GpuPool  # its node's GPU ids (a slot of a node that left keeps the pool it had)
    exp_id: str | None = None  # the experiment whose workload holds it
    freed_at: float = 0.0
    recorded: asyncio.Future[None] | None = None  # the last occupant's verdict is written


class Slots:
    """Every slot of every node, and each node's GPU pool. A slot and the GPU ids of a run are
    taken together (`claim`) and given back together (`release`). `update` follows the inventory:
    a node that left loses its slots and GPU ids at once (its runs still running give theirs back
    to nothing); a node that joined brings new ones."""

    def __init__(self, nodes: list[Node]) -> None:
        self.nodes: list[Node] = []
        self.all: list[Slot] = []
        self.pools: dict[str, GpuPool] = {}
        self._made = 0  # slots made so far: every slot gets an index of its own
        self.update(nodes)

    def update(self, nodes: list[Node]) -> tuple[list[str], list[str]]:
        """Take the inventory `nodes`; returns the names of the nodes that joined and of those that
        left. A node that comes back with other slots or GPUs has left and joined; one whose
        datasets changed has neither (its runs go on, later ones go by what it has now)."""
        if len({n.name for n in nodes}) != len(nodes):
            raise ValueError(f"the executor's inventory needs distinct node names: {nodes}")
        old = {n.name: _shape(n) for n in self.nodes}
        new = {n.name: n for n in nodes}
        left = [name for name, shape in old.items() if name not in new or _shape(new[name]) != shape]
        joined = [name for name, node in new.items() if old.get(name) != _shape(node)]
        self.all = [s for s in self.all if s.node not in left]
        for name in left:
            del self.pools[name]
        for name in joined:
            pool = self.pools[name] = GpuPool(list(new[name].gpus))
            for _ in range(new[name].slots):
                self.all.append(Slot(index=self._made, node=name, pool=pool))
                self._made += 1
        self.nodes = list(nodes)
        return joined, left

    def holding(self, datasets: Collection[str]) -> set[str] | None:
        """The nodes a run that mounts `datasets` may go to: those with all of them (or not
        checked); None when it names none (anywhere)."""
        if not datasets:
            return None
        return {n.name for n in self.nodes if n.datasets is None or n.datasets >= set(datasets)}

    def per_node(self) -> dict[str, tuple[int, int]]:
        """Node -> (slots, busy slots)."""
        found = {n.name: (0, 0) for n in self.nodes}
        for s in self.all:
            total, busy = found[s.node]
            found[s.node] = (total + 1, busy + (s.exp_id is not None))
        return found

    @property
    def total(self) -> int:
        return len(self.all)

    @property
    def busy(self) -> int:
        """Slots whose experiment's workload has not ended yet."""
        return sum(1 for s in self.all if s.exp_id is not None)

    @property
    def max_gpus(self) -> int:
        """The most GPUs one run can get (a run never spans nodes)."""
        return max((len(n.gpus) for n in self.nodes), default=0)

    def free(self) -> list[Slot]:
        return [s for s in self.all if s.exp_id is None]

    def idle(self, remeasures: set[str]) -> int:
        """Slots nothing waits on: free ones whose last verdict is written, and those held by a run
        in `remeasures` (idle-time re-measuring, which queued work takes back)."""
        return sum(
            1
            for s in self.all
            if s.exp_id in remeasures or (s.exp_id is None and (s.recorded is None or s.recorded.done()))
        )

    def claim(
        self, n_gpus: int, bound: Placement | None, datasets: Collection[str] = ()
    ) -> tuple[Slot, Placement, bool] | None:
        """A free slot and `n_gpus` GPU ids on its node (one holding `datasets`): exactly `bound`
        (where a prepared run was made) when its slot and ids are free — then True — else the
        first that fits; None when no free slot's node has the GPUs free now."""
        where = self.holding(datasets)
        free = [s for s in self.free() if where is None or s.node in where]
        if bound is not None:
            slot = next((s for s in free if s.node == bound.node), None)
            if slot is not None and slot.pool.take(list(bound.gpus)) is not None:
                return slot, bound, True
        for slot in free:
            gpus = slot.pool.allocate(n_gpus)
            if gpus is not None:
                return slot, Placement(slot.node, tuple(gpus)), False
        return None

    def release(self, slot: Slot, placement: Placement) -> None:
        slot.pool.release(list(placement.gpus))

    def bindable(
        self, n: int, promised: list[Placement], holding: list[Placement], datasets: Collection[str] = ()
    ) -> Placement | None:
        """Where a run prepared now should be made: on a node (and GPU ids) that a running run will
        hand over (`holding`: where runs whose workload goes on hold their slots, in start order),
        not yet promised to a run prepared earlier (`promised`); else on a free slot's node or free
        ids; None if none fit. The k-th run prepared for a node waits for the k-th run there to end.
        Only nodes holding `datasets` are considered."""
        where = self.holding(datasets)
        # not on a node that left, nor on one without the run's datasets
        holding = [p for p in holding if p.node in self.pools and (where is None or p.node in where)]
        if n == 0:
            return self._cpu_place(Counter(p.node for p in promised), holding, where)
        taken = {(p.node, g) for p in promised for g in p.gpus}
        for place in holding:
            ids = place.gpus
            if len(ids) >= n and not taken & {(place.node, g) for g in ids}:
                return Placement(place.node, ids[:n])
        for node, pool in self.pools.items():
            if not any(s.node == node for s in self.all) or (where is not None and node not in where):
                continue
            free = [g for g in pool.free_ids if (node, g) not in taken]
            if len(free) >= n:
                return Placement(node, tuple(free[:n]))
        return None

    def _cpu_place(
        self, promised: Counter[str], holding: list[Placement], where: set[str] | None
    ) -> Placement | None:
        seen: Counter[str] = Counter()
        free = [Placement(s.node) for s in self.free() if where is None or s.node in where]
        for place in [*holding, *free]:
            seen[place.node] += 1
            if seen[place.node] > promised[place.node]:
                return Placement(place.node)
        sizes = Counter(s.node for s in self.all if where is None or s.node in where)
        if not sizes:
            return None
        return Placement(min(sizes, key=lambda node: promised[node] / sizes[node]))


def _shape(node: Node) -> tuple[int, tuple[str, ...]]:
    """What a node's slots are made from: a change of it is the node leaving and joining again."""
    return node.slots, node.gpus
