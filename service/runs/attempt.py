"""One experiment from the moment it gets a slot until its verdict is written: its run prepared (or
taken prepared), the gate opened, the evaluation run after it, the slot handed on the moment the
workload ends, then the verdict (`recording`). An engine that broke the run sends it back to the
queue after a back-off; anything else unexpected ends it as `error`."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Coroutine
from typing import Any, Protocol

import msgspec

from .. import faults
from .. import metrics as m
from ..models import ExperimentView, LoopView, Status
from ..rules.evaluate import EVAL_SEPARATOR
from ..settings import Settings
from ..state import transitions
from ..state.snapshots import SnapshotStore, decode_manifest
from ..state.store import Store
from . import runspec
from .engine import EngineWatch
from .executor import Executor, Handle, RunDetached, RunResult, RunSpec, SandboxError, SpecError, Timings
from .logs import LiveLog, RunLogs
from .recording import record
from .slots import Placement, Slot

__all__ = ["Attempt", "Host", "Prepared", "prepare", "taken_over"]

log = logging.getLogger("ratchet.scheduler")


class Host(Protocol):
    """What an attempt needs of the scheduler that runs it."""

    settings: Settings
    store: Store
    snapshots: SnapshotStore
    executor: Executor
    logs: RunLogs
    engine: EngineWatch
    stopping: bool

    def background(self, coro: Coroutine[Any, Any, None]) -> None: ...
    def pass_soon(self) -> None: ...  # fill slots and prepare what comes next, now
    def slot_freed(self, attempt: Attempt) -> None: ...  # its slot and GPUs go to the next run
    def attempt_over(self, attempt: Attempt) -> None: ...  # its verdict is written


class Prepared(msgspec.Struct, kw_only=True):
    handle: Handle
    spec: RunSpec
    tree: dict[str, bytes]
    exp: ExperimentView
    loop: LoopView


async def prepare(
    host: Host, exp_id: str, loop: LoopView, placement: Placement, ahead: bool = False
) -> Prepared:
    """The experiment's training run, made ready behind its gate at `placement`. `ahead`: made
    before the experiment's start, which will count one more attempt."""
    exp, spec, tree = await _training(host, exp_id, loop, placement, ahead)
    handle = await host.executor.prepare(spec, placement.node)
    return Prepared(handle=handle, spec=spec, tree=tree, exp=exp, loop=loop)


async def taken_over(
    host: Host, handle: Handle, exp_id: str, loop: LoopView, placement: Placement
) -> Prepared:
    """A training run a previous process started (`Executor.reattach`), with what its experiment
    needs besides: the spec it was made from (the evaluation phase builds on it) and its files."""
    try:
        exp, spec, tree = await _training(host, exp_id, loop, placement, ahead=False)
    except BaseException:
        await handle.cancel()
        host.background(handle.cleanup())
        raise
    return Prepared(handle=handle, spec=spec, tree=tree, exp=exp, loop=loop)


async def _training(
    host: Host, exp_id: str, loop: LoopView, placement: Placement, ahead: bool
) -> tuple[ExperimentView, RunSpec, dict[str, bytes]]:
    exp = await host.store.get_experiment(exp_id, with_tail=False)
    if exp is None:
        raise OSError(f"experiment {exp_id} vanished from the database")
    raw = await host.store.get_manifest(exp.snapshot)
    if raw is None:
        raise OSError(f"snapshot {exp.snapshot} is missing from the database")
    manifest = decode_manifest(raw)
    tree = await asyncio.to_thread(host.snapshots.load_tree, manifest)
    spec = runspec.train_spec(
        exp,
        loop,
        tree,
        {e.path for e in manifest.files if e.executable},
        gpus=list(placement.gpus),
        attempt=exp.attempts + ahead,
        instance=host.executor.instance,
        settings=host.settings,
    )
    return exp, spec, tree


class Attempt:
    def __init__(
        self, host: Host, exp_id: str, loop: LoopView, slot: Slot, placement: Placement, handed_at: float
    ) -> None:
        self.host = host
        self.exp_id = exp_id
        self.loop = loop
        self.slot = slot
        self.placement = placement
        self.handed_at = handed_at  # when the slot became ours: freed by the previous run, or later
        self.live: LiveLog = host.logs.open(exp_id)  # our output as it arrives, for followers
        self.task: asyncio.Task[None] | None = None
        self.handle: Handle | None = None
        self.cancel_requested = False
        self.freed_at: float | None = None
        self.workload_s = 0.0
        self.opened_at: float | None = None  # when its gate was asked to open
        self.taken_over = False  # its run was started by a previous process of this service
        self.evaluating = False  # its training run is over; the evaluation's is under way
        self.detached = False  # let go at a stop: its run goes on for the next start

    def expected_end(self, now: float) -> float:
        """When its slot should pass on: its budget after its gate opened (or opens, now)."""
        return (self.opened_at or now) + self.loop.config.time_budget_s

    def __repr__(self) -> str:
        return f"<Attempt {self.exp_id} slot={self.slot.index} {self.placement} handle={self.handle}>"

    def begin(self, prepared: asyncio.Task[Prepared] | None) -> None:
        self.task = asyncio.create_task(self._run(prepared), name=f"experiment-{self.exp_id}")

    async def kill(self) -> None:
        """A prepared run never starts; a running one is killed; what it made is removed."""
        self.cancel_requested = True
        if self.handle is not None:
            await self.handle.cancel()

    async def detach(self) -> bool:
        """At a stop: a training run under way is let go, not killed (see `Handle.detach`); False
        when there is none (not started, evaluating, or over), for the caller to `kill` instead."""
        if self.handle is None or self.freed_at is not None or self.evaluating or self.cancel_requested:
            return False
        self.detached = True
        await self.handle.detach()
        return True

    def free(self) -> None:
        """The workload is over: the slot and its GPUs go to the next experiment now."""
        if self.freed_at is not None:
            return
        self.freed_at = time.time()
        self.slot.exp_id = None
        self.slot.freed_at = self.freed_at
        self.host.slot_freed(self)

    async def _run(self, prepared: asyncio.Task[Prepared] | None) -> None:
        host, loop = self.host, self.loop
        mine: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        before, self.slot.recorded = self.slot.recorded, mine
        result: RunResult | None = None
        try:
            faults.point("run.preparing")
            ready = await (prepared or prepare(host, self.exp_id, loop, self.placement))
            self.handle = ready.handle
            faults.point("run.prepared")
            # This run now makes room for the next prepares (the pass runs once the gate is asked
            # to open: nothing here yields before that).
            host.pass_soon()
            if not self.taken_over:  # the process that started it counted it
                m.QUEUE_WAIT.labels(loop=loop.name).observe(max(0.0, self.handed_at - ready.exp.created_at))
            if self.cancel_requested:
                await ready.handle.cancel()
            has_eval = loop.config.evaluate is not None
            result = await self._phase(ready.handle, free_after=not has_eval)
            evaluation: RunResult | None = None
            if has_eval and runspec.succeeded(result) and not self.cancel_requested:
                self.evaluating = True
                self.live.write(f"\n{EVAL_SEPARATOR}\n".encode())
                spec = runspec.eval_spec(ready.spec, loop.config, ready.tree, result)
                self.handle = await host.executor.prepare(spec, self.placement.node)
                if self.cancel_requested:
                    await self.handle.cancel()
                evaluation = await self._phase(self.handle, free_after=True)
            self.free()
            await _after(before)  # verdicts of one slot are written in the order their runs started
            await record(
                host.store,
                host.logs,
                host.settings,
                ready.exp,
                loop,
                result,
                evaluation,
                stopping=host.stopping,
            )
        except RunDetached:
            log.info("experiment %s: left running; the next start takes it over", self.exp_id)
        except (SandboxError, SpecError, OSError) as exc:
            kind = "container engine" if isinstance(exc, SandboxError) else "sandbox setup"
            m.ENGINE_ERRORS.labels(reason=m.engine_error_reason(exc)).inc()
            log.warning("experiment %s: %s failed: %s", self.exp_id, kind, exc)
            self.free()
            reason = await self._retry(exc, f"{kind}: {exc}")
            if reason is not None:
                await self._fail(reason, "engine")
        except Exception as exc:
            log.exception("experiment %s: unexpected failure", self.exp_id)
            await self._fail(f"internal error: {type(exc).__name__}: {exc}", "internal")
        finally:
            self.free()
            host.attempt_over(self)
            host.logs.close(self.exp_id)  # after the final status is written: followers read it next
            mine.set_result(None)
            if self.taken_over:
                pass  # its slot time began in a previous process: nothing to measure here
            elif result is not None and self.freed_at is not None and result.timings.started is not None:
                overhead = self.freed_at - self.handed_at - self.workload_s
                m.OVERHEAD.labels(loop=loop.name).observe(max(0.0, overhead))

    async def _phase(self, handle: Handle, free_after: bool) -> RunResult:
        """One run; its removal happens in the background, after the slot is free."""

        def output(data: bytes) -> None:
            self.live.write(data)
            faults.point("run.output")

        def exited(timings: Timings) -> None:
            faults.point("run.exited")
            if timings.started is not None and timings.finished is not None:
                self.workload_s += max(0.0, timings.finished - timings.started)
            if free_after:
                self.free()

        try:
            self.opened_at = self.opened_at or time.time()
            result = await handle.start(on_output=output, on_exit=exited)
        except RunDetached:
            raise  # it goes on: nothing to remove
        except BaseException:
            self.host.background(handle.cleanup())
            raise
        self.host.background(handle.cleanup())
        return result

    async def _retry(self, exc: Exception, reason: str) -> str | None:
        """An engine that stopped answering broke this run, not the candidate: queue it again after a
        back-off (doubling each time), up to `engine_retries` times. Returns None when it was queued
        again, else the reason to end it with as `error`. Its container may outlive the outage, so
        it is removed as soon as the engine answers."""
        if not (isinstance(exc, SandboxError) and exc.reason == "unreachable"):
            return reason
        settings, store = self.host.settings, self.host.store
        self.host.engine.leftover(self.exp_id)
        attempts = await store.attempts(self.exp_id)
        if attempts > settings.engine_retries:
            return f"{reason} (gave up after {attempts} attempts)"
        delay = settings.engine_backoff_s * 2 ** max(0, attempts - 1)
        tries = settings.engine_retries + 1
        note = f"{reason} (attempt {attempts} of {tries} failed; queued again, not before {delay:g} s)"
        await transitions.retry(store, self.exp_id, note, time.time() + delay)
        return None

    async def _fail(self, reason: str, failure: str) -> None:
        self.free()
        await transitions.fail(self.host.store, self.exp_id, reason)
        m.EXPERIMENTS.labels(loop=self.loop.name, status=Status.error.value).inc()
        m.FAILURES.labels(loop=self.loop.name, reason=failure).inc()


async def _after(previous: asyncio.Future[None] | None) -> None:
    if previous is not None:
        await asyncio.shield(previous)
