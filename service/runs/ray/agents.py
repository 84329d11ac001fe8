"""The cluster's nodes as the executor keeps them: one agent on each node that takes part, placed
when the node joins, dropped when it leaves or its agent stops answering. `version` moves on every
change, so `watch_inventory` can follow it.

A new agent first removes whatever this service instance left on its node (a previous process, or
this one before the node died), then reports its GPUs, its engine and the node's Ray
authentication. A node whose engine does not answer, or which runs Ray without token
authentication while Ratchet requires it, gets no agent (and is tried again a little later).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any

import msgspec

from nodeagent.protocol import AgentInfo, Failed
from sandbox import LABEL_SANDBOX, SandboxError

from .inventory import RayNode, nodes_from_ray, slots_of
from .remote import Remote, kill, translate

__all__ = ["Agents"]

log = logging.getLogger("ratchet.ray")

_AGENT_START_S = 60.0  # a new node's agent: placed, answering, its leftovers swept
_AGENT_RETRY_S = 10.0  # before another try on a node whose agent did not come up


class Agents:
    def __init__(
        self,
        instance: str,
        *,
        gpus_per_slot: int,
        cpu_slots: int,
        require_token: bool,
        only: set[str] | None = None,
        poll_s: float = 1.0,
    ) -> None:
        self.instance = instance
        self.gpus_per_slot = gpus_per_slot
        self.cpu_slots = cpu_slots
        self.require_token = require_token
        self.only = only
        self.poll_s = poll_s
        self.version = 0  # moves whenever a node gains or loses its agent
        self._agents: dict[str, Remote] = {}  # by Ray node id
        self._starting: dict[str, asyncio.Task[None]] = {}
        self._failed_at: dict[str, float] = {}  # node id -> when its agent last failed to start
        self._changed = asyncio.Event()
        self._watcher: asyncio.Task[None] | None = None
        self._agent_class: Any = None

    def ready(self) -> list[Remote]:
        """The agents that answer, by node name."""
        return sorted((a for a in self._agents.values() if not a.lost.is_set()), key=lambda a: a.name)

    def by_name(self, name: str) -> Remote | None:
        return next((a for a in self.ready() if a.name == name), None)

    async def start(self, nodes: int | None, timeout: float) -> None:
        """Place agents (Ray is joined). `nodes`: wait until that many nodes have agents; None:
        until every node of the cluster now has one or failed to get one. A cluster with no node
        to run on yet is waited for by the scheduler, not here (nodes may join any time)."""
        import ray

        from nodeagent.agent import CONCURRENCY, NodeAgent

        # The class goes to the nodes by reference; it is only ever made there.
        self._agent_class = ray.remote(concurrency_groups=CONCURRENCY, max_restarts=0)(NodeAgent)
        deadline = time.monotonic() + timeout
        if nodes is None:
            await self._refresh()
            if self._starting:
                await asyncio.wait(list(self._starting.values()), timeout=timeout)
            if not self.ready():
                log.warning(
                    "no node of the Ray cluster runs experiments yet (a node takes part when it"
                    " offers CPUs and its engine answers): nothing is dispatched until one joins"
                )
            nodes = 0
        self._watcher = asyncio.create_task(self._watch(), name="ratchet-ray-nodes")
        while len(self.ready()) < nodes:
            left = deadline - time.monotonic()
            if left <= 0:
                raise SandboxError(
                    f"only {len(self.ready())} of {nodes} node(s) of the Ray cluster have an agent"
                    f" after {timeout:g} s (see the log for why)",
                    "unreachable",
                )
            await self.changed(self.version, left)

    async def changed(self, seen: int, timeout: float | None = None) -> bool:
        """Wait until `version` is no longer `seen`; False on timeout."""
        try:
            async with asyncio.timeout(timeout):
                while self.version == seen:
                    await self._changed.wait()
        except TimeoutError:
            return False
        return True

    def _notify(self) -> None:
        self.version += 1
        self._changed.set()
        self._changed = asyncio.Event()

    async def close(self) -> None:
        if self._watcher is not None:
            self._watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watcher
        for task in list(self._starting.values()):
            task.cancel()
        for agent in list(self._agents.values()):
            kill(agent.actor)
        self._agents.clear()

    # -- membership --------------------------------------------------------------------------------

    async def _watch(self) -> None:
        while True:
            try:
                await self._refresh()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("could not read the Ray cluster's nodes: %s", exc)
            await asyncio.sleep(self.poll_s)

    async def _refresh(self) -> None:
        import ray

        raw = await asyncio.to_thread(ray.nodes)
        nodes = {n.node_id: n for n in nodes_from_ray(raw, self.only)}
        for node_id, agent in list(self._agents.items()):
            if node_id not in nodes:
                agent.lose("left the cluster")
        now = time.monotonic()
        for node_id, node in nodes.items():
            if node_id in self._agents or node_id in self._starting:
                continue
            if now - self._failed_at.get(node_id, -_AGENT_RETRY_S) < _AGENT_RETRY_S:
                continue
            if self.by_name(node.name) is not None:
                continue  # the node restarted: its old entry is still listed as alive
            task = asyncio.create_task(self._start_agent(node), name=f"ray-agent-{node.name}")
            self._starting[node_id] = task

    async def _start_agent(self, node: RayNode) -> None:
        """Place an agent on `node`, holding all its GPUs; it first sweeps this instance's runs."""
        import ray.exceptions
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        actor = None
        try:
            actor = self._agent_class.options(
                num_cpus=0,
                num_gpus=node.gpus,
                scheduling_strategy=NodeAffinitySchedulingStrategy(node.node_id, soft=False),
            ).remote(self.instance, node.name)
            try:
                hello = await asyncio.wait_for(actor.hello.remote(), _AGENT_START_S)
                info = msgspec.msgpack.decode(hello, type=AgentInfo)
                self._admit(node, info)
                sweep = actor.sweep.remote({LABEL_SANDBOX: self.instance})
                swept = await asyncio.wait_for(sweep, _AGENT_START_S)
            except ray.exceptions.RayError as exc:
                raise translate(exc, node.name, "start agent") from exc
            if isinstance(swept, bytes):
                raise msgspec.msgpack.decode(swept, type=Failed).error(node.name)
        except (SandboxError, TimeoutError) as exc:
            log.warning("node %s: no agent (%s); trying again in %g s", node.name, exc, _AGENT_RETRY_S)
            self._failed_at[node.node_id] = time.monotonic()
            if actor is not None:
                kill(actor)
            return
        finally:
            self._starting.pop(node.node_id, None)
        slots = slots_of(info.gpus, self.gpus_per_slot, self.cpu_slots)
        self._agents[node.node_id] = Remote(node, actor, info, slots, on_lost=self._lost)
        log.info(
            "node %s joined: %d slot(s), GPUs %s%s",
            node.name,
            slots,
            ",".join(info.gpus) or "none",
            f"; removed {swept} container(s)/volume(s) left there" if swept else "",
        )
        self._notify()

    def _admit(self, node: RayNode, info: AgentInfo) -> None:
        if not info.engine:
            raise SandboxError(f"node {node.name}: its container engine does not answer", "unreachable")
        if self.require_token and info.auth != "token":
            raise SandboxError(
                f"node {node.name} runs Ray without token authentication (RAY_AUTH_MODE={info.auth}):"
                " anyone who reaches it can run code there; start it with RAY_AUTH_MODE=token,"
                " or set RATCHET_RAY_AUTH=none to accept it",
                "refused",
            )

    def _lost(self, agent: Remote) -> None:
        """The node (or its agent) is gone: its runs have failed, its slots go away."""
        self._agents.pop(agent.node.node_id, None)
        runs = len(agent.active)
        log.warning("node %s %s: %d run(s) there fail and go back to the queue", agent.name, agent.why, runs)
        self._notify()
