"""Joining a Ray cluster as its driver: token authentication on unless switched off, and a loopback
address kept on loopback.

Ray reads its authentication settings (`RAY_AUTH_MODE`, `RAY_AUTH_TOKEN`, `RAY_AUTH_TOKEN_PATH`,
`~/.ray/auth_token`) from the environment and caches them when it is imported; `authenticate`
sets them from Ratchet's settings and has Ray read them again. With `auth="token"` (the default)
no token means no start: a driver without one is refused by a cluster that checks, and one that
does not check is refused by the executor (each node's agent reports the node's mode).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Literal

from sandbox import SandboxError

from .loopback import is_loopback, pin

__all__ = ["NAMESPACE", "authenticate", "join"]

NAMESPACE = "ratchet"
log = logging.getLogger("ratchet.ray")


def authenticate(auth: Literal["token", "none"], token_file: str | None) -> None:
    """Set Ray's authentication for this process (and what it starts). Raises SandboxError
    ("refused") when token authentication is asked for and no token can be found."""
    from ray._raylet import AuthenticationTokenLoader, Config

    if auth == "none":
        os.environ["RAY_AUTH_MODE"] = "disabled"
    else:
        os.environ["RAY_AUTH_MODE"] = "token"
        if token_file is not None:
            path = Path(token_file).expanduser()
            if not path.is_file():
                raise SandboxError(f"RATCHET_RAY_TOKEN_FILE {token_file}: no such file", "refused")
            os.environ["RAY_AUTH_TOKEN_PATH"] = str(path)
            os.environ.pop("RAY_AUTH_TOKEN", None)  # Ray would prefer it over the file
    Config.initialize("")
    loader = AuthenticationTokenLoader.instance()
    loader.reset_cache()
    if auth == "token" and not loader.has_token(ignore_auth_mode=True):
        raise SandboxError(
            "no Ray authentication token: set RATCHET_RAY_TOKEN_FILE (or Ray's RAY_AUTH_TOKEN,"
            " RAY_AUTH_TOKEN_PATH, ~/.ray/auth_token) to the cluster's token; RATCHET_RAY_AUTH=none"
            " joins a cluster without token authentication, which runs code for anyone who reaches it",
            "refused",
        )


class _NoSignalNote(logging.Filter):
    """`ray.init` runs in a worker thread on purpose, so that Ray installs no SIGTERM handler
    of its own (it would exit the service instead of letting it stop gracefully); Ray warns
    about exactly that, on every start."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "SIGTERM handler is not set" not in record.getMessage()


def join(address: str, auth: Literal["token", "none"], token_file: str | None) -> None:
    """`ray.init` against the cluster at `address` (host:port of its GCS). Blocking; call it
    from a thread other than the main one."""
    import ray

    logging.getLogger("ray._private.worker").addFilter(_NoSignalNote())

    host = address.rpartition(":")[0].strip("[]")
    local = is_loopback(host)
    if local:
        pin()  # else Ray would turn 127.0.0.1 into this machine's network address
    authenticate(auth, token_file)
    if auth == "none":
        log.warning(
            "!!! Ray token authentication is OFF (RATCHET_RAY_AUTH=none): anyone who reaches the"
            " cluster at %s can run code on every node !!!",
            address,
        )
    try:
        ray.init(
            address=address,
            namespace=NAMESPACE,
            logging_level=logging.WARNING,
            log_to_driver=False,
            configure_logging=False,
            _node_ip_address="127.0.0.1" if local else None,
        )
    except Exception as exc:
        raise SandboxError(f"cannot join the Ray cluster at {address}: {exc}", "unreachable") from exc
