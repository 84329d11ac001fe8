"""The `llm` proposer: a minimal agent over an OpenAI-compatible chat API, run by the service.

One proposal is one short conversation: the loop's program, editable files, ledger tail and the
recent experiments (crash log tails fenced as untrusted data) go in; a unified diff or whole files
come out and are applied to the parent like a REST candidate. A reply that cannot be applied is sent
back once with the error. Every request is counted against the loop's budget before it is sent
(retries too); the tokens the API reports are counted after. 429, 5xx and dropped connections are
retried with a doubling back-off (or the server's `Retry-After`); other errors are not.

The API key is read from the service's own environment (`settings.llm_api_key`) at each proposal:
it is never stored, logged or shown.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections.abc import Callable
from typing import Any

import httpx

from .. import proposer_metrics as pm
from ..models import LoopView
from ..proposal_models import LlmProposer
from ..rules import llm
from ..rules.patches import CandidateError, apply_files, apply_patch, is_editable
from ..rules.proposals import ProposalRefused
from ..settings import Settings, llm_api_key
from ..state import proposals
from ..state.proposal_reads import ledger_text, recent_experiments
from ..state.store import Store

__all__ = ["LlmAgent"]

log = logging.getLogger("ratchet.proposers")

MAX_RETRY_WAIT_S = 60.0
LEDGER_ROWS = 40
FILE_BYTES = 256 * 1024  # editable files shown to the model, in all


class LlmAgent:
    """Shared by every llm proposal of the service: one HTTP client, closed with the service."""

    def __init__(self, settings: Settings, store: Store) -> None:
        self.settings = settings
        self.store = store
        self.http = httpx.AsyncClient(follow_redirects=False)

    async def close(self) -> None:
        await self.http.aclose()

    async def propose(
        self,
        pid: str,
        loop: LoopView,
        spec: LlmProposer,
        tree: dict[str, bytes],
        say: Callable[[str], None],
    ) -> tuple[dict[str, bytes], str]:
        """(the candidate tree, its description); `say` writes the proposal's log."""
        editable = loop.config.editable
        files = _shown_files(tree, editable)
        program = tree.get("program.md", b"").decode("utf-8", errors="replace") or None
        ledger = await ledger_text(self.store, loop, last=LEDGER_ROWS)
        recent = await recent_experiments(self.store, loop.id, spec.context_experiments)
        nonce = secrets.token_hex(8)
        conversation = llm.messages(loop, program, files, ledger, recent, nonce, spec.log_tail_bytes)
        for turn in (1, 2):
            reply = await self._chat(pid, loop, spec, conversation, say)
            say(f"--- reply {turn} ---\n{reply}\n")
            try:
                parsed = llm.parse_reply(reply)
                child = (
                    apply_patch(tree, parsed.patch, editable)
                    if parsed.patch is not None
                    else apply_files(tree, parsed.files or {}, editable)
                )
                if child == tree:
                    raise CandidateError("the files are identical to the current ones: nothing to try")
                return child, parsed.description
            except (ProposalRefused, CandidateError) as exc:
                say(f"--- could not apply reply {turn}: {exc} ---\n")
                if turn == 2:
                    raise ProposalRefused("apply_failed", f"twice unusable; last: {exc}") from None
                conversation += [{"role": "assistant", "content": reply}, llm.retry_message(str(exc))]
        raise AssertionError("unreachable")

    async def _chat(
        self,
        pid: str,
        loop: LoopView,
        spec: LlmProposer,
        conversation: list[dict[str, str]],
        say: Callable[[str], None],
    ) -> str:
        headers = {"Content-Type": "application/json"}
        if spec.api_key_env is not None:
            key = llm_api_key(self.settings, spec.api_key_env)
            if key is None:
                raise ProposalRefused(
                    "api_error", f"the service has no {spec.api_key_env} in its environment"
                )
            headers["Authorization"] = f"Bearer {key}"
        body = {
            "model": spec.model,
            "messages": conversation,
            "temperature": spec.temperature,
            "max_tokens": spec.max_tokens,
        }
        url = spec.base_url.rstrip("/") + "/chat/completions"
        last = "no attempt"
        for attempt in range(spec.retries + 1):
            spent = await proposals.reserve_request(
                self.store, loop.id, pid, spec.max_requests, spec.max_total_tokens
            )
            if spent is not None:
                raise ProposalRefused("budget", spent)
            try:
                response = await self.http.post(url, json=body, headers=headers, timeout=spec.timeout_s)
            except httpx.TransportError as exc:
                last, wait = f"{type(exc).__name__}: {exc}", None
            else:
                if response.status_code == 200:
                    pm.LLM_REQUESTS.labels(loop=loop.name, outcome="ok").inc()
                    return await self._content(pid, loop, response, say)
                last = f"HTTP {response.status_code}: {response.text[:300]}"
                if response.status_code != 429 and response.status_code < 500:
                    pm.LLM_REQUESTS.labels(loop=loop.name, outcome="refused").inc()
                    raise ProposalRefused("api_error", f"the chat API refused the request: {last}")
                wait = _retry_after(response)
            pm.LLM_REQUESTS.labels(loop=loop.name, outcome="retried").inc()
            if attempt == spec.retries:
                break
            delay = wait if wait is not None else self.settings.llm_backoff_s * 2**attempt
            delay = min(MAX_RETRY_WAIT_S, delay)
            say(f"request {attempt + 1} failed ({last}); retrying in {delay:g} s\n")
            await asyncio.sleep(delay)
        raise ProposalRefused("api_error", f"the chat API failed {spec.retries + 1} times; last: {last}")

    async def _content(
        self, pid: str, loop: LoopView, response: httpx.Response, say: Callable[[str], None]
    ) -> str:
        try:
            data: Any = response.json()
            content = data["choices"][0]["message"]["content"]
            usage = data.get("usage") or {}
        except (ValueError, KeyError, IndexError, TypeError) as exc:
            raise ProposalRefused("api_error", f"the chat API answered no message ({exc!r})") from None
        tokens = usage.get("total_tokens")
        if not isinstance(tokens, int):
            tokens = sum(
                v for v in (usage.get("prompt_tokens"), usage.get("completion_tokens")) if isinstance(v, int)
            )
        if tokens:
            await proposals.add_tokens(self.store, loop.id, pid, tokens)
            pm.LLM_TOKENS.labels(loop=loop.name).inc(tokens)
        say(f"request ok: {tokens} tokens\n")
        if not isinstance(content, str):
            raise ProposalRefused("bad_reply", "the reply's message has no text content")
        return content


def _retry_after(response: httpx.Response) -> float | None:
    value = response.headers.get("retry-after")
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:
        return None


def _shown_files(tree: dict[str, bytes], editable: list[str]) -> dict[str, str]:
    """The editable text files, as many as fit in FILE_BYTES."""
    shown: dict[str, str] = {}
    used = 0
    for path, data in sorted(tree.items()):
        if not is_editable(path, editable) or used + len(data) > FILE_BYTES:
            continue
        try:
            shown[path] = data.decode("utf-8")
        except UnicodeDecodeError:
            continue
        used += len(data)
    return shown
