"""`/v1/datasets`: the names of the datasets the operator declared (`ratchet serve --dataset
NAME=PATH`), for loop bodies to name. Never their host paths."""

from __future__ import annotations

from litestar import Controller, get

from ..models import DatasetView
from .common import errors
from .services import Services

__all__ = ["DatasetController"]


class DatasetController(Controller):
    path = "/v1/datasets"
    tags = ["datasets"]

    @get("/", operation_id="listDatasets", summary="Datasets loops may name", responses=errors())
    async def list_datasets(self, services: Services) -> list[DatasetView]:
        return [DatasetView(name=name) for name in sorted(services.settings.datasets)]
