"""The scheduler's bookkeeping of where runs go: slots on nodes (from the executor's inventory), the
GPU ids of each node, and the order queued experiments get slots in. Pure: no I/O, no clock."""

from __future__ import annotations

import asyncio

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
    exp_id: str | None = None  # the experiment whose workload holds it
    freed_at: float = 0.0
    recorded: asyncio.Future[None] | None = None  # the last occupant's verdict is written


class Slots:
    """Every slot of every node, and each node's GPU pool. A slot and the GPU ids of a run are
    taken together (`claim`) and given back together (`release`)."""

    def __init__(self, nodes: list[Node]) -> None:
        if len({n.name for n in nodes}) != len(nodes):
            raise ValueError(f"the executor's inventory needs distinct node names: {nodes}")
        self.nodes = nodes
        places = [n.name for n in nodes for _ in range(n.slots)]
        self.all = [Slot(index=i, node=name) for i, name in enumerate(places)]
        self.pools = {n.name: GpuPool(list(n.gpus)) for n in nodes}

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

    def claim(self, n_gpus: int, bound: Placement | None) -> tuple[Slot, Placement, bool] | None:
        """A free slot and `n_gpus` GPU ids on its node: exactly `bound` (where a prepared run was
        made) when its slot and ids are free — then True — else the first that fits; None when no
        free slot's node has the GPUs free now."""
        free = self.free()
        if bound is not None:
            slot = next((s for s in free if s.node == bound.node), None)
            if slot is not None and self.pools[slot.node].take(list(bound.gpus)) is not None:
                return slot, bound, True
        for slot in free:
            gpus = self.pools[slot.node].allocate(n_gpus)
            if gpus is not None:
                return slot, Placement(slot.node, tuple(gpus)), False
        return None

    def release(self, placement: Placement) -> None:
        self.pools[placement.node].release(list(placement.gpus))

    def bindable(self, n: int, promised: set[tuple[str, str]], holding: list[Placement]) -> Placement | None:
        """Where a run prepared now should be made: on the GPU ids of one slot whose current run
        will hand them over (`holding`: those of runs whose workload goes on, in start order), that
        nobody else was promised; else on free ids; None if none fit. `promised` holds (node, id)."""
        if n == 0:
            node = holding[0].node if holding else next((s.node for s in self.free()), self.nodes[0].name)
            return Placement(node)
        for place in holding:
            ids = place.gpus
            if len(ids) >= n and not promised & {(place.node, g) for g in ids}:
                return Placement(place.node, ids[:n])
        for node, pool in self.pools.items():
            free = [g for g in pool.free_ids if (node, g) not in promised]
            if len(free) >= n:
                return Placement(node, tuple(free[:n]))
        return None
