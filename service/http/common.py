"""What the controllers share: path parameters, route options read by `auth`, the error answers each
route documents, and the lookups that answer 404."""

from __future__ import annotations

from typing import Annotated

from litestar.exceptions import NotFoundException
from litestar.openapi import ResponseSpec
from litestar.params import Parameter

from ..models import ErrorBody, ExperimentView, LoopView
from ..state.proposal_reads import proposer_view
from .services import Services

__all__ = [
    "SUBMIT_TO_EXPERIMENTS_LOOP",
    "SUBMIT_TO_LOOP",
    "ExpId",
    "LoopId",
    "errors",
    "experiment_or_404",
    "loop_or_404",
]

LoopId = Annotated[str, Parameter(pattern=r"^[0-9a-f]{16}$", description="loop id")]
ExpId = Annotated[str, Parameter(pattern=r"^[0-9a-f]{16}$", description="experiment id")]
# Route options read by service.http.auth: submitting needs the submit scope, on a loop the token may use.
SUBMIT_TO_LOOP = {"scope": "submit", "loop": "path"}
SUBMIT_TO_EXPERIMENTS_LOOP = {"scope": "submit", "loop": "experiment"}


_ERRORS = {
    400: "malformed request: `detail` and `errors` name the field",
    401: "no valid bearer token (only when the service runs with auth tokens)",
    403: "the token lacks the scope this needs, or may not use this loop",
    404: "no such resource",
    409: "conflicts with the current state (a stopped, full or expired loop, a finished experiment)",
    413: "the body is over RATCHET_MAX_BODY_BYTES",
    422: "refused: `detail` says what to fix; nothing was stored",
    503: "a tool the service needs is missing",
}


def errors(*codes: int) -> dict[int, ResponseSpec]:
    """OpenAPI entries for the error answers of a route; every route may answer 400, 401 and 403."""
    return {
        code: ResponseSpec(data_container=ErrorBody, description=_ERRORS[code], generate_examples=False)
        for code in (400, 401, 403, *codes)
    }


async def loop_or_404(services: Services, loop_id: str, counts: bool = True, where: str = "") -> LoopView:
    """The loop, or 404 naming where to find loops (`where`: a further place, e.g. a page)."""
    loop = await services.store.get_loop(loop_id, counts)
    if loop is None:
        raise NotFoundException(f"no loop {loop_id}; list loops with GET /v1/loops{where}")
    if counts and loop.config.proposer is not None:
        loop.proposer = await proposer_view(services.store, loop)
    return loop


async def experiment_or_404(services: Services, exp_id: str) -> ExperimentView:
    exp = await services.store.get_experiment(exp_id)
    if exp is None:
        raise NotFoundException(f"no experiment {exp_id}")
    return exp
