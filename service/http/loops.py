"""HTTP controllers: one per resource. Handlers only translate between HTTP and the service;
domain errors become responses in one place (`exception_handlers`)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Annotated

import msgspec
from litestar import Controller, Request, Response, delete, get, post
from litestar.exceptions import HTTPException, NotFoundException, ValidationException
from litestar.openapi import ResponseSpec
from litestar.openapi.spec import Operation
from litestar.params import Parameter
from litestar.response import ServerSentEvent, Stream
from litestar.status_codes import HTTP_200_OK, HTTP_201_CREATED, HTTP_202_ACCEPTED, HTTP_204_NO_CONTENT

from ..models import (
    CandidateCreate,
    ErrorBody,
    ExperimentPage,
    ExperimentView,
    Health,
    LoopCreate,
    LoopView,
    RerunCreate,
    Scope,
    SnapshotView,
    Status,
    TokenCreate,
    TokenCreated,
    TokenView,
)
from ..rules.ledger import header
from ..rules.patches import CandidateError
from ..runs.scheduler import LIVE_LOG_BYTES
from ..state import candidates, enqueue, history, tokens, transitions
from ..state.snapshots import decode_manifest
from .follow import follow_events, live_text
from .services import Services

__all__ = [
    "ExperimentController",
    "HealthController",
    "LoopController",
    "SnapshotController",
    "TokenController",
    "exception_handlers",
]

log = logging.getLogger("ratchet.api")

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
    409: "conflicts with the current state (a stopped or full loop, a finished experiment)",
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


class _LogsOperation(Operation):
    """The log answers as plain text, or with ?follow=true as an event stream: document both."""

    def to_schema(self) -> dict[str, object]:
        schema = super().to_schema()
        event = {
            "type": "object",
            "properties": {
                "event": {"type": "string", "enum": ["message", "end"]},
                "data": {"type": "string", "description": "output, or the final status for `end`"},
            },
            "required": ["data"],
        }
        schema["responses"]["200"]["content"]["text/event-stream"] = {"itemSchema": event}
        return schema


async def _loop(services: Services, loop_id: str, counts: bool = True) -> LoopView:
    loop = await services.store.get_loop(loop_id, counts)
    if loop is None:
        raise NotFoundException(f"no loop {loop_id}; list loops with GET /v1/loops")
    return loop


async def _experiment(services: Services, exp_id: str) -> ExperimentView:
    exp = await services.store.get_experiment(exp_id)
    if exp is None:
        raise NotFoundException(f"no experiment {exp_id}")
    return exp


class LoopController(Controller):
    path = "/v1/loops"
    tags = ["loops"]

    @post(
        "/",
        status_code=HTTP_201_CREATED,
        summary="Create a loop and queue its baseline",
        responses=errors(409, 413, 422),
    )
    async def create(self, data: LoopCreate, services: Services) -> LoopView:
        loop_id, _ = await candidates.create_loop(
            data, services.settings, services.store, services.snapshots, services.sandbox, len(services.gpus)
        )
        services.scheduler.wake()
        return await _loop(services, loop_id)

    @get("/", summary="All loops", responses=errors())
    async def list_loops(self, services: Services) -> list[LoopView]:
        return await services.store.list_loops()

    @get(
        "/{loop_id:str}",
        summary="One loop: state, best metric and snapshot, counts per status",
        responses=errors(404),
    )
    async def show(self, loop_id: LoopId, services: Services) -> LoopView:
        return await _loop(services, loop_id)

    async def _control(self, services: Services, loop_id: str, action: str) -> LoopView:
        await _loop(services, loop_id, counts=False)
        _, running = await transitions.set_loop_state(services.store, loop_id, action)
        await services.scheduler.kill(running)
        services.scheduler.wake()
        return await _loop(services, loop_id)

    @post(
        "/{loop_id:str}/pause",
        status_code=HTTP_200_OK,
        summary="Start nothing new; running experiments finish",
        responses=errors(404, 409),
    )
    async def pause(self, loop_id: LoopId, services: Services) -> LoopView:
        return await self._control(services, loop_id, "pause")

    @post(
        "/{loop_id:str}/resume",
        status_code=HTTP_200_OK,
        summary="Dispatch queued experiments again",
        responses=errors(404, 409),
    )
    async def resume(self, loop_id: LoopId, services: Services) -> LoopView:
        return await self._control(services, loop_id, "resume")

    @post(
        "/{loop_id:str}/stop",
        status_code=HTTP_200_OK,
        summary="Cancel queued and running experiments; final",
        responses=errors(404, 409),
    )
    async def stop(self, loop_id: LoopId, services: Services) -> LoopView:
        return await self._control(services, loop_id, "stop")

    @post(
        "/{loop_id:str}/baseline",
        status_code=HTTP_202_ACCEPTED,
        summary="Queue the unmodified baseline again",
        responses=errors(404, 409),
        opt=SUBMIT_TO_LOOP,
    )
    async def rerun_baseline(self, loop_id: LoopId, services: Services) -> ExperimentView:
        await _loop(services, loop_id, counts=False)
        exp_id = await enqueue.queue_baseline(services.store, loop_id)
        services.scheduler.wake()
        return await _experiment(services, exp_id)

    @post(
        "/{loop_id:str}/experiments",
        status_code=HTTP_202_ACCEPTED,
        summary="Submit a candidate (unified diff or whole files); 422 when refused",
        responses=errors(404, 409, 413, 422),
        opt=SUBMIT_TO_LOOP,
    )
    async def submit(self, loop_id: LoopId, data: CandidateCreate, services: Services) -> ExperimentView:
        loop = await _loop(services, loop_id, counts=False)
        exp_id = await candidates.submit_candidate(
            loop, data, services.settings, services.store, services.snapshots
        )
        services.scheduler.wake()
        return await _experiment(services, exp_id)

    @get(
        "/{loop_id:str}/experiments",
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
        await _loop(services, loop_id)
        most = services.settings.max_page_size
        limit = min(100, most) if limit is None else limit
        if limit > most:
            raise ValidationException(
                f"limit={limit} is over the largest page of {most}; ask for at most {most} and follow"
                " next_after (or raise RATCHET_MAX_PAGE_SIZE)"
            )
        items = await services.store.list_experiments(loop_id, status, after, limit + 1)
        if not items:  # a page with rows needs no proof that the loop exists
            await _loop(services, loop_id, counts=False)
        more = len(items) > limit
        items = items[:limit]
        return ExperimentPage(items=items, next_after=items[-1].number if more else None)

    @get(
        "/{loop_id:str}/results.tsv",
        media_type="text/tab-separated-values",
        summary="The ledger",
        responses=errors(404),
    )
    async def results(self, loop_id: LoopId, services: Services) -> Stream:
        loop = await _loop(services, loop_id, counts=False)

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
        loop = await _loop(services, loop_id, counts=False)
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

    @get("/{loop_id:str}/snapshots", summary="Accepted snapshots, newest first", responses=errors(404))
    async def snapshots(self, loop_id: LoopId, services: Services) -> list[SnapshotView]:
        await _loop(services, loop_id, counts=False)
        return await services.store.accepted_snapshots(loop_id)


class ExperimentController(Controller):
    path = "/v1/experiments"
    tags = ["experiments"]

    @get(
        "/{exp_id:str}",
        summary="One experiment with metrics and a log tail (live while it runs)",
        responses=errors(404),
    )
    async def show(self, exp_id: ExpId, services: Services) -> ExperimentView:
        exp = await _experiment(services, exp_id)
        live = services.scheduler.live_log(exp_id) if exp.status is Status.running else None
        if live is not None:
            tail = live_text(live, services.settings.log_tail_bytes, mark_gap=False)
            exp = msgspec.structs.replace(exp, log_tail=tail)
        return exp

    @get(  # no media_type here: it would override the event stream's
        "/{exp_id:str}/logs",
        summary="The full (capped) log; while running, the newest output; ?follow=true streams it",
        description=(
            "With `follow=true`: server-sent events. `data` events carry the output as it is printed"
            " (concatenate them); `event: end` carries the final status and closes the stream. A queued"
            " experiment is waited for, a finished one sends its stored log and `end`."
        ),
        responses={
            200: ResponseSpec(
                data_container=str,
                media_type="text/plain",
                description="the log; with follow=true a text/event-stream instead",
                generate_examples=False,
            ),
            **errors(404),
        },
        operation_class=_LogsOperation,
    )
    async def logs(
        self,
        exp_id: ExpId,
        services: Services,
        follow: Annotated[bool, Parameter(description="stream as server-sent events until it ends")] = False,
    ) -> Response[bytes] | ServerSentEvent:
        exp = await _experiment(services, exp_id)
        if follow:
            return ServerSentEvent(follow_events(services.store, services.scheduler, exp_id))
        live = services.scheduler.live_log(exp_id) if exp.status is Status.running else None
        if live is not None:
            data = live_text(live, LIVE_LOG_BYTES).encode()
        else:
            path = services.scheduler.logs_dir / f"{exp_id}.log"
            data = await asyncio.to_thread(path.read_bytes) if path.exists() else b""
        return Response(
            data, media_type="text/plain; charset=utf-8", headers={"X-Ratchet-Status": exp.status.value}
        )

    @get(
        "/{exp_id:str}/diff",
        media_type="text/x-diff",
        summary="The candidate's diff against its parent",
        responses=errors(404),
    )
    async def diff(self, exp_id: ExpId, services: Services) -> Response[str]:
        await _experiment(services, exp_id)
        return Response(await services.store.get_diff(exp_id) or "", media_type="text/x-diff; charset=utf-8")

    @post(
        "/{exp_id:str}/rerun",
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
        await _experiment(services, exp_id)
        new_id = await enqueue.rerun(services.store, exp_id, data.seed if data else None)
        services.scheduler.wake()
        return await _experiment(services, new_id)

    @post(
        "/{exp_id:str}/cancel",
        status_code=HTTP_200_OK,
        summary="Cancel a queued, running or confirming experiment",
        responses=errors(404, 409),
    )
    async def cancel(self, exp_id: ExpId, services: Services) -> ExperimentView:
        exp = await _experiment(services, exp_id)
        if exp.status not in (Status.queued, Status.running, Status.confirming):
            raise enqueue.Conflict(f"experiment {exp_id} already finished with status {exp.status.value}")
        await services.scheduler.cancel(exp_id)
        return await _experiment(services, exp_id)


class SnapshotController(Controller):
    path = "/v1/snapshots"
    tags = ["snapshots"]

    @get(
        "/{snapshot_id:str}/archive",
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


class TokenController(Controller):
    path = "/v1/tokens"
    tags = ["tokens"]
    opt = {"scope": Scope.admin.value}

    @post(
        "/",
        status_code=HTTP_201_CREATED,
        summary="Create an API token; the secret is shown only here",
        responses=errors(413, 422),
    )
    async def create(self, data: TokenCreate, services: Services) -> TokenCreated:
        if Scope.admin in data.scopes and data.loops is not None:
            raise CandidateError("an admin token may use every loop: leave out 'loops' or the admin scope")
        return await tokens.create_token(services.store, data)

    @get("/", summary="All API tokens (never their secrets)", responses=errors())
    async def list_tokens(self, services: Services) -> list[TokenView]:
        return await tokens.list_tokens(services.store)

    @delete(
        "/{token_id:str}",
        status_code=HTTP_204_NO_CONTENT,
        summary="Revoke a token, at once",
        responses=errors(404),
    )
    async def revoke(
        self, token_id: Annotated[str, Parameter(pattern=r"^[0-9a-f]{16}$")], services: Services
    ) -> None:
        if not await tokens.delete_token(services.store, token_id):
            raise NotFoundException(f"no token {token_id}; list tokens with GET /v1/tokens")


class HealthController(Controller):
    path = "/"
    tags = ["health"]
    opt = {"auth": "open"}

    @get("/healthz", summary="Liveness")
    async def healthz(self) -> Health:
        return Health(status="ok")

    @get(
        "/readyz",
        summary="Readiness: the database answers and the container engine pings",
        responses={
            503: ResponseSpec(data_container=Health, description="not ready", generate_examples=False)
        },
    )
    async def readyz(self, services: Services) -> Response[Health]:
        db = await services.store.ping()
        engine = await asyncio.to_thread(services.sandbox.ping)
        ok = db and engine
        body = Health(status="ready" if ok else "not ready", database=db, engine=engine)
        return Response(body, status_code=200 if ok else 503)


def _error(request: Request, status: int, detail: str) -> Response[dict[str, object]]:
    return Response({"status_code": status, "detail": detail}, status_code=status)


def _refused(request: Request, exc: CandidateError) -> Response[dict[str, object]]:
    return _error(request, 422, str(exc))


def _conflict(request: Request, exc: enqueue.Conflict) -> Response[dict[str, object]]:
    return _error(request, 409, str(exc))


def _not_found(request: Request, exc: candidates.NotFound) -> Response[dict[str, object]]:
    return _error(request, 404, str(exc))


def _git_missing(request: Request, exc: history.GitMissing) -> Response[dict[str, object]]:
    return _error(request, 503, str(exc))


def _validation(request: Request, exc: ValidationException) -> Response[dict[str, object]]:
    body: dict[str, object] = {"status_code": 400, "detail": exc.detail}
    if exc.extra:
        body["errors"] = exc.extra
    return Response(body, status_code=400)


def _http(request: Request, exc: HTTPException) -> Response[dict[str, object]]:
    detail = exc.detail
    if exc.status_code == 413:
        limit = request.app.request_max_body_size
        detail = (
            f"request body over the limit of {limit} bytes: send a smaller candidate (a patch rather than"
            " whole files) or raise RATCHET_MAX_BODY_BYTES"
        )
    body: dict[str, object] = {"status_code": exc.status_code, "detail": detail}
    if exc.extra:
        body["errors"] = exc.extra
    return Response(body, status_code=exc.status_code, headers=exc.headers)


def _bad_encoding(request: Request, exc: UnicodeDecodeError) -> Response[dict[str, object]]:
    # msgspec raises this (not a decode error) for invalid UTF-8 inside a JSON string of the body
    if request.method in ("POST", "PUT", "PATCH") and isinstance(exc.object, bytes):
        return _error(request, 400, f"request body is not valid UTF-8 (byte {exc.start}): send UTF-8 JSON")
    return _internal(request, exc)


def _internal(request: Request, exc: Exception) -> Response[dict[str, object]]:
    # A bug, not bad input: keep the traceback in the service log, never in the response.
    log.error("%s %s failed", request.method, request.url.path, exc_info=exc)
    return _error(request, 500, "internal error; the service log has the details")


exception_handlers = {
    CandidateError: _refused,
    enqueue.Conflict: _conflict,
    candidates.NotFound: _not_found,
    history.GitMissing: _git_missing,
    ValidationException: _validation,
    HTTPException: _http,
    UnicodeDecodeError: _bad_encoding,
    Exception: _internal,
}
