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

    inventory() -> [Node]
    prepare(spec, node) -> Handle ──start(on_output, on_exit)──> RunResult ──cleanup()
    reattach() -> [Handle] ─┘    └──cancel() (any time) ─────────────────────────┘

`ping` and `has_image` answer readiness and the image check of a new loop. Errors follow the
sandbox: `SpecError` for a spec that cannot run, `SandboxError` when the backend fails (its
`reason` from a fixed set; `unreachable` is retried); whatever the workload does is data in the
`RunResult`. `LocalExecutor` (`local.py`) is the local Docker engine through `sandbox`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import msgspec

from sandbox import RunDetached, RunResult, RunSpec, SandboxError, SpecError, Timings

__all__ = [
    "Executor",
    "Handle",
    "Node",
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
        """Whether `image` is there to run; None when the backend cannot tell now."""
        ...

    async def close(self) -> None:
        """Let go of the backend once nothing runs; what is still being removed finishes first."""
        ...
