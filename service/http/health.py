"""`/healthz` and `/readyz`: open to everyone, for probes."""

from __future__ import annotations

from litestar import Controller, Response, get
from litestar.openapi import ResponseSpec

from ..models import Health
from .services import Services

__all__ = ["HealthController"]


class HealthController(Controller):
    path = "/"
    tags = ["health"]
    opt = {"auth": "open"}

    @get("/healthz", operation_id="getHealth", summary="Liveness")
    async def healthz(self) -> Health:
        return Health(status="ok")

    @get(
        "/readyz",
        operation_id="getReadiness",
        summary="Readiness: the database answers and the container engine pings",
        responses={
            503: ResponseSpec(data_container=Health, description="not ready", generate_examples=False)
        },
    )
    async def readyz(self, services: Services) -> Response[Health]:
        db = await services.store.ping()
        engine = await services.scheduler.engine.ping()  # also what `ratchet_engine_up` says
        ok = db and engine
        body = Health(status="ready" if ok else "not ready", database=db, engine=engine)
        return Response(body, status_code=200 if ok else 503)
