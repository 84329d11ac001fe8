"""Which nodes of a Ray cluster run experiments, and the slots they give. Pure: no Ray, no I/O.

A node takes part when it is alive and offers CPUs (a head started with `--num-cpus=0` runs
nothing, as Ray's own guides advise). A node with GPUs gives one slot per `gpus_per_slot` of them;
one without gives `cpu_slots` slots. A slot's GPUs are named `<node>:<device id>` outside the node,
so ids stay distinct across nodes; on the node the engine gets the device ids alone.
"""

from __future__ import annotations

from typing import Any

import msgspec

__all__ = ["NODE_LABEL", "Node", "Slot", "global_gpu", "local_gpus", "nodes_from_ray", "slots_of"]

NODE_LABEL = "ratchet-node"  # a Ray node label naming the node (default: its host name)


class Node(msgspec.Struct, kw_only=True, frozen=True):
    node_id: str
    name: str
    address: str
    cpus: float
    gpus: int


class Slot(msgspec.Struct, kw_only=True, frozen=True):
    key: str  # "<node>/<n>"
    node: str
    gpus: list[str]  # global ids: "<node>:<device id>"


def nodes_from_ray(raw: list[dict[str, Any]], only: set[str] | None = None) -> list[Node]:
    """The nodes of `ray.nodes()` that take part, by name; `only` keeps the named ones."""
    nodes = []
    for entry in raw:
        if not entry.get("Alive"):
            continue
        res = entry.get("Resources") or {}
        labels = entry.get("Labels") or {}
        name = labels.get(NODE_LABEL) or entry.get("NodeManagerHostname") or entry["NodeID"][:12]
        node = Node(
            node_id=entry["NodeID"],
            name=name,
            address=entry.get("NodeManagerAddress", ""),
            cpus=float(res.get("CPU", 0)),
            gpus=int(res.get("GPU", 0)),
        )
        if node.cpus > 0 and (only is None or node.name in only):
            nodes.append(node)
    return sorted(nodes, key=lambda n: n.name)


def slots_of(node: str, gpus: list[str], gpus_per_slot: int, cpu_slots: int) -> list[Slot]:
    """The slots of one node whose agent holds device ids `gpus`."""
    if not gpus:
        return [Slot(key=f"{node}/{i}", node=node, gpus=[]) for i in range(cpu_slots)]
    groups = [gpus[i : i + gpus_per_slot] for i in range(0, len(gpus) - gpus_per_slot + 1, gpus_per_slot)]
    return [
        Slot(key=f"{node}/{i}", node=node, gpus=[global_gpu(node, g) for g in group])
        for i, group in enumerate(groups)
    ]


def global_gpu(node: str, device: str) -> str:
    return f"{node}:{device}"


def local_gpus(ids: list[str]) -> tuple[str | None, list[str]]:
    """(node, device ids) of global GPU ids; (None, []) for none. ValueError: not one node's ids."""
    if not ids:
        return None, []
    nodes = {gid.rpartition(":")[0] for gid in ids}
    if len(nodes) != 1 or "" in nodes:
        raise ValueError(f"GPU ids {ids} do not name devices of one node (<node>:<device id>)")
    return nodes.pop(), [gid.rpartition(":")[2] for gid in ids]
