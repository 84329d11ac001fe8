"""`RayExecutor`: the executor interface on a Ray cluster, one agent per node (`nodeagent`).

The scheduler sees what it sees of the local engine, with more nodes: `inventory()` lists the
nodes whose agents answer (slots: one per `gpus_per_slot` of the node's GPUs, else `cpu_slots`;
GPU ids: the node's own device ids), `watch_inventory()` yields it again whenever a node joins or
leaves, and `prepare(spec, node)` makes the run on that node, behind its gate, with the workspace
sent there through Ray's object store. Output streams back live, then the result.

Ratchet owns deadlines and faults, not Ray (which has no per-task timeout and does not stop a
container a task started): the agent kills a run at its hard deadline and on cancel, by container
id, on its node. A node that leaves (or whose agent dies) fails its runs with
`SandboxError(reason="unreachable")` — the engine-failure path, which the scheduler retries
elsewhere; nothing is judged. When a node (re)joins, its new agent first removes whatever this
instance left on it, so a node that died mid-run is cleaned when it comes back, and a restarted
service starts from clean nodes.

`ping` is true while any node's agent and engine answer; `has_image` is false when any node
lacks the image; `nodes_report` asks every node (see `NodeReport`). Errors: Ray's exceptions
become `SandboxError` at one place (`remote.translate`); a spec that cannot run on the node asked
for is a `SpecError`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterator
from typing import Literal

import msgspec

from nodeagent.protocol import Failed, NodeFacts, decode_facts, decode_prepared, encode
from sandbox import LABEL_SANDBOX, RunSpec, SandboxError, SpecError

from ...settings import Settings
from ..executor import Node, NodeReport
from .agents import Agents
from .connect import join
from .handle import RayHandle
from .remote import CALL_S, Remote

__all__ = ["RayExecutor", "RayHandle"]

_PING_CACHE_S = 0.5
log = logging.getLogger("ratchet.ray")


class RayExecutor:
    def __init__(
        self,
        address: str,
        instance: str,
        *,
        gpus_per_slot: int = 1,
        cpu_slots: int = 1,
        auth: Literal["token", "none"] = "token",
        token_file: str | None = None,
        only_nodes: set[str] | None = None,
        poll_s: float = 1.0,
        default_image: str = "ratchet/sandbox:latest",
    ) -> None:
        self.address = address
        self.instance = instance
        self.auth = auth
        self.token_file = token_file
        self.default_image = default_image
        self.agents = Agents(
            instance,
            gpus_per_slot=gpus_per_slot,
            cpu_slots=cpu_slots,
            require_token=auth == "token",
            only=only_nodes,
            poll_s=poll_s,
        )
        self._pinged: tuple[float, bool] = (0.0, False)
        self.connected = False
        self.dispatched = 0

    @classmethod
    def from_settings(cls, settings: Settings, instance: str) -> RayExecutor:
        if not settings.ray_address:
            raise SandboxError("the Ray executor needs RATCHET_RAY_ADDRESS (--ray-address)", "refused")
        return cls(
            settings.ray_address,
            instance,
            gpus_per_slot=settings.gpus_per_slot,
            cpu_slots=settings.ray_cpu_slots,
            auth=settings.ray_auth,
            token_file=settings.ray_token_file,
            default_image=settings.default_image,
        )

    def __repr__(self) -> str:
        nodes = ",".join(f"{a.name}:{a.load()}/{a.slots}" for a in self.agents.ready())
        return f"<RayExecutor {self.address} nodes={nodes or '-'} dispatched={self.dispatched}>"

    async def connect(self, nodes: int | None = None, timeout: float = 120.0) -> None:
        """Join the cluster and place the agents. `nodes`: wait until that many nodes have agents;
        None: until every node of the cluster now has one, or failed to get one."""
        await asyncio.to_thread(join, self.address, self.auth, self.token_file)
        self.connected = True
        await self.agents.start(nodes, timeout)

    # -- the inventory ------------------------------------------------------------------------------

    async def inventory(self) -> list[Node]:
        return [a.as_node() for a in self.agents.ready()]

    async def watch_inventory(self) -> AsyncIterator[list[Node]]:
        while True:
            seen = self.agents.version
            yield await self.inventory()
            await self.agents.changed(seen)

    # -- runs ---------------------------------------------------------------------------------------

    async def prepare(self, spec: RunSpec, node: str) -> RayHandle:
        agent = self.agents.by_name(node)
        if agent is None:
            raise SandboxError(f"node {node} is not in the Ray cluster (now)", "unreachable")
        if not set(spec.gpus) <= set(agent.info.gpus):
            raise SpecError(f"node {node} has GPUs {agent.info.gpus}, not {spec.gpus}")
        # The workspace travels with the call: inline when small, through Ray's object store when
        # over Ray's inline limit (100 KiB by default); a `ray.put` of its own costs a round trip.
        data = encode(spec)
        key = uuid.uuid4().hex
        agent.preparing += 1
        try:
            raw = await agent.call("prepare", agent.actor.prepare.remote(key, data), timeout=None)
        except asyncio.CancelledError:
            # Its caller gave up: the agent removes the run once it is made.
            with contextlib.suppress(Exception):
                agent.actor.release.remote(key)
            raise
        finally:
            agent.preparing -= 1
        answer = decode_prepared(raw)
        if isinstance(answer, Failed):
            raise answer.error(agent.name)
        handle = RayHandle(agent, key, spec, answer)
        agent.active.add(handle)
        self.dispatched += 1
        return handle

    async def reattach(self) -> list[RayHandle]:
        """Runs are not taken over on a cluster (each node's agent lives and dies with the driver
        that made it): everything the previous process left is removed, and its experiments run
        again."""
        await self.cleanup()
        return []

    async def cleanup(self, experiment: str | None = None) -> int:
        """Removes the runs of this instance (or of one experiment) on every node that answers; a
        node that does not is cleaned by its next agent when it comes back."""
        if not self.connected:
            raise SandboxError("not connected to the Ray cluster", "unreachable")
        labels = {LABEL_SANDBOX: self.instance}
        if experiment is not None:
            labels["ratchet.experiment"] = experiment
        agents = self.agents.ready()
        answers = await asyncio.gather(
            *(a.call("clean up", a.actor.sweep.remote(labels), timeout=CALL_S) for a in agents),
            return_exceptions=True,
        )
        removed, errors = 0, []
        for agent, answer in zip(agents, answers, strict=True):
            if isinstance(answer, int):
                removed += answer
                continue
            if isinstance(answer, bytes):
                failed = msgspec.msgpack.decode(answer, type=Failed)
                answer = SandboxError(f"node {agent.name}: {failed.message}", failed.reason)
            errors.append(answer if isinstance(answer, SandboxError) else SandboxError(str(answer)))
            log.warning("node %s: clean-up failed: %s", agent.name, errors[-1])
        if errors and len(errors) == len(agents):
            raise errors[0]  # no node answered: the caller tries again later
        return removed

    # -- checks -------------------------------------------------------------------------------------

    async def ping(self) -> bool:
        """Whether any node's agent and engine answer: true at the first that does, so a slow
        node never holds up a pass (a cached answer for half a second)."""
        at, up = self._pinged
        if time.monotonic() - at < _PING_CACHE_S:
            return up
        agents = self.agents.ready()
        calls = [asyncio.ensure_future(a.call("ping", a.actor.ping.remote(), 5.0)) for a in agents]
        up = False
        try:
            for answer in asyncio.as_completed(calls):
                with contextlib.suppress(SandboxError):
                    if await answer is True:
                        up = True
                        break
        finally:
            for call in calls:
                call.cancel()
        self._pinged = (time.monotonic(), up)
        return up

    async def has_image(self, image: str) -> bool | None:
        reports = await self.nodes_report([image], probe=False)
        if any(image in r.missing_images for r in reports):
            return False
        return True if reports and all(r.problem is None for r in reports) else None

    async def nodes_report(self, images: list[str], probe: bool = True) -> list[NodeReport]:
        """Every node with an agent, asked now (`probe`: also its runtimes and GPU route, which
        on a GPU node starts one throw-away container the first time)."""
        agents = self.agents.ready()
        answers = await asyncio.gather(*(self._report(a, images, probe) for a in agents))
        return list(answers)

    async def _report(self, agent: Remote, images: list[str], probe: bool) -> NodeReport:
        node = agent.as_node()
        here = NodeReport(name=node.name, slots=node.slots, gpus=list(node.gpus))
        gpu_image = self.default_image if probe and node.gpus else None
        try:
            if probe:
                ref = agent.actor.report.remote(images, gpu_image)
                facts = decode_facts(await agent.call("report", ref, timeout=CALL_S))
            else:
                missing = await agent.call("check images", agent.actor.images.remote(images), CALL_S)
                facts = NodeFacts(engine=True, missing_images=missing)
        except SandboxError as exc:
            return msgspec.structs.replace(here, problem=str(exc))
        return msgspec.structs.replace(here, **msgspec.structs.asdict(facts))

    async def close(self) -> None:
        await self.agents.close()
        if not self.connected:
            return
        self.connected = False
        import ray

        await asyncio.to_thread(ray.shutdown)
