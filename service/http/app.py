"""`create_app(settings)` composes the service; one lifespan opens the database, the executor
and the scheduler, and closes them in reverse."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import platform
import secrets
import signal
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

from litestar import Litestar, Request
from litestar.di import Provide
from litestar.openapi import OpenAPIConfig
from litestar.plugins.prometheus import PrometheusConfig, PrometheusController, PrometheusMiddleware

from .. import faults, metrics
from ..runs.executor import Executor, SandboxError
from ..runs.executors import open_executor
from ..runs.logs import RunLogs
from ..runs.proposing import Proposers
from ..runs.scheduler import Scheduler
from ..settings import Settings
from ..state.integrity import DataDamaged, open_verified
from ..state.snapshots import SnapshotStore
from ..state.store import Store
from .auth import SECURITY, SECURITY_COMPONENTS, Authenticator, is_loopback
from .caches import CacheController
from .datasets import DatasetController
from .errors import exception_handlers, reject_bad_utf8
from .experiments import ExperimentController
from .health import HealthController
from .login import login_controller
from .loops import LoopController
from .operations import check_settings, open_operations
from .pages import PageController, ProgressController
from .proposals import LoopProposalsController, ProposalController
from .service_info import ServiceController
from .services import Services
from .sessions import DatabaseSessions, session_middleware
from .snapshots import SnapshotController
from .tokens import TokenController
from .webhooks import WebhookController

__all__ = ["create_app"]

VERSION = "0.1.0"
DESCRIPTION = (
    "Autoresearch loops as a service: every experiment (an edit of a training script) runs in an"
    " isolated container with a fixed time budget; a change is kept only if the metric improved."
)
log = logging.getLogger("ratchet")


class MetricsController(PrometheusController):
    path = "/metrics"
    include_in_schema = False
    opt = {"auth": "metrics"}


class _RouteMetrics(PrometheusMiddleware):
    """Labels from the route template alone: the stock labels also parse the full URL on every
    request, only to throw it away when paths are grouped."""

    def _get_default_labels(self, request: Request[Any, Any, Any]) -> dict[str, str | int | float]:
        scope = request.scope
        return {
            "method": scope.get("method", scope["type"]),
            "path": scope.get("path_template", "other"),
            "status_code": 200,
            "app_name": self._config.app_name,
        }


def _instance_id(data_dir: Path) -> str:
    """A stable id for this data dir, so a restarted service recognises its own containers."""
    path = data_dir / "instance-id"
    if not path.exists():
        path.write_text(secrets.token_hex(6) + "\n")
    return path.read_text().strip()


class DataDirBusy(RuntimeError):
    pass


def _lock_data_dir(data_dir: Path) -> int:
    """One service per data dir: two schedulers on one database would run experiments twice."""
    fd = os.open(data_dir / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise DataDirBusy(  # noqa: B904 - the OS error adds nothing
            f"{data_dir} is in use by another ratchet service; stop it or use another --data-dir"
        )
    return fd


def _log_auth(settings: Settings, mode: str) -> None:
    if mode == "tokens" and settings.admin_token:
        log.info("auth: bearer tokens; a bootstrap admin token is set")
    elif mode == "tokens":
        log.warning("auth: bearer tokens, no RATCHET_ADMIN_TOKEN: only tokens in the database log in")
    elif not is_loopback(settings.host):
        log.warning(
            "!!! AUTH IS OFF on %s (RATCHET_AUTH=none, RATCHET_AUTH_NONE_ON_NETWORK=1): anyone who can"
            " reach this port can create loops and run code on this machine !!!",
            settings.host,
        )
    else:
        log.info("auth: none (loopback %s only); RATCHET_AUTH=tokens turns tokens on", settings.host)


@contextlib.contextmanager
def on_exit_signals(callback: Callable[[], None]) -> Iterator[None]:
    """Also runs `callback` on the event loop when SIGINT or SIGTERM arrives.

    uvicorn finishes open responses before it runs the lifespan's shutdown, so a follower would
    hold a stopping service up for its whole graceful-shutdown timeout; this lets followers end at
    once. The handlers already installed (uvicorn's) still run. Outside the main thread
    signals cannot be handled: then this does nothing, as it does for a signal nobody handles."""
    loop = asyncio.get_running_loop()
    previous: dict[int, Any] = {}

    def handler(signum: int, frame: Any) -> None:
        with contextlib.suppress(RuntimeError):  # first: the previous handler may raise
            loop.call_soon_threadsafe(callback)
        previous[signum](signum, frame)

    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            prev = signal.getsignal(sig)
            if callable(prev):  # else the signal ends the process: nothing waits for followers
                previous[sig] = prev
                signal.signal(sig, handler)
    try:
        yield
    finally:
        for sig, prev in previous.items():
            if signal.getsignal(sig) is handler:
                signal.signal(sig, prev)


def create_app(settings: Settings, executor: Executor | None = None) -> Litestar:
    """The service. `executor`: where experiments run (default: the one the settings name, see
    `runs.executors`)."""
    data_dir = Path(settings.data_dir)
    metrics.BUILD.info({"version": VERSION, "python": platform.python_version()})
    holder: dict[str, Services] = {}
    faults.arm(settings.fault_point)

    @contextlib.asynccontextmanager
    async def lifespan(app: Litestar) -> AsyncIterator[None]:
        data_dir.mkdir(parents=True, exist_ok=True)
        async with contextlib.AsyncExitStack() as stack:
            stack.callback(os.close, _lock_data_dir(data_dir))
            instance = settings.instance or _instance_id(data_dir)
            store = Store(data_dir / "ratchet.db")
            snapshots = SnapshotStore(data_dir / "blobs")
            try:
                await open_verified(store, snapshots, settings.verify_blobs, stack)
            except DataDamaged as exc:
                log.error("refusing to start: %s", exc)
                raise
            try:
                runner = executor or await open_executor(settings, instance)
            except SandboxError as exc:
                log.error("refusing to start: %s", exc)
                raise
            logs = RunLogs(data_dir / "logs")
            scheduler = Scheduler(settings, store, snapshots, runner, logs)
            proposers = Proposers(settings, store, snapshots, runner, logs, scheduler)
            services = Services(settings, store, snapshots, runner, scheduler, logs, proposers)
            services.version, services.data_dir, services.auth = VERSION, str(data_dir.resolve()), guard.mode
            services.started_at = time.time()
            holder["services"] = services
            await scheduler.start()
            stack.push_async_callback(scheduler.stop)
            await proposers.start()
            stack.push_async_callback(proposers.stop)
            services.webhooks = await open_operations(settings, store, guard.mode, stack)
            stack.enter_context(on_exit_signals(logs.end_streams))
            log.info("ratchet %s ready: %r %r, data in %s", VERSION, scheduler, proposers, data_dir)
            _log_auth(settings, guard.mode)
            yield

    def provide_services() -> Services:
        return holder["services"]

    guard = Authenticator(settings, provide_services)
    check_settings(settings)

    prometheus = PrometheusConfig(
        app_name="ratchet",
        prefix="ratchet_http",
        group_path=True,
        exclude=["/metrics"],
        middleware_class=_RouteMetrics,
    )
    return Litestar(
        route_handlers=[
            LoopController,
            ExperimentController,
            SnapshotController,
            TokenController,
            DatasetController,
            CacheController,
            LoopProposalsController,
            ProposalController,
            HealthController,
            MetricsController,
            ProgressController,
            PageController,
            WebhookController,
            ServiceController,
            login_controller(settings),
        ],
        dependencies={
            "services": Provide(provide_services, sync_to_thread=False),
            "guard": Provide(lambda: guard, sync_to_thread=False),
            "settings": Provide(lambda: settings, sync_to_thread=False),
        },
        lifespan=[lifespan],
        exception_handlers=exception_handlers,  # type: ignore[arg-type]
        before_request=reject_bad_utf8,
        guards=[guard],
        middleware=[prometheus.middleware, session_middleware(settings)],
        stores={"sessions": DatabaseSessions(lambda: holder["services"].store, settings.session_max_age_s)},
        request_max_body_size=settings.max_body_bytes,
        openapi_config=OpenAPIConfig(
            title="Ratchet",
            version=VERSION,
            description=DESCRIPTION,
            path="/schema",
            components=SECURITY_COMPONENTS,
            security=SECURITY,
        ),
    )
