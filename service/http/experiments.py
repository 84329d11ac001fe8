"""`/v1/experiments/{id}`: one experiment, its log (whole, newest, or followed live), its diff, and
re-running or cancelling it."""

from __future__ import annotations

import msgspec
from litestar import Controller, Response, get, post
from litestar.response import ServerSentEvent
from litestar.status_codes import HTTP_200_OK, HTTP_202_ACCEPTED

from ..models import ExperimentView, RerunCreate, Status
from ..runs.logs import LIVE_LOG_BYTES
from ..state import enqueue
from .common import SUBMIT_TO_EXPERIMENTS_LOOP, ExpId, errors, experiment_or_404
from .follow import follow_events, live_text
from .log_answers import LOG_RESPONSES, Follow, LogsOperation, live_tail, log_response
from .services import Services

__all__ = ["ExperimentController"]


class ExperimentController(Controller):
    path = "/v1/experiments"
    tags = ["experiments"]

    @get(
        "/{exp_id:str}",
        operation_id="getExperiment",
        summary="One experiment with metrics and a log tail (live while it runs)",
        responses=errors(404),
    )
    async def show(self, exp_id: ExpId, services: Services) -> ExperimentView:
        exp = await experiment_or_404(services, exp_id)
        tail = live_tail(services, exp_id, exp.status is Status.running)
        return exp if tail is None else msgspec.structs.replace(exp, log_tail=tail)

    @get(  # no media_type here: it would override the event stream's
        "/{exp_id:str}/logs",
        operation_id="followLogs",
        summary="The full (capped) log; while running, the newest output; ?follow=true streams it",
        description=(
            "With `follow=true`: server-sent events. `data` events carry the output as it is printed"
            " (concatenate them); `event: end` carries the final status and closes the stream. A queued"
            " experiment is waited for, a finished one sends its stored log and `end`."
        ),
        responses=LOG_RESPONSES,
        operation_class=LogsOperation,
    )
    async def logs(
        self,
        exp_id: ExpId,
        services: Services,
        follow: Follow = False,
    ) -> Response[bytes] | ServerSentEvent:
        exp = await experiment_or_404(services, exp_id)
        if follow:
            return ServerSentEvent(follow_events(services.store, services.logs, exp_id))
        live = services.logs.live(exp_id) if exp.status is Status.running else None
        if live is not None:
            data = live_text(live, LIVE_LOG_BYTES).encode()
        else:
            data = await services.logs.read(exp_id)
        return log_response(data, exp.status.value)

    @get(
        "/{exp_id:str}/diff",
        operation_id="getExperimentDiff",
        media_type="text/x-diff",
        summary="The candidate's diff against its parent",
        responses=errors(404),
    )
    async def diff(self, exp_id: ExpId, services: Services) -> Response[str]:
        await experiment_or_404(services, exp_id)
        return Response(await services.store.get_diff(exp_id) or "", media_type="text/x-diff; charset=utf-8")

    @post(
        "/{exp_id:str}/rerun",
        operation_id="rerunExperiment",
        status_code=HTTP_202_ACCEPTED,
        summary="Queue the identical snapshot again (optional seed, passed as RATCHET_SEED)",
        responses=errors(404, 409, 413),
        description=(
            "The new experiment has the same parent, snapshot and diff, `rerun_of` set, and is judged"
            " like any other: re-running the current best is a discard unless it beats itself."
            " A re-run of a baseline is a baseline. 409 when the loop is stopped or full."
        ),
        opt=SUBMIT_TO_EXPERIMENTS_LOOP,
    )
    async def rerun(
        self, exp_id: ExpId, services: Services, data: RerunCreate | None = None
    ) -> ExperimentView:
        await experiment_or_404(services, exp_id)
        new_id = await enqueue.rerun(services.store, exp_id, data.seed if data else None)
        services.scheduler.wake()
        return await experiment_or_404(services, new_id)

    @post(
        "/{exp_id:str}/cancel",
        operation_id="cancelExperiment",
        status_code=HTTP_200_OK,
        summary="Cancel a queued, running or confirming experiment",
        responses=errors(404, 409),
    )
    async def cancel(self, exp_id: ExpId, services: Services) -> ExperimentView:
        exp = await experiment_or_404(services, exp_id)
        if exp.status not in (Status.queued, Status.running, Status.confirming):
            raise enqueue.Conflict(f"experiment {exp_id} already finished with status {exp.status.value}")
        await services.scheduler.cancel(exp_id)
        return await experiment_or_404(services, exp_id)
