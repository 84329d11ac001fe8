"""Datasets: read-only data the operator declares (`ratchet serve --dataset NAME=PATH`) and loops
name. What a loop body may say about them, checked before anything is stored. Pure: no I/O.

An API body never carries a host path or a volume: only names the operator declared, and where
in the container each goes. That is the whole defence against a token holder reading host
directories into a container, so anything that looks like a path where a name belongs is refused
with the operator's flag named, not looked up."""

from __future__ import annotations

import posixpath
import re
from collections.abc import Collection, Mapping

from ..models import DatasetMount, EvaluateSpec, LoopConfig
from .patches import CandidateError

__all__ = ["FLAG", "HOME", "check_datasets", "check_evaluate_datasets", "mounted", "nowhere", "source_of"]

FLAG = "`ratchet serve --dataset NAME=PATH` (or RATCHET_DATASETS)"
HOME = "/home/sandbox"  # the sandbox user's home: `~/.cache/NAME` is a target under it
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_TARGET = re.compile(r"^(/[A-Za-z0-9._+@=,-]+)+$")
# Never at or under these: the run's volume (workspace with the harness files, output, cache),
# /tmp, and what the image and the kernel need to run anything at all.
_FORBIDDEN = (
    "/sandbox", "/tmp", "/proc", "/dev", "/sys", "/etc", "/usr", "/bin", "/sbin",
    "/lib", "/lib32", "/lib64", "/libx32", "/boot", "/run",
)  # fmt: skip


def _where(target: str) -> str | None:
    """Why a (normalised) target cannot be mounted at, or None."""
    if target == "/":
        return "it would cover the whole file system"
    for p in _FORBIDDEN:
        if target == p or target.startswith(p + "/"):
            if p == "/sandbox":
                return "it would cover the run's workspace, harness files or output (/sandbox)"
            return f"it is at or under {p}"
    if target == HOME or HOME.startswith(target + "/"):
        return f"it would hide the home {HOME} (a target under it is fine, e.g. {HOME}/.cache/NAME)"
    if not _TARGET.match(target):
        return "a target may hold only letters, digits and ._+@=,- between slashes"
    return None


def _undeclared(field: str, name: str, declared: Collection[str]) -> str:
    known = ", ".join(sorted(declared)) or "none"
    return (
        f"{field}.name {name!r} is not a dataset of this service (declared: {known}); the operator"
        f" declares it with `ratchet serve --dataset {name}=PATH` (or RATCHET_DATASETS)"
    )


def check_datasets(field: str, wanted: list[DatasetMount], declared: Collection[str]) -> None:
    """Every entry names a declared dataset by name and mounts it somewhere of its own."""
    seen: list[str] = []
    for i, d in enumerate(wanted):
        at = f"{field}[{i}]"
        if d.name.startswith(("/", ".", "~")) or "/" in d.name or d.name.startswith("volume:"):
            raise CandidateError(
                f"{at}.name {d.name!r} is a host path or volume: API bodies never name those. The"
                f" operator declares data with {FLAG}; a loop names it"
            )
        if not _NAME.match(d.name) or d.name not in declared:
            raise CandidateError(_undeclared(at, d.name, declared))
        if not d.target.startswith("/"):
            raise CandidateError(f"{at}.target {d.target!r} must be an absolute path")
        target = "/" + posixpath.normpath(d.target).lstrip("/")
        why = _where(target)
        if why:
            raise CandidateError(f"{at}.target {d.target!r} is refused: {why}")
        for other in seen:
            if target == other or target.startswith(other + "/") or other.startswith(target + "/"):
                raise CandidateError(f"{at}.target {d.target!r} overlaps another dataset's target {other!r}")
        seen.append(target)


def check_evaluate_datasets(spec: EvaluateSpec, declared: Collection[str]) -> None:
    """The evaluation names its data like training does; the removed `mounts` took host paths."""
    if spec.mounts:
        raise CandidateError(
            "evaluate.mounts is no longer accepted: an API body never names host paths or volumes."
            f" The operator declares the data with {FLAG}; name it in evaluate.datasets"
            ' ([{"name": NAME, "target": "/abs/path"}])'
        )
    check_datasets("evaluate.datasets", spec.datasets, declared)


def source_of(declared: Mapping[str, str], name: str) -> str | None:
    """The engine's source for a declared dataset: a host path, or the volume's name."""
    source = declared.get(name)
    if source is None:
        return None
    return source.removeprefix("volume:")


def mounted(config: LoopConfig) -> set[str]:
    """Every dataset a loop's experiments mount: its training's and its evaluation's (both phases
    of an experiment run on the node it was given)."""
    names = {d.name for d in config.datasets}
    if config.evaluate is not None:
        names |= {d.name for d in config.evaluate.datasets}
    return names


def nowhere(wanted: Collection[str], nodes: Mapping[str, frozenset[str] | None]) -> str | None:
    """Why no node can run a loop mounting `wanted`, or None. `nodes`: each node's datasets (None:
    not checked there). No nodes at all is no refusal: they may join later."""
    if not wanted or not nodes or any(has is None or has >= set(wanted) for has in nodes.values()):
        return None
    lacks = "; ".join(
        f"{node} lacks {', '.join(sorted(set(wanted) - (has or frozenset())))}"
        for node, has in sorted(nodes.items())
    )
    return (
        f"no node has every dataset this loop names ({', '.join(sorted(wanted))}): {lacks}. Put"
        " the data there under the path or volume the operator declared (`ratchet doctor` checks"
        " each node); runs go only to nodes that have all of it"
    )
