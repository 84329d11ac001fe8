"""Domain errors become HTTP answers here, and only here: every 4xx and 5xx body is an `ErrorBody`
whose `detail` says what was wrong and how to fix it; a bug answers 500 and is logged in full."""

from __future__ import annotations

import logging

from litestar import Request, Response
from litestar.exceptions import HTTPException, ValidationException

from ..rules.patches import CandidateError
from ..state import candidates, enqueue, history

__all__ = ["exception_handlers", "reject_bad_utf8"]

log = logging.getLogger("ratchet.api")


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


async def reject_bad_utf8(request: Request) -> Response[dict[str, object]] | None:
    """Answers a JSON body that is not UTF-8 before anything decodes it, naming the first bad byte.

    The JSON decoder's own error for this changed between msgspec releases (an exception with the
    position, later a decode error without it); checking here gives one answer under any of them."""
    if request.method not in ("POST", "PUT", "PATCH"):
        return None
    body = await request.body()
    if body.isascii():  # the common case, checked without building a string
        return None
    try:
        body.decode("utf-8")
    except UnicodeDecodeError as exc:
        return _error(request, 400, f"request body is not valid UTF-8 (byte {exc.start}): send UTF-8 JSON")
    return None


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
    Exception: _internal,
}
