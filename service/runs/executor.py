"""Where experiments run: the interface the scheduler dispatches through, and the only door to the
container engine (or a cluster). Nothing above it imports the engine; a backend is one class.

The scheduler never touches a container. It asks an `Executor` for its **inventory** (the nodes it
can run on: slots and GPU ids on each), then to **prepare** a run on a node: everything that may
happen before the untrusted workload may start (container created, workspace copied in, devices
attached), ending with the run held behind a trusted gate. Later it **starts** the `Handle` it got
back: the gate opens and the workload begins that moment (the time budget and the hard deadline
count from there). `start` calls `on_exit` as soon as the workload has ended, before its outputs are
collected, so the scheduler can hand the slot to the next prepared run at once; it returns the
complete `RunResult` afterwards (its `timeout_s` says which hard timeout applied). **cancel** works
at any time (a prepared run never starts; a running one is killed); **cleanup** removes what the
run left, once nobody needs it, off the critical path. `Executor.cleanup()` removes everything a
previous process of this instance left behind (every run carries the instance label);
`Executor.reattach()` instead takes over the runs of that process that are still alive, prepared or
running, and removes the rest: a restart then loses no run that is inside its deadline.

    inventory() -> [Node]           watch_inventory() -> [Node], [Node], ... (as nodes come and go)
    prepare(spec, node) -> Handle ──start(on_output, on_exit)──> RunResult ──cleanup()
    reattach() -> [Handle] ─┘    └──cancel() (any time) ─────────────────────────┘

The inventory may change while the service runs (a cluster's nodes join and leave):
`watch_inventory` yields it again each time, and the scheduler follows it at once. A node that
leaves the inventory (or comes back with other slots or GPUs) takes its runs with it: their
`start` raises `SandboxError(reason="unreachable")`, the engine-failure path, so the experiment is
queued again and runs elsewhere; what they left on the node is the executor's to remove when it
can reach the node again.

`ping` and `has_image` answer readiness and the image check of a new loop; `nodes_report` is what
`ratchet doctor` prints per node (engine, runtimes, GPU route, missing images). Errors follow the
sandbox: `SpecError` for a spec that cannot run, `SandboxError` when the backend fails (its
`reason` from a fixed set; `unreachable` is retried); whatever the workload does is data in the
`RunResult`. `LocalExecutor` (`local.py`) is the local Docker engine through `sandbox`;
`RayExecutor` (`ray/`) the nodes of a Ray cluster, each running `sandbox` on its own engine.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Protocol

import msgspec

from sandbox import RunDetached, RunResult, RunSpec, SandboxError, SpecError, Timings

__all__ = [
    "Executor",
    "Handle",
    "Node",
    "NodeReport",
    "RunDetached",
    "RunResult",
    "RunSpec",
    "SandboxError",
    "SpecError",
    "Timings",
]


class Node(msgspec.Struct, kw_only=True, frozen=True):
    """One place runs can go: how many at once, and the GPU device ids there (as its runs see
    them in `RunSpec.gpus`). A run never spans nodes."""

    name: str
    slots: int
    gpus: tuple[str, ...] = ()


class NodeReport(msgspec.Struct, kw_only=True, frozen=True):
    """One node as `ratchet doctor` shows it: whether runs can go there, and what is missing."""

    name: str
    slots: int = 0
    gpus: list[str] = []  # the device ids its runs may get
    engine: bool = False  # its container engine answers
    engine_version: str = ""
    runtimes: list[str] = []  # OCI runtimes registered with that engine (runc, runsc, ...)
    gpu_route: str = "none"  # how its containers get GPUs: "nvidia", "cdi" or "none"
    gpu_reason: str = ""  # why that route; for "none", what to install
    missing_images: list[str] = []  # of the images asked about, those its engine lacks
    problem: str | None = None  # why the node could not be asked (the fields above are then unknown)


class Handle(Protocol):
    """One prepared run, held behind its gate until `start`."""

    spec: RunSpec
    node: str  # where it was prepared, and runs

    async def start(
        self, on_output: Callable[[bytes], None], on_exit: Callable[[Timings], None]
    ) -> RunResult:
        """Open the gate and see the run through. `on_output` may be called from any thread, as
        output arrives; `on_exit` once, on the event loop, when the workload has ended."""
        ...

    async def cancel(self) -> None:
        """A prepared run never starts; a running one is killed. Safe to call twice."""
        ...

    async def cleanup(self) -> None:
        """Remove what the run left (container, volume). Idempotent; never raises."""
        ...

    async def detach(self) -> None:
        """Let go of the run without stopping it (the service is stopping): `start` raises
        `RunDetached` and the run goes on, for the next process's `Executor.reattach()`. A backend
        that cannot take runs over stops it instead, as `cancel` does."""
        ...


class Executor(Protocol):
    instance: str  # every run made carries it, so a restarted service finds its own leftovers

    async def inventory(self) -> list[Node]:
        """The nodes runs can go to, with their slots and GPU ids."""
        ...

    def watch_inventory(self) -> AsyncIterator[list[Node]]:
        """The inventory now, then again each time it changes; an inventory that never changes is
        yielded once, and the iterator then waits for good."""
        ...

    async def prepare(self, spec: RunSpec, node: str) -> Handle:
        """Get a run ready behind its gate on `node`. A caller cancelled while waiting owes
        nothing: what was made is cleaned up when it is done."""
        ...

    async def reattach(self) -> list[Handle]:
        """The runs a previous process of this instance left alive, taken over, and everything
        else it left removed. A handle's `spec` says what it runs (its labels name the experiment
        and attempt; without files); `start` sees it through as for a run just prepared: a run whose
        gate never opened is let go then, one already going is followed on with its original hard
        deadline, its whole output passed to `on_output` from the beginning, its `RunResult`
        complete. A handle nobody wants is cancelled and cleaned up. Raises SandboxError when the
        backend does not answer; [] from a backend that cannot take runs over (after `cleanup`)."""
        ...

    async def cleanup(self, experiment: str | None = None) -> int:
        """Remove every run of this instance (a restarted service's leftovers), or only those of one
        experiment; returns how many. Raises SandboxError when the backend does not answer."""
        ...

    async def ping(self) -> bool:
        """Whether the backend answers now (nothing is dispatched while it does not)."""
        ...

    async def has_image(self, image: str) -> bool | None:
        """Whether `image` is there to run (on a cluster: on every node); None when the backend
        cannot tell now."""
        ...

    async def nodes_report(self, images: list[str]) -> list[NodeReport]:
        """Every node of the inventory, asked now: its engine, runtimes and GPU route, and which
        of `images` it lacks. A node that cannot be asked is listed with its `problem`."""
        ...

    async def close(self) -> None:
        """Let go of the backend once nothing runs; what is still being removed finishes first."""
        ...
