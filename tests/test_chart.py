"""The progress chart is pure (points in, SVG text out): checked as parsed XML, no server."""

from __future__ import annotations

import math
import re
import xml.etree.ElementTree as ET

import pytest

from service.rules.chart import MAX_LABELS, Point, nice_ticks, progress_svg, y_window

NS = {"s": "http://www.w3.org/2000/svg"}


def parse(svg: str) -> ET.Element:
    return ET.fromstring(svg)


def by_class(root: ET.Element, tag: str, cls: str) -> list[ET.Element]:
    return [el for el in root.iter(f"{{{NS['s']}}}{tag}") if el.get("class") == cls]


def texts(root: ET.Element, cls: str) -> list[str]:
    return ["".join(el.itertext()) for el in by_class(root, "text", cls)]


def step_vertices(root: ET.Element) -> list[tuple[float, float]]:
    """The corners of the running-best line, from its path of M, H and V commands."""
    (path,) = by_class(root, "path", "best")
    x = y = math.nan
    out = []
    for cmd, a, b in re.findall(r"([MHV])([-\d.]+)(?: ([-\d.]+))?", path.get("d")):
        if cmd == "M":
            x, y = float(a), float(b)
        elif cmd == "H":
            x = float(a)
        else:
            y = float(a)
        out.append((x, y))
    return out


def history(minimize: bool = True) -> list[Point]:
    """A plausible loop: baseline, some keeps, discards around them, one wild discard."""
    sign = 1 if minimize else -1
    rows = [
        (1, 1.000, True, "baseline"),
        (2, 0.990, True, "raise lr"),
        (3, 1.004, False, ""),
        (4, 0.995, False, ""),
        (5, 0.981, True, "cosine schedule"),
        (6, 100.0, False, ""),  # diverged: 100x worse than the baseline
        (7, 0.983, False, ""),
        (8, 0.970, True, "SwiGLU"),
        (9, 0.975, False, ""),
    ]
    return [Point(n, 1 + sign * (v - 1) if v < 50 else sign * v, k, d) for n, v, k, d in rows]


@pytest.mark.parametrize("minimize", [True, False])
def test_dots_labels_and_axis(minimize):
    pts = history(minimize)
    svg = progress_svg(pts, "val_bpb", "minimize" if minimize else "maximize", "charlm")
    root = parse(svg)
    assert root.tag == "{http://www.w3.org/2000/svg}svg"
    kept = [p for p in pts if p.kept]
    assert len(by_class(root, "circle", "keep")) == len(kept)
    drawn = by_class(root, "circle", "discard") + by_class(root, "path", "clipped")
    assert len(drawn) == len(pts) - len(kept)
    assert sorted(texts(root, "label")) == sorted(p.description for p in kept)
    word = "lower" if minimize else "higher"
    assert f"val_bpb ({word} is better)" in texts(root, "axis")
    assert texts(root, "title") == ["charlm"]
    assert "9 experiments with a result · 4 kept" in texts(root, "sub")[0]


@pytest.mark.parametrize("minimize", [True, False])
def test_step_line_is_monotone_in_the_better_direction(minimize):
    pts = history(minimize)
    root = parse(progress_svg(pts, "m", "minimize" if minimize else "maximize", "t"))
    corners = step_vertices(root)
    xs = [x for x, _ in corners]
    ys = [y for _, y in corners]
    assert xs == sorted(xs)
    # SVG y grows downwards: a falling metric moves the line down the page, a rising one up
    assert ys == (sorted(ys) if minimize else sorted(ys, reverse=True))
    assert len(set(ys)) == 4  # baseline and three improvements
    keeps = [(float(c.get("cx")), float(c.get("cy"))) for c in by_class(root, "circle", "keep")]
    assert {(round(x, 1), round(y, 1)) for x, y in keeps} <= {(round(x, 1), round(y, 1)) for x, y in corners}
    assert xs[-1] == pytest.approx(max(float(c.get("cx")) for c in by_class(root, "circle", "discard")))


def test_running_best_ignores_keeps_that_do_not_improve_in_number_order():
    # With two slots, #3 can finish (and be kept) before #2 does; in number order #3 is worse.
    pts = [
        Point(1, 1.0, True, "baseline"),
        Point(2, 0.90, True, "a"),
        Point(3, 0.95, True, "b"),
        Point(4, 0.85, True, "c"),
    ]
    root = parse(progress_svg(pts, "m", "minimize", "t"))
    ys = [y for _, y in step_vertices(root)]
    assert ys == sorted(ys), ys  # only ever down the page
    corners = {round(y, 1) for y in ys}
    circles = by_class(root, "circle", "keep")
    cy = {p.description: round(float(c.get("cy")), 1) for p, c in zip(pts, circles, strict=True)}
    assert cy["b"] not in corners and cy["c"] in corners and cy["a"] in corners


def test_outlier_is_clipped_to_the_edge_and_does_not_flatten_the_rest():
    pts = history()
    root = parse(progress_svg(pts, "val_bpb", "minimize", "t"))
    (clipped,) = by_class(root, "path", "clipped")
    assert "#6" in "".join(clipped.itertext())
    assert any("1 outside the range" in t for t in texts(root, "note"))
    ys = [float(c.get("cy")) for c in by_class(root, "circle", "keep")]
    assert max(ys) - min(ys) > 150  # the kept points use most of the ~380 px of plot height


def test_y_window_is_robust():
    values = [1.0, 0.99, 0.98, 1.01, 1.02, 100.0, -50.0]
    lo, hi = y_window(values, [1.0, 0.99, 0.98])
    assert lo < 0.98 and hi > 1.02 and hi < 2 and lo > 0
    lo, hi = y_window([0.0], [0.0])  # zero span and zero magnitude still give a real window
    assert lo < 0 < hi and math.isfinite(lo) and math.isfinite(hi)


@pytest.mark.parametrize("n", [0, 1, 2])
def test_few_points(n):
    pts = [Point(i + 1, 0.5 + 0.1 * i, True, f"p{i}") for i in range(n)]
    svg = progress_svg(pts, "acc", "maximize", "few")
    assert "nan" not in svg.lower() and "inf" not in svg.lower()
    root = parse(svg)
    assert len(by_class(root, "circle", "keep")) == n
    if n == 0:
        assert "no results yet" in "".join(root.itertext())
        assert "acc (higher is better)" in "".join(root.itertext())


def test_equal_values_and_zero_metric_give_finite_coordinates():
    pts = [Point(1, 0.0, True, "baseline"), Point(2, 0.0, False), Point(3, 0.0, False)]
    svg = progress_svg(pts, "loss", "minimize", "zeros")
    assert "nan" not in svg.lower() and "inf" not in svg.lower()
    assert len(by_class(parse(svg), "circle", "discard")) == 2


def test_non_finite_values_are_ignored():
    pts = [Point(1, 1.0, True, "baseline"), Point(2, math.nan, False), Point(3, math.inf, False)]
    svg = progress_svg(pts, "m", "minimize", "t")
    assert "nan" not in svg.lower()
    assert len(by_class(parse(svg), "circle", "discard")) == 0


def test_hostile_text_is_escaped():
    evil = '<script>alert(1)</script> & "quoted" \x00\x1b[31m'
    pts = [Point(1, 1.0, True, "baseline"), Point(2, 0.5, True, evil)]
    svg = progress_svg(pts, "val_bpb", "minimize", 'loop <&">')
    assert "<script" not in svg
    root = parse(svg)  # control characters would make it invalid XML
    labels = texts(root, "label")
    assert any(label.startswith('<script>alert(1)</script> & "quoted"') for label in labels)
    assert texts(root, "title") == ['loop <&">']
    tips = ["".join(t.itertext()) for t in root.iter(f"{{{NS['s']}}}title")]
    assert any('<script>alert(1)</script> & "quoted"' in t for t in tips)


def test_long_descriptions_are_truncated():
    pts = [Point(1, 1.0, True, "baseline"), Point(2, 0.9, True, "x" * 500)]
    labels = texts(parse(progress_svg(pts, "m", "minimize", "t")), "label")
    assert max(len(label) for label in labels) <= 40 and any(label.endswith("\u2026") for label in labels)


def test_not_drawn_is_reported():
    pts = [Point(1, 1.0, True, "baseline"), Point(2, 1.1, False)]
    root = parse(progress_svg(pts, "m", "minimize", "t", not_drawn=99))
    assert any("99 of 100 discards not drawn" in t for t in texts(root, "note"))
    assert "101 experiments with a result" in texts(root, "sub")[0]


def test_crowded_labels_are_thinned_and_capped():
    # 300 keeps in a row: every one improves a little; far too many to label
    pts = [Point(i, 1.0 - i * 1e-3, True, f"improvement number {i}") for i in range(1, 301)]
    root = parse(progress_svg(pts, "m", "minimize", "t"))
    labels = texts(root, "label")
    assert 1 <= len(labels) <= MAX_LABELS
    assert "improvement number 1" in labels  # the baseline's label comes first
    assert any("kept points unlabelled" in t for t in texts(root, "note"))


def test_nice_ticks():
    assert nice_ticks(0, 10, 5) == [0, 2, 4, 6, 8, 10]
    ticks = nice_ticks(0.9512, 1.0031, 6)
    assert ticks[0] >= 0.9512 and ticks[-1] <= 1.0031 and len(ticks) >= 3
    step = ticks[1] - ticks[0]
    assert any(math.isclose(step, s) for s in (0.01, 0.02, 0.005))
    assert nice_ticks(1, 1) == [1]
    assert all(t == int(t) for t in nice_ticks(0.5, 7.5, 10, integer=True))
