"""What a run leaves behind, read once its workload has reported its exit and while the gate still
keeps the container (and its volume) alive: the peak memory, the output files and the workspace
paths the spec asks back (`RunSpec.collect`). Each read is capped by the run's own limits."""

from __future__ import annotations

import logging
from typing import Any

import docker.errors

from .archive import read_collected_tar, read_output_tar
from .engine import SandboxError, engine_call
from .options import OUTPUT_DIR, WORKSPACE_DIR
from .spec import RunResult, RunSpec

__all__ = ["collect"]

log = logging.getLogger("ratchet.sandbox")


def collect(api: Any, container_id: str, spec: RunSpec, result: RunResult, run_id: str) -> None:
    """Fills `result` with the peak memory, output files and collected paths (engine errors raise
    `SandboxError`, except for the peak memory, which is only logged)."""
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
