"""A restarted service takes over the runs its previous process left alive instead of running them
again: the container goes on behind its gate, so a run inside its deadline loses nothing.

At start the scheduler asks the executor for those runs (`Executor.reattach`, which removes
everything else that process left). A run is taken over when its experiment is still `running` in
the database, it is that experiment's current attempt (`ratchet.attempt` = `attempts`), it is the
training run (an evaluation run cannot be taken over: the training result it builds on is gone),
and its slot and GPU ids are free here. It then gets an `Attempt` like any run, with no new
transition: the experiment keeps its start and its attempt count, and its one guarded
`running → final` write decides it once. Everything else is cancelled and removed: a prepared-ahead
run (its experiment is still `queued`: it is prepared again when its turn comes), an experiment
cancelled or decided meanwhile, a run of an older attempt. Experiments left `running` without a run
taken over go back to the queue, as before.
"""

from __future__ import annotations

import logging
from typing import Protocol

from ..models import LoopView
from ..settings import Settings
from ..state import transitions
from ..state.store import Store
from .engine import EngineWatch
from .executor import Executor, Handle, SandboxError

__all__ = ["recover", "take_over"]

log = logging.getLogger("ratchet.scheduler")


class Taker(Protocol):
    store: Store
    executor: Executor
    settings: Settings
    engine: EngineWatch

    def resume(self, handle: Handle, exp_id: str, loop: LoopView) -> bool: ...
    def background_cleanup(self, handle: Handle) -> None: ...


async def recover(host: Taker) -> None:
    """Experiments left `running` by a previous process: their runs still alive are taken over
    (with `reattach` off, removed); every other run that process made (they carry this data dir's
    instance label) is removed, and the experiments without a run go back to the queue."""
    running = await host.store.running_ids()
    taken: list[str] = []
    removed = 0
    if not host.settings.reattach:
        removed = await host.engine.recover()
    else:
        try:
            taken = await take_over(host, running)
        except SandboxError as exc:
            log.warning("recover: the engine did not say which runs are alive: %s", exc)
            host.engine.leftover(None)  # every run is removed before anything new starts
    requeued = [exp_id for exp_id in running if exp_id not in taken]
    for exp_id in requeued:
        await transitions.requeue(host.store, exp_id)
    if running or removed:
        log.info("recovered: %d run(s) taken over, %d requeued", len(taken), len(requeued))


async def take_over(host: Taker, running: list[str]) -> list[str]:
    """Takes over the live runs of `running` experiments; returns their ids. Raises SandboxError
    when the executor does not answer (nothing was taken over or removed then)."""
    taken: list[str] = []
    for handle in await host.executor.reattach():
        labels = handle.spec.labels
        exp_id = labels.get("ratchet.experiment", "")
        why = await _refusal(host, handle, exp_id, running)
        if why is None:
            loop = await _loop_of(host.store, exp_id)
            if loop is not None and host.resume(handle, exp_id, loop):
                taken.append(exp_id)
                log.info("experiment %s: its run goes on from before the restart: taken over", exp_id)
                continue
            why = "its slot or GPUs are not free here"
        attempt = labels.get("ratchet.attempt")
        log.info("run of experiment %s (attempt %s) removed, not taken over: %s", exp_id or "?", attempt, why)
        await handle.cancel()
        host.background_cleanup(handle)
    return taken


async def _refusal(host: Taker, handle: Handle, exp_id: str, running: list[str]) -> str | None:
    """Why this run cannot be taken over, or None."""
    if "ratchet.proposal" in handle.spec.labels:
        return "a proposer run: its proposal runs again (proposals are never taken over)"
    if exp_id not in running:
        return "its experiment is not running (prepared ahead, or decided or cancelled meanwhile)"
    if handle.spec.labels.get("ratchet.phase") is not None:
        return f"an {handle.spec.labels['ratchet.phase']} run: the training result it needs is gone"
    attempts = await host.store.attempts(exp_id)
    if handle.spec.labels.get("ratchet.attempt") != str(attempts):
        return f"not the experiment's current attempt ({attempts})"
    return None


async def _loop_of(store: Store, exp_id: str) -> LoopView | None:
    exp = await store.get_experiment(exp_id, with_tail=False)
    return None if exp is None else await store.get_loop(exp.loop_id, counts=False)
