"""The cluster's nodes as the executor keeps them: one agent on each node that takes part, placed
when the node joins, dropped when it leaves or its agent stops answering. `version` moves on every
change, so `watch_inventory` can follow it.

A new agent first removes whatever this service instance left on its node (a previous process, or
this one before the node died), then reports its GPUs, its engine and the node's Ray
authentication. A node whose engine does not answer, or which runs Ray without token
authentication while Ratchet requires it, gets no agent (and is tried again a little later).

Each node says which of the declared datasets its engine can mount, when its agent starts and
every `datasets_poll_s` after: runs of a loop go only to nodes with all of the loop's datasets, so
a dataset copied onto a node is used from the next check on, and one removed stops drawing runs.
A node that cannot say (its engine lacks the default image, which the check of a path needs) keeps
what it said last, or, when it never said, is taken to have none.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any

import msgspec

from nodeagent.protocol import AgentInfo, Failed, decode_mountable
from sandbox import LABEL_SANDBOX, SandboxError

from .inventory import RayNode, nodes_from_ray, slots_of
from .remote import CALL_S, Remote, kill, translate

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
        datasets: dict[str, str] | None = None,
        image: str = "ratchet/sandbox:latest",
        datasets_poll_s: float = 30.0,
    ) -> None:
        """`datasets`: name -> the engine's source (a host path or a volume's name), checked on
        each node with `image`."""
        self.instance = instance
        self.gpus_per_slot = gpus_per_slot
        self.cpu_slots = cpu_slots
        self.require_token = require_token
        self.only = only
        self.poll_s = poll_s
        self.datasets = dict(datasets or {})
        self.image = image
        self.datasets_poll_s = datasets_poll_s
        self._datasets_at = time.monotonic()
        self._checking: asyncio.Task[None] | None = None
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
        for task in (self._watcher, self._checking):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
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
            self._recheck_datasets()
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
        remote = Remote(node, actor, info, slots, on_lost=self._lost)
        await self._check_datasets(remote, first=True)
        self._agents[node.node_id] = remote
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

    # -- datasets ----------------------------------------------------------------------------------

    def _recheck_datasets(self) -> None:
        """Every `datasets_poll_s`, each node's datasets asked again (in the background)."""
        busy = self._checking is not None and not self._checking.done()
        if not self.datasets or busy or time.monotonic() - self._datasets_at < self.datasets_poll_s:
            return
        self._datasets_at = time.monotonic()

        async def check_all() -> None:
            agents = self.ready()
            seen = [a.datasets for a in agents]
            await asyncio.gather(*(self._check_datasets(a) for a in agents))
            if [a.datasets for a in agents] != seen:
                self._notify()

        self._checking = asyncio.create_task(check_all(), name="ray-datasets")

    async def _check_datasets(self, agent: Remote, first: bool = False) -> None:
        """Which declared datasets the node's engine can mount now, into `agent.datasets`; what
        it lacks is logged when the node joins and when it changes."""
        if not self.datasets:
            return
        try:
            ref = agent.actor.datasets.remote(self.datasets, self.image)
            answer = decode_mountable(await agent.call("check datasets", ref, timeout=CALL_S))
        except SandboxError as exc:
            answer = Failed(message=str(exc))
        if isinstance(answer, Failed):
            log.warning("node %s: its datasets could not be checked (%s)", agent.name, answer.message)
            if agent.datasets is None:
                agent.datasets = frozenset()  # not known to be there: no run that needs one
            return
        present = frozenset(answer.present)
        if first or present != agent.datasets:
            for name, why in sorted(answer.missing.items()):
                log.warning(
                    "node %s lacks dataset %s (%s): loops naming it run on other nodes", agent.name, name, why
                )
            if gained := (present - (agent.datasets or frozenset()) if not first else frozenset()):
                log.info("node %s now has dataset(s) %s", agent.name, ", ".join(sorted(gained)))
        agent.datasets = present

    def _lost(self, agent: Remote) -> None:
        """The node (or its agent) is gone: its runs have failed, its slots go away."""
        self._agents.pop(agent.node.node_id, None)
        runs = len(agent.active)
        log.warning("node %s %s: %d run(s) there fail and go back to the queue", agent.name, agent.why, runs)
        self._notify()
