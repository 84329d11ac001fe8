"""`RayHandle`: one run prepared on one node of a Ray cluster, behind its gate. Its events (output
as it arrives, the workload's end, the result) stream back from the node's agent."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from typing import Any

from nodeagent.protocol import Exited, Finished, Output, Prepared, decode_event
from sandbox import RunResult, RunSpec, SandboxError, Timings

from .remote import CALL_S, Remote

__all__ = ["RayHandle"]

log = logging.getLogger("ratchet.ray")

_STREAM_GRACE_S = 120.0  # past a run's hard timeout: collection, then the agent's own kill


class RayHandle:
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

    async def detach(self) -> None:
        """A run on a cluster node is not taken over by the next process (its agent goes with this
        driver), so a stop ends it, as `cancel` does."""
        await self.cancel()

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
