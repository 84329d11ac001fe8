"""What handlers depend on, opened and closed by the app's lifespan."""

from __future__ import annotations

from dataclasses import dataclass

from sandbox import Sandbox

from .scheduler import Scheduler
from .settings import Settings
from .snapshots import SnapshotStore
from .store import Store


@dataclass(slots=True)
class Services:
    settings: Settings
    store: Store
    snapshots: SnapshotStore
    sandbox: Sandbox
    scheduler: Scheduler
    gpus: list[str]
