"""`create_app(settings)` composes the service; one lifespan opens the database, the engine client
and the scheduler, and closes them in reverse."""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import platform
import secrets
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from litestar import Litestar, Request
from litestar.di import Provide
from litestar.openapi import OpenAPIConfig
from litestar.plugins.prometheus import PrometheusConfig, PrometheusController, PrometheusMiddleware

from sandbox import Sandbox

from . import faults, metrics
from .api import (
    ExperimentController,
    HealthController,
    LoopController,
    SnapshotController,
    TokenController,
    exception_handlers,
    reject_bad_utf8,
)
from .auth import SECURITY, SECURITY_COMPONENTS, Authenticator, is_loopback
from .gpus import detect_gpus
from .integrity import DataDamaged, open_verified
from .livelog import on_exit_signals
from .scheduler import Scheduler
from .services import Services
from .settings import Settings
from .snapshots import SnapshotStore
from .store import Store
from .web import PageController, ProgressController

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
        log.warning("auth: bearer tokens, no RATCHET_ADMIN_TOKEN: only tokens made earlier can log in")
    elif not is_loopback(settings.host):
        log.warning(
            "!!! AUTH IS OFF on %s (RATCHET_AUTH=none, RATCHET_AUTH_NONE_ON_NETWORK=1): anyone who can"
            " reach this port can create loops and run code on this machine !!!",
            settings.host,
        )
    else:
        log.info("auth: none (loopback %s only); RATCHET_AUTH=tokens turns tokens on", settings.host)


async def _ray_scheduler(
    settings: Settings, store: Store, snapshots: SnapshotStore, engine: Sandbox, instance: str
) -> tuple[Scheduler, list[str]]:
    """The scheduler on a Ray cluster: its slots and GPU ids (`<node>:<device>`) are the cluster's
    at start-up; a node that leaves fails its runs into the engine-retry path."""
    from .cluster.executor import RayExecutor

    assert settings.ray_address is not None
    executor = RayExecutor(
        settings.ray_address,
        instance,
        gpus_per_slot=settings.gpus_per_slot,
        cpu_slots=settings.ray_cpu_slots,
        auth_token_path=settings.ray_token_file,
    )
    await executor.connect()  # every node of the cluster now
    slots = settings.slots or max(1, len(executor.slots))
    gpus = executor.gpu_ids()
    log.info("Ray cluster at %s: %d slot(s) on %s", settings.ray_address, slots, repr(executor))
    scheduler = Scheduler(settings.with_overrides(slots=slots), store, snapshots, engine, gpus, executor)
    return scheduler, gpus


def create_app(settings: Settings, sandbox: Sandbox | None = None) -> Litestar:
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
            engine = sandbox or Sandbox(instance=instance)
            if settings.executor == "ray":
                scheduler, gpus = await _ray_scheduler(settings, store, snapshots, engine, instance)
            else:
                gpus = settings.gpus if settings.gpus is not None else detect_gpus()
                scheduler = Scheduler(settings, store, snapshots, engine, gpus)
            holder["services"] = Services(settings, store, snapshots, engine, scheduler, gpus)
            await scheduler.start()
            stack.push_async_callback(scheduler.stop)
            stack.enter_context(on_exit_signals(scheduler.end_streams))
            log.info("ratchet %s ready: %r, data in %s", VERSION, scheduler, data_dir)
            _log_auth(settings, guard.mode)
            yield

    def provide_services() -> Services:
        return holder["services"]

    guard = Authenticator(settings, provide_services)

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
            HealthController,
            MetricsController,
            ProgressController,
            PageController,
        ],
        dependencies={"services": Provide(provide_services, sync_to_thread=False)},
        lifespan=[lifespan],
        exception_handlers=exception_handlers,  # type: ignore[arg-type]
        before_request=reject_bad_utf8,
        guards=[guard],
        middleware=[prometheus.middleware],
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
