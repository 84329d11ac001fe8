"""`/v1/snapshots/{id}/archive`: a stored workspace as .tar.gz."""

from __future__ import annotations

import asyncio
from typing import Annotated

from litestar import Controller, Response, get
from litestar.exceptions import NotFoundException
from litestar.params import Parameter

from ..state.snapshots import decode_manifest
from .common import errors
from .services import Services

__all__ = ["SnapshotController"]


class SnapshotController(Controller):
    path = "/v1/snapshots"
    tags = ["snapshots"]

    @get(
        "/{snapshot_id:str}/archive",
        operation_id="getSnapshotArchive",
        media_type="application/gzip",
        summary="The whole workspace of a snapshot as .tar.gz",
        responses=errors(404),
    )
    async def archive(
        self, snapshot_id: Annotated[str, Parameter(pattern=r"^[0-9a-f]{64}$")], services: Services
    ) -> Response[bytes]:
        raw = await services.store.get_manifest(snapshot_id)
        if raw is None:
            raise NotFoundException(f"no snapshot {snapshot_id}")
        data = await asyncio.to_thread(services.snapshots.archive, decode_manifest(raw))
        return Response(
            data,
            media_type="application/gzip",
            headers={"Content-Disposition": f'attachment; filename="{snapshot_id[:12]}.tar.gz"'},
        )
