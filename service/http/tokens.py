"""`/v1/tokens`: API tokens, for admins."""

from __future__ import annotations

from typing import Annotated

from litestar import Controller, delete, get, post
from litestar.exceptions import NotFoundException
from litestar.params import Parameter
from litestar.status_codes import HTTP_201_CREATED, HTTP_204_NO_CONTENT

from ..models import Scope, TokenCreate, TokenCreated, TokenView
from ..rules.patches import CandidateError
from ..state import tokens
from .common import errors
from .services import Services

__all__ = ["TokenController"]


class TokenController(Controller):
    path = "/v1/tokens"
    tags = ["tokens"]
    opt = {"scope": Scope.admin.value}

    @post(
        "/",
        operation_id="createToken",
        status_code=HTTP_201_CREATED,
        summary="Create an API token; the secret is shown only here",
        responses=errors(413, 422),
    )
    async def create(self, data: TokenCreate, services: Services) -> TokenCreated:
        if Scope.admin in data.scopes and data.loops is not None:
            raise CandidateError("an admin token may use every loop: leave out 'loops' or the admin scope")
        return await tokens.create_token(services.store, data)

    @get("/", operation_id="listTokens", summary="All API tokens (never their secrets)", responses=errors())
    async def list_tokens(self, services: Services) -> list[TokenView]:
        return await tokens.list_tokens(services.store)

    @delete(
        "/{token_id:str}",
        operation_id="revokeToken",
        status_code=HTTP_204_NO_CONTENT,
        summary="Revoke a token, at once",
        responses=errors(404),
    )
    async def revoke(
        self, token_id: Annotated[str, Parameter(pattern=r"^[0-9a-f]{16}$")], services: Services
    ) -> None:
        if not await tokens.delete_token(services.store, token_id):
            raise NotFoundException(f"no token {token_id}; list tokens with GET /v1/tokens")
