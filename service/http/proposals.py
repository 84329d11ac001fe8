"""Proposer runs: `/v1/loops/{id}/proposals` lists a loop's, `/v1/proposals/{id}` shows one (its log
tail live while it runs), its log (whole, or followed live as server-sent events, like an
experiment's) and cancels it."""

from __future__ import annotations

from typing import Annotated

import msgspec
from litestar import Controller, Response, get, post
from litestar.exceptions import NotFoundException, ValidationException
from litestar.params import Parameter
from litestar.response import ServerSentEvent
from litestar.status_codes import HTTP_200_OK

from ..proposal_models import PROPOSAL_OVER, ProposalPage, ProposalStatus, ProposalView
from ..runs.logs import LIVE_LOG_BYTES
from ..state import enqueue
from ..state.proposal_reads import get_proposal, list_proposals
from .common import LoopId, errors, loop_or_404
from .follow import follow_events, live_text
from .log_answers import LOG_RESPONSES, Follow, LogsOperation, live_tail, log_response
from .services import Services

__all__ = ["LoopProposalsController", "ProposalController"]

ProposalId = Annotated[str, Parameter(pattern=r"^[0-9a-f]{16}$", description="proposal id")]


async def proposal_or_404(services: Services, pid: str) -> ProposalView:
    found = await get_proposal(services.store, pid)
    if found is None:
        raise NotFoundException(f"no proposal {pid}; list a loop's with GET /v1/loops/{{loop_id}}/proposals")
    return found


class LoopProposalsController(Controller):
    path = "/v1/loops"
    tags = ["proposals"]

    @get(
        "/{loop_id:str}/proposals",
        operation_id="listProposals",
        summary="Proposer runs of a loop in order, paginated",
        responses=errors(404),
    )
    async def proposals(
        self,
        loop_id: LoopId,
        services: Services,
        status: Annotated[
            list[ProposalStatus] | None, Parameter(description="filter; repeat for several")
        ] = None,
        after: Annotated[
            int, Parameter(ge=0, le=2**63 - 1, description="proposal number to start after")
        ] = 0,
        limit: Annotated[
            int | None, Parameter(ge=1, description="page size (default 100), at most RATCHET_MAX_PAGE_SIZE")
        ] = None,
    ) -> ProposalPage:
        await loop_or_404(services, loop_id, counts=False)
        most = services.settings.max_page_size
        limit = min(100, most) if limit is None else limit
        if limit > most:
            raise ValidationException(f"limit={limit} is over the largest page of {most}; follow next_after")
        statuses = [s.value for s in status] if status else None
        items = await list_proposals(services.store, loop_id, statuses, after, limit + 1)
        more = len(items) > limit
        items = items[:limit]
        return ProposalPage(items=items, next_after=items[-1].number if more else None)


class ProposalController(Controller):
    path = "/v1/proposals"
    tags = ["proposals"]

    @get(
        "/{proposal_id:str}",
        operation_id="getProposal",
        summary="One proposer run: status, reason, its candidate (or the duplicate), a log tail",
        responses=errors(404),
    )
    async def show(self, proposal_id: ProposalId, services: Services) -> ProposalView:
        found = await proposal_or_404(services, proposal_id)
        tail = live_tail(services, proposal_id, found.status is ProposalStatus.running)
        return found if tail is None else msgspec.structs.replace(found, log_tail=tail)

    @get(
        "/{proposal_id:str}/logs",
        operation_id="followProposalLogs",
        summary="The proposer run's log; while it runs, the newest output; ?follow=true streams it",
        description=(
            "As for an experiment: plain text, or with `follow=true` server-sent events (`data` events"
            " carry output as it is printed, `event: end` carries the final status). A command"
            " proposer's log ends with the proxy's decisions after `===== egress =====`."
        ),
        responses=LOG_RESPONSES,
        operation_class=LogsOperation,
    )
    async def logs(
        self,
        proposal_id: ProposalId,
        services: Services,
        follow: Follow = False,
    ) -> Response[bytes] | ServerSentEvent:
        found = await proposal_or_404(services, proposal_id)
        if follow:

            async def lookup(pid: str) -> tuple[str, bool] | None:
                view = await get_proposal(services.store, pid)
                return None if view is None else (view.status.value, view.status in PROPOSAL_OVER)

            return ServerSentEvent(follow_events(services.store, services.logs, proposal_id, lookup))
        live = services.logs.live(proposal_id) if found.status is ProposalStatus.running else None
        data = live_text(live, LIVE_LOG_BYTES).encode() if live else await services.logs.read(proposal_id)
        return log_response(data, found.status.value)

    @post(
        "/{proposal_id:str}/cancel",
        operation_id="cancelProposal",
        status_code=HTTP_200_OK,
        summary="Cancel a queued or running proposer run (its container is killed)",
        responses=errors(404, 409),
    )
    async def cancel(self, proposal_id: ProposalId, services: Services) -> ProposalView:
        found = await proposal_or_404(services, proposal_id)
        if found.status in PROPOSAL_OVER:
            raise enqueue.Conflict(f"proposal {proposal_id} already ended as {found.status.value}")
        await services.proposers.cancel(proposal_id)
        return await proposal_or_404(services, proposal_id)
