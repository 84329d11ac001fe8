"""The executor's side of one node's agent: its actor, what it reported, its slots and runs, and
every call to it, each raced against the node being lost.

Ray's own failures (the actor or its node gone) lose the agent: its runs fail at once, its slots
go, and the executor places a new agent if the node is still there. A slow answer does not: on a
busy node that would throw away every run the node holds.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, TypeVar

from nodeagent.protocol import AgentInfo
from sandbox import SandboxError

from ..executor import Node
from .inventory import RayNode

if TYPE_CHECKING:
    from .executor import RayHandle

__all__ = ["CALL_S", "Remote", "kill", "translate"]

T = TypeVar("T")

CALL_S = 30.0  # cancel, release, sweep: short calls


class Remote:
    def __init__(
        self, node: RayNode, actor: Any, info: AgentInfo, slots: int, on_lost: Callable[[Remote], None]
    ) -> None:
        self.node = node
        self.actor = actor
        self.info = info
        self.slots = slots
        self.active: set[RayHandle] = set()  # prepared or running, not yet cleaned up
        self.preparing = 0
        self.lost = asyncio.Event()
        self.why = ""
        self._on_lost = on_lost

    @property
    def name(self) -> str:
        return self.node.name

    def as_node(self) -> Node:
        """This node as the scheduler sees it."""
        return Node(name=self.name, slots=self.slots, gpus=tuple(self.info.gpus))

    def load(self) -> int:
        return len(self.active) + self.preparing

    def lose(self, why: str) -> None:
        """The node (or this agent) is gone: every call waiting on it fails now."""
        if self.lost.is_set():
            return
        self.why = why
        self.lost.set()
        kill(self.actor)
        self._on_lost(self)

    async def call(self, action: str, ref: Awaitable[T], timeout: float | None) -> T:
        """One call to the agent (an ObjectRef), failed at once when the node is lost meanwhile."""
        return await self.race(action, _awaited(ref), timeout)

    async def race(self, action: str, work: Awaitable[T], timeout: float | None) -> T:
        import ray.exceptions

        task = asyncio.ensure_future(work)
        lost = asyncio.ensure_future(self.lost.wait())
        try:
            done, _ = await asyncio.wait({task, lost}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            task.cancel()
            raise
        finally:
            lost.cancel()
        if task in done:
            try:
                return task.result()
            except ray.exceptions.RayError as exc:
                error = translate(exc, self.name, action)
                if error.reason == "unreachable":
                    self.lose(f"stopped answering ({type(exc).__name__})")
                raise error from exc
        task.cancel()
        if self.lost.is_set():
            raise SandboxError(f"node {self.name} {self.why} during {action}", "unreachable")
        raise SandboxError(f"node {self.name}: no answer to {action} within {timeout:g} s", "unreachable")


async def _awaited(ref: Awaitable[T]) -> T:
    return await ref


def translate(exc: Exception, node: str, action: str) -> SandboxError:
    """The one place where Ray's exceptions become `SandboxError`: a lost actor or node is
    "unreachable" (the scheduler runs the experiment again elsewhere); a failure of the agent's
    own code is "refused"."""
    import ray.exceptions as rex

    if isinstance(exc, rex.RayActorError | rex.ObjectLostError | rex.OwnerDiedError | rex.NodeDiedError):
        return SandboxError(f"node {node}: lost during {action}: {type(exc).__name__}", "unreachable")
    if isinstance(exc, rex.RayTaskError):
        return SandboxError(f"node {node}: {action} failed in the agent: {exc}")
    return SandboxError(f"node {node}: {action}: {type(exc).__name__}: {exc}", "unreachable")


def kill(actor: Any) -> None:
    import ray

    with contextlib.suppress(Exception):
        ray.kill(actor, no_restart=True)
