"""The local Docker engine as an `Executor`, through `sandbox`: the one module of the service that
holds a `Sandbox`. Its inventory is this machine: one node, `local`, with the slots and GPU ids of
the settings (`--slots`, `--gpus`) or, without them, every GPU nvidia-smi reports."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from functools import partial
from pathlib import Path

import msgspec

from sandbox import LABEL_SANDBOX, PreparedRun, Sandbox, SandboxError
from sandbox.gpus import gpu_refusal

from ..settings import Settings
from .executor import Node, NodeReport, RunResult, RunSpec, Timings
from .gpus import detect_gpus

__all__ = ["NODE", "LocalExecutor", "LocalHandle", "local_node"]

NODE = "local"

log = logging.getLogger("ratchet.executor")


def local_node(settings: Settings, gpus: list[str] | None = None) -> Node:
    """This machine. Slots default to one per `gpus_per_slot` GPUs on a GPU host, else 1."""
    if gpus is None:
        gpus = settings.gpus if settings.gpus is not None else detect_gpus()
    if settings.slots is not None:
        slots = settings.slots
    else:
        slots = max(1, len(gpus) // settings.gpus_per_slot) if gpus else 1
    return Node(name=NODE, slots=slots, gpus=tuple(gpus))


class LocalExecutor:
    """docker-py blocks, so each call runs in a thread of this executor's own: a run holds one for
    its whole duration, and they must never starve the default pool that serves the API's short
    blocking calls."""

    def __init__(self, settings: Settings, instance: str, sandbox: Sandbox | None = None) -> None:
        self.instance = instance
        # The journal lets the next process of this data dir take over runs that outlive this one.
        self.sandbox = sandbox or Sandbox(instance=instance, journal=Path(settings.data_dir) / "runs")
        self.node = local_node(settings)
        self._settings = settings
        self._route_told = False
        # one per running workload and per prepare ahead, and a few spare
        threads = self.node.slots * (1 + settings.prepare_ahead) + 4
        self._threads = concurrent.futures.ThreadPoolExecutor(threads, thread_name_prefix="ratchet-run")
        # Removal is slow and never urgent: its own threads keep it from delaying a start.
        self._cleaners = concurrent.futures.ThreadPoolExecutor(2, thread_name_prefix="ratchet-cleanup")

    def __repr__(self) -> str:
        return f"<LocalExecutor instance={self.instance} {self.node}>"

    async def inventory(self) -> list[Node]:
        if self.node.gpus and not self._route_told:
            self._route_told = True
            await self._tell_gpu_route()
        return [self.node]

    async def watch_inventory(self) -> AsyncIterator[list[Node]]:
        yield await self.inventory()
        await asyncio.Event().wait()  # this machine stays what it is

    async def _tell_gpu_route(self) -> None:
        """Says once how containers will get their GPUs, or why they cannot (each GPU run is then
        refused with the same words). The scheduler asks for the inventory before it removes this
        instance's leftovers, so the probe's container is gone by then."""
        gpus = ",".join(self.node.gpus)
        try:
            probe = await asyncio.to_thread(self.sandbox.gpu_probe, self._settings.default_image)
        except SandboxError as exc:
            log.warning("GPUs %s: could not ask the container engine how to attach them: %s", gpus, exc)
            return
        refusal = gpu_refusal(probe, self._settings.runtime)
        if refusal is not None:
            log.warning("GPUs %s found, but GPU runs will fail: %s", gpus, refusal)
        else:
            log.info("GPUs %s, attached by %s (engine %s)", gpus, probe.reason, probe.engine_version)

    async def prepare(self, spec: RunSpec, node: str = NODE) -> LocalHandle:
        if node != NODE:
            raise ValueError(f"the local executor has no node {node!r}")
        future = self._threads.submit(self.sandbox.prepare, spec)
        try:
            run = await asyncio.wrap_future(future)
        except asyncio.CancelledError:
            future.add_done_callback(_release_orphan)
            raise
        return LocalHandle(run, self._threads, self._cleaners)

    async def reattach(self) -> list[LocalHandle]:
        runs = await asyncio.to_thread(self.sandbox.reattach)
        return [LocalHandle(run, self._threads, self._cleaners) for run in runs]

    async def cleanup(self, experiment: str | None = None) -> int:
        labels = {LABEL_SANDBOX: self.instance}
        if experiment is not None:
            labels["ratchet.experiment"] = experiment
        return await asyncio.to_thread(self.sandbox.remove_labelled, labels)

    async def ping(self) -> bool:
        return await asyncio.to_thread(self.sandbox.ping)

    async def has_image(self, image: str) -> bool | None:
        return await asyncio.to_thread(self.sandbox.has_image, image)

    async def nodes_report(self, images: list[str]) -> list[NodeReport]:
        def ask() -> NodeReport:
            node, sandbox = self.node, self.sandbox
            here = NodeReport(name=node.name, slots=node.slots, gpus=list(node.gpus))
            try:  # the nvidia driver is tried (with a throw-away container) only on a GPU host
                probe = sandbox.gpu_probe(self._settings.default_image) if node.gpus else sandbox.probe()
                missing = [name for name in images if sandbox.has_image(name) is False]
            except SandboxError as exc:
                return msgspec.structs.replace(here, problem=str(exc))
            return msgspec.structs.replace(
                here,
                engine=True,
                engine_version=probe.engine_version,
                runtimes=sorted(probe.runtimes),
                gpu_route=probe.route,
                gpu_reason=probe.reason,
                missing_images=missing,
            )

        return [await asyncio.to_thread(ask)]

    async def close(self) -> None:
        """Waits (a bounded time) for prepares and removals still under way: a prepare cancelled
        at shutdown removes its container when it finishes, and must get to."""

        def drain() -> None:
            self._threads.shutdown(wait=True, cancel_futures=True)
            self._cleaners.shutdown(wait=True)

        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.to_thread(drain), timeout=60)


def _release_orphan(future: concurrent.futures.Future[PreparedRun]) -> None:
    # Runs in the thread that finished the prepare (or here, if it is already done).
    if not future.cancelled() and future.exception() is None:
        future.result().release()


async def _in(pool: concurrent.futures.ThreadPoolExecutor, fn: Callable[[], object]) -> object:
    return await asyncio.get_running_loop().run_in_executor(pool, fn)


class LocalHandle:
    node = NODE

    def __init__(
        self,
        run: PreparedRun,
        threads: concurrent.futures.ThreadPoolExecutor,
        cleaners: concurrent.futures.ThreadPoolExecutor,
    ) -> None:
        self._run = run
        self._threads = threads
        self._cleaners = cleaners
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
        result = await _in(self._threads, execute)
        assert isinstance(result, RunResult)
        return result

    async def cancel(self) -> None:
        await asyncio.to_thread(self._run.cancel)

    async def detach(self) -> None:
        self._run.detach()

    async def cleanup(self) -> None:
        try:
            await _in(self._cleaners, self._run.release)
        except RuntimeError:  # the pool is shut down (service stopping): remove it here
            self._run.release()
