"""`/v1/loops/{id}/cache`: a loop's cache, cleared or filled again by an admin (after an image
rebuild, say: a compile cache belongs to one image on one kind of machine). Its state is part of
the loop view (`cache`)."""

from __future__ import annotations

from litestar import Controller, delete, post
from litestar.status_codes import HTTP_200_OK, HTTP_202_ACCEPTED

from ..models import ExperimentView, LoopView
from ..state import enqueue
from .common import LoopId, errors, experiment_or_404, loop_or_404
from .services import Services

__all__ = ["CacheController"]


class CacheController(Controller):
    path = "/v1/loops/{loop_id:str}/cache"
    tags = ["loops"]

    @delete(
        "/",
        operation_id="clearCache",
        status_code=HTTP_200_OK,
        summary="Forget the loop's cache; the next baseline run fills it again",
        responses=errors(404),
    )
    async def clear(self, loop_id: LoopId, services: Services) -> LoopView:
        await loop_or_404(services, loop_id, counts=False)
        await services.scheduler.caches.clear(loop_id)
        return await loop_or_404(services, loop_id)

    @post(
        "/fill",
        operation_id="fillCache",
        status_code=HTTP_202_ACCEPTED,
        summary="Clear the loop's cache and queue a baseline run that fills it",
        responses=errors(404, 409),
        description=(
            "Only a run of the unmodified baseline fills a loop's cache; candidates work on private"
            " copies that are thrown away. 409 when the loop is stopped or a baseline run is already"
            " queued (the cache is cleared either way)."
        ),
    )
    async def fill(self, loop_id: LoopId, services: Services) -> ExperimentView:
        await loop_or_404(services, loop_id, counts=False)
        if not services.scheduler.caches.enabled:
            raise enqueue.Conflict("caches are off on this service (RATCHET_CACHE_MAX_MB=0)")
        await services.scheduler.caches.clear(loop_id)
        exp_id = await enqueue.queue_baseline(services.store, loop_id, "baseline (fills the cache)")
        services.scheduler.wake()
        return await experiment_or_404(services, exp_id)
