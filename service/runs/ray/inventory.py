"""Which nodes of a Ray cluster run experiments, and the slots each gives. Pure: no Ray, no I/O.

A node takes part when it is alive and offers CPUs (a head started with `--num-cpus=0` runs
nothing, as Ray's own guides advise). A node with GPUs gives one slot per `gpus_per_slot` of them;
one without gives `cpu_slots` slots. A node is known by a stable name: its `ratchet-node` label,
else its host name; its runs' GPU ids are the node's own device ids (the executor's inventory keeps
them per node, so the same id on two nodes names two GPUs).
"""

from __future__ import annotations

from typing import Any

import msgspec

__all__ = ["NODE_LABEL", "RayNode", "nodes_from_ray", "slots_of"]

NODE_LABEL = "ratchet-node"  # a Ray node label naming the node (default: its host name)


class RayNode(msgspec.Struct, kw_only=True, frozen=True):
    node_id: str  # Ray's id: new each time the node starts
    name: str
    address: str
    cpus: float
    gpus: int


def nodes_from_ray(raw: list[dict[str, Any]], only: set[str] | None = None) -> list[RayNode]:
    """The nodes of `ray.nodes()` that take part, by name; `only` keeps the named ones."""
    nodes = []
    for entry in raw:
        if not entry.get("Alive"):
            continue
        res = entry.get("Resources") or {}
        labels = entry.get("Labels") or {}
        name = labels.get(NODE_LABEL) or entry.get("NodeManagerHostname") or entry["NodeID"][:12]
        node = RayNode(
            node_id=entry["NodeID"],
            name=name,
            address=entry.get("NodeManagerAddress", ""),
            cpus=float(res.get("CPU", 0)),
            gpus=int(res.get("GPU", 0)),
        )
        if node.cpus > 0 and (only is None or node.name in only):
            nodes.append(node)
    return sorted(nodes, key=lambda n: n.name)


def slots_of(gpus: list[str], gpus_per_slot: int, cpu_slots: int) -> int:
    """The slots of a node whose agent holds device ids `gpus` (an odd GPU out makes none)."""
    return len(gpus) // gpus_per_slot if gpus else cpu_slots
