"""What handlers depend on, opened and closed by the app's lifespan."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..runs.executor import Executor
from ..runs.logs import RunLogs
from ..runs.proposing import Proposers
from ..runs.scheduler import Scheduler
from ..runs.webhook_sender import WebhookSender
from ..settings import Settings
from ..state.ledger_cache import LedgerCache
from ..state.snapshots import SnapshotStore
from ..state.store import Store


@dataclass(slots=True)
class Services:
    settings: Settings
    store: Store
    snapshots: SnapshotStore
    executor: Executor
    scheduler: Scheduler
    logs: RunLogs
    proposers: Proposers
    ledger: LedgerCache = field(init=False)
    # operations (set by the lifespan once they are open)
    webhooks: WebhookSender = field(init=False)
    version: str = ""
    data_dir: str = ""
    auth: str = ""
    started_at: float = 0.0

    def __post_init__(self) -> None:
        self.ledger = LedgerCache(self.store)
