"""`/v1/loops`: create loops, read them, control them, submit candidates, and read what they made
(experiments, the ledger, the git history, accepted snapshots)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Annotated

import msgspec
from litestar import Controller, Response, get, post
from litestar.exceptions import ValidationException
from litestar.openapi import ResponseSpec
from litestar.params import Parameter
from litestar.response import Stream
from litestar.status_codes import HTTP_200_OK, HTTP_201_CREATED, HTTP_202_ACCEPTED

from .. import proposer_metrics as pm
from ..models import (
    CandidateCreate,
    ExperimentPage,
    ExperimentView,
    LoopCreate,
    LoopView,
    SnapshotView,
    Status,
)
from ..rules.ledger import header
from ..state import candidates, enqueue, history, transitions, webhooks
from ..state.proposal_reads import proposer_view
from .common import SUBMIT_TO_LOOP, LoopId, errors, experiment_or_404, loop_or_404
from .services import Services
from .webhooks import check_webhooks, tell_webhooks

__all__ = ["LoopController"]


class LoopController(Controller):
    path = "/v1/loops"
    tags = ["loops"]

    @post(
        "/",
        operation_id="createLoop",
        status_code=HTTP_201_CREATED,
        summary="Create a loop and queue its baseline",
        responses=errors(409, 413, 422),
    )
    async def create(self, data: LoopCreate, services: Services) -> LoopView:
        check_webhooks(data.webhooks, services.settings)
        loop_id, _ = await candidates.create_loop(
            data,
            services.settings,
            services.store,
            services.snapshots,
            services.executor.has_image,
            services.scheduler.slots.max_gpus,
            {n.name: n.datasets for n in services.scheduler.slots.nodes},
        )
        if data.webhooks:
            await webhooks.add_webhooks(services.store, loop_id, data.webhooks)
        services.scheduler.wake()
        return await loop_or_404(services, loop_id)

    @get("/", operation_id="listLoops", summary="All loops", responses=errors())
    async def list_loops(self, services: Services) -> list[LoopView]:
        loops = await services.store.list_loops()
        for loop in loops:
            loop.proposer = await proposer_view(services.store, loop)
        return loops

    @get(
        "/{loop_id:str}",
        operation_id="getLoop",
        summary="One loop: state, best metric and snapshot, counts per status",
        responses=errors(404),
    )
    async def show(self, loop_id: LoopId, services: Services) -> LoopView:
        return await loop_or_404(services, loop_id)

    async def _control(self, services: Services, loop_id: str, action: str) -> LoopView:
        before = await loop_or_404(services, loop_id, counts=False)
        state, running = await transitions.set_loop_state(services.store, loop_id, action)
        for exp_id in running:
            await services.scheduler.cancel(exp_id, "loop stopped")
        if action == "stop":
            await services.proposers.loop_stopped(loop_id)
        services.scheduler.wake()
        services.proposers.wake()
        if state != before.state:
            await tell_webhooks(services, loop_id, state)
        return await loop_or_404(services, loop_id)

    @post(
        "/{loop_id:str}/pause",
        operation_id="pauseLoop",
        status_code=HTTP_200_OK,
        summary="Start nothing new; running experiments finish",
        responses=errors(404, 409),
    )
    async def pause(self, loop_id: LoopId, services: Services) -> LoopView:
        return await self._control(services, loop_id, "pause")

    @post(
        "/{loop_id:str}/resume",
        operation_id="resumeLoop",
        status_code=HTTP_200_OK,
        summary="Dispatch queued experiments again",
        responses=errors(404, 409),
    )
    async def resume(self, loop_id: LoopId, services: Services) -> LoopView:
        return await self._control(services, loop_id, "resume")

    @post(
        "/{loop_id:str}/stop",
        operation_id="stopLoop",
        status_code=HTTP_200_OK,
        summary="Cancel queued and running experiments; final",
        responses=errors(404, 409),
    )
    async def stop(self, loop_id: LoopId, services: Services) -> LoopView:
        return await self._control(services, loop_id, "stop")

    @post(
        "/{loop_id:str}/baseline",
        operation_id="rerunBaseline",
        status_code=HTTP_202_ACCEPTED,
        summary="Queue the unmodified baseline again",
        responses=errors(404, 409),
        opt=SUBMIT_TO_LOOP,
    )
    async def rerun_baseline(self, loop_id: LoopId, services: Services) -> ExperimentView:
        await loop_or_404(services, loop_id, counts=False)
        exp_id = await enqueue.queue_baseline(services.store, loop_id)
        services.scheduler.wake()
        return await experiment_or_404(services, exp_id)

    @post(
        "/{loop_id:str}/experiments",
        operation_id="submitCandidate",
        status_code=HTTP_202_ACCEPTED,
        summary="Submit a candidate (unified diff or whole files); 422 when refused",
        description=(
            "202 with the new experiment, queued. A candidate whose resulting snapshot already ran in"
            " this loop (queued, running or decided; not cancelled or error) is not run again: the"
            " answer is 200 with that earlier experiment, its `duplicate_of` set to its own id. Use"
            " `POST /v1/experiments/{id}/rerun` to repeat a run on purpose."
        ),
        responses={
            200: ResponseSpec(
                data_container=ExperimentView,
                description="a duplicate: the earlier experiment that ran the same snapshot; nothing queued",
                generate_examples=False,
            ),
            **errors(404, 409, 413, 422),
        },
        opt=SUBMIT_TO_LOOP,
    )
    async def submit(
        self, loop_id: LoopId, data: CandidateCreate, services: Services
    ) -> Response[ExperimentView]:
        loop = await loop_or_404(services, loop_id, counts=False)
        try:
            exp_id = await candidates.submit_candidate(
                loop, data, services.settings, services.store, services.snapshots
            )
        except enqueue.Duplicate as dup:
            pm.DUPLICATES.labels(loop=loop.name, source="api").inc()
            earlier = await experiment_or_404(services, dup.experiment_id)
            answer = msgspec.structs.replace(earlier, duplicate_of=earlier.id)
            return Response(answer, status_code=HTTP_200_OK)
        services.scheduler.wake()
        return Response(await experiment_or_404(services, exp_id), status_code=HTTP_202_ACCEPTED)

    @get(
        "/{loop_id:str}/experiments",
        operation_id="listExperiments",
        summary="Experiments of a loop in submission order, paginated",
        responses=errors(404),
    )
    async def experiments(
        self,
        loop_id: LoopId,
        services: Services,
        status: Annotated[list[Status] | None, Parameter(description="filter; repeat for several")] = None,
        after: Annotated[
            int, Parameter(ge=0, le=2**63 - 1, description="experiment number to start after")
        ] = 0,
        limit: Annotated[
            int | None, Parameter(ge=1, description="page size (default 100), at most RATCHET_MAX_PAGE_SIZE")
        ] = None,
    ) -> ExperimentPage:
        await loop_or_404(services, loop_id)
        most = services.settings.max_page_size
        limit = min(100, most) if limit is None else limit
        if limit > most:
            raise ValidationException(
                f"limit={limit} is over the largest page of {most}; ask for at most {most} and follow"
                " next_after (or raise RATCHET_MAX_PAGE_SIZE)"
            )
        items = await services.store.list_experiments(loop_id, status, after, limit + 1)
        if not items:  # a page with rows needs no proof that the loop exists
            await loop_or_404(services, loop_id, counts=False)
        more = len(items) > limit
        items = items[:limit]
        return ExperimentPage(items=items, next_after=items[-1].number if more else None)

    @get(
        "/{loop_id:str}/results.tsv",
        operation_id="getResults",
        media_type="text/tab-separated-values",
        summary="The ledger",
        responses=errors(404),
    )
    async def results(self, loop_id: LoopId, services: Services) -> Stream:
        loop = await loop_or_404(services, loop_id, counts=False)

        async def lines() -> AsyncIterator[bytes]:
            yield header(loop.config.metric.name).encode()
            async for part in services.ledger.rows(loop_id):
                yield part

        return Stream(
            lines(),
            media_type="text/tab-separated-values; charset=utf-8",
            headers={"Content-Disposition": f'inline; filename="{loop.name}-results.tsv"'},
        )

    @get(
        "/{loop_id:str}/history.bundle",
        operation_id="getHistoryBundle",
        media_type="application/octet-stream",
        summary="The accepted history as a git bundle: baseline, then one commit per keep",
        responses=errors(404, 409, 503),
        description=(
            "Branch `ratchet/<loop name>`: the baseline is the root commit, then one commit per kept"
            " experiment in finishing order (message: description, blank line, metric lines). Clone it"
            " with `git clone <file> <dir> -b ratchet/<loop name>`. 409 before a successful baseline."
        ),
    )
    async def history_bundle(self, loop_id: LoopId, services: Services) -> Response[bytes]:
        loop = await loop_or_404(services, loop_id, counts=False)
        commits = await services.store.kept_for_history(loop_id)
        if not commits:
            raise enqueue.Conflict(
                f"loop {loop.name} has no successful baseline yet, so there is no history to bundle"
            )
        data = await asyncio.to_thread(
            history.build_bundle,
            commits,
            f"ratchet/{loop.name}",
            loop.config.metric.name,
            services.snapshots,
        )
        return Response(
            data,
            media_type="application/octet-stream",
            headers={"Content-Disposition": f'attachment; filename="{loop.name}.bundle"'},
        )

    @get(
        "/{loop_id:str}/snapshots",
        operation_id="listSnapshots",
        summary="Accepted snapshots, newest first",
        responses=errors(404),
    )
    async def snapshots(self, loop_id: LoopId, services: Services) -> list[SnapshotView]:
        await loop_or_404(services, loop_id, counts=False)
        return await services.store.accepted_snapshots(loop_id)
