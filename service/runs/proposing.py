"""Keeps loops that carry a proposer supplied with candidates: when and how many proposals run.

A steady loop around one small pass, woken whenever the scheduler's pass ends or a verdict is
written. Proposals never hold an experiment slot or a GPU; they fill only slots that nothing queued
will take (`Scheduler.idle_slots`: free, the last verdict on them written, or only re-measuring,
less the experiments waiting to start),
so a proposer can never starve experiments, and each proposal starts from the best as it is once
the previous verdicts are in. With K spare slots a loop runs up to `parallel` proposals at once
(a wave), less what it already has queued or proposing; at most `RATCHET_PROPOSER_RUNS` run across
all loops. Loops take turns, the one served least recently first.

A loop proposes only while it is active, has a successful baseline, is under `max_experiments`
(proposals in flight count) and before its `deadline`. Its proposals left `queued` by a restart run
first, from the parent they were made for. Stopping a loop cancels its open proposals and kills their
runs; a stopping service puts running proposals back in the queue for the next start.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from .. import proposer_metrics as pm
from ..models import LoopState, LoopView
from ..rules.proposals import idle_reason
from ..settings import Settings
from ..state import proposals
from ..state.proposal_reads import (
    get_proposal,
    proposer_loops,
    queued_everywhere,
    queued_proposals,
    submitted,
)
from ..state.snapshots import SnapshotStore
from ..state.store import Store
from .executor import Executor
from .llm_agent import LlmAgent
from .logs import RunLogs
from .proposal_run import ProposalRun
from .scheduler import Scheduler

__all__ = ["Proposers"]

log = logging.getLogger("ratchet.proposers")


class Proposers:
    def __init__(
        self,
        settings: Settings,
        store: Store,
        snapshots: SnapshotStore,
        executor: Executor,
        logs: RunLogs,
        scheduler: Scheduler,
    ) -> None:
        self.settings = settings
        self.store = store
        self.snapshots = snapshots
        self.executor = executor
        self.logs = logs
        self.scheduler = scheduler
        self.llm = LlmAgent(settings, store)
        self.stopping = False
        self.started = 0
        self._running: dict[str, ProposalRun] = {}
        self._rotation: dict[str, float] = {}
        self._tracked: set[str] = set()  # loops whose metric series exist
        self._wake = asyncio.Event()
        self._lock = asyncio.Lock()
        self._task: asyncio.Task[None] | None = None

    def __repr__(self) -> str:
        return f"<Proposers running={len(self._running)} started={self.started}>"

    # -- lifecycle -------------------------------------------------------------------------------

    async def start(self) -> None:
        """After the scheduler's start (which removed every container a previous process left):
        proposals that process left `running` go back to the queue."""
        requeued = await proposals.requeue_running(self.store)
        if requeued:
            log.info("recovered: %d proposal(s) queued again", len(requeued))
        self.scheduler.listeners.append(self.wake)
        self._task = asyncio.create_task(self._loop(), name="ratchet-proposers")

    async def stop(self) -> None:
        """Running proposals go back to the queue (written first), then their runs are killed."""
        self.stopping = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await proposals.requeue_running(self.store)
        for run in list(self._running.values()):
            await run.kill()
        tasks = [r.task for r in self._running.values() if r.task is not None]
        if tasks:
            await asyncio.wait(tasks, timeout=30)
        await self.llm.close()

    def wake(self) -> None:
        self._wake.set()

    async def _loop(self) -> None:
        # Python 3.11's wait_for can swallow a cancel that arrives as the wake-up does: the flag
        # ends the loop whatever happens to the cancel.
        while not self.stopping:
            self._wake.clear()
            try:
                await self._pass()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("proposer iteration failed; retrying")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=1.0)

    # -- what runs want of it ----------------------------------------------------------------------

    def node(self) -> str:
        nodes = self.scheduler.slots.nodes
        return nodes[0].name if nodes else "local"

    def candidate_queued(self) -> None:
        self.scheduler.wake()

    def proposal_over(self, run: ProposalRun) -> None:
        self._running.pop(run.pid, None)
        pm.PROPOSALS_RUNNING.set(len(self._running))
        self.wake()

    def running(self, loop_id: str | None = None) -> list[str]:
        return [p for p, r in self._running.items() if loop_id is None or r.loop.id == loop_id]

    async def cancel(self, pid: str, reason: str = "cancelled") -> bool:
        """Writes the cancel first, then stops its run."""
        changed = await proposals.cancel(self.store, pid, reason)
        run = self._running.get(pid)
        if run is not None:
            await run.kill()
        return changed

    async def loop_stopped(self, loop_id: str) -> None:
        for pid in await proposals.cancel_open(self.store, loop_id, "loop stopped"):
            run = self._running.get(pid)
            if run is not None:
                await run.kill()

    # -- the pass ----------------------------------------------------------------------------------

    async def _pass(self) -> None:
        async with self._lock:
            if self.stopping:
                return
            for loop_id in {r.loop.id for r in self._running.values()}:
                loop = await self.store.get_loop(loop_id, counts=False)
                if loop is not None and loop.state == LoopState.stopped:
                    await self.loop_stopped(loop_id)  # stopped by a path that did not tell us
            if not self.scheduler.engine.up:
                return
            ids = await proposer_loops(self.store)
            for loop_id in set(ids) - self._tracked:  # their series start at zero
                loop = await self.store.get_loop(loop_id, counts=False)
                if loop is not None:
                    pm.track_proposer(loop.name, _kind(loop))
                    self._tracked.add(loop_id)
            for loop_id in sorted(ids, key=lambda lid: self._rotation.get(lid, 0.0)):
                if await self._fill(loop_id) is None:
                    break

    async def _fill(self, loop_id: str) -> int | None:
        """Starts what the loop should have running now; None when no slot or run is left for
        anyone. A unit of work is at every instant a running proposal, a queued candidate (in the
        database) or a claimed slot, and moves between them across the awaits here: counting
        proposals before the database reads and idle slots both before and after them sees each
        one at least once, so a proposal never takes a slot that queued work will need."""
        mine, running = len(self.running(loop_id)), len(self._running)
        idle = self.scheduler.idle_slots()
        room = self.settings.proposer_runs - running
        if idle - running - self.scheduler.queued_ahead <= 0 or room <= 0:
            return None
        loop = await self.store.get_loop(loop_id)
        if loop is None or loop.config.proposer is None:
            return 0
        taken = await submitted(self.store, loop_id)
        most = self.scheduler.slots.total + 1
        waiting = max(self.scheduler.queued_ahead, await queued_everywhere(self.store, most))
        spare = min(idle, self.scheduler.idle_slots()) - running - waiting
        if spare <= 0:
            return None
        if idle_reason(loop, taken + mine, time.time()) is not None:
            return 0
        n = min(loop.config.proposer.parallel - mine - loop.counts.get("queued", 0), spare, room)
        if loop.config.max_experiments is not None:
            n = min(n, loop.config.max_experiments - taken - mine)
        started = await self._start(loop, max(0, n))
        if started:
            self._rotation[loop_id] = time.monotonic()
        return started

    async def _start(self, loop: LoopView, n: int) -> int:
        """Starts up to `n` proposals of the loop: those a restart left queued first."""
        started = 0
        for pid, parent in await queued_proposals(self.store, loop.id):
            if started >= n:
                return started
            if await proposals.start(self.store, pid):
                view = await get_proposal(self.store, pid)
                assert view is not None
                start = parent or _start_point(loop)
                self._launch(ProposalRun(self, pid, view.number, view.attempts, loop, start))
                started += 1
        while started < n:
            parent = _start_point(loop)
            pid, number = await proposals.open_proposal(self.store, loop.id, _kind(loop), parent)
            self._launch(ProposalRun(self, pid, number, 1, loop, parent))
            started += 1
        return started

    def _launch(self, run: ProposalRun) -> None:
        self._running[run.pid] = run
        self.started += 1
        pm.PROPOSALS_RUNNING.set(len(self._running))
        run.begin()


def _start_point(loop: LoopView) -> str:
    """The snapshot a new proposal starts from: the best so far, or the baseline (`start_from`)."""
    proposer = loop.config.proposer
    if proposer is not None and proposer.start_from == "baseline":
        return loop.root_snapshot
    return loop.best_snapshot or loop.root_snapshot


def _kind(loop: LoopView) -> str:
    proposer = loop.config.proposer
    return str(proposer.__struct_config__.tag) if proposer is not None else "none"

