"""From an experiment's finished runs to its verdict: the log file, the judgement (`runspec.judge`),
the one guarded write that decides (`transitions.finish`), then the counters and a log line."""

from __future__ import annotations

import logging
import time

from .. import faults
from .. import metrics as m
from ..models import FAILED, ExperimentView, LoopView, Status
from ..rules.decisions import Decision
from ..settings import Settings
from ..state import transitions
from ..state.store import Store
from . import runspec
from .executor import RunResult
from .logs import RunLogs

__all__ = ["publish_bests", "record"]

log = logging.getLogger("ratchet.scheduler")


async def record(
    store: Store,
    logs: RunLogs,
    settings: Settings,
    exp: ExperimentView,
    loop: LoopView,
    result: RunResult,
    evaluation: RunResult | None,
    *,
    stopping: bool,
) -> None:
    """Writes the log, then the verdict. A run cut short because the service is stopping is queued
    again instead: the next start runs it."""
    text = runspec.combined_log(result, evaluation)
    await logs.save(exp.id, text)
    m.record_run(result)
    if (result.cancelled or (evaluation is not None and evaluation.cancelled)) and stopping:
        await transitions.requeue(store, exp.id)
        return
    judged = runspec.judge(loop.config, result, evaluation, text, settings.log_tail_bytes)
    faults.point("decide.before")
    with faults.scope("decide"):
        decision = await transitions.finish(store, exp.id, judged.outcome, judged.finished)
    faults.point("decide.after")
    await _count(store, loop, exp.id, result, judged, decision)
    log.info(
        "experiment %s (%s #%d): %s — %s",
        exp.id,
        loop.name,
        exp.number,
        decision.status if decision else Status.cancelled,
        decision.reason if decision else "cancelled",
    )


async def _count(
    store: Store,
    loop: LoopView,
    exp_id: str,
    result: RunResult,
    judged: runspec.Judged,
    decision: Decision | None,
) -> None:
    status = decision.status if decision else Status.cancelled
    if status != Status.confirming:  # counted once its confirmation runs settle it
        m.EXPERIMENTS.labels(loop=loop.name, status=str(status)).inc()
    if decision is not None and decision.settled is not None:
        m.EXPERIMENTS.labels(loop=loop.name, status=str(decision.settled)).inc()
    if result.workload_seconds is not None:
        m.DURATION.labels(loop=loop.name).observe(result.workload_seconds)
    if decision is None:
        return
    if decision.status in FAILED:
        m.FAILURES.labels(loop=loop.name, reason=m.failure_reason(judged.outcome, judged.unparsable)).inc()
    now = await store.get_loop(loop.id, counts=False)  # a new best, or the best's new mean
    if now is not None and now.best_metric is not None:
        m.BEST_METRIC.labels(loop=loop.name, metric=loop.config.metric.name).set(now.best_metric)
    if await store.finish_seq(exp_id) == 1:  # the loop's first decided experiment
        m.TIME_TO_FIRST_RESULT.labels(loop=loop.name).observe(max(0.0, time.time() - loop.created_at))


async def publish_bests(store: Store) -> None:
    """Gauges live only in this process: a restarted service rebuilds the best metrics from the
    database (oldest loop first, so a reused name shows its newest loop)."""
    for name, metric, best in await store.best_metrics():
        m.BEST_METRIC.labels(loop=name, metric=metric).set(best)
