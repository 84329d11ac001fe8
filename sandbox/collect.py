"""What is read back from a run once its gate reported the workload's end, while the gate still
keeps the container (and its volumes) alive: the peak memory, the output files, the workspace paths
the spec asks back (`RunSpec.collect`) and the cache directory when the spec asks for it. Each read
is capped by the run's own limits."""

from __future__ import annotations

import logging
from typing import Any

import docker.errors

from .archive import read_cache_tar, read_collected_tar, read_output_tar
from .engine import SandboxError, engine_call
from .options import CACHE_DIR, OUTPUT_DIR, WORKSPACE_DIR
from .spec import RunResult, RunSpec

__all__ = ["collect"]

log = logging.getLogger("ratchet.sandbox")


def collect(api: Any, container_id: str, spec: RunSpec, result: RunResult, run_id: str) -> None:
    """Fills `result` with the peak memory, output files, collected paths and cache (engine errors
    raise `SandboxError`, except for the peak memory, which is only logged)."""
    try:
        with engine_call("read peak memory"):
            stats = api.stats(container_id, stream=False, one_shot=True)
        result.peak_memory_bytes = (stats.get("memory_stats") or {}).get("max_usage")
    except SandboxError as exc:
        log.warning("run %s: %s", run_id, exc)
    if spec.limits.output_bytes > 0:
        with engine_call("collect output"):
            try:
                chunks, _ = api.get_archive(container_id, OUTPUT_DIR)
            except docker.errors.NotFound:
                chunks = iter(())
            # The output directory cannot outgrow the run's disk: read that far at most, so
            # files after a skipped large one still arrive.
            read_limit = (spec.limits.disk_mb + 1) * 1024 * 1024
            files, skipped = read_output_tar(iter(chunks), spec.limits.output_bytes, read_limit)
        result.output_files, result.output_skipped = files, skipped
    if spec.collect_cache:
        with engine_call("collect cache"):
            chunks, _ = api.get_archive(container_id, CACHE_DIR)
            cap = spec.limits.cache_mb * 1024 * 1024
            result.cache, result.cache_skipped = read_cache_tar(iter(chunks), cap, 2 * cap + 1024 * 1024)
    for path in spec.collect:
        _collect_path(api, container_id, spec, path, result)


def _collect_path(api: Any, container_id: str, spec: RunSpec, path: str, result: RunResult) -> None:
    """A workspace path as the workload left it (the volume holds at most `disk_mb`)."""
    where = WORKSPACE_DIR if path == "." else f"{WORKSPACE_DIR}/{path}"
    with engine_call("collect workspace"):
        try:
            chunks, _ = api.get_archive(container_id, where)
        except docker.errors.NotFound:
            return
        cap = spec.limits.disk_mb * 1024 * 1024
        archived = where.rsplit("/", 1)[-1]
        files, skipped = read_collected_tar(iter(chunks), path, archived, cap, cap + 1024 * 1024)
    result.workspace_files.update(files)
    result.workspace_skipped.extend(skipped)
