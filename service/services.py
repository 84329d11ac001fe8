"""What handlers depend on, opened and closed by the app's lifespan."""

from __future__ import annotations

from dataclasses import dataclass, field

from sandbox import Sandbox

from .ledger_cache import LedgerCache
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
    ledger: LedgerCache = field(init=False)

    def __post_init__(self) -> None:
        self.ledger = LedgerCache(self.store)
