"""Dispatches queued experiments onto slots and sees each one through an executor.

A steady loop around one small pass: fill every free slot in dispatch order (the store's queue
order per loop, round-robin across loops), then prepare the experiments that come next behind
their gates, so each one's workload starts the moment a slot frees. Only the gate opening sits on
the critical path: when a workload ends its slot goes at once to the next prepared run, while
outputs are collected, the log written, the verdict recorded and the container removed behind it.

A prepared run is only a head start, never a claim. It stays `queued` in the database and holds
no slot and no GPU: it is bound to GPU ids (those of the slot expected to run it, whose current
experiment holds them), and it runs only if it is still first in dispatch order when a slot frees
and those ids are free then. Otherwise (cancelled, loop paused or stopped, overtaken, ids taken)
it is removed, like everything no longer among the next in line.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

import msgspec

from sandbox import (
    FileEntry,
    Limits,
    Mount,
    RunResult,
    RunSpec,
    Sandbox,
    SandboxError,
    SpecError,
    Timings,
)
from sandbox.options import WORKSPACE_DIR

from .. import faults
from .. import metrics as m
from ..models import ExperimentView, LoopConfig, LoopView, Status
from ..rules.decisions import Outcome
from ..rules.evaluate import EVAL_SEPARATOR, TRAIN_OUTPUT, eval_tree, prefixed
from ..rules.extract import Extracted, extract_metrics, implausible
from ..rules.patches import is_editable
from ..settings import Settings
from ..state import enqueue, transitions
from ..state.snapshots import SnapshotStore, decode_manifest
from ..state.store import Store
from .executor import Executor, Handle, LocalExecutor
from .gpus import GpuPool
from .livelog import LiveLog

__all__ = ["Scheduler", "dispatch_order"]

log = logging.getLogger("ratchet.scheduler")

LIVE_LOG_BYTES = 1024 * 1024  # newest output of each running experiment kept for followers


def dispatch_order(queued: list[tuple[str, str]], rotation: dict[str, float]) -> list[tuple[str, str]]:
    """The order experiments will get slots in: each loop's own order (as `queued` lists them,
    loop by loop), interleaved round-robin, the loop served least recently first."""
    per_loop: dict[str, list[str]] = {}
    for loop_id, exp_id in queued:
        per_loop.setdefault(loop_id, []).append(exp_id)
    loops = sorted(per_loop, key=lambda lid: rotation.get(lid, 0.0))
    order: list[tuple[str, str]] = []
    for place in range(max((len(v) for v in per_loop.values()), default=0)):
        order += [(lid, per_loop[lid][place]) for lid in loops if place < len(per_loop[lid])]
    return order


class _Prepared(msgspec.Struct, kw_only=True):
    handle: Handle
    spec: RunSpec
    tree: dict[str, bytes]
    exp: ExperimentView
    loop: LoopView


class _Staged(msgspec.Struct, kw_only=True):
    """A queued experiment being prepared (or prepared) ahead of its turn."""

    exp_id: str
    loop_id: str
    gpus: list[str]  # the ids it was made for; it runs only on exactly these
    task: asyncio.Task[_Prepared]


class _Slot(msgspec.Struct, kw_only=True):
    index: int
    exp_id: str | None = None  # the experiment whose workload holds it
    freed_at: float = 0.0
    recorded: asyncio.Future[None] | None = None  # the last occupant's verdict is written


class _Running(msgspec.Struct, kw_only=True):
    """An experiment from dispatch until its verdict is written (its slot frees earlier)."""

    exp_id: str
    loop_name: str
    slot: _Slot
    gpus: list[str]
    handed_at: float  # when the slot became this experiment's: freed by the previous one, or later
    live: LiveLog  # its output as it arrives, for followers
    task: asyncio.Task[None] | None = None
    handle: Handle | None = None
    cancel_requested: bool = False
    freed_at: float | None = None
    workload_s: float = 0.0


class Scheduler:
    def __init__(
        self,
        settings: Settings,
        store: Store,
        snapshots: SnapshotStore,
        sandbox: Sandbox,
        gpus: list[str],
        executor: Executor | None = None,
    ) -> None:
        self.settings = settings
        self.store = store
        self.snapshots = snapshots
        self.instance = sandbox.instance
        self.pool = GpuPool(gpus)
        if settings.slots is not None:
            self.slots = settings.slots
        else:
            self.slots = max(1, len(gpus) // settings.gpus_per_slot) if gpus else 1
        self.lookahead = self.slots * settings.prepare_ahead
        threads = self.slots + self.lookahead + 4  # one per running workload, prepare, and spare
        self.executor: Executor = executor or LocalExecutor(sandbox, threads)
        self.logs_dir = Path(settings.data_dir) / "logs"
        self.logs_dir.mkdir(parents=True, exist_ok=True)
        self._slots = [_Slot(index=i) for i in range(self.slots)]
        self._running: dict[str, _Running] = {}
        self._staged: dict[str, _Staged] = {}
        self._seen: dict[str, float] = {}  # exp id -> when it first showed up in dispatch order
        self._cleanups: set[asyncio.Task[None]] = set()
        self._pass_lock = asyncio.Lock()
        self._wake = asyncio.Event()
        self._rotation: dict[str, float] = {}  # loop id -> last dispatch, for round-robin
        self._remeasures: set[str] = set()  # idle-time runs of a best: first to give a slot back
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        self._slots_changed = asyncio.Event()  # replaced on every set: each waiter sees one change
        self.streams_ending = False
        self.dispatched = 0
        self._engine_up = True
        # runs to remove once the engine answers again: (instance, experiment or None for all)
        self._leftovers: list[tuple[str, str | None]] = []
        self.prepared_hits = 0  # dispatches that found their run already prepared
        m.SLOTS_TOTAL.set(self.slots)
        m.SLOTS_BUSY.set(0)

    def __repr__(self) -> str:
        return (
            f"<Scheduler slots={self.slots} busy={self.busy} prepared={len(self._staged)}"
            f" dispatched={self.dispatched} prepared_hits={self.prepared_hits}>"
        )

    # -- lifecycle -------------------------------------------------------------------------------

    async def start(self) -> None:
        await self.recover()
        await self.publish_bests()
        self._task = asyncio.create_task(self._loop(), name="ratchet-scheduler")

    async def stop(self) -> None:
        """Removes prepared runs, kills running ones and puts their experiments back in the queue
        for the next start."""
        self._stopping = True
        self.end_streams()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        async with self._pass_lock:
            for exp_id in list(self._staged):
                self._discard(exp_id)
        for run in list(self._running.values()):
            run.cancel_requested = True
            if run.handle is not None:
                await run.handle.cancel()
        tasks = [r.task for r in self._running.values() if r.task is not None]
        if tasks:
            await asyncio.wait(tasks, timeout=30)
        if self._cleanups:
            await asyncio.wait(list(self._cleanups), timeout=30)
        await self.executor.close()

    async def recover(self) -> None:
        """Experiments left `running` by a previous process: remove every container and volume that
        process made, prepared ones included (they carry this data dir's instance label), then
        queue those experiments again."""
        running = await self.store.running_ids()
        try:
            removed = await self.executor.cleanup(self.instance)
        except SandboxError as exc:
            log.warning("recover: could not clean up the previous run's containers: %s", exc)
            self._leftovers.append((self.instance, None))  # before anything runs
            removed = 0
        for exp_id in running:
            await transitions.requeue(self.store, exp_id)
        if running or removed:
            log.info(
                "recovered: %d experiment(s) requeued, %d container(s)/volume(s) removed",
                len(running),
                removed,
            )

    async def publish_bests(self) -> None:
        """Gauges live only in this process: a restarted service rebuilds the best metrics from the
        database (oldest loop first, so a reused name shows its newest loop)."""
        for name, metric, best in await self.store.best_metrics():
            m.BEST_METRIC.labels(loop=name, metric=metric).set(best)

    def wake(self) -> None:
        self._wake.set()

    async def _loop(self) -> None:
        while True:
            self._wake.clear()  # before the pass: a wake-up during it is never lost
            try:
                await self._iteration()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("scheduler iteration failed; retrying")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=1.0)

    # -- dispatch --------------------------------------------------------------------------------

    async def _iteration(self) -> None:
        await self._pass()

    async def _publish_depths(self) -> None:
        for name, depth in (await self.store.queue_depths()).items():
            m.track_loop(name)
            m.QUEUE_DEPTH.labels(loop=name).set(depth)

    async def _remeasure_when_idle(self) -> None:
        """A slot with nothing to run re-measures a loop's best (noise-aware loops), so the best
        so far is the mean of many runs rather than one lucky draw."""
        if not self._engine_up:
            return
        for loop_id, config in await self.store.loops_with_best():
            if enqueue.rule_of(config).remeasure_runs <= 1:
                continue  # never re-measured: no write transaction on every idle pass for it
            while free := [s for s in self._slots if s.exp_id is None]:
                exp_id = await enqueue.queue_remeasure(self.store, loop_id)
                if exp_id is None:
                    break
                self._remeasures.add(exp_id)
                if not await self._dispatch(loop_id, exp_id, free[0]):
                    self._remeasures.discard(exp_id)
                    await transitions.cancel(self.store, exp_id, "no slot was free for re-measuring")
                    break

    async def _preempt_remeasure(self) -> None:
        """Re-measuring only uses idle time: queued work takes the slot back from it."""
        victim = next(
            (r for r in self._running.values() if r.exp_id in self._remeasures and not r.cancel_requested),
            None,
        )
        if victim is not None:
            log.info("re-measure %s gives its slot to queued work", victim.exp_id)
            self._background(self.cancel(victim.exp_id, "preempted: queued work needed the slot"))

    async def _engine_ready(self) -> bool:
        """Nothing is dispatched while the engine does not answer a ping: a run started now could
        only fail, and the queue would drain into `error`. Containers that an outage left behind
        are removed before anything new starts."""
        up = await self.executor.ping()
        if up != self._engine_up:
            self._engine_up = up
            if up:
                log.info("the container engine answers again: dispatch resumes")
            else:
                log.warning("the container engine does not answer: dispatch paused")
        if not up:
            # Prepared runs hold connections to the engine that went away: make them again later.
            for exp_id in list(self._staged):
                self._leftovers.append((self.instance, exp_id))
                self._discard(exp_id)
        return up and await self._remove_leftovers()

    async def _remove_leftovers(self) -> bool:
        pending, self._leftovers = self._leftovers, []
        for instance, experiment in pending:
            try:
                removed = await self.executor.cleanup(instance, experiment)
            except SandboxError as exc:
                log.warning("could not remove containers left by an engine failure: %s", exc)
                self._leftovers.append((instance, experiment))
            else:
                if removed:
                    log.info("removed %d container(s)/volume(s) left by an engine failure", removed)
        return not self._leftovers

    async def _pass(self) -> None:
        """Fill the free slots in dispatch order, then prepare what comes next."""
        async with self._pass_lock:
            if self._stopping:
                return
            order = await self._order()
            if order and not await self._engine_ready():
                await self._publish_depths()
                return
            blocked: set[str] = set()  # loops whose next experiment cannot get its GPUs now
            for loop_id, exp_id in order:
                free = [s for s in self._slots if s.exp_id is None]
                if not free:
                    break
                if loop_id in blocked:
                    continue  # FIFO within a loop: nothing of it overtakes its own head
                started = await self._dispatch(loop_id, exp_id, free[0])
                if started is None:
                    blocked.add(loop_id)
            if any(s.exp_id is None for s in self._slots):
                await self._remeasure_when_idle()
            elif any(exp_id not in self._running for _, exp_id in order):
                await self._preempt_remeasure()
            await self._publish_depths()  # every pass may have started something
            await self._prepare_ahead()

    async def _order(self) -> list[tuple[str, str]]:
        queued = await self.store.queue_heads(depth=max(1, self.slots + self.lookahead))
        order = [item for item in dispatch_order(queued, self._rotation) if item[1] not in self._running]
        now = time.time()
        self._seen = {exp_id: self._seen.get(exp_id, now) for _, exp_id in order}
        return order

    async def _dispatch(self, loop_id: str, exp_id: str, slot: _Slot) -> bool | None:
        """Give `slot` to `exp_id`: True when it started, False when it could not (already cancelled),
        None when its GPUs are not free now."""
        loop = await self.store.get_loop(loop_id, counts=False)
        if loop is None:
            return False
        staged = self._staged.get(exp_id)
        gpus = self.pool.take(staged.gpus) if staged is not None else None
        if gpus is None:
            gpus = self.pool.allocate(loop.config.resources.gpus)
            if gpus is None:
                return None  # it waits, prepared or not, for GPUs to free
            self._discard(exp_id)  # made for GPUs that are not free: start from scratch
            staged = None
        self._staged.pop(exp_id, None)
        if not await transitions.start(self.store, exp_id, gpus):
            self.pool.release(gpus)
            self._forget(staged)
            return False
        now = time.time()
        self._rotation[loop_id] = time.monotonic()
        live = LiveLog(asyncio.get_running_loop(), LIVE_LOG_BYTES)
        handed = max(slot.freed_at, self._seen.pop(exp_id, now))
        run = _Running(exp_id=exp_id, loop_name=loop.name, slot=slot, gpus=gpus, handed_at=handed, live=live)
        slot.exp_id = exp_id
        self._running[exp_id] = run
        self._announce()
        self.dispatched += 1
        self.prepared_hits += staged is not None
        self._busy_changed()
        prepared = staged.task if staged is not None else None
        run.task = asyncio.create_task(self._run(run, loop, prepared), name=f"experiment-{exp_id}")
        return True

    async def _prepare_ahead(self) -> None:
        """Prepare the next `lookahead` experiments in dispatch order; remove any prepared run that
        is no longer among them (cancelled, paused, stopped, overtaken)."""
        if self._stopping:
            return
        order = await self._order() if self.lookahead else []
        wanted = order[: self.lookahead]
        wanted_ids = {exp_id for _, exp_id in wanted}
        for exp_id in [e for e in self._staged if e not in wanted_ids]:
            self._discard(exp_id)
        # Runs that hold a slot get the engine first: each one whose own prepare is done makes
        # room for the next ones (its prepare's end starts a new pass).
        ready = sum(1 for r in self._running.values() if r.handle is not None and r.freed_at is None)
        budget = min(self.lookahead, ready * self.settings.prepare_ahead)
        promised = {g for st in self._staged.values() for g in st.gpus}
        for loop_id, exp_id in wanted:
            if len(self._staged) >= budget:
                break
            if exp_id in self._staged:
                continue
            loop = await self.store.get_loop(loop_id, counts=False)
            if loop is None:
                continue
            gpus = self._bindable(loop.config.resources.gpus, promised)
            if gpus is None:
                continue
            promised |= set(gpus)
            task = asyncio.create_task(
                self._prepare(exp_id, loop, gpus, ahead=True), name=f"prepare-{exp_id}"
            )
            self._staged[exp_id] = _Staged(exp_id=exp_id, loop_id=loop_id, gpus=gpus, task=task)

    def _bindable(self, n: int, promised: set[str]) -> list[str] | None:
        """GPU ids a run prepared now should be made for: those of one slot whose current
        experiment will hand them over (nobody else's promise), else free ones; None if none fit."""
        if n == 0:
            return []
        for run in self._running.values():
            if run.freed_at is None and len(run.gpus) >= n and not promised & set(run.gpus):
                return run.gpus[:n]
        free = [g for g in self.pool.free_ids if g not in promised]
        return free[:n] if len(free) >= n else None

    def _discard(self, exp_id: str) -> None:
        self._forget(self._staged.pop(exp_id, None))

    def _forget(self, staged: _Staged | None) -> None:
        """A prepared run that will not run: stop preparing it and remove what it made."""
        if staged is None:
            return
        if not staged.task.done():
            staged.task.cancel()  # the executor removes whatever the prepare still makes
            return
        if staged.task.cancelled() or staged.task.exception() is not None:
            return
        self._background(staged.task.result().handle.cleanup())

    def _background(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(coro)
        self._cleanups.add(task)
        task.add_done_callback(self._background_done)

    def _background_done(self, task: asyncio.Task[None]) -> None:
        self._cleanups.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("background step failed", exc_info=task.exception())

    async def _prepare(self, exp_id: str, loop: LoopView, gpus: list[str], ahead: bool = False) -> _Prepared:
        """`ahead`: made before the experiment's start, which will count one more attempt."""
        exp = await self.store.get_experiment(exp_id, with_tail=False)
        if exp is None:
            raise OSError(f"experiment {exp_id} vanished from the database")
        spec, tree = await self._spec(exp, loop, gpus, attempt=exp.attempts + ahead)
        handle = await self.executor.prepare(spec)
        return _Prepared(handle=handle, spec=spec, tree=tree, exp=exp, loop=loop)

    # -- one experiment --------------------------------------------------------------------------

    async def _run(self, run: _Running, loop: LoopView, prepared: asyncio.Task[_Prepared] | None) -> None:
        slot = run.slot
        mine: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        before, slot.recorded = slot.recorded, mine
        result: RunResult | None = None
        try:
            faults.point("run.preparing")
            ready = await (prepared if prepared is not None else self._prepare(run.exp_id, loop, run.gpus))
            run.handle = ready.handle
            faults.point("run.prepared")
            # This run now makes room for the next prepares (the pass runs once the gate is asked
            # to open: nothing here yields before that).
            self._background(self._pass())
            m.QUEUE_WAIT.labels(loop=loop.name).observe(max(0.0, run.handed_at - ready.exp.created_at))
            if run.cancel_requested:
                await ready.handle.cancel()
            has_eval = loop.config.evaluate is not None
            result = await self._phase(run, ready.handle, free_after=not has_eval)
            evaluation: RunResult | None = None
            if has_eval and _succeeded(result) and not run.cancel_requested:
                run.live.write(f"\n{EVAL_SEPARATOR}\n".encode())
                eval_spec = self._eval_spec(ready.spec, loop.config, ready.tree, result)
                run.handle = await self.executor.prepare(eval_spec)
                if run.cancel_requested:
                    await run.handle.cancel()
                evaluation = await self._phase(run, run.handle, free_after=True)
            self._free(run)
            await _after(before)  # verdicts of one slot are written in the order their runs started
            await self._record(run, ready.exp, loop, result, evaluation)
        except (SandboxError, SpecError, OSError) as exc:
            kind = "container engine" if isinstance(exc, SandboxError) else "sandbox setup"
            m.ENGINE_ERRORS.labels(reason=m.engine_error_reason(exc)).inc()
            log.warning("experiment %s: %s failed: %s", run.exp_id, kind, exc)
            self._free(run)
            reason = await self._retry(run.exp_id, exc, f"{kind}: {exc}")
            if reason is not None:
                await self._fail(run, reason, "engine")
        except Exception as exc:
            log.exception("experiment %s: unexpected failure", run.exp_id)
            await self._fail(run, f"internal error: {type(exc).__name__}: {exc}", "internal")
        finally:
            self._free(run)
            del self._running[run.exp_id]
            self._remeasures.discard(run.exp_id)
            run.live.close()  # after the final status is written: followers read it next
            self._announce()
            mine.set_result(None)
            if result is not None and run.freed_at is not None and result.timings.started is not None:
                overhead = run.freed_at - run.handed_at - run.workload_s
                m.OVERHEAD.labels(loop=run.loop_name).observe(max(0.0, overhead))

    async def _retry(self, exp_id: str, exc: Exception, reason: str) -> str | None:
        """An engine that stopped answering broke this run, not the candidate: queue it again after a
        back-off (doubling each time), up to `engine_retries` times. Returns None when it was queued
        again, else the reason to end it with as `error`. Its container may outlive the outage, so
        it is removed as soon as the engine answers."""
        if not (isinstance(exc, SandboxError) and exc.reason == "unreachable"):
            return reason
        self._leftovers.append((self.instance, exp_id))
        attempts = await self.store.attempts(exp_id)
        if attempts > self.settings.engine_retries:
            return f"{reason} (gave up after {attempts} attempts)"
        delay = self.settings.engine_backoff_s * 2 ** max(0, attempts - 1)
        tries = self.settings.engine_retries + 1
        note = f"{reason} (attempt {attempts} of {tries} failed; queued again, not before {delay:g} s)"
        await transitions.retry(self.store, exp_id, note, time.time() + delay)
        return None

    async def _fail(self, run: _Running, reason: str, failure: str) -> None:
        self._free(run)
        await transitions.fail(self.store, run.exp_id, reason)
        m.EXPERIMENTS.labels(loop=run.loop_name, status=Status.error.value).inc()
        m.FAILURES.labels(loop=run.loop_name, reason=failure).inc()

    async def _phase(self, run: _Running, handle: Handle, free_after: bool) -> RunResult:
        """One container's run; its removal happens in the background, after the slot is free."""

        def exited(timings: Timings) -> None:
            if timings.started is not None and timings.finished is not None:
                run.workload_s += max(0.0, timings.finished - timings.started)
            if free_after:
                self._free(run)

        try:
            return await handle.start(on_output=run.live.write, on_exit=exited)
        finally:
            self._background(handle.cleanup())

    def _free(self, run: _Running) -> None:
        """The workload is over: the slot and its GPUs go to the next experiment now."""
        if run.freed_at is not None:
            return
        run.freed_at = time.time()
        run.slot.exp_id = None
        run.slot.freed_at = run.freed_at
        self.pool.release(run.gpus)
        self._busy_changed()
        if not self._stopping:
            self._background(self._pass())

    def _busy_changed(self) -> None:
        m.SLOTS_BUSY.set(self.busy)
        m.RUNNING.set(self.busy)

    async def _spec(
        self, exp: ExperimentView, loop: LoopView, gpus: list[str], attempt: int
    ) -> tuple[RunSpec, dict[str, bytes]]:
        raw = await self.store.get_manifest(exp.snapshot)
        if raw is None:
            raise OSError(f"snapshot {exp.snapshot} is missing from the database")
        manifest = decode_manifest(raw)
        tree = await asyncio.to_thread(self.snapshots.load_tree, manifest)
        execs = {e.path for e in manifest.files if e.executable}
        cfg: LoopConfig = loop.config
        res = cfg.resources
        files = [
            FileEntry(path=p, data=d, writable=is_editable(p, cfg.editable), executable=p in execs)
            for p, d in tree.items()
        ]
        env = {
            **cfg.env,
            "RATCHET_TIME_BUDGET_S": f"{cfg.time_budget_s:g}",
            "RATCHET_EXPERIMENT_ID": exp.id,
            "RATCHET_LOOP_ID": loop.id,
        }
        if exp.seed is not None:
            env["RATCHET_SEED"] = str(exp.seed)
        spec = RunSpec(
            image=cfg.image or self.settings.default_image,
            argv=list(cfg.command),
            files=files,
            env=env,
            limits=Limits(
                cpus=res.cpus,
                memory_mb=res.memory_mb,
                pids=res.pids,
                disk_mb=res.disk_mb,
                log_bytes=self.settings.log_bytes,
            ),
            gpus=gpus,
            runtime=cfg.runtime or self.settings.runtime,
            timeout_s=cfg.hard_timeout_s,
            labels={
                "ratchet.loop": loop.id,
                "ratchet.experiment": exp.id,
                "ratchet.instance": self.instance,
                "ratchet.attempt": str(attempt),
            },
        )
        return spec, tree

    def _eval_spec(
        self, train: RunSpec, cfg: LoopConfig, tree: dict[str, bytes], result: RunResult
    ) -> RunSpec:
        """The trusted evaluation: the non-editable files (read-only), the training output
        (read-only, under train_output/), the evaluation's own mounts and hard timeout."""
        ev = cfg.evaluate
        assert ev is not None
        files_tree, _ = eval_tree(tree, cfg.editable, result.output_files)
        execs = {f.path for f in train.files if f.executable}
        files = [
            FileEntry(path=p, data=d, writable=False, executable=p in execs) for p, d in files_tree.items()
        ]
        env = {**train.env, "RATCHET_TRAIN_OUTPUT_DIR": f"{WORKSPACE_DIR}/{TRAIN_OUTPUT}"}
        return msgspec.structs.replace(
            train,
            argv=list(ev.command),
            files=files,
            env=env,
            mounts=[Mount(source=m.source, target=m.target) for m in ev.mounts],
            timeout_s=ev.timeout_s,
            labels={**train.labels, "ratchet.phase": "evaluate"},
        )

    async def _record(
        self,
        run: _Running,
        exp: ExperimentView,
        loop: LoopView,
        result: RunResult,
        evaluation: RunResult | None = None,
    ) -> None:
        text = result.log
        if evaluation is not None:
            sep = "" if not text or text.endswith("\n") else "\n"
            text = f"{text}{sep}{EVAL_SEPARATOR}\n{evaluation.log}"
        await asyncio.to_thread(self._write_log, exp.id, text)
        tail = _tail(text, self.settings.log_tail_bytes)
        m.record_run(result)
        if (result.cancelled or (evaluation is not None and evaluation.cancelled)) and self._stopping:
            await transitions.requeue(self.store, exp.id)  # service shutdown: run it again next time
            return
        cfg = loop.config
        trained = extract_metrics(result.log, result.output_files.get("metrics.json"))
        if cfg.evaluate is None:
            judged, phase, source = result, None, trained
            metrics = trained.metrics
            timeout_s = cfg.hard_timeout_s
        elif evaluation is None:  # training failed (or was cancelled): it decides, never its metric
            judged, phase = result, None
            source = Extracted(problem="evaluation did not run")
            metrics = prefixed(trained.metrics)
            timeout_s = cfg.hard_timeout_s
        else:
            judged, phase = evaluation, "evaluation"
            source = extract_metrics(evaluation.log, evaluation.output_files.get("metrics.json"))
            metrics = {**source.metrics, **prefixed(trained.metrics)}
            timeout_s = cfg.evaluate.timeout_s
        value = source.metrics.get(cfg.metric.name)
        problem = source.problem
        spec = cfg.metric
        if value is not None and (why := implausible(spec.name, value, spec.min_value, spec.max_value)):
            value, problem = None, why
        if value is None and problem is None:
            bad = source.non_numeric.get(cfg.metric.name)
            where = "metrics.json" if source.source == "metrics.json" else "summary block"
            problem = (
                f"{cfg.metric.name} in the {where} is {bad}, not a number"
                if bad is not None
                else f"metric {cfg.metric.name!r} missing from the {where}"
            )
        outcome = Outcome(
            exit_code=judged.exit_code,
            oom_killed=judged.oom_killed,
            timed_out=judged.timed_out,
            cancelled=judged.cancelled,
            exit_reported=judged.exit_reported,
            report_forged=judged.report_forged,
            metric=value,
            metric_problem=problem,
            timeout_s=timeout_s,
            memory_mb=cfg.resources.memory_mb,
            phase=phase,
        )
        info = transitions.Finished(
            metrics=metrics,
            memory_gb=_memory_gb(trained.metrics, result),
            workload_seconds=result.workload_seconds,
            log_tail=tail,
        )
        faults.point("decide.before")
        with faults.scope("decide"):
            decision = await transitions.finish(self.store, exp.id, outcome, info)
        faults.point("decide.after")
        status = decision.status if decision else Status.cancelled
        if status != Status.confirming:  # counted once its confirmation runs settle it
            m.EXPERIMENTS.labels(loop=loop.name, status=str(status)).inc()
        if decision is not None and decision.settled is not None:
            m.EXPERIMENTS.labels(loop=loop.name, status=str(decision.settled)).inc()
        if result.workload_seconds is not None:
            m.DURATION.labels(loop=loop.name).observe(result.workload_seconds)
        if decision is not None:
            unparsable = cfg.metric.name in source.non_numeric or cfg.metric.name in source.metrics
            failure = m.failure_reason(outcome, unparsable) if decision.status in m.FAILED else None
            await self._observe_decided(loop, exp.id, failure)
        log.info(
            "experiment %s (%s #%d): %s — %s",
            exp.id,
            loop.name,
            exp.number,
            status,
            decision.reason if decision else "cancelled",
        )

    async def _observe_decided(self, loop: LoopView, exp_id: str, failure: str | None) -> None:
        if failure is not None:
            m.FAILURES.labels(loop=loop.name, reason=failure).inc()
        now = await self.store.get_loop(loop.id, counts=False)  # a new best, or the best's new mean
        if now is not None and now.best_metric is not None:
            m.BEST_METRIC.labels(loop=loop.name, metric=loop.config.metric.name).set(now.best_metric)
        if await self.store.finish_seq(exp_id) == 1:  # the loop's first decided experiment
            m.TIME_TO_FIRST_RESULT.labels(loop=loop.name).observe(max(0.0, time.time() - loop.created_at))

    def _write_log(self, exp_id: str, text: str) -> None:
        path = self.logs_dir / f"{exp_id}.log"
        tmp = path.with_suffix(".tmp")
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)

    # -- control ---------------------------------------------------------------------------------

    async def cancel(self, exp_id: str, reason: str = "cancelled") -> bool:
        """Writes the cancel first, then removes its prepared run or kills its running one (and
        those of its repeat runs, when a confirming candidate is cancelled)."""
        running_repeats = await self.store.repeat_ids(exp_id, ["running"])
        changed = await transitions.cancel(self.store, exp_id, reason)
        for repeat in running_repeats if changed else []:
            await transitions.cancel(self.store, repeat, f"its candidate was cancelled: {reason}")
        for victim in [exp_id, *running_repeats]:
            self._discard(victim)
            run = self._running.get(victim)
            if run is not None:
                run.cancel_requested = True
                if run.handle is not None:
                    await run.handle.cancel()
        self.wake()
        return changed

    async def kill(self, exp_ids: list[str]) -> None:
        for exp_id in exp_ids:
            await self.cancel(exp_id, "loop stopped")

    @property
    def busy(self) -> int:
        """Slots whose experiment's workload has not ended yet."""
        return sum(1 for s in self._slots if s.exp_id is not None)

    @property
    def prepared(self) -> list[str]:
        """Queued experiments prepared (or being prepared) ahead of their turn."""
        return list(self._staged)

    # -- live output -----------------------------------------------------------------------------

    def live_log(self, exp_id: str) -> LiveLog | None:
        """The output of `exp_id` while it holds a slot; None when it is not running here."""
        slot = self._running.get(exp_id)
        return slot.live if slot is not None else None

    async def slots_changed(self, timeout: float) -> None:
        """Returns when an experiment starts or finishes (or `end_streams`), or after `timeout`."""
        changed = self._slots_changed
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(changed.wait(), timeout)

    def _announce(self) -> None:
        self._slots_changed.set()
        self._slots_changed = asyncio.Event()

    def end_streams(self) -> None:
        """The service is stopping: followers of live output end now rather than hold it up."""
        self.streams_ending = True
        for slot in self._running.values():
            slot.live.wake_all()
        self._announce()


async def _after(previous: asyncio.Future[None] | None) -> None:
    if previous is not None:
        await asyncio.shield(previous)


def _succeeded(result: RunResult) -> bool:
    return result.exit_code == 0 and not (result.oom_killed or result.timed_out or result.cancelled)


def _tail(text: str, n: int) -> str:
    data = text.encode("utf-8", errors="replace")[-n:] if n else b""
    return data.decode("utf-8", errors="replace")


def _memory_gb(metrics: dict[str, float], result: RunResult) -> float | None:
    if "peak_vram_mb" in metrics:
        return metrics["peak_vram_mb"] / 1024
    if result.peak_memory_bytes is not None:
        return result.peak_memory_bytes / 1024**3
    return None
