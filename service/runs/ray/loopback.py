"""Keeps a Ray cluster on one machine on the loopback interface.

Ray turns a loopback address it is given (`--node-ip-address=127.0.0.1`, `--address=127.0.0.1:P`,
`ray.init(address="127.0.0.1:P")`) into the machine's network address before using it, so a
"local" cluster would listen on, and talk over, the network. `pin()` stops that rewrite in this
process: a loopback address stays what it is, every other address is resolved as Ray does.
Each process that parses such an address (the driver, each `ray start`) must call it; the
processes those start get the address already resolved.

    python -m service.runs.ray.loopback start --head --node-ip-address=127.0.0.1 ...

runs Ray's own command line with the rewrite stopped.
"""

from __future__ import annotations

import ipaddress
import sys

__all__ = ["is_loopback", "pin"]


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def pin() -> None:
    """Idempotent. Ray's own code calls the module attribute, so replacing it is enough."""
    import ray._private.services as services

    resolve = services.resolve_ip_for_localhost
    if getattr(resolve, "_ratchet_pinned", False):
        return

    def keep_loopback(host: str) -> str:
        return "127.0.0.1" if host == "localhost" else host if is_loopback(host) else resolve(host)

    keep_loopback._ratchet_pinned = True  # type: ignore[attr-defined]
    services.resolve_ip_for_localhost = keep_loopback


def main() -> int:
    pin()
    from ray.scripts.scripts import main as ray_main

    sys.argv[0] = "ray"
    return ray_main()


if __name__ == "__main__":
    sys.exit(main())
