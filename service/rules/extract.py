"""Reading a run's metrics: `metrics.json` if the workload wrote one, else the last `---` block of
its log. Pure: no I/O."""

from __future__ import annotations

import json
import math
import re

import msgspec

__all__ = ["Extracted", "extract_metrics", "implausible"]

_KV = re.compile(r"^\s*([A-Za-z_][A-Za-z0-9_.\-/]*)\s*:\s*(\S+)\s*$")
MAX_METRICS = 64


class Extracted(msgspec.Struct, kw_only=True):
    metrics: dict[str, float] = {}
    non_numeric: dict[str, str] = {}  # reported keys whose values are not numbers (shown in reasons)
    source: str = "none"  # "metrics.json", "summary" or "none"
    problem: str | None = None  # why nothing usable was found


def _number(raw: object) -> float | None:
    if isinstance(raw, bool):
        return None
    if isinstance(raw, int | float):
        return float(raw)
    if isinstance(raw, str):
        try:
            return float(raw)
        except ValueError:
            return None
    return None


def _from_json(data: bytes) -> Extracted:
    try:
        obj = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        return Extracted(source="metrics.json", problem=f"metrics.json is not valid JSON: {exc}")
    if not isinstance(obj, dict):
        return Extracted(source="metrics.json", problem="metrics.json must hold a JSON object")
    metrics: dict[str, float] = {}
    non_numeric: dict[str, str] = {}
    for key, value in list(obj.items())[:MAX_METRICS]:
        if not isinstance(key, str) or len(key) > 64:
            continue
        num = _number(value)
        if num is not None:
            metrics[key] = num
        else:
            non_numeric[key] = json.dumps(value)[:40]
    return Extracted(metrics=metrics, non_numeric=non_numeric, source="metrics.json")


def _from_log(log: str) -> Extracted:
    lines = log.splitlines()
    starts = [i for i, line in enumerate(lines) if line.strip() == "---"]
    if not starts:
        return Extracted(problem="no metrics.json and no '---' summary block in the output")
    metrics: dict[str, float] = {}
    non_numeric: dict[str, str] = {}
    for line in lines[starts[-1] + 1 :]:
        m = _KV.match(line)
        if not m or len(metrics) + len(non_numeric) >= MAX_METRICS:
            continue
        num = _number(m.group(2))
        if num is not None:
            metrics[m.group(1)] = num
        else:
            non_numeric[m.group(1)] = m.group(2)[:40]
    return Extracted(metrics=metrics, non_numeric=non_numeric, source="summary")


def extract_metrics(log: str, metrics_json: bytes | None) -> Extracted:
    """All numeric values the run reported. Non-finite values are kept: judging them is not our job."""
    return _from_json(metrics_json) if metrics_json is not None else _from_log(log)


def finite(value: float | None) -> bool:
    return value is not None and math.isfinite(value)


def implausible(name: str, value: float, low: float | None, high: float | None) -> str | None:
    """Why a finite `value` cannot be believed: it lies outside the declared range [low, high]."""
    if not math.isfinite(value) or ((low is None or value >= low) and (high is None or value <= high)):
        return None
    lo = "-inf" if low is None else f"{low:g}"
    hi = "inf" if high is None else f"{high:g}"
    return f"{name} {value:g} is outside the loop's plausible range [{lo}, {hi}] (metric.min_value/max_value)"
