"""A small synchronous client for the v1 API, used by the `ratchet` commands, the example driver,
tests and scripts.

client = RatchetClient("http://127.0.0.1:8080")
loop = client.create_loop(loop_body_from_dir("examples/charlm"))
exp = client.submit(loop["id"], "lower lr", patch=open("lr.patch").read())
client.wait(exp["id"])
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import httpx

from service.models import FINAL, RUN_OVER

from .loopdir import loop_body

__all__ = ["FINAL_STATUSES", "ApiError", "RatchetClient", "Unreachable", "loop_body_from_dir", "parse_sse"]

FINAL_STATUSES = frozenset(s.value for s in FINAL)


class ApiError(RuntimeError):
    """The service answered with an error status; `detail` is its message."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(f"HTTP {status}: {detail}")
        self.status, self.detail = status, detail


class Unreachable(RuntimeError):
    """No answer from the service: nothing listening, a dropped connection, a timeout."""

    def __init__(self, url: str, exc: httpx.TransportError) -> None:
        text = str(exc) or exc.__class__.__name__
        if isinstance(exc, httpx.ConnectError):
            reason = "connection refused" if "refused" in text.lower() else text
            message = f"cannot reach Ratchet at {url}: {reason} — is `ratchet serve` running?"
        elif isinstance(exc, httpx.TimeoutException):
            message = f"Ratchet at {url} did not answer in time ({text})"
        else:
            message = f"lost the connection to Ratchet at {url}: {text}"
        super().__init__(message)
        self.url = url


def loop_body_from_dir(path: str | Path, **overrides: Any) -> dict[str, Any]:
    """The loop definition in `DIR/ratchet.toml` or `DIR/ratchet.json` plus every other file of DIR
    as the workspace (see `client.loopdir`)."""
    return loop_body(path, overrides)


def _error(response: httpx.Response) -> ApiError:
    try:
        body = response.json()
    except ValueError:
        return ApiError(response.status_code, response.text.strip() or response.reason_phrase)
    if not isinstance(body, dict):
        return ApiError(response.status_code, str(body))
    detail = str(body.get("detail", response.text))
    # Validation failures name the offending field in `errors`, not in `detail`.
    for err in body.get("errors") or []:
        if isinstance(err, dict) and err.get("message"):
            where = f" ({err['key']})" if err.get("key") else ""
            detail += f"; {err['message']}{where}"
    return ApiError(response.status_code, detail)


def parse_sse(lines: Iterable[str]) -> Iterator[tuple[str, str]]:
    """(event, data) pairs of a server-sent event stream, decoded as the SSE specification says:
    `data:` lines of one event are joined with newlines, a blank line ends the event."""
    event, data = "message", []
    for line in lines:
        if not line:
            if data or event != "message":
                yield event, "\n".join(data)
            event, data = "message", []
            continue
        if line.startswith(":"):
            continue
        field, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if field == "data":
            data.append(value)
        elif field == "event":
            event = value
    if data:
        yield event, "\n".join(data)


class RatchetClient:
    def __init__(self, url: str, timeout: float = 60.0, token: str | None = None) -> None:
        self.url = url.rstrip("/")
        self.timeout = timeout
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.http = httpx.Client(base_url=self.url, timeout=timeout, headers=headers)

    @contextlib.contextmanager
    def _transport(self) -> Iterator[None]:
        try:
            yield
        except httpx.TransportError as exc:
            raise Unreachable(self.url, exc) from exc

    def _call(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        with self._transport():
            response = self.http.request(method, path, **kwargs)
        if response.status_code >= 400:
            raise _error(response)
        return response

    # -- loops -------------------------------------------------------------------------------------

    def create_loop(self, body: dict[str, Any]) -> dict[str, Any]:
        return self._call("POST", "/v1/loops", json=body).json()

    def list_loops(self) -> list[dict[str, Any]]:
        return self._call("GET", "/v1/loops").json()

    def loop(self, loop_id: str) -> dict[str, Any]:
        return self._call("GET", f"/v1/loops/{loop_id}").json()

    def control(self, loop_id: str, action: str) -> dict[str, Any]:
        """`pause`, `resume` or `stop`; returns the loop afterwards."""
        return self._call("POST", f"/v1/loops/{loop_id}/{action}").json()

    def clear_cache(self, loop_id: str) -> dict[str, Any]:
        """Forget the loop's cache; returns the loop."""
        return self._call("DELETE", f"/v1/loops/{loop_id}/cache").json()

    def fill_cache(self, loop_id: str) -> dict[str, Any]:
        """Clear the loop's cache and queue the baseline run that fills it; returns that experiment."""
        return self._call("POST", f"/v1/loops/{loop_id}/cache/fill").json()

    def datasets(self) -> list[dict[str, Any]]:
        return self._call("GET", "/v1/datasets").json()

    def experiments(
        self, loop_id: str, *, status: Iterable[str] = (), after: int = 0, limit: int = 100
    ) -> dict[str, Any]:
        """One page: `{"items": [...], "next_after": n | None}`."""
        params: dict[str, Any] = {"after": after, "limit": limit}
        if status:
            params["status"] = list(status)
        return self._call("GET", f"/v1/loops/{loop_id}/experiments", params=params).json()

    def all_experiments(self, loop_id: str, *, status: Iterable[str] = ()) -> Iterator[dict[str, Any]]:
        after: int | None = 0
        while after is not None:
            page = self.experiments(loop_id, status=status, after=after, limit=1000)
            yield from page["items"]
            after = page["next_after"]

    def recent_experiments(self, loop: dict[str, Any], limit: int) -> list[dict[str, Any]]:
        """The last LIMIT experiments of LOOP (a loop view): numbers run 1..total within a loop."""
        total = sum(loop.get("counts", {}).values())
        return self.experiments(loop["id"], after=max(0, total - limit), limit=limit)["items"]

    def results(self, loop_id: str) -> str:
        return self._call("GET", f"/v1/loops/{loop_id}/results.tsv").text

    def snapshots(self, loop_id: str) -> list[dict[str, Any]]:
        return self._call("GET", f"/v1/loops/{loop_id}/snapshots").json()

    def archive(self, snapshot_id: str) -> bytes:
        return self._call("GET", f"/v1/snapshots/{snapshot_id}/archive").content

    # -- proposals ---------------------------------------------------------------------------------

    def proposals(
        self, loop_id: str, *, status: Iterable[str] = (), after: int = 0, limit: int = 100
    ) -> dict[str, Any]:
        """One page of a loop's proposer runs: `{"items": [...], "next_after": n | None}`."""
        params: dict[str, Any] = {"after": after, "limit": limit}
        if status:
            params["status"] = list(status)
        return self._call("GET", f"/v1/loops/{loop_id}/proposals", params=params).json()

    def recent_proposals(self, loop: dict[str, Any], limit: int) -> list[dict[str, Any]]:
        """The last LIMIT proposer runs of LOOP (a loop view with its `proposer`), oldest first."""
        total = sum(((loop.get("proposer") or {}).get("counts") or {}).values())
        return self.proposals(loop["id"], after=max(0, total - limit), limit=limit)["items"]

    def proposal(self, proposal_id: str) -> dict[str, Any]:
        return self._call("GET", f"/v1/proposals/{proposal_id}").json()

    def cancel_proposal(self, proposal_id: str) -> dict[str, Any]:
        return self._call("POST", f"/v1/proposals/{proposal_id}/cancel").json()

    # -- tokens ------------------------------------------------------------------------------------

    def service_info(self) -> dict[str, Any]:
        """Version and data dir of the service (admin)."""
        return self._call("GET", "/v1/service").json()

    def create_token(
        self, name: str, scopes: Iterable[str], loops: Iterable[str] | None = None
    ) -> dict[str, Any]:
        """A new token; its `secret` is in this answer only."""
        body: dict[str, Any] = {"name": name, "scopes": list(scopes)}
        if loops is not None:
            body["loops"] = list(loops)
        return self._call("POST", "/v1/tokens", json=body).json()

    def list_tokens(self) -> list[dict[str, Any]]:
        return self._call("GET", "/v1/tokens").json()

    def revoke_token(self, token_id: str) -> None:
        self._call("DELETE", f"/v1/tokens/{token_id}")

    # -- experiments -------------------------------------------------------------------------------

    def submit(
        self,
        loop_id: str,
        description: str,
        *,
        patch: str | None = None,
        files: dict[str, str] | None = None,
        parent: str | None = None,
    ) -> dict[str, Any]:
        body: dict[str, Any] = {"description": description}
        for key, value in (("patch", patch), ("files", files), ("parent", parent)):
            if value is not None:
                body[key] = value
        return self._call("POST", f"/v1/loops/{loop_id}/experiments", json=body).json()

    def experiment(self, exp_id: str) -> dict[str, Any]:
        return self._call("GET", f"/v1/experiments/{exp_id}").json()

    def wait(self, exp_id: str, timeout: float = 3600.0, poll: float = 0.5) -> dict[str, Any]:
        """Polls until the experiment is final; `timeout=math.inf` waits for as long as it takes."""
        deadline = time.monotonic() + timeout
        while True:
            exp = self.experiment(exp_id)
            if exp["status"] in FINAL_STATUSES:
                return exp
            if time.monotonic() > deadline:
                raise TimeoutError(f"experiment {exp_id} still {exp['status']} after {timeout:g} s")
            time.sleep(poll)

    def logs(self, exp_id: str, kind: str = "experiments") -> str:
        """The log of an experiment (or, with kind="proposals", of a proposer run)."""
        return self._call("GET", f"/v1/{kind}/{exp_id}/logs").text

    def diff(self, exp_id: str) -> str:
        return self._call("GET", f"/v1/experiments/{exp_id}/diff").text

    def follow_logs(self, exp_id: str, poll: float = 0.5, kind: str = "experiments") -> Iterator[str]:
        """The log as it grows, in chunks, until the experiment (or, with kind="proposals", the
        proposer run) is final.

        Asks for `?follow=true`: a server that streams answers with server-sent events (one `data`
        event per chunk, then `event: end`); one that does not answers with the log so far as plain
        text, and then the log is polled along with the experiment's status."""
        path = f"/v1/{kind}/{exp_id}/logs"
        # The stream may be quiet for as long as the workload prints nothing.
        stream_timeout = httpx.Timeout(self.timeout, read=None)
        with (
            self._transport(),
            self.http.stream("GET", path, params={"follow": "true"}, timeout=stream_timeout) as response,
        ):
            if response.status_code >= 400:
                response.read()
                raise _error(response)
            if response.headers.get("content-type", "").startswith("text/event-stream"):
                for event, data in parse_sse(response.iter_lines()):
                    if event == "end":
                        return
                    if event in ("message", "log"):
                        yield data
                return
            first = response.read().decode("utf-8", errors="replace")
        yield from self.poll_logs(exp_id, poll, first)

    def poll_logs(self, exp_id: str, poll: float = 0.5, text: str = "") -> Iterator[str]:
        """Follows the log by polling the experiment and its plain-text log (TEXT: already fetched)."""
        shown = 0
        while True:
            if len(text) > shown:
                yield text[shown:]
                shown = len(text)
            # Status first: a log read after a final status is the complete log.
            final = self.experiment(exp_id)["status"] in RUN_OVER  # the run's own log is complete
            if not final:
                time.sleep(poll)
            text = self.logs(exp_id)
            if final:
                if len(text) > shown:
                    yield text[shown:]
                return
