"""The progress chart of a loop as SVG text: x = experiment number, y = metric, every finished
experiment a dot, kept ones highlighted and labelled, the running best as a step line.

Pure: points in, markup out. No plotting library: the chart is a few hundred lines of SVG, and
keeping it dependency-free keeps the service image small and the output testable as XML.
"""

from __future__ import annotations

import html
import itertools
import math
import re
import statistics
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["LABEL_CHARS", "MAX_LABELS", "Point", "nice_ticks", "progress_svg", "y_window"]

WIDTH, HEIGHT = 960, 500
LEFT, RIGHT, TOP, BOTTOM = 84, 24, 64, 58
LABEL_CHARS = 40
MAX_LABELS = 80  # placement is quadratic in labels; beyond this many nothing more fits anyway
LABEL_ANGLE = 28
LABEL_EM = 0.56  # average glyph width per font size, to size label boxes without a font engine
FONT = "system-ui, -apple-system, 'Segoe UI', Roboto, 'DejaVu Sans', sans-serif"
GREEN, GREY, EDGE = "#1a9850", "#9aa0a6", "#5f6368"

# XML 1.0 forbids most control characters even as entities; descriptions are agent-written.
_NOT_XML = re.compile("[^\x09\x0a\x0d\x20-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")


@dataclass(frozen=True, slots=True)
class Point:
    number: int
    value: float
    kept: bool
    description: str = ""


def _esc(text: str) -> str:
    return html.escape(_NOT_XML.sub("\ufffd", text), quote=True)


def _short(text: str, limit: int = LABEL_CHARS) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1].rstrip() + "\u2026"


def _f(x: float) -> str:
    return f"{x:.1f}"


def nice_ticks(lo: float, hi: float, target: int = 6, integer: bool = False) -> list[float]:
    """Round tick values (1, 2 or 5 times a power of ten) covering [lo, hi]."""
    span = hi - lo
    if not (math.isfinite(span) and span > 0):
        return [lo]
    raw = span / max(target, 1)
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 5, 10) if raw <= m * mag * (1 + 1e-9))
    if integer:
        step = max(1.0, round(step))
    first = math.ceil(lo / step - 1e-9)
    ticks = []
    k = first
    while k * step <= hi + step * 1e-9:
        ticks.append(k * step)
        k += 1
    return ticks


def _tick_text(value: float, step: float) -> str:
    if value == 0:
        return "0"
    if abs(value) >= 1e6 or step < 1e-5:
        return f"{value:.4g}"
    decimals = max(0, -math.floor(math.log10(step) + 1e-9))
    return f"{value:.{decimals}f}"


def y_window(values: Sequence[float], core: Sequence[float]) -> tuple[float, float]:
    """The range of metric values worth showing: the kept values (`core`) widened by their spread,
    by the robust spread of all values, and by 2 % of their magnitude, so one wild discard cannot
    flatten the region where the loop actually moves. Values outside are drawn at the edge."""
    lo, hi = min(core), max(core)
    med = statistics.median(values)
    mad = statistics.median(abs(v - med) for v in values)
    scale = max(hi - lo, 3 * 1.4826 * mad, 0.02 * max(abs(lo), abs(hi)), 1e-12)
    return lo - 1.5 * scale, hi + 1.5 * scale


@dataclass(frozen=True, slots=True)
class _Frame:
    x0: float
    x1: float
    y0: float
    y1: float

    def x(self, number: float) -> float:
        return LEFT + (number - self.x0) / (self.x1 - self.x0) * (WIDTH - LEFT - RIGHT)

    def y(self, value: float) -> float:
        return TOP + (self.y1 - value) / (self.y1 - self.y0) * (HEIGHT - TOP - BOTTOM)


def _frame(points: Sequence[Point], shown: Sequence[float], minimize: bool) -> _Frame:
    numbers = [p.number for p in points]
    n0, n1 = min(numbers), max(numbers)
    xpad = max(0.5, (n1 - n0) * 0.03)
    lo, hi = min(shown), max(shown)
    span = hi - lo
    if span <= 0:
        span = max(abs(hi) * 0.1, 1e-3)
        lo, hi = lo - span / 2, hi + span / 2
    # extra room on the better side, where the labels of kept points go
    below, above = (0.22, 0.08) if minimize else (0.08, 0.22)
    return _Frame(n0 - xpad, n1 + xpad, lo - below * span, hi + above * span)


def _running_best(kept: Sequence[Point], minimize: bool) -> list[tuple[int, float]]:
    """(number, best) at each point where the best so far changes, in experiment order."""
    steps: list[tuple[int, float]] = []
    for p in kept:
        if not steps or (p.value < steps[-1][1] if minimize else p.value > steps[-1][1]):
            steps.append((p.number, p.value))
    return steps


def _box(metric: str, minimize: bool) -> list[str]:
    """The plot area and the axis titles."""
    plot_w, plot_h = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM
    direction = "lower is better" if minimize else "higher is better"
    cy = TOP + plot_h / 2
    return [
        f'<rect class="plot" x="{LEFT}" y="{TOP}" width="{plot_w}" height="{plot_h}" fill="#fff"/>',
        f'<text class="axis" x="{LEFT + plot_w / 2:.1f}" y="{HEIGHT - 24}" text-anchor="middle">'
        "experiment number</text>",
        f'<text class="axis" x="18" y="{cy:.1f}" text-anchor="middle" transform="rotate(-90 18 {cy:.1f})">'
        f"{_esc(metric)} ({direction})</text>",
    ]


def _border() -> str:
    plot_w, plot_h = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM
    return f'<rect x="{LEFT}" y="{TOP}" width="{plot_w}" height="{plot_h}" fill="none" stroke="#5f6368"/>'


def _ticks(f: _Frame) -> list[str]:
    out = []
    yt = nice_ticks(f.y0, f.y1, 6)
    ystep = yt[1] - yt[0] if len(yt) > 1 else abs(f.y1 - f.y0)
    for v in yt:
        y = _f(f.y(v))
        out.append(f'<line class="grid" x1="{LEFT}" x2="{WIDTH - RIGHT}" y1="{y}" y2="{y}"/>')
        out.append(f'<text class="tick" x="{LEFT - 6}" y="{y}" text-anchor="end" dy="0.32em">')
        out.append(f"{_tick_text(v, ystep)}</text>")
    for v in nice_ticks(max(f.x0, 0), f.x1, 10, integer=True):
        if v < f.x0:
            continue
        x = _f(f.x(v))
        out.append(f'<line class="grid" x1="{x}" x2="{x}" y1="{TOP}" y2="{HEIGHT - BOTTOM}"/>')
        out.append(
            f'<text class="tick" x="{x}" y="{HEIGHT - BOTTOM + 16}" text-anchor="middle">{int(v)}</text>'
        )
    return out


def _legend(clipped: bool) -> str:
    x, y = WIDTH - RIGHT - 420, 44
    parts = [
        f'<g class="legend" transform="translate({x} {y})">',
        f'<circle cx="0" cy="-4" r="3.5" fill="{GREY}"/><text x="8" y="0">discarded</text>',
        f'<circle cx="86" cy="-4" r="5" fill="{GREEN}" stroke="#0b5d2e"/><text x="96" y="0">kept</text>',
        f'<path d="M140 -4 H168" stroke="{GREEN}" stroke-width="2"/><text x="174" y="0">running best</text>',
    ]
    if clipped:
        parts.append(
            f'<path d="M276 0 l4 -8 l4 8 z" fill="{EDGE}"/><text x="290" y="0">outside the range</text>'
        )
    parts.append("</g>")
    return "".join(parts)


@dataclass(frozen=True, slots=True)
class _Label:
    markup: str
    corners: tuple[tuple[float, float], ...]
    axes: tuple[tuple[float, float], tuple[float, float]]

    def overlaps(self, other: _Label) -> bool:
        """Separating-axis test of two rotated rectangles."""
        for ax in (*self.axes, *other.axes):
            a = [c[0] * ax[0] + c[1] * ax[1] for c in self.corners]
            b = [c[0] * ax[0] + c[1] * ax[1] for c in other.corners]
            if max(a) < min(b) or max(b) < min(a):
                return False
        return True

    def inside(self) -> bool:
        return all(LEFT <= x <= WIDTH - RIGHT and TOP <= y <= HEIGHT - BOTTOM for x, y in self.corners)


def _label_at(text: str, x: float, y: float, angle: float, anchor: str) -> _Label:
    a = math.radians(angle)
    u, n = (math.cos(a), math.sin(a)), (-math.sin(a), math.cos(a))
    length = len(text) * LABEL_EM * 10
    start = -length if anchor == "end" else 0.0
    corners = tuple(
        (x + s * u[0] + t * n[0], y + s * u[1] + t * n[1])
        for s in (start, start + length)
        for t in (-8.0, 2.5)
    )
    markup = (
        f'<text class="label" x="{_f(x)}" y="{_f(y)}" text-anchor="{anchor}"'
        f' transform="rotate({angle} {_f(x)} {_f(y)})">{_esc(text)}</text>'
    )
    return _Label(markup, corners, (u, n))


def _label_options(p: Point, f: _Frame, minimize: bool) -> list[_Label]:
    """Where the label of a kept point may go, best first. It leans away from the step line:
    below-left of a kept point is empty when minimising (everything earlier was worse), above-left
    when maximising; to the right, then level with the point, are the fallbacks near the edges."""
    x, y = f.x(p.number), f.y(p.value)
    text = _short(p.description) or f"#{p.number}"
    sign = -1 if minimize else 1
    dy = 12 if minimize else -6
    return [
        _label_at(text, x - 7, y + dy, sign * LABEL_ANGLE, "end"),
        _label_at(text, x + 7, y + dy, -sign * LABEL_ANGLE, "start"),
        _label_at(text, x - 9, y + 4, 0, "end"),
        _label_at(text, x + 9, y + 4, 0, "start"),
    ]


def _place_labels(
    kept: Sequence[Point], steps: Sequence[tuple[int, float]], f: _Frame, minimize: bool
) -> list[str]:
    """Labels for kept points, the baseline and the largest gains first; a label that would overlap
    one already placed (or leave the plot) is left out; its point keeps its tooltip."""
    gain: dict[int, float] = {}
    for (_, before), (number, after) in itertools.pairwise(steps):
        gain[number] = abs(after - before)
    first = kept[0].number if kept else 0
    ranked = sorted(kept, key=lambda p: (p.number != first, -gain.get(p.number, 0.0), p.number))
    placed: list[_Label] = []
    for p in ranked[:MAX_LABELS]:
        for option in _label_options(p, f, minimize):
            if option.inside() and not any(option.overlaps(q) for q in placed):
                placed.append(option)
                break
    return [q.markup for q in placed]


def _note(lines: list[str]) -> str:
    if not lines:
        return ""
    return f'<text class="note" x="{LEFT}" y="{HEIGHT - 6}">' + _esc(" · ".join(lines)) + "</text>"


STYLE = (
    f"<style>text{{font-family:{FONT};fill:#202124}}"
    ".tick{font-size:11px;fill:#5f6368}.axis{font-size:12px}.title{font-size:16px;font-weight:600}"
    ".sub{font-size:12px;fill:#5f6368}.legend text{font-size:11px}.note{font-size:11px;fill:#5f6368}"
    ".grid{stroke:#eceff1;stroke-width:1}"
    ".label{font-size:10px;paint-order:stroke;stroke:#fff;stroke-width:3px;stroke-linejoin:round}"
    "</style>"
)


def progress_svg(
    points: Sequence[Point],
    metric: str,
    direction: str,
    title: str,
    *,
    not_drawn: int = 0,
) -> str:
    """The chart for `points` (finished experiments with a metric: keep and discard), in any order.

    `not_drawn` is how many discarded experiments the caller left out to bound the drawing; the
    chart says so. Non-finite values are ignored.
    """
    minimize = direction != "maximize"
    pts = sorted((p for p in points if math.isfinite(p.value)), key=lambda p: p.number)
    kept = [p for p in pts if p.kept]
    head = [
        f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {WIDTH} {HEIGHT}" width="{WIDTH}"'
        f' height="{HEIGHT}" role="img" aria-label="progress of {_esc(title)}">',
        STYLE,
        f'<rect width="{WIDTH}" height="{HEIGHT}" fill="#fafafa"/>',
        f'<text class="title" x="{LEFT}" y="24">{_esc(title)}</text>',
    ]
    if not pts:
        return "".join([*head, _empty(metric, minimize), "</svg>"])

    values = [p.value for p in pts]
    core = [p.value for p in kept] or values
    wlo, whi = y_window(values, core)
    inside = [v for v in values if wlo <= v <= whi]
    f = _frame(pts, inside + core, minimize)
    steps = _running_best(kept, minimize)
    total = len(pts) + not_drawn
    sub = f"{total} experiments with a result · {len(kept)} kept"
    if steps:
        sub += f" · best {steps[-1][1]:.6g} at #{steps[-1][0]}"
    body = [
        f'<text class="sub" x="{LEFT}" y="44">{_esc(sub)}</text>',
        *_box(metric, minimize),
        *_ticks(f),
        _border(),
    ]

    discards, clipped = _discard_marks(pts, f)
    body += [discards, _step_path(steps, f, pts[-1].number), _keep_marks(kept, f)]
    labels = _place_labels(kept, steps, f, minimize)
    body += ['<g class="labels">', *labels, "</g>"]
    notes = []
    if clipped:
        notes.append(f"{clipped} outside the range drawn at the edge")
    if not_drawn:
        notes.append(f"{not_drawn} of {not_drawn + len(pts) - len(kept)} discards not drawn (sampled)")
    if len(labels) < len(kept):
        notes.append(
            f"{len(kept) - len(labels)} kept points unlabelled where labels would overlap (hover for them)"
        )
    body += [_legend(clipped > 0), _note(notes)]
    return "".join([*head, *body, "</svg>"])


def _discard_marks(pts: Sequence[Point], f: _Frame) -> tuple[str, int]:
    """Grey dots for discards; those outside the frame as triangles at its edge. Also their count."""
    clipped = 0
    out = ['<g class="discards">']
    for p in pts:
        if p.kept:
            continue
        x = _f(f.x(p.number))
        tip = f"<title>#{p.number}: {p.value:.6g}</title>"
        if f.y0 <= p.value <= f.y1:
            out.append(
                f'<circle class="discard" cx="{x}" cy="{_f(f.y(p.value))}" r="3.5" fill="{GREY}"'
                f' fill-opacity="0.75">{tip}</circle>'
            )
            continue
        clipped += 1
        up = p.value > f.y1
        y = TOP + 1 if up else HEIGHT - BOTTOM - 1
        shape = f"M{x} {y} l-4 {8 if up else -8} h8 z"
        out.append(f'<path class="clipped" d="{shape}" fill="{EDGE}">{tip}</path>')
    out.append("</g>")
    return "".join(out), clipped


def _keep_marks(kept: Sequence[Point], f: _Frame) -> str:
    out = ['<g class="keeps">']
    for p in kept:
        tip = _esc(f"#{p.number}: {p.value:.6g} — {p.description}")
        out.append(
            f'<circle class="keep" cx="{_f(f.x(p.number))}" cy="{_f(f.y(p.value))}" r="5.5"'
            f' fill="{GREEN}" stroke="#0b5d2e" stroke-width="1.2"><title>{tip}</title></circle>'
        )
    out.append("</g>")
    return "".join(out)


def _step_path(steps: Sequence[tuple[int, float]], f: _Frame, last: int) -> str:
    if not steps:
        return ""
    n, v = steps[0]
    d = [f"M{_f(f.x(n))} {_f(f.y(v))}"]
    for n, v in steps[1:]:
        d.append(f"H{_f(f.x(n))} V{_f(f.y(v))}")
    d.append(f"H{_f(f.x(max(last, steps[-1][0])))}")
    return f'<path class="best" d="{" ".join(d)}" fill="none" stroke="{GREEN}" stroke-width="2"/>'


def _empty(metric: str, minimize: bool) -> str:
    cx, cy = LEFT + (WIDTH - LEFT - RIGHT) / 2, HEIGHT / 2
    message = f'<text class="sub" x="{cx:.1f}" y="{cy:.1f}" text-anchor="middle">no results yet</text>'
    return "".join([*_box(metric, minimize), _border(), message])
