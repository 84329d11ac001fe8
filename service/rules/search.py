"""The built-in `search` proposer: random local search over declared assignments. Pure.

A knob is a top-level assignment `NAME = value` (optionally `NAME: type = value`, with a trailing
comment) in one editable file, whose value is a Python literal. Each proposal starts from the
current best text and changes one knob (two, three times in ten): a range knob moves by a Gaussian
step of `step` times its range, measured in its own scale (log or linear), reflected back into the
range and rounded for integers; a choice knob takes another of its choices. The generator is seeded
with the loop's seed and the proposal's number, so a loop proposes the same candidates from the
same best, and a proposal run again after a restart proposes the same edit.
"""

from __future__ import annotations

import ast
import math
import random
import re

from ..proposal_models import Knob, SearchProposer
from .patches import CandidateError, is_editable

__all__ = ["Assignment", "SearchError", "assignments", "check_search", "propose"]

_ASSIGN = re.compile(
    r"^(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?P<sep>[ \t]*(?::[^=\n]*)?=[ \t]*)"
    r"(?P<value>[^#\n]*?)(?P<rest>[ \t]*(?:#[^\n]*)?)$",
    re.MULTILINE,
)
_TRIES = 16
Value = int | float | str | bool


class SearchError(CandidateError):
    """The search cannot run on this loop as configured; the message says what to fix."""


class Assignment:
    """Where one knob's value sits in the text."""

    def __init__(self, name: str, value: Value, start: int, end: int) -> None:
        self.name, self.value, self.start, self.end = name, value, start, end


def assignments(text: str, names: set[str]) -> dict[str, Assignment]:
    """The top-level assignment of each name in `names`; refused if missing, repeated or not a
    literal."""
    found: dict[str, Assignment] = {}
    for m in _ASSIGN.finditer(text):
        name = m.group("name")
        if name not in names:
            continue
        if name in found:
            raise SearchError(f"knob {name} is assigned more than once at the top level; keep one")
        try:
            value = ast.literal_eval(m.group("value").strip())
        except (ValueError, SyntaxError):
            raise SearchError(
                f"knob {name}: {m.group('value').strip()!r} is not a plain literal (a number, string or bool)"
            ) from None
        if not isinstance(value, int | float | str | bool):
            raise SearchError(f"knob {name}: its value must be a number, string or bool")
        found[name] = Assignment(name, value, m.start("value"), m.end("value"))
    missing = sorted(names - set(found))
    if missing:
        raise SearchError(f"no top-level assignment 'NAME = value' for knob(s) {', '.join(missing)}")
    return found


def _check_knob(name: str, knob: Knob, value: Value) -> None:
    if knob.choices is not None:
        if knob.min is not None or knob.max is not None:
            raise SearchError(f"knob {name}: give either min/max or choices, not both")
        return
    if knob.min is None or knob.max is None or not knob.min < knob.max:
        raise SearchError(f"knob {name}: give min < max (or a list of choices)")
    if knob.log and knob.min <= 0:
        raise SearchError(f"knob {name}: a log-scale range needs min > 0")
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise SearchError(f"knob {name}: a range needs a numeric value, found {value!r}")


def check_search(spec: SearchProposer, tree: dict[str, bytes], editable: list[str]) -> None:
    """Refuses a search that could not run on `tree` (the loop's workspace)."""
    if spec.file not in tree:
        raise SearchError(f"search.file {spec.file!r} is not in the workspace")
    if not is_editable(spec.file, editable):
        raise SearchError(f"search.file {spec.file!r} is read-only in this loop; name an editable file")
    try:
        text = tree[spec.file].decode("utf-8")
    except UnicodeDecodeError:
        raise SearchError(f"search.file {spec.file!r} is not UTF-8 text") from None
    found = assignments(text, set(spec.knobs))
    for name, knob in spec.knobs.items():
        _check_knob(name, knob, found[name].value)


def _unit(knob: Knob, x: float) -> float:
    lo, hi = float(knob.min or 0.0), float(knob.max or 0.0)
    if knob.log:
        x = min(max(x, lo), hi)
        return (math.log(x) - math.log(lo)) / (math.log(hi) - math.log(lo))
    return min(max((x - lo) / (hi - lo), 0.0), 1.0)


def _from_unit(knob: Knob, u: float) -> float:
    lo, hi = float(knob.min or 0.0), float(knob.max or 0.0)
    if knob.log:
        return math.exp(math.log(lo) + u * (math.log(hi) - math.log(lo)))
    return lo + u * (hi - lo)


def _reflect(u: float) -> float:
    u = abs(u) % 2.0
    return 2.0 - u if u > 1.0 else u


def render(value: Value, like: Value) -> str:
    """The literal of `value` in the style of the value it replaces: an int stays an int, a float
    keeps 4 significant digits and stays a float literal."""
    if isinstance(value, bool | str):
        return repr(value)
    if isinstance(like, int) and not isinstance(like, bool) and isinstance(value, int):
        return str(value)
    text = f"{float(value):.4g}"
    return text if any(c in text for c in ".eni") else text + ".0"


def _step(knob: Knob, current: Value, rng: random.Random, step: float) -> Value:
    if knob.choices is not None:
        others = [c for c in knob.choices if c != current] or list(knob.choices)
        return rng.choice(others)
    assert isinstance(current, int | float)
    u = _reflect(_unit(knob, float(current)) + rng.gauss(0.0, step))
    x = _from_unit(knob, u)
    if knob.integer:
        return max(int(knob.min or 0), min(int(knob.max or 0), round(x)))
    return x


def propose(spec: SearchProposer, text: str, number: int) -> tuple[str, str]:
    """Proposal `number` from `text`: (the new text, a description naming each change)."""
    found = assignments(text, set(spec.knobs))
    rng = random.Random(f"ratchet-search:{spec.seed}:{number}")
    names = sorted(spec.knobs)
    count = 2 if len(names) > 1 and rng.random() < 0.3 else 1
    chosen = rng.sample(names, count)
    edits: list[tuple[Assignment, str]] = []
    for name in chosen:
        knob, at = spec.knobs[name], found[name]
        old = text[at.start : at.end].strip()
        new = old
        for _ in range(_TRIES):  # a step may round back onto the same literal
            new = render(_step(knob, at.value, rng, spec.step), at.value)
            if new != old:
                break
        if new != old:
            edits.append((at, new))
    if not edits:
        raise SearchError("no knob could be moved: each step rounded back to its current value")
    out = text
    for at, new in sorted(edits, key=lambda e: e[0].start, reverse=True):
        out = out[: at.start] + new + out[at.end :]
    changes = ", ".join(f"{at.name} {text[at.start : at.end].strip()} -> {new}" for at, new in edits)
    return out, f"search: {changes}"
