"""Asks the engine how containers get GPUs there; `sandbox.gpus.decide_route` decides from the answers.

Docker has no API that lists its device drivers, so whether the `nvidia` driver is registered is
learned the only reliable way: a throw-away container asking it for no device at all is started
(the driver is chosen at start, not at create). Engine errors propagate as docker-py raises them;
the caller translates them.
"""

from __future__ import annotations

import logging

import docker
import docker.errors
import requests.exceptions

from .gpus import EngineProbe, decide_route

__all__ = ["LABEL_PROBE", "accepts_nvidia_driver", "probe_engine"]

log = logging.getLogger("ratchet.sandbox")

LABEL_PROBE = "ratchet.probe"
_NO_DRIVER = "could not select device driver"  # the engine's words when no driver matches a request


def probe_engine(client: docker.DockerClient, image: str | None, labels: dict[str, str]) -> EngineProbe:
    """The engine's version, runtimes and CDI state, and its GPU route. With `image`, the `nvidia`
    driver is tried with a container of it unless the engine already lists nvidia CDI devices."""
    version = client.api.version()
    info = client.api.info()
    passive = decide_route(version, info, nvidia_driver=None)
    if image is None or (passive.route == "cdi" and passive.cdi_devices):
        return passive
    return decide_route(version, info, nvidia_driver=accepts_nvidia_driver(client, image, labels))


def accepts_nvidia_driver(client: docker.DockerClient, image: str, labels: dict[str, str]) -> bool:
    """Whether the engine starts a container that asks the `nvidia` driver for no device. It runs
    `exit 0` as the sandbox user, with no network and no capabilities; NVIDIA_VISIBLE_DEVICES=void
    makes NVIDIA's real hook do nothing, so no GPU is touched."""
    container = client.containers.create(
        image,
        entrypoint=["/bin/sh", "-c", "exit 0"],
        command=[],
        user="1000:1000",
        environment={"NVIDIA_VISIBLE_DEVICES": "void"},
        labels={**labels, LABEL_PROBE: "nvidia-driver"},
        network_mode="none",
        read_only=True,
        cap_drop=["ALL"],
        security_opt=["no-new-privileges"],
        mem_limit="64m",
        pids_limit=16,
        runtime="runc",
        device_requests=[{"Driver": "nvidia", "Count": 0, "Capabilities": [["gpu"]]}],
        detach=True,
    )
    try:
        try:
            container.start()
        except docker.errors.APIError as exc:
            if _NO_DRIVER in str(exc.explanation or exc):
                return False
            raise
        container.wait(timeout=30)
        return True
    finally:
        try:
            container.remove(force=True)
        except docker.errors.NotFound:
            pass
        except (docker.errors.APIError, requests.exceptions.RequestException) as exc:
            log.warning("could not remove the GPU probe container %s: %s", container.short_id, exc)
