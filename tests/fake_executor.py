"""An executor with no engine behind it, for the scheduler's fast tests and its capacity benchmark
(httpx's MockTransport is the model): a run's result is whatever `handler(handle)` returns, awaited
(`handle.spec` is the run, `handle.node` where it was placed).
It keeps the real interface's promises: a cancel before the gate means the run never starts, the
hard timeout counts from `start`, `on_exit` comes before the result, and it records every handle.
Its nodes may change while it runs (`set_nodes`, as a cluster's do): a run on a node that left
fails as an unreachable engine, as the interface promises."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable

from service.runs.executor import Node, NodeReport, RunResult, RunSpec, SandboxError, Timings

Handler = Callable[["FakeHandle"], Awaitable[RunResult]]


async def summary(handle: FakeHandle, value: float = 1.0, name: str = "val_bpb") -> RunResult:
    """A run that prints the reference summary block and exits 0."""
    return RunResult(exit_code=0, exit_reported=True, log=f"---\n{name}: {value}\n")


class FakeHandle:
    def __init__(self, executor: FakeExecutor, spec: RunSpec, node: str) -> None:
        self.executor, self.spec, self.node = executor, spec, node
        self.cancelled = asyncio.Event()
        self.lost = asyncio.Event()  # its node left the inventory
        self.cleaned = False

    async def start(
        self, on_output: Callable[[bytes], None], on_exit: Callable[[Timings], None]
    ) -> RunResult:
        timings = Timings(started=time.time())
        self.executor.started.append(self)
        run = asyncio.ensure_future(self.executor.handler(self))
        cancel = asyncio.ensure_future(self.cancelled.wait())
        lost = asyncio.ensure_future(self.lost.wait())
        done, _ = await asyncio.wait(
            {run, cancel, lost}, timeout=self.spec.timeout_s, return_when="FIRST_COMPLETED"
        )
        for task in (run, cancel, lost):
            task.cancel()
        if lost in done:
            raise SandboxError(f"node {self.node} left (fake)", "unreachable")
        if run in done:
            result = run.result()  # a SandboxError from the handler is the engine failing
        else:
            result = RunResult(exit_code=137, timed_out=not done, cancelled=bool(done))
        timings.finished = time.time()
        on_exit(timings)
        if result.log:
            on_output(result.log.encode())
        result.timings, result.timeout_s = timings, self.spec.timeout_s
        return result

    async def cancel(self) -> None:
        self.cancelled.set()

    async def cleanup(self) -> None:
        self.cleaned = True

    async def detach(self) -> None:
        self.cancelled.set()  # nothing outlives the fake's process: it stops, as the interface allows


class FakeExecutor:
    instance = "fake"

    def __init__(self, handler: Handler = summary, nodes: list[Node] | None = None) -> None:
        self.handler = handler
        self.nodes = nodes or [Node(name="fake", slots=1)]
        self.up = True  # False: pings fail and prepares raise as an unreachable engine does
        self.prepared: list[FakeHandle] = []
        self.started: list[FakeHandle] = []
        self._changed = asyncio.Condition()

    async def inventory(self) -> list[Node]:
        return list(self.nodes)

    async def watch_inventory(self) -> AsyncIterator[list[Node]]:
        while True:
            seen = self.nodes
            yield list(seen)
            async with self._changed:
                await self._changed.wait_for(lambda seen=seen: self.nodes is not seen)

    async def set_nodes(self, nodes: list[Node]) -> None:
        """The inventory changes: runs on a node that left (or changed) fail as unreachable."""
        kept = {n.name for n in nodes} & {n.name for n in self.nodes if n in nodes}
        for handle in self.prepared:
            if handle.node not in kept:
                handle.lost.set()
        async with self._changed:
            self.nodes = list(nodes)
            self._changed.notify_all()

    async def prepare(self, spec: RunSpec, node: str) -> FakeHandle:
        if not self.up:
            raise SandboxError("create container: engine unreachable (fake)", "unreachable")
        handle = FakeHandle(self, spec.validate(), node)
        self.prepared.append(handle)
        return handle

    async def reattach(self) -> list[FakeHandle]:
        """Nothing outlives the fake's process: like a backend that cannot take runs over."""
        return []

    async def cleanup(self, experiment: str | None = None) -> int:
        if not self.up:
            raise SandboxError("cleanup: engine unreachable (fake)", "unreachable")
        return 0

    async def ping(self) -> bool:
        return self.up

    async def has_image(self, image: str) -> bool | None:
        return True

    async def nodes_report(self, images: list[str]) -> list[NodeReport]:
        return [
            NodeReport(name=n.name, slots=n.slots, gpus=list(n.gpus), engine=self.up, runtimes=["runc"])
            for n in self.nodes
        ]

    async def close(self) -> None:
        pass
