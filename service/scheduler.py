"""Dispatches queued experiments onto slots and sees each one through the sandbox.

A steady loop around one small iteration: fill every free slot (round-robin across loops, FIFO
within a loop), then sleep until something changes. docker-py blocks, so every run lives in a
worker thread; the event loop only ever awaits it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path

import msgspec

from sandbox import (
    LABEL_SANDBOX,
    FileEntry,
    Limits,
    Mount,
    PreparedRun,
    RunResult,
    RunSpec,
    Sandbox,
    SandboxError,
    SpecError,
)
from sandbox.options import WORKSPACE_DIR

from . import faults, transitions
from . import metrics as m
from .decisions import Outcome
from .evaluate import EVAL_SEPARATOR, TRAIN_OUTPUT, eval_tree, prefixed
from .extract import Extracted, extract_metrics, implausible
from .gpus import GpuPool
from .livelog import LiveLog
from .models import ExperimentView, LoopConfig, LoopView, Status
from .patches import is_editable
from .settings import Settings
from .snapshots import SnapshotStore, decode_manifest
from .store import Store

__all__ = ["Scheduler"]

log = logging.getLogger("ratchet.scheduler")

LIVE_LOG_BYTES = 1024 * 1024  # newest output of each running experiment kept for followers


class _Slot(msgspec.Struct, kw_only=True):
    exp_id: str
    loop_name: str
    gpus: list[str]
    handed_at: float
    task: asyncio.Task[None] | None = None
    run: PreparedRun | None = None
    cancel_requested: bool = False
    live: LiveLog  # its output as it arrives, for followers


class Scheduler:
    def __init__(
        self, settings: Settings, store: Store, snapshots: SnapshotStore, sandbox: Sandbox, gpus: list[str]
    ) -> None:
        self.settings = settings
        self.store = store
        self.snapshots = snapshots
        self.sandbox = sandbox
        self.pool = GpuPool(gpus)
        if settings.slots is not None:
            self.slots = settings.slots
        else:
            self.slots = max(1, len(gpus) // settings.gpus_per_slot) if gpus else 1
        self.logs_dir = Path(settings.data_dir) / "logs"
        self.logs_dir.mkdir(parents=True, exist_ok=True)
        self._running: dict[str, _Slot] = {}
        self._wake = asyncio.Event()
        self._rotation: dict[str, float] = {}  # loop id -> last dispatch, for round-robin
        self._remeasures: set[str] = set()  # idle-time runs of a best: first to give a slot back
        self._task: asyncio.Task[None] | None = None
        # Runs block a thread each for their whole duration: they get threads of their own so
        # they never starve the default pool that serves the API's short blocking calls.
        self._threads = ThreadPoolExecutor(max_workers=self.slots + 2, thread_name_prefix="ratchet-run")
        self._stopping = False
        self._slots_changed = asyncio.Event()  # replaced on every set: each waiter sees one change
        self.streams_ending = False
        self.dispatched = 0
        self._engine_up = True
        self._leftovers: list[dict[str, str]] = []  # labels of containers to remove once the engine answers
        m.SLOTS_TOTAL.set(self.slots)
        m.SLOTS_BUSY.set(0)

    def __repr__(self) -> str:
        return f"<Scheduler slots={self.slots} busy={len(self._running)} dispatched={self.dispatched}>"

    # -- lifecycle -------------------------------------------------------------------------------

    async def start(self) -> None:
        await self.recover()
        await self.publish_bests()
        self._task = asyncio.create_task(self._loop(), name="ratchet-scheduler")

    async def stop(self) -> None:
        """Kills running containers and puts their experiments back in the queue for the next start."""
        self._stopping = True
        self.end_streams()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        for slot in list(self._running.values()):
            slot.cancel_requested = True
            if slot.run is not None:
                await asyncio.to_thread(slot.run.cancel)
        tasks = [s.task for s in self._running.values() if s.task is not None]
        if tasks:
            await asyncio.wait(tasks, timeout=30)
        self._threads.shutdown(wait=False, cancel_futures=True)

    async def recover(self) -> None:
        """Experiments left `running` by a previous process: remove every container and volume that
        process made (they carry this data dir's instance label), then queue those experiments again."""
        running = await self.store.running_ids()
        try:
            removed = await asyncio.to_thread(
                self.sandbox.remove_labelled, {LABEL_SANDBOX: self.sandbox.instance}
            )
        except SandboxError as exc:
            log.warning("recover: could not clean up the previous run's containers: %s", exc)
            self._leftovers.append({LABEL_SANDBOX: self.sandbox.instance})  # before anything runs
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
            try:
                await self._iteration()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("scheduler iteration failed; retrying")
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=1.0)

    # -- dispatch --------------------------------------------------------------------------------

    async def _iteration(self) -> None:
        depths = await self.store.queue_depths()
        for name, depth in depths.items():
            m.track_loop(name)
            m.QUEUE_DEPTH.labels(loop=name).set(depth)
        engine_checked = False
        while len(self._running) < self.slots and not self._stopping:
            heads = await self.store.queue_heads()
            if heads and not engine_checked:
                if not await self._engine_ready():
                    return
                engine_checked = True
            heads.sort(key=lambda h: self._rotation.get(h[0], 0.0))
            started = False
            for loop_id, exp_id in heads:
                if len(self._running) >= self.slots:
                    break
                started |= await self._dispatch(loop_id, exp_id)
            if not started:
                break
        if self._stopping:
            return
        if len(self._running) < self.slots:
            await self._remeasure_when_idle()
        else:
            await self._preempt_remeasure()

    async def _remeasure_when_idle(self) -> None:
        """A slot with nothing to run re-measures a loop's best (noise-aware loops), so the best
        so far is the mean of many runs rather than one lucky draw."""
        if not self._engine_up:
            return
        for loop_id in await self.store.loops_with_best():
            while len(self._running) < self.slots:
                exp_id = await transitions.queue_remeasure(self.store, loop_id)
                if exp_id is None:
                    break
                self._remeasures.add(exp_id)
                if not await self._dispatch(loop_id, exp_id):
                    self._remeasures.discard(exp_id)
                    await transitions.cancel(self.store, exp_id, "no slot was free for re-measuring")
                    break

    async def _preempt_remeasure(self) -> None:
        """Re-measuring only uses idle time: queued work takes the slot back from it."""
        victim = next(
            (s for s in self._running.values() if s.exp_id in self._remeasures and not s.cancel_requested),
            None,
        )
        if victim is not None and await self.store.queue_heads():
            log.info("re-measure %s gives its slot to queued work", victim.exp_id)
            await self.cancel(victim.exp_id, "preempted: queued work needed the slot")

    async def _engine_ready(self) -> bool:
        """Nothing is dispatched while the engine does not answer a ping: a run started now could
        only fail, and the queue would drain into `error`. Containers that an outage left behind
        are removed before anything new starts."""
        up = await asyncio.to_thread(self.sandbox.ping)
        if up != self._engine_up:
            self._engine_up = up
            if up:
                log.info("the container engine answers again: dispatch resumes")
            else:
                log.warning("the container engine does not answer: dispatch paused")
        return up and await self._remove_leftovers()

    async def _remove_leftovers(self) -> bool:
        pending, self._leftovers = self._leftovers, []
        for labels in pending:
            try:
                removed = await asyncio.to_thread(self.sandbox.remove_labelled, labels)
            except SandboxError as exc:
                log.warning("could not remove containers left by an engine failure: %s", exc)
                self._leftovers.append(labels)
            else:
                if removed:
                    log.info("removed %d container(s)/volume(s) left by an engine failure", removed)
        return not self._leftovers

    async def _dispatch(self, loop_id: str, exp_id: str) -> bool:
        loop = await self.store.get_loop(loop_id, counts=False)
        exp = await self.store.get_experiment(exp_id, with_tail=False)
        if loop is None or exp is None:
            return False
        gpus = self.pool.allocate(loop.config.resources.gpus)
        if gpus is None:
            return False  # not enough free GPUs for this loop now; others may still fit
        if not await transitions.start(self.store, exp_id, gpus):
            self.pool.release(gpus)
            return False
        self._rotation[loop_id] = time.monotonic()
        live = LiveLog(asyncio.get_running_loop(), LIVE_LOG_BYTES)
        slot = _Slot(exp_id=exp_id, loop_name=loop.name, gpus=gpus, handed_at=time.time(), live=live)
        self._running[exp_id] = slot
        self._announce()
        self.dispatched += 1
        m.SLOTS_BUSY.set(len(self._running))
        m.RUNNING.set(len(self._running))
        m.QUEUE_WAIT.labels(loop=loop.name).observe(max(0.0, slot.handed_at - exp.created_at))
        slot.task = asyncio.create_task(self._run(slot, exp, loop), name=f"experiment-{exp_id}")
        return True

    # -- one experiment --------------------------------------------------------------------------

    async def _run(self, slot: _Slot, exp: ExperimentView, loop: LoopView) -> None:
        result: RunResult | None = None
        try:
            faults.point("run.preparing")
            spec, tree = await self._spec(exp, loop, slot.gpus)
            result = await self._sandbox_run(slot, spec)
            evaluation: RunResult | None = None
            if loop.config.evaluate is not None and _succeeded(result) and not slot.cancel_requested:
                slot.live.write(f"\n{EVAL_SEPARATOR}\n".encode())
                eval_spec = self._eval_spec(spec, loop.config, tree, result)
                evaluation = await self._sandbox_run(slot, eval_spec)
            await self._record(slot, exp, loop, result, evaluation)
        except (SandboxError, SpecError, OSError) as exc:
            kind = "container engine" if isinstance(exc, SandboxError) else "sandbox setup"
            m.ENGINE_ERRORS.labels(reason=m.engine_error_reason(exc)).inc()
            log.warning("experiment %s: %s failed: %s", exp.id, kind, exc)
            reason = await self._retry(exp.id, exc, f"{kind}: {exc}")
            if reason is not None:
                await transitions.fail(self.store, exp.id, reason)
                m.EXPERIMENTS.labels(loop=loop.name, status=Status.error.value).inc()
                m.FAILURES.labels(loop=loop.name, reason="engine").inc()
        except Exception as exc:
            log.exception("experiment %s: unexpected failure", exp.id)
            await transitions.fail(self.store, exp.id, f"internal error: {type(exc).__name__}: {exc}")
            m.EXPERIMENTS.labels(loop=loop.name, status=Status.error.value).inc()
            m.FAILURES.labels(loop=loop.name, reason="internal").inc()
        finally:
            self.pool.release(slot.gpus)
            del self._running[slot.exp_id]
            self._remeasures.discard(slot.exp_id)
            slot.live.close()  # after the final status is written: followers read it next
            self._announce()
            m.SLOTS_BUSY.set(len(self._running))
            m.RUNNING.set(len(self._running))
            if result is not None and result.timings.started and result.timings.finished:
                before = result.timings.started - slot.handed_at
                after = time.time() - result.timings.finished
                m.OVERHEAD.labels(loop=slot.loop_name).observe(max(0.0, before) + max(0.0, after))
            self.wake()

    async def _retry(self, exp_id: str, exc: Exception, reason: str) -> str | None:
        """An engine that stopped answering broke this run, not the candidate: queue it again after a
        back-off (doubling each time), up to `engine_retries` times. Returns None when it was queued
        again, else the reason to end it with as `error`. Its container may outlive the outage, so
        it is removed as soon as the engine answers."""
        if not (isinstance(exc, SandboxError) and exc.reason == "unreachable"):
            return reason
        self._leftovers.append({LABEL_SANDBOX: self.sandbox.instance, "ratchet.experiment": exp_id})
        attempts = await self.store.attempts(exp_id)
        if attempts > self.settings.engine_retries:
            return f"{reason} (gave up after {attempts} attempts)"
        delay = self.settings.engine_backoff_s * 2 ** max(0, attempts - 1)
        tries = self.settings.engine_retries + 1
        note = f"{reason} (attempt {attempts} of {tries} failed; queued again, not before {delay:g} s)"
        await transitions.retry(self.store, exp_id, note, time.time() + delay)
        return None

    async def _sandbox_run(self, slot: _Slot, spec: RunSpec) -> RunResult:
        run = partial(
            self.sandbox.run,
            spec,
            on_start=lambda run: self._attach(slot, run),
            on_output=slot.live.write,
        )
        return await asyncio.get_running_loop().run_in_executor(self._threads, run)

    def _attach(self, slot: _Slot, run: PreparedRun) -> None:
        slot.run = run
        faults.point("run.prepared")
        if slot.cancel_requested:
            run.cancel()

    async def _spec(
        self, exp: ExperimentView, loop: LoopView, gpus: list[str]
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
                "ratchet.instance": self.sandbox.instance,
                "ratchet.attempt": str(exp.attempts + 1),  # `exp` was read just before its start
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
        slot: _Slot,
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
        """Writes the cancel first, then kills the container if the experiment holds a slot."""
        running_repeats = await self.store.repeat_ids(exp_id, ["running"])
        changed = await transitions.cancel(self.store, exp_id, reason)
        for repeat in running_repeats if changed else []:
            await transitions.cancel(self.store, repeat, f"its candidate was cancelled: {reason}")
        for victim in [exp_id, *running_repeats]:
            slot = self._running.get(victim)
            if slot is not None:
                slot.cancel_requested = True
                if slot.run is not None:
                    await asyncio.to_thread(slot.run.cancel)
        self.wake()
        return changed

    async def kill(self, exp_ids: list[str]) -> None:
        for exp_id in exp_ids:
            await self.cancel(exp_id, "loop stopped")

    @property
    def busy(self) -> int:
        return len(self._running)

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
