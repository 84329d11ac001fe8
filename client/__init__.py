"""The client side of Ratchet: the `ratchet` commands that drive a running service, the Python
client of its v1 API, and loop directories read from and written to disk. It talks to the service
over HTTP only and imports no server module (it shares `service.models`, the schema)."""

from .api import FINAL_STATUSES, ApiError, RatchetClient, Unreachable, loop_body_from_dir, parse_sse

__all__ = ["FINAL_STATUSES", "ApiError", "RatchetClient", "Unreachable", "loop_body_from_dir", "parse_sse"]
