"""What a run gets besides its workspace, made before its gate: the read-only mounts it names
(checked first: a missing volume would be made, empty, by the engine) and its cache directory, a
volume of its own seeded with the spec's starting content. `mount_problem` asks an engine whether
a run there could mount a source at all (a cluster's nodes each have their own)."""

from __future__ import annotations

from typing import Any

import docker
import docker.errors

from .archive import cache_seed_tar
from .engine import SandboxError, engine_call, remove
from .options import CACHE_DIR, cache_volume_options, engine_mount, run_ids
from .spec import Mount, RunSpec, SpecError

__all__ = ["cache_volume_name", "check_mounts", "make_cache_volume", "mount_problem", "seed_cache"]

_CHECK_TARGET = "/ratchet-mount-check"


def cache_volume_name(run_id: str, spec: RunSpec) -> str | None:
    """The run's cache volume; None when it has no cache directory."""
    return f"ratchet-cache-{run_id}" if spec.limits.cache_mb else None


def check_mounts(client: docker.DockerClient, spec: RunSpec) -> None:
    """A volume mount names an existing volume. (A missing host path is the engine's refusal at
    create: the mounts go in its structured form, which never makes one.)"""
    for m in spec.mounts:
        if m.is_bind:
            continue
        try:
            with engine_call("inspect volume"):
                client.volumes.get(m.source)
        except SandboxError as exc:
            if isinstance(exc.__cause__, docker.errors.NotFound):
                raise SpecError(f"volume {m.source!r} (to mount at {m.target}) does not exist") from None
            raise


def make_cache_volume(client: docker.DockerClient, spec: RunSpec, name: str, labels: dict[str, str]) -> None:
    with engine_call("create volume"):
        client.volumes.create(**cache_volume_options(spec, name, labels))


def seed_cache(api: Any, container_id: str, spec: RunSpec) -> None:
    """The cache's starting content, owned by the run's user (the container runs, behind its gate)."""
    if not spec.cache:
        return
    uid = (run_ids(spec) or (0, 0))[0]
    with engine_call("copy cache"):
        if not api.put_archive(container_id, CACHE_DIR, cache_seed_tar(spec.cache, uid)):
            raise SandboxError("copy cache: engine did not accept the archive")


def mount_problem(client: docker.DockerClient, source: str, image: str, labels: dict[str, str]) -> str | None:
    """Why a run on this engine could not mount `source` (a named volume, or a host path as the
    engine sees it, which may not be what this process sees), or None when it could. A path is
    tried as a run's mount is made: a container of `image` (never started) is created with it,
    then removed. Raises SandboxError when the engine cannot tell (unreachable, `image` missing)."""
    mount = Mount(source=source, target=_CHECK_TARGET)
    if not mount.is_bind:
        try:
            with engine_call("inspect volume"):
                client.volumes.get(source)
        except SandboxError as exc:
            if isinstance(exc.__cause__, docker.errors.NotFound):
                return f"volume {source!r} does not exist"
            raise
        return None
    try:
        with engine_call("check a mount"):
            made = client.containers.create(
                image, ["true"], mounts=[engine_mount(mount)], labels=labels, network_disabled=True
            )
    except SandboxError as exc:
        if exc.reason != "refused":
            raise
        return str(exc).removeprefix("check a mount: engine refused: ")
    with engine_call("remove the mount check"):
        remove(lambda: made.remove(force=True))
    return None
