"""many_models' figure (Pillow only, as the search suite's): export time and peak RssAnon against the
number of sources (log x), one line per method, the read floor and the after-imports baseline dashed."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw

_COLOURS = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf"]
_GREY = "#555555"
Series = Mapping[str, Sequence[tuple[int, float]]]  # name → (N, value) points


@dataclass(frozen=True)
class Panel:
    title: str
    unit: str
    lines: Series  # one solid line each
    dashed: Series  # reference lines (grey, dashed)
    log_y: bool


def plot(
    path: Path, panels: Sequence[Panel], *, title: str, panel_size: tuple[int, int] = (520, 380)
) -> Path:
    """``panels`` side by side under ``title``, each with its legend on the right."""
    width, height = panel_size
    image = Image.new("RGB", (width * len(panels), height + 30), "white")
    draw = ImageDraw.Draw(image)
    draw.text((12, 8), title, fill="#111")
    for index, panel in enumerate(panels):
        _draw_panel(draw, panel, origin=(index * width, 30), size=panel_size)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    return path


def _draw_panel(
    draw: ImageDraw.ImageDraw, panel: Panel, *, origin: tuple[int, int], size: tuple[int, int]
) -> None:
    (ox, oy), (width, height) = origin, size
    left, right, top, bottom = ox + 60, ox + width - 130, oy + 24, oy + height - 36
    points = [p for series in (panel.lines, panel.dashed) for line in series.values() for p in line]
    if not points:
        return
    xs, ys = [n for n, _ in points], [v for _, v in points]
    x_low, x_high = math.log(min(xs)), math.log(max(xs)) + 1e-9
    y_low, y_high = _y_range(ys, log=panel.log_y)

    def x(n: float) -> float:
        return left + (right - left) * (math.log(n) - x_low) / (x_high - x_low)

    def y(v: float) -> float:
        value = math.log(max(v, 1e-12)) if panel.log_y else v
        return bottom - (bottom - top) * (value - y_low) / (y_high - y_low)

    draw.text((left, oy + 4), f"{panel.title} ({panel.unit})", fill="#111")
    for tick in _y_ticks(y_low, y_high, log=panel.log_y):
        draw.line([(left, y(tick)), (right, y(tick))], fill="#e4e8ec")
        draw.text((ox + 6, y(tick) - 6), f"{tick:.3g}", fill="#444")
    for n in sorted(set(xs)):
        draw.line([(x(n), top), (x(n), bottom)], fill="#e4e8ec")
        draw.text((x(n) - 6, bottom + 6), str(n), fill="#444")
    draw.text(((left + right) / 2 - 30, bottom + 20), "sources N (log)", fill="#444")
    legend = 0
    for index, (name, line) in enumerate(panel.lines.items()):
        colour = _COLOURS[index % len(_COLOURS)]
        _polyline(draw, [(x(n), y(v)) for n, v in sorted(line)], colour=colour, dashed=False)
        draw.text((right + 10, top + 16 * legend), name, fill=colour)
        legend += 1
    for name, line in panel.dashed.items():
        _polyline(draw, [(x(n), y(v)) for n, v in sorted(line)], colour=_GREY, dashed=True)
        draw.text((right + 10, top + 16 * legend), f"- - {name}", fill=_GREY)
        legend += 1


def _y_range(values: Sequence[float], *, log: bool) -> tuple[float, float]:
    if log:
        low, high = math.log(max(min(values), 1e-12)), math.log(max(max(values), 1e-12))
        return low - 0.1, high + 0.1 + (1e-9 if high == low else 0.0)
    return 0.0, max(values) * 1.1 or 1.0


def _y_ticks(low: float, high: float, *, log: bool) -> list[float]:
    if log:
        decades = range(math.floor(low / math.log(10)), math.ceil(high / math.log(10)) + 1)
        ticks = [m * 10.0**d for d in decades for m in (1, 2, 5)]
        return [t for t in ticks if low <= math.log(t) <= high]
    step = _nice_step(high / 5)
    return [i * step for i in range(int(high / step) + 1)]


def _nice_step(raw: float) -> float:
    power = 10 ** math.floor(math.log10(raw)) if raw > 0 else 1.0
    return next(m * power for m in (1, 2, 5, 10) if m * power >= raw)


def _polyline(
    draw: ImageDraw.ImageDraw, points: list[tuple[float, float]], *, colour: str, dashed: bool
) -> None:
    for start, end in zip(points, points[1:], strict=False):
        if not dashed:
            draw.line([start, end], fill=colour, width=2)
            continue
        length = math.dist(start, end)
        for begin in range(0, int(length), 10):
            a, b = begin / length, min(begin + 5, length) / length
            draw.line([_along(start, end, a), _along(start, end, b)], fill=colour, width=2)
    for px, py in points:
        draw.ellipse([px - 3, py - 3, px + 3, py + 3], fill=colour)


def _along(start: tuple[float, float], end: tuple[float, float], t: float) -> tuple[float, float]:
    return start[0] + (end[0] - start[0]) * t, start[1] + (end[1] - start[1]) * t
