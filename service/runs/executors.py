"""The executor the settings name: the local engine (`LocalExecutor`, the default) or the nodes of
a Ray cluster (`RayExecutor`, joined here: every node given its agent). The one place that
chooses; nothing above the executor knows which one runs."""

from __future__ import annotations

from ..settings import Settings
from .executor import Executor
from .local import LocalExecutor

__all__ = ["open_executor"]


async def open_executor(settings: Settings, instance: str) -> Executor:
    """Raises SandboxError when the backend cannot be used (a cluster not reachable, say)."""
    if settings.executor == "ray":
        from .ray.executor import RayExecutor

        executor = RayExecutor.from_settings(settings, instance)
        try:
            await executor.connect()
        except BaseException:
            await executor.close()
            raise
        return executor
    return LocalExecutor(settings, instance)
