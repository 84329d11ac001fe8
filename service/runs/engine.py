"""Whether the executor's backend answers, and the runs an outage or a previous process left behind.

Nothing is dispatched while the engine does not answer a ping: a run started then could only fail,
and the queue would drain into `error`. What an outage left (a run the engine broke, prepared runs
whose connection went away) is removed as soon as it answers again, before anything new starts."""

from __future__ import annotations

import logging
import time

from .. import metrics as m
from .executor import Executor, SandboxError

__all__ = ["WATCH_S", "EngineWatch"]

log = logging.getLogger("ratchet.scheduler")

WATCH_S = 5.0  # an idle scheduler still pings this often, so `ratchet_engine_up` stays current


class EngineWatch:
    def __init__(self, executor: Executor) -> None:
        self.executor = executor
        self.up = True
        self.checked_at = -WATCH_S  # monotonic time of the last ping
        self._leftovers: list[str | None] = []  # experiments (None: every run) to remove

    def leftover(self, experiment: str | None) -> None:
        """Remove this experiment's runs (None: all of this instance's) once the engine answers."""
        self._leftovers.append(experiment)

    async def recover(self) -> int:
        """Removes every run a previous process of this instance made; how many."""
        try:
            return await self.executor.cleanup()
        except SandboxError as exc:
            log.warning("recover: could not clean up the previous run's containers: %s", exc)
            self.leftover(None)  # before anything runs
            return 0

    async def ping(self) -> bool:
        up = await self.executor.ping()
        self.checked_at = time.monotonic()
        m.ENGINE_UP.set(1 if up else 0)
        if up != self.up:
            self.up = up
            if up:
                log.info("the container engine answers again: dispatch resumes")
            else:
                log.warning("the container engine does not answer: dispatch paused")
        return up

    async def watch(self) -> None:
        """Pings when the last ping is older than `WATCH_S` (dispatch pings whenever work waits)."""
        if time.monotonic() - self.checked_at >= WATCH_S:
            await self.ping()

    async def remove_leftovers(self) -> bool:
        """True once nothing is left to remove."""
        pending, self._leftovers = self._leftovers, []
        for experiment in pending:
            try:
                removed = await self.executor.cleanup(experiment)
            except SandboxError as exc:
                log.warning("could not remove containers left by an engine failure: %s", exc)
                self._leftovers.append(experiment)
            else:
                if removed:
                    log.info("removed %d container(s)/volume(s) left by an engine failure", removed)
        return not self._leftovers
