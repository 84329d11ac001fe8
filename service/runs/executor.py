"""Where experiments run: the small interface the scheduler dispatches through, and the local
Docker engine behind it.

The scheduler never touches a container. It asks an `Executor` to **prepare** a run: everything
that may happen before the untrusted workload may start (container created, workspace copied in,
devices attached), ending with the run held behind a trusted gate. Later it **starts** the
`Handle` it got back: the gate opens and the workload begins that moment (the time budget and the
hard deadline count from there). `start` calls `on_exit` as soon as the workload has ended, before
its outputs are collected, so the scheduler can hand the slot to the next prepared run at once; it
returns the complete `RunResult` afterwards. **cancel** works at any time (a prepared run never
starts; a running one is killed); **cleanup** removes what the run left, once nobody needs it, off
the critical path. `Executor.cleanup(instance)` removes everything a previous process of this
instance left behind (every run carries the instance label).

    prepare(spec) -> Handle ──start(on_output, on_exit)──> RunResult ──cleanup()
                        └──cancel() (any time) ──────────────────────────┘

A cluster backend (Ray, say: prepare = reserve a worker with the spec's GPUs and ship the
workspace; start = signal it) implements the same methods and leaves the scheduler untouched.
Errors follow the sandbox: `SpecError` for a spec that cannot run, `SandboxError` when the backend
fails; whatever the workload does is data in the `RunResult`.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
from collections.abc import Callable
from functools import partial
from typing import Protocol

from sandbox import LABEL_SANDBOX, PreparedRun, RunResult, RunSpec, Sandbox, Timings

__all__ = ["Executor", "Handle", "LocalExecutor"]

log = logging.getLogger("ratchet.executor")


class Handle(Protocol):
    """One prepared run, held behind its gate until `start`."""

    spec: RunSpec

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


class Executor(Protocol):
    async def prepare(self, spec: RunSpec) -> Handle:
        """Get a run ready behind its gate. A caller cancelled while waiting owes nothing: what
        was made is cleaned up when it is done."""
        ...

    async def cleanup(self, instance: str, experiment: str | None = None) -> int:
        """Remove every run of `instance` (a restarted service's leftovers), or only those of one
        experiment; returns how many. Raises SandboxError when the backend does not answer."""
        ...

    async def ping(self) -> bool:
        """Whether the backend answers now (nothing is dispatched while it does not)."""
        ...

    async def close(self) -> None:
        """Let go of the backend once nothing runs; what is still being removed finishes first."""
        ...


class LocalExecutor:
    """The local Docker engine through `sandbox`. docker-py blocks, so each call runs in a thread
    of this executor's own: a run holds one for its whole duration, and they must never starve
    the default pool that serves the API's short blocking calls."""

    def __init__(self, sandbox: Sandbox, threads: int) -> None:
        self.sandbox = sandbox
        self._threads = concurrent.futures.ThreadPoolExecutor(threads, thread_name_prefix="ratchet-run")
        # Removal is slow and never urgent: its own threads keep it from delaying a start.
        self._cleaners = concurrent.futures.ThreadPoolExecutor(2, thread_name_prefix="ratchet-cleanup")

    async def prepare(self, spec: RunSpec) -> LocalHandle:
        future = self._threads.submit(self.sandbox.prepare, spec)
        try:
            run = await asyncio.wrap_future(future)
        except asyncio.CancelledError:
            future.add_done_callback(self._release_orphan)
            raise
        return LocalHandle(self, run)

    @staticmethod
    def _release_orphan(future: concurrent.futures.Future[PreparedRun]) -> None:
        # Runs in the thread that finished the prepare (or here, if it is already done).
        if not future.cancelled() and future.exception() is None:
            future.result().release()

    async def cleanup(self, instance: str, experiment: str | None = None) -> int:
        labels = {LABEL_SANDBOX: instance}
        if experiment is not None:
            labels["ratchet.experiment"] = experiment
        return await asyncio.to_thread(self.sandbox.remove_labelled, labels)

    async def ping(self) -> bool:
        return await asyncio.to_thread(self.sandbox.ping)

    async def _call(self, pool: concurrent.futures.ThreadPoolExecutor, fn: Callable[[], object]) -> object:
        return await asyncio.get_running_loop().run_in_executor(pool, fn)

    async def close(self) -> None:
        """Waits (a bounded time) for prepares and removals still under way: a prepare cancelled
        at shutdown removes its container when it finishes, and must get to."""

        def drain() -> None:
            self._threads.shutdown(wait=True, cancel_futures=True)
            self._cleaners.shutdown(wait=True)

        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.to_thread(drain), timeout=60)


class LocalHandle:
    def __init__(self, executor: LocalExecutor, run: PreparedRun) -> None:
        self._executor = executor
        self._run = run
        self.spec = run.spec

    def __repr__(self) -> str:
        return f"<LocalHandle run={self._run.run_id} container={(self._run.container_id or '')[:12]}>"

    async def start(
        self, on_output: Callable[[bytes], None], on_exit: Callable[[Timings], None]
    ) -> RunResult:
        loop = asyncio.get_running_loop()

        def exited(timings: Timings) -> None:  # in the run's thread
            loop.call_soon_threadsafe(on_exit, timings)

        execute = partial(self._run.execute, on_output=on_output, on_exit=exited, release=False)
        result = await self._executor._call(self._executor._threads, execute)
        assert isinstance(result, RunResult)
        return result

    async def cancel(self) -> None:
        await asyncio.to_thread(self._run.cancel)

    async def cleanup(self) -> None:
        try:
            await self._executor._call(self._executor._cleaners, self._run.release)
        except RuntimeError:  # the pool is shut down (service stopping): remove it here
            self._run.release()
