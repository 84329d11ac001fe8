"""`RayExecutor`: the executor interface on a Ray cluster, one agent per node.

The scheduler sees what it sees of the local engine: `prepare(spec) -> handle`, `handle.start`,
`cancel`, `cleanup`, `ping`, `close` — plus the cluster's slots, which change as nodes come and go
(`slots`, `wait_changed`). Which node runs a spec follows from its GPU ids (`<node>:<device id>`,
as the slots name them), else from the slot asked for, else it goes to the least busy node; the
run is prepared on the node that will run it, and the engine there gets the device ids alone.

Ratchet owns deadlines and faults, not Ray (which has no per-task timeout and does not stop a
container a task started): the agent kills a run at its hard deadline and on cancel, by container
id, on its node. A node that leaves (or whose agent dies) fails its runs with
`SandboxError(reason="unreachable")` — the engine-failure path, which the scheduler retries
elsewhere; nothing is judged. When a node (re)joins, its new agent first removes whatever this
instance left on it, so a node that died mid-run is cleaned when it comes back and a restarted
service starts from clean nodes.

Errors: Ray's exceptions become `SandboxError` at one place (`remote.translate`); a spec that cannot run
on the chosen node is a `SpecError`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
import uuid
from collections.abc import Callable
from typing import Any

import msgspec

from sandbox import LABEL_SANDBOX, RunResult, RunSpec, SandboxError, SpecError, Timings

from .inventory import Node, Slot, local_gpus, nodes_from_ray, slots_of
from .loopback import is_loopback, pin
from .protocol import (
    AgentInfo,
    Exited,
    Failed,
    Finished,
    Output,
    Prepared,
    decode_event,
    decode_prepared,
    encode,
)
from .remote import CALL_S, Remote, kill, translate

__all__ = ["RayExecutor", "RayHandle"]

log = logging.getLogger("ratchet.ray")

NAMESPACE = "ratchet"
_AGENT_START_S = 60.0  # a new node's agent: placed, answering, its leftovers swept
_AGENT_RETRY_S = 10.0  # before another try on a node whose agent did not come up
_STREAM_GRACE_S = 120.0  # past a run's hard timeout: collection, then the agent's own kill
_PING_CACHE_S = 0.5


class RayExecutor:
    def __init__(
        self,
        address: str,
        instance: str,
        *,
        gpus_per_slot: int = 1,
        cpu_slots: int = 1,
        auth_token_path: str | None = None,
        only_nodes: set[str] | None = None,
        poll_s: float = 1.0,
    ) -> None:
        self.address = address
        self.instance = instance
        self.gpus_per_slot = gpus_per_slot
        self.cpu_slots = cpu_slots
        self.auth_token_path = auth_token_path
        self.only_nodes = only_nodes
        self.poll_s = poll_s
        self._agents: dict[str, Remote] = {}  # by Ray node id
        self._starting: dict[str, asyncio.Task[None]] = {}
        self._failed_at: dict[str, float] = {}  # node id -> when its agent last failed to start
        self._watcher: asyncio.Task[None] | None = None
        self._changed = asyncio.Event()
        self._pinged: tuple[float, bool] = (0.0, False)
        self._agent_class: Any = None
        self.connected = False
        self.dispatched = 0

    def __repr__(self) -> str:
        nodes = ",".join(f"{a.name}:{a.load()}/{len(a.slots)}" for a in self._ready())
        return f"<RayExecutor {self.address} nodes={nodes or '-'} dispatched={self.dispatched}>"

    # -- connection and inventory ------------------------------------------------------------------

    async def connect(self, nodes: int | None = None, timeout: float = 120.0) -> None:
        """Join the cluster. `nodes`: wait until that many nodes have agents; None: until every
        node in the cluster now has one, or failed to get one (at least one must succeed)."""
        await asyncio.to_thread(self._init_ray)
        self.connected = True
        deadline = time.monotonic() + timeout
        if nodes is None:
            await self._refresh()
            if self._starting:
                await asyncio.wait(list(self._starting.values()), timeout=timeout)
            nodes = 1
        self._watcher = asyncio.create_task(self._watch(), name="ratchet-ray-nodes")
        while len(self._ready()) < nodes:
            left = deadline - time.monotonic()
            if left <= 0:
                raise SandboxError(
                    f"only {len(self._ready())} of {nodes} node(s) of the Ray cluster at {self.address}"
                    f" have an agent after {timeout:g} s",
                    "unreachable",
                )
            await self.wait_changed(left)

    def _init_ray(self) -> None:
        import ray

        from .agent import CONCURRENCY, NodeAgent

        host = self.address.rpartition(":")[0].strip("[]")
        local = is_loopback(host)
        if local:
            pin()  # else Ray would turn 127.0.0.1 into this machine's network address
        if self.auth_token_path is not None:
            _use_token(self.auth_token_path)
        try:
            ray.init(
                address=self.address,
                namespace=NAMESPACE,
                logging_level=logging.WARNING,
                log_to_driver=False,
                configure_logging=False,
                _node_ip_address="127.0.0.1" if local else None,
            )
        except Exception as exc:
            raise SandboxError(
                f"cannot join the Ray cluster at {self.address}: {exc}", "unreachable"
            ) from exc
        self._agent_class = ray.remote(concurrency_groups=CONCURRENCY, max_restarts=0)(NodeAgent)

    @property
    def slots(self) -> list[Slot]:
        """Every slot of the nodes whose agents answer now, node by node."""
        return [s for a in self._ready() for s in a.slots]

    def gpu_ids(self) -> list[str]:
        return [g for s in self.slots for g in s.gpus]

    async def wait_changed(self, timeout: float) -> bool:
        """True when the slots changed (a node came or went) within `timeout`."""
        changed = self._changed
        try:
            await asyncio.wait_for(changed.wait(), timeout)
        except TimeoutError:
            return False
        return True

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    def _ready(self) -> list[Remote]:
        return sorted((a for a in self._agents.values() if not a.lost.is_set()), key=lambda a: a.name)

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
        nodes = {n.node_id: n for n in nodes_from_ray(raw, self.only_nodes)}
        for node_id, agent in list(self._agents.items()):
            if node_id not in nodes:
                agent.lose("left the cluster")
        now = time.monotonic()
        for node_id, node in nodes.items():
            if node_id in self._agents or node_id in self._starting:
                continue
            if now - self._failed_at.get(node_id, -_AGENT_RETRY_S) < _AGENT_RETRY_S:
                continue
            if any(a.name == node.name for a in self._ready()):
                continue  # the node restarted: its old entry is still listed as alive
            task = asyncio.create_task(self._start_agent(node), name=f"ray-agent-{node.name}")
            self._starting[node_id] = task

    async def _start_agent(self, node: Node) -> None:
        """Place an agent on `node`, holding all its GPUs, and let it remove what this instance
        left there (a previous process, or this one before the node died)."""
        import ray.exceptions
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        actor = None
        try:
            actor = self._agent_class.options(
                num_cpus=0,
                num_gpus=node.gpus,
                scheduling_strategy=NodeAffinitySchedulingStrategy(node.node_id, soft=False),
                name=None,
            ).remote(self.instance, node.name)
            try:
                hello = await asyncio.wait_for(actor.hello.remote(), _AGENT_START_S)
                sweep = actor.sweep.remote({LABEL_SANDBOX: self.instance})
                swept = await asyncio.wait_for(sweep, _AGENT_START_S)
            except ray.exceptions.RayError as exc:
                raise translate(exc, node.name, "start agent") from exc
            info = msgspec.msgpack.decode(hello, type=AgentInfo)
            if isinstance(swept, bytes):
                raise msgspec.msgpack.decode(swept, type=Failed).error(node.name)
            if not info.engine:
                raise SandboxError(f"node {node.name}: its container engine does not answer", "unreachable")
        except (SandboxError, TimeoutError) as exc:
            log.warning("node %s: no agent (%s); trying again in %g s", node.name, exc, _AGENT_RETRY_S)
            self._failed_at[node.node_id] = time.monotonic()
            if actor is not None:
                kill(actor)
            return
        finally:
            self._starting.pop(node.node_id, None)
        slots = slots_of(node.name, info.gpus, self.gpus_per_slot, self.cpu_slots)
        self._agents[node.node_id] = Remote(node, actor, info, slots, on_lost=self._lost)
        log.info(
            "node %s joined: %d slot(s), GPUs %s%s",
            node.name,
            len(slots),
            ",".join(info.gpus) or "none",
            f"; removed {swept} container(s)/volume(s) left there" if swept else "",
        )
        self._notify()

    def _lost(self, agent: Remote) -> None:
        """The node (or its agent) is gone: its runs have failed, its slots go away."""
        self._agents.pop(agent.node.node_id, None)
        runs = len(agent.active)
        log.warning("node %s %s: %d run(s) there fail and go back to the queue", agent.name, agent.why, runs)
        self._notify()

    # -- the executor interface --------------------------------------------------------------------

    async def prepare(self, spec: RunSpec, slot: str | None = None) -> RayHandle:
        agent, devices = self._place(spec, slot)
        local = msgspec.structs.replace(spec, gpus=devices)
        import ray

        ref = ray.put(encode(local))  # the workspace travels to the node through the object store
        key = uuid.uuid4().hex
        agent.preparing += 1
        try:
            raw = await agent.call("prepare", agent.actor.prepare.remote(key, ref), timeout=None)
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

    def _place(self, spec: RunSpec, slot: str | None) -> tuple[Remote, list[str]]:
        try:
            node, devices = local_gpus(spec.gpus)
        except ValueError as exc:
            raise SpecError(str(exc)) from exc
        if slot is not None:
            wanted = slot.rpartition("/")[0]
            if node is not None and node != wanted:
                raise SpecError(f"GPUs {spec.gpus} are not on the node of slot {slot}")
            node = wanted
        ready = self._ready()
        if node is None:
            if not ready:
                raise SandboxError("no node of the Ray cluster has an agent", "unreachable")
            return max(ready, key=lambda a: (len(a.slots) - a.load(), -ready.index(a))), []
        agent = next((a for a in ready if a.name == node), None)
        if agent is None:
            raise SandboxError(f"node {node} is not in the Ray cluster (now)", "unreachable")
        if not set(devices) <= set(agent.info.gpus):
            raise SpecError(f"node {node} has GPUs {agent.info.gpus}, not {devices}")
        return agent, devices

    async def cleanup(self, instance: str, experiment: str | None = None) -> int:
        """Removes the runs of `instance` (or of one experiment) on every node that answers; a
        node that does not is cleaned by its next agent when it comes back."""
        if not self.connected:
            raise SandboxError("not connected to the Ray cluster", "unreachable")
        labels = {LABEL_SANDBOX: instance}
        if experiment is not None:
            labels["ratchet.experiment"] = experiment
        agents = self._ready()
        answers = await asyncio.gather(
            *(a.call("clean up", a.actor.sweep.remote(labels), timeout=CALL_S) for a in agents),
            return_exceptions=True,
        )
        removed = 0
        for agent, answer in zip(agents, answers, strict=True):
            if isinstance(answer, int):
                removed += answer
            elif isinstance(answer, bytes):
                log.warning("node %s: %s", agent.name, msgspec.msgpack.decode(answer, type=Failed).message)
            else:
                log.warning("node %s: clean-up failed: %s", agent.name, answer)
        return removed

    async def ping(self) -> bool:
        """Whether any node's agent and engine answer (a cached answer for half a second)."""
        at, up = self._pinged
        if time.monotonic() - at < _PING_CACHE_S:
            return up
        agents = self._ready()
        answers = await asyncio.gather(
            *(a.call("ping", a.actor.ping.remote(), timeout=5.0) for a in agents),
            return_exceptions=True,
        )
        up = any(a is True for a in answers)
        self._pinged = (time.monotonic(), up)
        return up

    async def missing_images(self, images: list[str]) -> dict[str, list[str]]:
        """Node -> the images of `images` its engine lacks (nodes lacking none are left out)."""
        agents = self._ready()
        answers = await asyncio.gather(
            *(a.call("check images", a.actor.images.remote(images), timeout=CALL_S) for a in agents)
        )
        return {a.name: missing for a, missing in zip(agents, answers, strict=True) if missing}

    async def close(self) -> None:
        if self._watcher is not None:
            self._watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watcher
        for task in list(self._starting.values()):
            task.cancel()
        if not self.connected:
            return
        self.connected = False
        import ray

        for agent in list(self._agents.values()):
            kill(agent.actor)
        self._agents.clear()
        await asyncio.to_thread(ray.shutdown)


class RayHandle:
    """One run prepared on one node, behind its gate."""

    def __init__(self, agent: Remote, key: str, spec: RunSpec, ready: Prepared) -> None:
        self._agent = agent
        self._key = key
        self.spec = spec
        self.node = agent.name
        self.container_id = ready.container_id
        self.timings = ready.timings
        self._released = False

    def __repr__(self) -> str:
        return f"<RayHandle node={self.node} container={self.container_id[:12]}>"

    async def start(
        self, on_output: Callable[[bytes], None], on_exit: Callable[[Timings], None]
    ) -> RunResult:
        """Opens the gate on the node and follows the run's events until its result arrives. The
        node enforces the hard timeout; this side gives up `_STREAM_GRACE_S` later, as if the node
        were lost (a node that cannot kill its own run is not one to trust with the next)."""
        agent = self._agent
        stream = agent.actor.execute.remote(self._key)
        limit = self.spec.timeout_s + _STREAM_GRACE_S
        try:
            return await agent.race("run", self._follow(stream, on_output, on_exit), limit)
        except SandboxError:
            if not agent.lost.is_set():  # whatever still runs there is killed, not left to run on
                with contextlib.suppress(Exception):
                    agent.actor.cancel.remote(self._key)
            raise

    async def _follow(
        self, stream: Any, on_output: Callable[[bytes], None], on_exit: Callable[[Timings], None]
    ) -> RunResult:
        exited = False
        async for ref in stream:
            event = decode_event(await ref)
            if isinstance(event, Output):
                on_output(event.data)
            elif isinstance(event, Exited):
                if not exited:
                    exited = True
                    on_exit(event.timings)
            elif isinstance(event, Finished):
                return event.result
            else:
                raise event.error(self.node)
        raise SandboxError(f"node {self.node}: the run's events ended without a result", "unreachable")

    async def cancel(self) -> None:
        agent = self._agent
        if agent.lost.is_set():
            return  # its container goes when the node comes back
        with contextlib.suppress(SandboxError):
            await agent.call("cancel", agent.actor.cancel.remote(self._key), timeout=CALL_S)

    async def cleanup(self) -> None:
        if self._released:
            return
        self._released = True
        agent = self._agent
        agent.active.discard(self)
        if agent.lost.is_set():
            return
        try:
            await agent.call("release", agent.actor.release.remote(self._key), timeout=120)
        except SandboxError as exc:
            log.warning("node %s: could not remove run %s: %s", self.node, self.container_id[:12], exc)


def _use_token(path: str) -> None:
    """Ray reads its authentication settings from the environment once, when it is imported:
    set them, then have Ray read them again (the token, too, is cached)."""
    os.environ["RAY_AUTH_MODE"] = "token"
    os.environ["RAY_AUTH_TOKEN_PATH"] = path
    os.environ.pop("RAY_AUTH_TOKEN", None)
    from ray._raylet import AuthenticationTokenLoader, Config

    Config.initialize("")
    AuthenticationTokenLoader.instance().reset_cache()
