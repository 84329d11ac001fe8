"""The trusted evaluation phase: what it may run, what it is given, and how its result and the
training run's combine into one outcome. Pure: no I/O."""

from __future__ import annotations

import posixpath
import re
from collections.abc import Iterable, Mapping

from ..models import EvaluateSpec
from .patches import CandidateError, is_editable

__all__ = [
    "EVAL_SEPARATOR",
    "TRAIN_OUTPUT",
    "check_evaluate",
    "eval_tree",
    "prefixed",
]

TRAIN_OUTPUT = "train_output"  # folder of the evaluation's workspace holding the training output
EVAL_SEPARATOR = "===== evaluation ====="  # between the two phases' logs; never a '---' line
_SAFE_PATH = re.compile(r"^[A-Za-z0-9._+@=,-]+(/[A-Za-z0-9._+@=,-]+)*$")
_FILE_LIKE = re.compile(r"\.[A-Za-z0-9]+$")


def _as_path(arg: str) -> str:
    path = posixpath.normpath(arg) if arg else arg
    while path.startswith("./"):
        path = path[2:]
    return path


def _candidates(command: list[str]) -> Iterable[tuple[str, str]]:
    """(argument, workspace path it may name) for every argument of COMMAND."""
    for i, arg in enumerate(command):
        yield arg, _as_path(arg)
        if i > 0 and command[i - 1] == "-m":  # python3 -m pkg.mod runs pkg/mod.py
            yield arg, arg.replace(".", "/") + ".py"
            yield arg, arg.replace(".", "/") + "/__main__.py"


def check_evaluate(spec: EvaluateSpec, editable: list[str], files: Iterable[str]) -> None:
    """Refuse an evaluation that could run a file candidates may change. FILES are the paths of
    the loop's initial workspace. (Its data: `rules.datasets`.)"""
    tree = set(files)
    for arg, path in _candidates(spec.command):
        named = path in tree or "/" in path or bool(_FILE_LIKE.search(path))
        if named and is_editable(path, editable):
            raise CandidateError(
                f"evaluate.command runs {arg!r}, which candidates may edit (editable: {editable});"
                " the evaluation must only run non-editable files"
            )


def eval_tree(
    tree: Mapping[str, bytes], editable: list[str], train_output: Mapping[str, bytes]
) -> tuple[dict[str, bytes], list[str]]:
    """The evaluation's workspace: the non-editable files plus the training output under
    `train_output/`. Returns it and the output names left out (unsafe or clashing paths)."""
    out = {p: d for p, d in tree.items() if not is_editable(p, editable)}
    skipped: list[str] = []
    for name, data in sorted(train_output.items()):
        path = f"{TRAIN_OUTPUT}/{name}"
        if not _SAFE_PATH.match(name) or any(p in (".", "..") for p in name.split("/")) or path in out:
            skipped.append(name)
            continue
        out[path] = data
    return out, skipped


def prefixed(metrics: Mapping[str, float], prefix: str = "train.") -> dict[str, float]:
    return {f"{prefix}{k}": v for k, v in metrics.items()}
