"""A loop's `proposer` checked when the loop is created, before anything is stored: every refusal is
a `CandidateError` (422) that says what to fix."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from sandbox import RUNSC_MIN_PIDS

from ..models import LoopConfig
from ..proposal_models import CommandProposer, LlmProposer, SearchProposer
from ..rules.patches import CandidateError
from ..rules.search import check_search
from ..settings import Settings, llm_api_key, llm_key_refusal

__all__ = ["check_proposer"]


async def check_proposer(
    config: LoopConfig,
    tree: dict[str, bytes],
    settings: Settings,
    has_image: Callable[[str], Awaitable[bool | None]],
) -> None:
    match config.proposer:
        case None:
            return
        case SearchProposer() as search:
            check_search(search, tree, config.editable)
        case CommandProposer() as command:
            await _check_command(command, config, settings, has_image)
        case LlmProposer() as llm:
            _check_llm(llm, settings)


async def _check_command(
    proposer: CommandProposer,
    config: LoopConfig,
    settings: Settings,
    has_image: Callable[[str], Awaitable[bool | None]],
) -> None:
    runtime = config.runtime or settings.runtime
    for key in proposer.env:
        if key.startswith("RATCHET_"):
            raise CandidateError(
                f"proposer.env {key!r}: RATCHET_* variables are set by the service; rename it"
            )
    if runtime == "runsc" and proposer.resources.pids < RUNSC_MIN_PIDS:
        raise CandidateError(
            f"proposer.resources.pids={proposer.resources.pids} is too low for runsc; use at least"
            f" {RUNSC_MIN_PIDS}"
        )
    if proposer.network is not None and runtime != "runc":
        raise CandidateError(
            "proposer.network needs the runc runtime: the engine's runsc is registered with"
            " --network=none, so the proxy's relay cannot reach a gVisor sandbox; set runtime to runc"
            " or drop proposer.network"
        )
    image = proposer.image or config.image or settings.default_image
    if await has_image(image) is False:
        raise CandidateError(
            f"proposer.image {image!r} is not on the container engine; build or pull it first"
        )


def _check_llm(proposer: LlmProposer, settings: Settings) -> None:
    name = proposer.api_key_env
    if name is None:
        return
    refusal = llm_key_refusal(settings, name)
    if refusal is not None:
        raise CandidateError(refusal)
    if llm_api_key(settings, name) is None:
        raise CandidateError(
            f"proposer.api_key_env {name!r} is not set in the service's environment: start"
            f" `ratchet serve` with {name} set (the key stays on the server), or leave api_key_env out"
        )
