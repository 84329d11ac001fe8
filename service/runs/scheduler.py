"""Dispatches queued experiments onto slots and sees each one through an executor: when and where a
run happens. What a run is (its spec, its result judged) is `runspec`'s; its verdict `recording`'s.

A steady loop around one small pass: fill every free slot in dispatch order (the store's queue
order per loop, round-robin across loops), then prepare the experiments that come next behind
their gates, so each one's workload starts the moment a slot frees. Only the gate opening sits on
the critical path: when a workload ends its slot goes at once to the next prepared run, while
outputs are collected, the log written, the verdict recorded and the container removed behind it.

A prepared run is only a head start, never a claim. It stays `queued` in the database and holds
no slot and no GPU: it is bound to a node and GPU ids (those of the slot expected to run it, whose
current experiment holds them), and it runs only if it is still first in dispatch order when a
slot frees and those ids are free then. Otherwise (cancelled, loop paused or stopped, overtaken,
ids taken) it is removed, like everything no longer among the next in line.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Coroutine
from pathlib import Path
from typing import Any, Literal

import msgspec

from .. import metrics as m
from ..models import LoopView, Status
from ..rules.datasets import mounted
from ..settings import Settings
from ..state import enqueue, transitions
from ..state.caches import CacheStore
from ..state.snapshots import SnapshotStore
from ..state.store import Store
from .adoption import recover
from .attempt import Attempt, Prepared, prepare, taken_over
from .engine import EngineWatch
from .executor import Executor, Handle, Node
from .logs import RunLogs
from .recording import publish_bests
from .slots import Placement, Slot, Slots, dispatch_order

__all__ = ["Scheduler", "dispatch_order"]

log = logging.getLogger("ratchet.scheduler")


class _Claim(msgspec.Struct, kw_only=True):
    """A slot and GPU ids held for an experiment whose start is not written yet."""

    exp_id: str
    loop: LoopView
    slot: Slot
    placement: Placement
    staged: _Staged | None  # its run, prepared there ahead of its turn


class _Staged(msgspec.Struct, kw_only=True):
    """A queued experiment being prepared (or prepared) ahead of its turn."""

    exp_id: str
    loop_id: str
    placement: Placement  # where it was made for; it runs only there
    task: asyncio.Task[Prepared]


class Scheduler:
    def __init__(
        self, settings: Settings, store: Store, snapshots: SnapshotStore, executor: Executor, logs: RunLogs
    ) -> None:
        self.settings = settings
        self.store = store
        self.snapshots = snapshots
        self.executor = executor
        self.logs = logs
        self.caches = CacheStore(
            store, Path(settings.data_dir) / "caches", settings.cache_max_mb * 1024 * 1024
        )
        self.slots = Slots([])  # the executor's inventory, from `start`
        self.lookahead = 0
        self.engine = EngineWatch(executor)
        self._running: dict[str, Attempt] = {}
        self._staged: dict[str, _Staged] = {}
        self._seen: dict[str, float] = {}  # exp id -> when it first showed up in dispatch order
        self._cleanups: set[asyncio.Task[None]] = set()
        self._pass_lock = asyncio.Lock()
        self._pass_waiting = False  # a pass asked for by `pass_soon` has not started yet
        self._wake = asyncio.Event()
        self._rotation: dict[str, float] = {}  # loop id -> last dispatch, for round-robin
        self._remeasures: set[str] = set()  # idle-time runs of a best: first to give a slot back
        self._task: asyncio.Task[None] | None = None
        self.queued_ahead = 0  # dispatchable queued experiments the last pass left waiting
        self.listeners: list[Callable[[], None]] = []  # told after each pass and each verdict
        self._follower: asyncio.Task[None] | None = None
        self.stopping = False
        self.dispatched = 0
        self.prepared_hits = 0  # dispatches that found their run already prepared

    def __repr__(self) -> str:
        return (
            f"<Scheduler slots={self.slots.total} busy={self.busy} prepared={len(self._staged)}"
            f" dispatched={self.dispatched} prepared_hits={self.prepared_hits}>"
        )

    # -- lifecycle -------------------------------------------------------------------------------

    async def start(self) -> None:
        self._take_inventory(await self.executor.inventory())
        await recover(self)
        await publish_bests(self.store)
        self._task = asyncio.create_task(self._loop(), name="ratchet-scheduler")
        self._follower = asyncio.create_task(
            _follow(self.executor, self._inventory_changed), name="ratchet-inventory"
        )

    async def stop(self) -> None:
        """Removes prepared runs, kills running ones and puts their experiments back in the queue
        for the next start; with `detach_on_stop`, training runs under way go on instead, and the
        next start takes them over."""
        self.stopping = True
        self.logs.end_streams()
        for task in (self._follower, self._task):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        async with self._pass_lock:
            for exp_id in list(self._staged):
                self._discard(exp_id)
        await _end_runs(list(self._running.values()), self.settings.detach_on_stop)
        tasks = [r.task for r in self._running.values() if r.task is not None]
        if tasks:
            await asyncio.wait(tasks, timeout=30)
        if self._cleanups:
            await asyncio.wait(list(self._cleanups), timeout=30)
        await self.executor.close()

    def resume(self, handle: Handle, exp_id: str, loop: LoopView) -> bool:
        """A run taken over gets the slot and GPU ids it holds, and an attempt; False when they are
        not free here (fewer slots or other GPUs since the restart)."""
        held = Placement(handle.node, tuple(handle.spec.gpus))
        claim = self.slots.claim(len(held.gpus), held)
        if claim is None or not claim[2]:
            if claim is not None:
                self.slots.release(claim[1])
            return False
        claim[0].exp_id = exp_id
        attempt = self._running[exp_id] = Attempt(self, exp_id, loop, claim[0], held, time.time())
        attempt.taken_over = True
        attempt.begin(asyncio.create_task(taken_over(self, handle, exp_id, loop, held)))
        self._busy_changed()
        return True

    def background_cleanup(self, handle: Handle) -> None:
        self.background(handle.cleanup())

    def wake(self) -> None:
        self._wake.set()

    # -- the inventory ---------------------------------------------------------------------------

    async def _inventory_changed(self, nodes: list[Node]) -> None:
        async with self._pass_lock:  # between passes
            self._take_inventory(nodes)

    def _take_inventory(self, nodes: list[Node]) -> None:
        """A node that left loses its slots and GPU ids now, and the runs prepared there (its
        running ones fail in the executor and are retried elsewhere); one that joined takes work
        from the next pass."""
        joined, left = self.slots.update(nodes)
        for exp_id in [e for e, st in self._staged.items() if st.placement.node in left]:
            self._discard(exp_id)
        self.lookahead = self.slots.total * self.settings.prepare_ahead
        m.SLOTS_TOTAL.set(self.slots.total)
        self._busy_changed()
        if self._task is not None and (joined or left):
            now = f"{self.slots.total} on {len(self.slots.nodes)} node(s)"
            log.info("slots: %s; joined: %s; left: %s", now, ",".join(joined) or "-", ",".join(left) or "-")
        self.wake()

    async def _loop(self) -> None:
        while not self.stopping:  # 3.11's wait_for can swallow a cancel that comes with a wake-up
            self._wake.clear()  # before the pass: a wake-up during it is never lost
            try:
                await self._pass()
                await self.engine.watch()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("scheduler iteration failed; retrying")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=1.0)

    # -- the engine ------------------------------------------------------------------------------

    async def _engine_ready(self) -> bool:
        if not await self.engine.ping():
            # Prepared runs hold connections to the engine that went away: make them again later.
            for exp_id in list(self._staged):
                self.engine.leftover(exp_id)
                self._discard(exp_id)
            return False
        return await self.engine.remove_leftovers()

    # -- dispatch --------------------------------------------------------------------------------

    async def _pass(self) -> None:
        """Fill the free slots in dispatch order, then prepare what comes next."""
        async with self._pass_lock:
            self._pass_waiting = False
            if self.stopping:
                return
            order = await self._order()
            if order and not await self._engine_ready():
                await self._publish_depths()
                return
            blocked: set[str] = set()  # loops whose next experiment cannot get its GPUs now
            claims: list[_Claim] = []
            for loop_id, exp_id in order:
                if not self.slots.free():
                    break
                if loop_id in blocked:
                    continue  # FIFO within a loop: nothing of it overtakes its own head
                claim = await self._claim(loop_id, exp_id)
                if claim is None:
                    blocked.add(loop_id)
                elif claim:
                    claims.append(claim)
            await self._launch(claims)
            if self.slots.free():
                await self._remeasure_when_idle()
            elif any(exp_id not in self._running for _, exp_id in order):
                self._preempt_remeasure()
            await self._publish_depths()  # every pass may have started something
            await self._prepare_ahead(waiting := [item for item in order if item[1] not in self._running])
            self.queued_ahead = len(waiting)
            _tell(self.listeners)

    async def _order(self) -> list[tuple[str, str]]:
        """The experiments next in dispatch order: every active loop's head, and enough behind them
        for every slot and every prepared run (`wanted`), were the queue to hold that many."""
        wanted = self.slots.total + self.lookahead
        loops = await self.store.active_loops()
        heads: dict[str, list[str]] = {}
        depth, pending = -(-wanted // max(1, len(loops))), loops
        while pending:
            for loop_id, ok in pending:
                heads[loop_id] = await self.store.queue_head(loop_id, ok, depth)
            # A loop that filled `depth` may hold more: read deeper while the order is short.
            short = depth < wanted and sum(map(len, heads.values())) < wanted
            pending = [(lid, ok) for lid, ok in pending if len(heads[lid]) == depth] if short else []
            depth = min(wanted, 2 * depth)
        queued = [(lid, exp_id) for lid, _ in loops for exp_id in heads[lid]]
        order = [item for item in dispatch_order(queued, self._rotation) if item[1] not in self._running]
        now = time.time()
        self._seen = {exp_id: self._seen.get(exp_id, now) for _, exp_id in order}
        return order

    async def _publish_depths(self) -> None:
        for name, depth in (await self.store.queue_depths()).items():
            m.track_loop(name)
            m.QUEUE_DEPTH.labels(loop=name).set(depth)

    async def _dispatch(self, loop_id: str, exp_id: str) -> bool | None:
        """Give a free slot to `exp_id`: True when it started, False when it could not (already
        cancelled), None when no free slot's node has its GPUs free now."""
        claim = await self._claim(loop_id, exp_id)
        return claim if not claim else bool(await self._launch([claim]))

    async def _claim(self, loop_id: str, exp_id: str) -> _Claim | Literal[False] | None:
        """A free slot and the GPUs for `exp_id`, held for it until `_launch`; False when its loop is
        gone, None when no free slot's node has its GPUs free now."""
        loop = await self.store.get_loop(loop_id, counts=False)
        if loop is None:
            return False
        staged, mounts = self._staged.get(exp_id), mounted(loop.config)
        taken = self.slots.claim(loop.config.resources.gpus, staged.placement if staged else None, mounts)
        if taken is None:
            return None  # it waits, prepared or not, for GPUs to free
        slot, placement, hit = taken
        if not hit:
            self._discard(exp_id)  # made for a place that is not free: start from scratch
            staged = None
        self._staged.pop(exp_id, None)
        slot.exp_id = exp_id
        return _Claim(exp_id=exp_id, loop=loop, slot=slot, placement=placement, staged=staged)

    async def _launch(self, claims: list[_Claim]) -> int:
        """Starts the claimed experiments: their `start` transitions commit together, then each one
        whose transition went through (the rest were cancelled meanwhile) begins its attempt."""
        moves = [(c.exp_id, list(c.placement.gpus), c.placement.node) for c in claims]
        try:
            started = await transitions.start_many(self.store, moves) if moves else []
        except BaseException:
            started = [False] * len(claims)  # nothing was written: give every claim back
            raise
        finally:
            for c, ok in zip(claims, started, strict=True):
                if not ok:
                    c.slot.exp_id = None
                    self.slots.release(c.slot, c.placement)
                    self._forget(c.staged)
        for c, ok in zip(claims, started, strict=True):
            if not ok:
                continue
            self._rotation[c.loop.id] = time.monotonic()
            handed = max(c.slot.freed_at, self._seen.pop(c.exp_id, time.time()))
            attempt = Attempt(self, c.exp_id, c.loop, c.slot, c.placement, handed)
            self._running[c.exp_id] = attempt
            self.dispatched += 1
            self.prepared_hits += c.staged is not None
            attempt.begin(c.staged.task if c.staged is not None else None)
        self._busy_changed()
        return sum(started)

    async def _prepare_ahead(self, order: list[tuple[str, str]]) -> None:
        """Prepare the next `lookahead` experiments in dispatch `order` (what is left of it once
        the free slots are filled); remove any prepared run that is no longer among them
        (cancelled, paused, stopped, overtaken)."""
        if self.stopping:
            return
        wanted = order[: self.lookahead]
        wanted_ids = {exp_id for _, exp_id in wanted}
        for exp_id in [e for e in self._staged if e not in wanted_ids]:
            self._discard(exp_id)
        # Runs that hold a slot get the engine first: each one whose own prepare is done makes
        # room for the next ones (its prepare's end starts a new pass).
        ready = sum(1 for r in self._running.values() if r.handle is not None and r.freed_at is None)
        budget = min(self.lookahead, ready * self.settings.prepare_ahead)
        promised = [st.placement for st in self._staged.values()]
        # Each run prepared is made where a slot should free next (made on another node than the
        # one that frees, it would be made again from scratch there): by budget from gate opening.
        now = time.time()
        working = [r for r in self._running.values() if r.freed_at is None]
        holding = [r.placement for r in sorted(working, key=lambda r: r.expected_end(now))]
        for loop_id, exp_id in wanted:
            if len(self._staged) >= budget:
                break
            if exp_id in self._staged:
                continue
            loop = await self.store.get_loop(loop_id, counts=False)
            if loop is None:
                continue
            place = self.slots.bindable(loop.config.resources.gpus, promised, holding, mounted(loop.config))
            if place is None:
                continue
            promised.append(place)
            task = asyncio.create_task(
                prepare(self, exp_id, loop, place, ahead=True), name=f"prepare-{exp_id}"
            )
            self._staged[exp_id] = _Staged(exp_id=exp_id, loop_id=loop_id, placement=place, task=task)

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
        self.background(staged.task.result().handle.cleanup())

    def background(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(coro)
        self._cleanups.add(task)
        task.add_done_callback(self._background_done)

    def _background_done(self, task: asyncio.Task[None]) -> None:
        self._cleanups.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("background step failed", exc_info=task.exception())

    # -- idle slots ------------------------------------------------------------------------------

    async def _remeasure_when_idle(self) -> None:
        """A slot with nothing to run re-measures a loop's best (noise-aware loops), so the best
        so far is the mean of many runs rather than one lucky draw."""
        if not self.engine.up:
            return
        for loop_id, config in await self.store.loops_with_best():
            if enqueue.rule_of(config).remeasure_runs <= 1:
                continue  # never re-measured: no write transaction on every idle pass for it
            while self.slots.free():
                exp_id = await enqueue.queue_remeasure(self.store, loop_id)
                if exp_id is None:
                    break
                self._remeasures.add(exp_id)
                if not await self._dispatch(loop_id, exp_id):
                    self._remeasures.discard(exp_id)
                    await transitions.cancel(self.store, exp_id, "no slot was free for re-measuring")
                    break

    def _preempt_remeasure(self) -> None:
        """Re-measuring only uses idle time: queued work takes the slot back from it."""
        victim = next(
            (r for r in self._running.values() if r.exp_id in self._remeasures and not r.cancel_requested),
            None,
        )
        if victim is not None:
            log.info("re-measure %s gives its slot to queued work", victim.exp_id)
            self.background(self.cancel(victim.exp_id, "preempted: queued work needed the slot"))

    # -- what attempts ask for ---------------------------------------------------------------------

    def pass_soon(self) -> None:
        """A pass, unless one is already waiting for its turn (it will see what changed)."""
        if not self._pass_waiting:
            self._pass_waiting = True
            self.background(self._pass())

    def slot_freed(self, attempt: Attempt) -> None:
        self.slots.release(attempt.slot, attempt.placement)
        self._busy_changed()
        if not self.stopping:
            self.pass_soon()

    def attempt_over(self, attempt: Attempt) -> None:
        del self._running[attempt.exp_id]
        self._remeasures.discard(attempt.exp_id)
        _tell(self.listeners)

    def idle_slots(self) -> int:
        """Slots proposals may fill once the queue is served (`queued_ahead`), never more."""
        return self.slots.idle(self._remeasures)

    def _busy_changed(self) -> None:
        m.SLOTS_BUSY.set(self.busy)
        m.RUNNING.set(self.busy)
        m.publish_nodes(self.slots.per_node())

    # -- control ---------------------------------------------------------------------------------

    async def cancel(self, exp_id: str, reason: str = "cancelled") -> bool:
        """Writes the cancel first, then removes its prepared run or kills its running one (and
        those of its repeat runs, when a confirming candidate is cancelled)."""
        running_repeats = await self.store.repeat_ids(exp_id, [Status.running.value])
        changed = await transitions.cancel(self.store, exp_id, reason)
        for repeat in running_repeats if changed else []:
            await transitions.cancel(self.store, repeat, f"its candidate was cancelled: {reason}")
        for victim in [exp_id, *running_repeats]:
            self._discard(victim)
            attempt = self._running.get(victim)
            if attempt is not None:
                await attempt.kill()
        self.wake()
        return changed

    @property
    def busy(self) -> int:
        """Slots whose experiment's workload has not ended yet."""
        return self.slots.busy

    def attempt(self, exp_id: str) -> Attempt | None:
        """The experiment's attempt while it holds a slot or awaits its verdict."""
        return self._running.get(exp_id)

    @property
    def prepared(self) -> list[str]:
        """Queued experiments prepared (or being prepared) ahead of their turn."""
        return list(self._staged)


def _tell(listeners: list[Callable[[], None]]) -> None:
    """After each pass and each verdict (the proposers wait for both)."""
    for listener in listeners:
        listener()


async def _end_runs(attempts: list[Attempt], detach: bool) -> None:
    """At a stop: kills every run, or with `detach` lets training runs go on for the next start."""
    left = 0
    for attempt in attempts:
        if detach and await attempt.detach():
            left += 1
        else:
            await attempt.kill()
    if left:
        log.info("stopping: %d experiment(s) left running for the next start to take over", left)


async def _follow(executor: Executor, changed: Callable[[list[Node]], Awaitable[None]]) -> None:
    """Hands every inventory the executor reports to `changed`, as nodes join and leave."""
    while True:
        try:
            async for nodes in executor.watch_inventory():
                await changed(nodes)
        except Exception:
            log.exception("following the executor's inventory failed; retrying")
        await asyncio.sleep(1.0)
