"""The container engine's failures, translated at one place into `SandboxError`, and removal that
waits out a removal already under way."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator

import docker
import docker.errors
import requests.exceptions

__all__ = ["PING_TIMEOUT_S", "SandboxError", "engine_call", "ping", "remove", "remove_labelled"]

# A hung engine must flip readiness in seconds, not after the client's timeout for long calls.
PING_TIMEOUT_S = 3.0


class SandboxError(RuntimeError):
    """The container engine failed (not the workload): unreachable, image missing, API error.

    `reason` is one of a small fixed set (image_missing, refused, unreachable) so callers can count
    failures by kind without parsing messages."""

    def __init__(self, message: str, reason: str = "refused") -> None:
        super().__init__(message)
        self.reason = reason


@contextlib.contextmanager
def engine_call(action: str) -> Iterator[None]:
    """The one place where engine exceptions become `SandboxError`."""
    try:
        yield
    except docker.errors.ImageNotFound as exc:
        raise SandboxError(f"{action}: image not found ({exc.explanation})", "image_missing") from exc
    except docker.errors.APIError as exc:
        raise SandboxError(f"{action}: engine refused: {exc.explanation or exc}") from exc
    except (docker.errors.DockerException, requests.exceptions.RequestException, OSError) as exc:
        raise SandboxError(f"{action}: engine unreachable: {exc}", "unreachable") from exc


def remove(call: Callable[[], object], tries: int = 20) -> bool:
    """Runs an engine removal; False when the object was already gone. Another removal of the same
    container (a cleanup by label racing a run's own release) answers 409 while it is in progress,
    and its volume stays "in use" until it is done: wait for that rather than leak the volume."""
    for attempt in range(tries):
        try:
            call()
            return True
        except docker.errors.NotFound:
            return False
        except docker.errors.APIError as exc:
            if exc.status_code != 409 or attempt == tries - 1:
                raise
            time.sleep(0.1)
    return False


def remove_labelled(
    client: docker.DockerClient, labels: dict[str, str], keep: frozenset[str] = frozenset()
) -> int:
    """Force-removes every container and volume carrying all of `labels`, except those named (by
    container id or volume name) in `keep`; returns how many."""
    filters = {"label": [f"{k}={v}" for k, v in labels.items()]}
    removed = 0
    with engine_call("cleanup"):
        for c in client.containers.list(all=True, filters=filters):
            if c.id not in keep and remove(lambda c=c: c.remove(force=True)):
                removed += 1
        for v in client.volumes.list(filters=filters):
            if v.name not in keep and remove(lambda v=v: v.remove(force=True)):
                removed += 1
    return removed


def ping(client: docker.DockerClient, timeout: float = PING_TIMEOUT_S) -> bool:
    """Whether the engine answers its `/_ping` within `timeout` seconds."""
    try:
        with engine_call("ping"):
            api = client.api
            return bool(api._result(api._get(api._url("/_ping"), timeout=timeout)) == "OK")
    except SandboxError:
        return False
