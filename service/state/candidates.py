"""From request bodies to stored loops and queued experiments: every check happens before the
first byte is stored, so a refused request changes nothing."""

from __future__ import annotations

import asyncio
import difflib
from collections.abc import Awaitable, Callable, Mapping

import msgspec

from sandbox import RUNSC_MIN_PIDS

from .. import faults
from ..models import CandidateCreate, LoopConfig, LoopCreate, LoopView
from ..rules.datasets import check_datasets, check_evaluate_datasets, mounted, nowhere
from ..rules.evaluate import check_evaluate
from ..rules.patches import CandidateError, apply_files, apply_patch
from ..rules.workspaces import decode_workspace
from ..settings import Settings
from . import enqueue
from .proposer_checks import check_proposer
from .snapshots import SnapshotStore, decode_manifest
from .store import Store

__all__ = ["NotFound", "create_loop", "submit_candidate", "unified_diff"]


class NotFound(LookupError):
    pass


async def create_loop(
    body: LoopCreate,
    settings: Settings,
    store: Store,
    snapshots: SnapshotStore,
    has_image: Callable[[str], Awaitable[bool | None]],
    gpus: int,
    datasets_at: Mapping[str, frozenset[str] | None] | None = None,
) -> tuple[str, str]:
    """`has_image`: the executor's; `gpus`: the most one run can get; `datasets_at`: the datasets
    on each node of the executor's inventory now (None: not checked there)."""
    config: LoopConfig = msgspec.structs.replace(
        body.config(),
        image=body.image or settings.default_image,
        runtime=body.runtime or settings.runtime,
    )
    if config.resources.gpus > gpus:
        raise CandidateError(
            f"resources.gpus={config.resources.gpus} but this service has {gpus} GPU(s);"
            f" ask for at most {gpus}"
        )
    if config.runtime == "runsc" and config.resources.pids < RUNSC_MIN_PIDS:
        raise CandidateError(
            f"resources.pids={config.resources.pids} is too low for runsc, whose own threads count"
            f" against the limit; use at least {RUNSC_MIN_PIDS}"
        )
    low, high = config.metric.min_value, config.metric.max_value
    if low is not None and high is not None and not low < high:
        raise CandidateError(f"metric.min_value ({low:g}) must be below metric.max_value ({high:g})")
    if config.timeout_s is not None and config.timeout_s < config.time_budget_s:
        raise CandidateError(
            "timeout_s must be at least time_budget_s (it is the hard kill after the budget)"
        )
    try:
        enqueue.rule_of(config)
    except ValueError as exc:
        raise CandidateError(f"acceptance: {exc}") from None
    for key in config.env:
        if key.startswith("RATCHET_"):
            raise CandidateError(f"env {key!r}: RATCHET_* variables are set by the service; rename it")
    check_datasets("datasets", config.datasets, settings.datasets)
    if config.evaluate is not None:
        check_evaluate_datasets(config.evaluate, settings.datasets)
    refusal = nowhere(mounted(config), datasets_at or {})
    if refusal is not None:
        raise CandidateError(refusal)
    if await store.active_loop_named(config.name):
        raise enqueue.Conflict(f"a loop named {config.name!r} is active; stop it or pick another name")
    tree, execs = decode_workspace(body.workspace, settings.max_workspace_bytes, settings.max_workspace_files)
    if config.evaluate is not None:
        check_evaluate(config.evaluate, config.editable, tree)
    if config.deadline is not None and config.deadline.tzinfo is None:
        raise CandidateError("deadline needs a time zone, e.g. 2026-12-02T08:00:00Z")
    await check_proposer(config, tree, settings, has_image)
    if await has_image(config.image or "") is False:  # None: cannot tell; the run will say
        raise CandidateError(
            f"image {config.image!r} is not on the container engine;"
            " build it (images/build.sh) or pull it first"
        )
    manifest = await asyncio.to_thread(snapshots.put_tree, tree, execs)
    return await enqueue.create_loop(store, config, manifest.id, manifest.encode())


def unified_diff(parent: dict[str, bytes], child: dict[str, bytes]) -> str:
    """The candidate's diff against its parent, as the API shows it."""
    out: list[str] = []
    for path in sorted(set(parent) | set(child)):
        old, new = parent.get(path), child.get(path)
        if old == new:
            continue
        a = old.decode("utf-8", errors="replace").splitlines(keepends=True) if old is not None else []
        b = new.decode("utf-8", errors="replace").splitlines(keepends=True) if new is not None else []
        fromfile = f"a/{path}" if old is not None else "/dev/null"
        tofile = f"b/{path}" if new is not None else "/dev/null"
        for line in difflib.unified_diff(a, b, fromfile, tofile):
            out.append(line if line.endswith("\n") else line + "\n\\ No newline at end of file\n")
    return "".join(out)


async def submit_candidate(
    loop: LoopView, body: CandidateCreate, settings: Settings, store: Store, snapshots: SnapshotStore
) -> str:
    if (body.patch is None) == (body.files is None):
        raise CandidateError(
            "give exactly one of 'patch' (a unified diff) or 'files' ({path: full new text})"
        )
    if body.parent is not None:
        parent = await store.resolve_snapshot(loop.id, body.parent)
        if parent is None:
            raise CandidateError(
                f"parent {body.parent!r} is not a snapshot of this loop (or the prefix is ambiguous)"
            )
    else:
        parent = loop.best_snapshot or loop.root_snapshot
    if loop.state == "stopped":
        raise enqueue.Conflict("the loop is stopped; create a new loop to run more experiments")
    raw = await store.get_manifest(parent)
    if raw is None:
        raise NotFound(f"snapshot {parent} not found")
    parent_manifest = decode_manifest(raw)
    tree = await asyncio.to_thread(snapshots.load_tree, parent_manifest)
    editable = loop.config.editable
    if body.patch is not None:
        child = apply_patch(tree, body.patch, editable)
    else:
        child = apply_files(tree, body.files or {}, editable)
        if child == tree:
            raise CandidateError("the files are identical to the parent's: nothing to try")
    total = sum(len(d) for d in child.values())
    if total > settings.max_workspace_bytes or len(child) > settings.max_workspace_files:
        raise CandidateError(
            f"the edited workspace would hold {total} bytes in {len(child)} files; the limits are"
            f" {settings.max_workspace_bytes} bytes (RATCHET_MAX_WORKSPACE_BYTES) and"
            f" {settings.max_workspace_files} files (RATCHET_MAX_WORKSPACE_FILES): make the edit smaller"
        )
    execs = frozenset(e.path for e in parent_manifest.files if e.executable)
    diff = unified_diff(tree, child)
    manifest = await asyncio.to_thread(snapshots.put_tree, child, execs, parent_manifest)
    with faults.scope("submit"):
        return await enqueue.submit(
            store, loop.id, body.description, parent, manifest.id, manifest.encode(), diff
        )
