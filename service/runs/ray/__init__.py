"""Experiments on the nodes of a Ray cluster: `RayExecutor` (`executor.py`) implements the executor
interface; one agent per node (`nodeagent`, a Ray actor) runs `sandbox` on that node's engine.

    executor.py     RayExecutor: the interface (inventory, prepare, cleanup, checks)
    handle.py       RayHandle: one run on one node, its events streamed back
    agents.py       the nodes and their agents: placed as nodes join, dropped as they leave
    remote.py       the calls to one agent, each raced against its node being lost
    connect.py      joining the cluster: token authentication, loopback kept loopback
    inventory.py    which nodes take part and their slots (pure)
    loopback.py     keeps a cluster on one machine on 127.0.0.1
    localcluster.py a real cluster on loopback (head + workers), for tests, benchmarks and trying it

Importing this package does not import Ray.
"""
