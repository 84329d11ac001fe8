"""`/v1/service`: what the service is and where it keeps its data (admin: `ratchet backup` asks it
for the data dir of the running service)."""

from __future__ import annotations

from litestar import Controller, get

from ..models import Scope
from ..ops_models import ServiceInfo
from .common import errors
from .services import Services

__all__ = ["ServiceController"]


class ServiceController(Controller):
    path = "/v1/service"
    tags = ["service"]
    opt = {"scope": Scope.admin.value}

    @get(
        "/",
        operation_id="getServiceInfo",
        summary="Version and data dir of the service (admin)",
        responses=errors(),
    )
    async def info(self, services: Services) -> ServiceInfo:
        return ServiceInfo(
            version=services.version,
            data_dir=services.data_dir,
            auth=services.auth,
            started_at=services.started_at,
        )
