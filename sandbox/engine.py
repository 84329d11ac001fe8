"""The engine's failures as the sandbox reports them: `SandboxError`, with a reason from a small
fixed set, made from docker-py's exceptions at one place (`engine_call`); and removals that wait
out a racing removal of the same object instead of leaking it."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator

import docker.errors
import requests.exceptions

__all__ = ["SandboxError", "engine_call", "remove_retrying"]


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


def remove_retrying(call: Callable[[], object], tries: int = 20) -> bool:
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
