"""report.html: one self-contained page (inline SVG charts, images as data URIs, no scripts or CDNs),
drawn from a ``ReportData`` that the study gathers; nothing here knows about Optuna or studies."""

from __future__ import annotations

import html
import math
from collections.abc import Callable
from dataclasses import dataclass, field

GridCell = tuple[str | None, float | None]
"""One image of the grid: its data URI (None: missing) and its score (None: not scored, a reference)."""
Margin = tuple[str, float, float, float, int]
"""(baseline, mean margin of the best over it, interval low, interval high, seeds)."""

_STYLE = """
body{font:14px/1.45 system-ui,sans-serif;margin:24px auto;max-width:1180px;color:#1d232a;padding:0 16px}
h1{font-size:22px;margin:0 0 4px} h2{font-size:17px;margin:28px 0 8px;border-bottom:1px solid #dde3ea;padding-bottom:4px}
table{border-collapse:collapse} td,th{padding:3px 10px;border-bottom:1px solid #edf0f3;text-align:right}
th{background:#f5f7f9} td:first-child,th:first-child{text-align:left}
.grid img{width:128px;height:auto;image-rendering:pixelated;display:block}
.muted{color:#6b7785} .good{color:#17803d} .chart{background:#fbfcfd;border:1px solid #e4e8ec}
"""


@dataclass(frozen=True)
class ParetoPoint:
    """One complete trial of a study with several objectives, as the front's scatter draws it."""

    number: int
    label: str  # "A", "uniform 0.5", "trial 7"
    values: tuple[float, ...]  # one score per objective, as stored
    on_front: bool
    baseline: bool = False
    thumbnails: tuple[str | None, ...] = ()  # data URIs of its first images (the first on hover)


@dataclass
class ParetoData:
    """What a study with several objectives adds to the report: the objectives, every complete
    trial's scores, how the exported trial was chosen."""

    names: list[str]
    maximize: list[bool]
    points: list[ParetoPoint]
    how: str  # "picked trial 7 … the knee point …", or "chosen with --trial 7"
    importances: dict[str, dict[str, float]] = field(default_factory=dict)  # objective → parameter → share
    validation: list[tuple[str, tuple[float, ...]]] = field(default_factory=list)

    def scores_text(self, values: tuple[float, ...]) -> str:
        """``near-a -0.00123 · near-b -0.0456``."""
        return " · ".join(f"{_e(n)} {v:.6g}" for n, v in zip(self.names, values, strict=True))


@dataclass(frozen=True)
class GuardData:
    """The guard's checks of the bests: (trial, proxy score, each member's score), each member's band
    (the drop that counts), the last agreed best and where the current disagreement started."""

    members: list[str]
    panel: str  # "validation" or "study": the payloads the guard renders
    checks: list[tuple[int, float, tuple[float, ...]]]
    bands: tuple[float, ...]
    agreed: int | None = None
    diverged_at: int | None = None
    reason: str = ""


@dataclass
class ReportData:
    """What the report shows: the exported trial, the best, the trial counts, images, charts."""

    title: str
    exported_number: int
    exported_value: float
    best_number: int
    best_value: float
    trial_count: int
    completed_count: int
    failed_count: int
    pruned_count: int
    stop_reason: str
    columns: list[str]
    grid: dict[str, list[GridCell]]  # image key → (data URI, score) per column
    curve: list[tuple[int, float]]  # (trial number, value) of completed trials
    weights: list[tuple[str, float, float, float]]  # (dimension, best value, low, high)
    secret: dict[str, float] | None = None
    importances: dict[str, float] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)  # median seconds per stage
    baselines: list[tuple[str, int, float]] = field(default_factory=list)
    validation: list[tuple[str, float]] = field(default_factory=list)
    confidence: list[Margin] = field(default_factory=list)
    confidence_source: str = ""
    pareto: ParetoData | None = None  # several objectives: the front instead of a best
    guard: GuardData | None = None  # guard: the held-out panel's reading of the bests

    def recovery_errors(self) -> dict[str, float]:
        """|recovered − secret| per searched dimension of a hidden-target study; {} otherwise."""
        secret = self.secret or {}
        return {
            name: abs(value - secret[name]) for name, value, _low, _high in self.weights if name in secret
        }


def recovery_line(data: ReportData) -> str | None:
    """``recovered vs secret: mean |error| 0.054, worst alpha.MID 0.701 for 0.400`` (None: no secret)."""
    errors = data.recovery_errors()
    if not errors or data.secret is None:  # no secret, or none of its dimensions searched
        return None
    worst = max(errors, key=errors.__getitem__)
    recovered = next(value for name, value, _low, _high in data.weights if name == worst)
    mean = sum(errors.values()) / len(errors)
    return (
        f"recovered vs secret: mean |error| {mean:.3f} over {len(errors)} dimensions, "
        f"worst {worst} {recovered:.3f} for {data.secret[worst]:.3f}"
    )


def _e(text: object) -> str:
    return html.escape(str(text))


def curve_svg(
    points: list[tuple[int, float]],
    *,
    baselines: list[tuple[str, int, float]] | None = None,
    width: int = 760,
    height: int = 280,
) -> str:
    """Distance to the final best, best − value, on a log axis (every trial a dot, the best-so-far as a
    line, the baselines as dashed lines): raw values of a distance-type reward span decades, and a
    linear axis squashed every trial after the first into one line."""
    if not points:
        return "<p class=muted>no completed trials</p>"
    left, right, top, bottom = 70, 20, 16, 44
    best = max(v for _, v in points)
    gaps = [best - v for _, v in points] + [best - v for _, _, v in baselines or []]
    positive = [g for g in gaps if g > 0]
    floor = min(positive) / 2 if positive else 1.0  # the best itself sits on the floor
    lo, hi = math.log10(floor), math.log10(max(positive, default=floor * 10))
    hi = max(hi, lo + 1)
    x_max = max(n for n, _ in points) or 1

    def px(n: float) -> float:
        return left + (width - left - right) * n / x_max

    def py(value: float) -> float:
        gap = max(best - value, floor)
        return top + (height - top - bottom) * (hi - math.log10(gap)) / (hi - lo)

    parts = [f'<circle cx="{px(n):.1f}" cy="{py(v):.1f}" r="2.5" fill="#8aa1b8"/>' for n, v in points]
    running, line = -math.inf, []
    for n, v in points:
        running = max(running, v)
        line.append(f"{px(n):.1f},{py(running):.1f}")
    parts.append(f'<polyline points="{" ".join(line)}" fill="none" stroke="#17803d" stroke-width="2"/>')
    for label, _number, value in baselines or []:
        y = py(value)
        parts.append(
            f'<line x1="{left}" x2="{width - right}" y1="{y:.1f}" y2="{y:.1f}" stroke="#b36b00" '
            f'stroke-dasharray="5 4"/><text x="{width - right - 4}" y="{y - 4:.1f}" font-size="11" '
            f'text-anchor="end" fill="#b36b00">{_e(label)}</text>'
        )
    for decade in range(math.ceil(lo), math.floor(hi) + 1):  # y ticks at powers of ten
        y = top + (height - top - bottom) * (hi - decade) / (hi - lo)
        parts.append(
            f'<line x1="{left - 4}" x2="{left}" y1="{y:.1f}" y2="{y:.1f}" stroke="#555"/>'
            f'<text x="{left - 6}" y="{y + 4:.1f}" font-size="11" text-anchor="end">1e{decade}</text>'
        )
    for n in sorted({0, x_max // 2, x_max}):
        parts.append(
            f'<text x="{px(n):.1f}" y="{height - bottom + 16}" font-size="11" text-anchor="middle">{n}</text>'
        )
    parts.append(
        f'<line x1="{left}" x2="{left}" y1="{top}" y2="{height - bottom}" stroke="#555"/>'
        f'<line x1="{left}" x2="{width - right}" y1="{height - bottom}" y2="{height - bottom}" stroke="#555"/>'
        f'<text x="{(left + width - right) / 2:.0f}" y="{height - 6}" font-size="12" text-anchor="middle">trial</text>'
        f'<text x="14" y="{(top + height - bottom) / 2:.0f}" font-size="12" text-anchor="middle" '
        f'transform="rotate(-90 14 {(top + height - bottom) / 2:.0f})">best score − score (log)</text>'
    )
    return f'<svg class=chart width="{width}" height="{height}" xmlns="http://www.w3.org/2000/svg">{"".join(parts)}</svg>'


_GUARD_COLOURS = ("#b3261e", "#6a3fb5", "#00796b", "#b36b00")


def guard_svg(guard: GuardData, *, width: int = 760, height: int = 240) -> str:
    """The proxy and each guard member over the guarded bests, each scaled to its own range (0 at its
    lowest, 1 at its highest: the lines show direction, the table the values); a red line where the
    current disagreement starts."""
    left, right, top, bottom = 40, 150, 14, 40
    numbers = [n for n, _, _ in guard.checks]
    x_min, x_max = min(numbers), max(numbers)
    span = (x_max - x_min) or 1

    def px(n: float) -> float:
        return left + (width - left - right) * (n - x_min) / span

    def line(values: list[float], colour: str, label: str, row: int) -> str:
        low, high = min(values), max(values)
        scale = (high - low) or 1.0
        points = " ".join(
            f"{px(n):.1f},{top + (height - top - bottom) * (1 - (v - low) / scale):.1f}"
            for n, v in zip(numbers, values, strict=True)
        )
        y = top + 14 * row + 8
        return (
            f'<polyline points="{points}" fill="none" stroke="{colour}" stroke-width="2"/>'
            f'<line x1="{width - right + 10}" x2="{width - right + 28}" y1="{y}" y2="{y}" stroke="{colour}" '
            f'stroke-width="2"/><text x="{width - right + 32}" y="{y + 4}" font-size="11">{_e(label)}</text>'
        )

    parts = [line([p for _, p, _ in guard.checks], "#17803d", "proxy (score)", 0)]
    for index, member in enumerate(guard.members):
        values = [scores[index] for _, _, scores in guard.checks]
        parts.append(line(values, _GUARD_COLOURS[index % len(_GUARD_COLOURS)], f"guard {member}", index + 1))
    if guard.diverged_at is not None:
        x = px(guard.diverged_at)
        parts.append(
            f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{top}" y2="{height - bottom}" stroke="#b3261e" '
            f'stroke-dasharray="4 3"/><text x="{x + 4:.1f}" y="{top + 10}" font-size="11" fill="#b3261e">'
            f"disagrees from trial {guard.diverged_at}</text>"
        )
    for n in sorted({x_min, x_max}):
        parts.append(
            f'<text x="{px(n):.1f}" y="{height - bottom + 16}" font-size="11" text-anchor="middle">{n}</text>'
        )
    parts.append(
        f'<line x1="{left}" x2="{width - right}" y1="{height - bottom}" y2="{height - bottom}" stroke="#555"/>'
        f'<text x="{(left + width - right) / 2:.0f}" y="{height - 6}" font-size="12" text-anchor="middle">'
        "trial (each a new best)</text>"
    )
    return f'<svg class=chart width="{width}" height="{height}" xmlns="http://www.w3.org/2000/svg">{"".join(parts)}</svg>'


def _guard_section(guard: GuardData | None) -> str:
    """The proxy against the guard: the chart, the verdict and a table of the guarded bests."""
    if guard is None:
        return ""
    if guard.diverged_at is not None:
        verdict = f"<p><b style='color:#b3261e'>{_e(guard.reason)}</b></p>"
    else:
        verdict = f"<p class=good>the guard agrees with the best (last checked: trial {guard.agreed})</p>"
    bands = ", ".join(f"{_e(m)} ±{b:.3g}" for m, b in zip(guard.members, guard.bands, strict=True))
    rows = [
        [
            n,
            f"{proxy:.6g}",
            *(f"{v:.6g}" for v in scores),
            "disagrees" if guard.diverged_at is not None and n >= guard.diverged_at else "agrees",
        ]
        for n, proxy, scores in guard.checks
    ]
    return (
        f"<h2>Guard: the proxy against a held-out panel ({_e(guard.panel)} payloads)</h2>"
        + verdict
        + guard_svg(guard)
        + f"<p class=muted>a drop counts beyond: {bands} (the guard's seed noise)</p>"
        + _table(["best trial", "proxy", *(f"guard {m}" for m in guard.members), "verdict"], rows)
    )


def weights_svg(weights: list[tuple[str, float, float, float]], secret: dict[str, float] | None) -> str:
    """One bar per searched dimension (its range scaled to the bar height); the secret as a red tick."""
    if not weights:
        return ""
    bar = 40 if len(weights) <= 12 else 22
    gap, height, pad, label_room, axis = 12, 250, 20, 60, 56
    width = axis + len(weights) * (bar + gap) + pad
    plot = height - label_room  # bars end here; rotated labels below
    ranges = {(low, high) for _, _, low, high in weights}
    low0, high0 = next(iter(ranges)) if len(ranges) == 1 else (0.0, 1.0)
    title = "value" if len(ranges) == 1 else "share of range"
    parts = [f'<line x1="{axis - 8}" x2="{axis - 8}" y1="{pad}" y2="{plot}" stroke="#555"/>']
    for share in (0.0, 0.25, 0.5, 0.75, 1.0):  # y ticks: the dimensions' common range, else its share
        y = plot - (plot - pad) * share
        parts.append(
            f'<line x1="{axis - 12}" x2="{axis - 8}" y1="{y:.1f}" y2="{y:.1f}" stroke="#555"/>'
            f'<text x="{axis - 14}" y="{y + 4:.1f}" font-size="10" text-anchor="end">'
            f"{low0 + share * (high0 - low0):.2g}</text>"
        )
    parts.append(
        f'<text x="10" y="{(pad + plot) / 2:.0f}" font-size="11" text-anchor="middle" '
        f'transform="rotate(-90 10 {(pad + plot) / 2:.0f})">{title}</text>'
    )
    for index, (name, value, low, high) in enumerate(weights):
        span = (high - low) or 1.0
        x = axis + index * (bar + gap)
        h = (plot - pad) * (value - low) / span
        parts.append(
            f'<rect x="{x}" y="{plot - h:.1f}" width="{bar}" height="{h:.1f}" fill="#4f7cac">'
            f"<title>{_e(name)} = {value:.3f}</title></rect>"
        )
        if secret and name in secret:
            y = plot - (plot - pad) * (secret[name] - low) / span
            parts.append(
                f'<line x1="{x - 3}" x2="{x + bar + 3}" y1="{y:.1f}" y2="{y:.1f}" stroke="#c0392b" stroke-width="3"/>'
            )
        label, cx = name.split(".", 1)[-1], x + bar / 2
        parts.append(
            f'<text x="{cx}" y="{plot + 12}" font-size="10" text-anchor="end" '
            f'transform="rotate(-40 {cx} {plot + 12})">{_e(label)}</text>'
        )
    return f'<svg class=chart width="{width}" height="{height}" xmlns="http://www.w3.org/2000/svg">{"".join(parts)}</svg>'


_PARETO_STYLE = (
    "<style>.pt .thumb{visibility:hidden}.pt:hover .thumb{visibility:visible}"
    ".front-grid img{width:96px;height:auto;image-rendering:pixelated}</style>"
)


def front_svg(
    pareto: ParetoData,
    x: int,
    y: int,
    *,
    exported: int,
    width: int = 640,
    height: int = 440,
) -> str:
    """Objective ``x`` against objective ``y``, every complete trial a dot (its number and scores on
    hover, with its first image), the Pareto front's trials green, numbered and linked to their row of
    images, the baselines orange, the exported trial ringed; with two objectives the front is joined."""
    points = pareto.points
    if not points:
        return "<p class=muted>no completed trials</p>"
    left, right, top, bottom = 78, 24, 16, 48
    xs, ys = [p.values[x] for p in points], [p.values[y] for p in points]
    px, py = _axis(xs, left, width - right), _axis(ys, height - bottom, top)
    parts = [_axes_svg(xs, ys, px, py, left, right, top, bottom, width, height, pareto, x, y)]
    front = sorted((p for p in points if p.on_front), key=lambda p: p.values[x])
    if len(pareto.names) == 2 and len(front) > 1:
        line = " ".join(f"{px(p.values[x]):.1f},{py(p.values[y]):.1f}" for p in front)
        parts.append(f'<polyline points="{line}" fill="none" stroke="#17803d" stroke-width="1.5"/>')
    for point in sorted(points, key=lambda p: (p.on_front, p.baseline)):  # the front on top
        parts.append(_front_point(point, px(point.values[x]), py(point.values[y]), pareto, exported, width))
    return (
        f'<svg class=chart width="{width}" height="{height}" xmlns="http://www.w3.org/2000/svg">'
        f"{''.join(parts)}</svg>"
    )


def _axis(values: list[float], start: float, stop: float) -> Callable[[float], float]:
    """Value → pixel, the values' range padded by 6 % on each side (a range of one value: ±1)."""
    low, high = min(values), max(values)
    pad = (high - low) * 0.06 or 1.0
    low, high = low - pad, high + pad
    return lambda value: start + (stop - start) * (value - low) / (high - low)


def _axes_svg(
    xs: list[float],
    ys: list[float],
    px: Callable[[float], float],
    py: Callable[[float], float],
    left: int,
    right: int,
    top: int,
    bottom: int,
    width: int,
    height: int,
    pareto: ParetoData,
    x: int,
    y: int,
) -> str:
    """Both axes with 5 ticks over the values' range, labelled with the objective and its direction."""

    def title(index: int) -> str:
        better = "higher" if pareto.maximize[index] else "lower"
        return f"{_e(pareto.names[index])} ({better} is better)"

    parts = [
        f'<line x1="{left}" x2="{left}" y1="{top}" y2="{height - bottom}" stroke="#555"/>'
        f'<line x1="{left}" x2="{width - right}" y1="{height - bottom}" y2="{height - bottom}" stroke="#555"/>'
    ]
    for share in (0.0, 0.25, 0.5, 0.75, 1.0):
        vx = min(xs) + share * (max(xs) - min(xs))
        vy = min(ys) + share * (max(ys) - min(ys))
        parts.append(
            f'<text x="{px(vx):.1f}" y="{height - bottom + 16}" font-size="10" text-anchor="middle">{vx:.3g}</text>'
            f'<text x="{left - 6}" y="{py(vy) + 4:.1f}" font-size="10" text-anchor="end">{vy:.3g}</text>'
        )
    middle = (top + height - bottom) / 2
    parts.append(
        f'<text x="{(left + width - right) / 2:.0f}" y="{height - 8}" font-size="12" text-anchor="middle">'
        f"{title(x)}</text>"
        f'<text x="14" y="{middle:.0f}" font-size="12" text-anchor="middle" '
        f'transform="rotate(-90 14 {middle:.0f})">{title(y)}</text>'
    )
    return "".join(parts)


def _front_point(
    point: ParetoPoint, cx: float, cy: float, pareto: ParetoData, exported: int, width: int
) -> str:
    """One trial's dot: its tooltip (number and scores), its first image shown on hover, a link to its
    row of images when it is on the front."""
    colour = "#b36b00" if point.baseline else "#17803d" if point.on_front else "#8aa1b8"
    radius = 5 if point.on_front or point.baseline else 3
    name = f"{_e(point.label)} · " if point.baseline else ""
    parts = [
        f'<circle cx="{cx:.1f}" cy="{cy:.1f}" r="{radius}" fill="{colour}"/>'
        f"<title>{name}trial {point.number}: {pareto.scores_text(point.values)}"
        f"{' · on the Pareto front' if point.on_front else ''}</title>"
    ]
    if point.number == exported:
        parts.append(
            f'<circle cx="{cx:.1f}" cy="{cy:.1f}" r="9" fill="none" stroke="#c0392b" stroke-width="2"/>'
        )
    if point.on_front or point.baseline:
        text = point.label if point.baseline else str(point.number)
        parts.append(
            f'<text x="{cx + 7:.1f}" y="{cy - 6:.1f}" font-size="11" fill="{colour}">{_e(text)}</text>'
        )
    if point.thumbnails and point.thumbnails[0]:
        tx, ty = min(cx + 10, width - 100), max(cy - 106, 0)
        parts.append(
            f'<image class=thumb href="{point.thumbnails[0]}" x="{tx:.1f}" y="{ty:.1f}" width="96" height="96"/>'
        )
    group = f"<g class=pt>{''.join(parts)}</g>"
    return f'<a href="#front-trial-{point.number}">{group}</a>' if point.on_front else group


def _pareto_section(data: ReportData, pareto: ParetoData) -> str:
    """The front: one scatter for two objectives, one per pair for more; then its trials' images."""
    count = len(pareto.names)
    pairs = [(i, j) for i in range(count) for j in range(i + 1, count)]
    size = {"width": 640, "height": 440} if count == 2 else {"width": 420, "height": 320}
    plots = "".join(front_svg(pareto, i, j, exported=data.exported_number, **size) for i, j in pairs)
    front = [p for p in pareto.points if p.on_front]
    return (
        f'<h2 id="pareto-front">Pareto front: {len(front)} of {len(pareto.points)} complete trials</h2>'
        + _PARETO_STYLE
        + "<p>Each dot is a complete trial (hover: its number, scores and first image); green: on the front "
        "(no other trial is at least as good in every objective and better in one), numbered and linked "
        "to its images below; orange: the baselines; red ring: the exported trial. Any trial exports with "
        "<code>automerge export STUDY --trial N</code>; <code>--pick knee</code> or "
        "<code>--pick weighted:W1,W2</code> picks one of the front.</p>" + plots + _front_grid(pareto, front)
    )


def _front_grid(pareto: ParetoData, front: list[ParetoPoint]) -> str:
    """The front's trials, best in the first objective first: scores and first images."""
    if not front:
        return ""
    sign = 1.0 if pareto.maximize[0] else -1.0
    rows = []
    for point in sorted(front, key=lambda p: -sign * p.values[0]):
        images = "".join(
            f'<img src="{uri}" alt="trial {point.number}">' for uri in point.thumbnails if uri is not None
        )
        rows.append(
            f'<tr id="front-trial-{point.number}"><td>trial {point.number}</td><td>{_e(point.label)}</td>'
            + "".join(f"<td>{value:.6g}</td>" for value in point.values)
            + f"<td>{images or '<span class=muted>no images stored</span>'}</td></tr>"
        )
    head = "".join(f"<th>{_e(h)}</th>" for h in ["trial", "label", *pareto.names, "images"])
    return f'<div class="front-grid"><table><tr>{head}</tr>{"".join(rows)}</table></div>'


def _pareto_baselines(pareto: ParetoData) -> str:
    rows = [[_e(p.label), p.number, *(f"{v:.6g}" for v in p.values)] for p in pareto.points if p.baseline]
    return "<h2>Baselines</h2>" + _table(["baseline", "trial", *pareto.names], rows)


def _pareto_importances(pareto: ParetoData) -> str:
    if not pareto.importances:
        return "<h2>Parameter importances</h2><p class=muted>needs at least 4 completed trials</p>"
    params = list(dict.fromkeys(k for shares in pareto.importances.values() for k in shares))
    rows = [
        [_e(param), *(f"{pareto.importances.get(n, {}).get(param, 0.0):.3f}" for n in pareto.names)]
        for param in params
    ]
    return "<h2>Parameter importances (per objective)</h2>" + _table(["parameter", *pareto.names], rows)


def _table(header: list[str], rows: list[list[object]]) -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{cell}</td>" for cell in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _grid(data: ReportData) -> str:
    if not data.grid:
        return "<p class=muted>no trial images stored</p>"
    rows = []
    for key, cells in sorted(data.grid.items()):
        shown = []
        for uri, score in cells:
            image = f'<img src="{uri}" alt="{_e(key)}">' if uri else "<span class=muted>—</span>"
            caption = f"<div class=muted>{score:.4g}</div>" if score is not None else ""
            shown.append(image + caption)
        rows.append([_e(key), *shown])
    return '<div class="grid">' + _table(["image", *data.columns], rows) + "</div>"


def _confidence(data: ReportData) -> str:
    """The best's margin over each baseline with its bootstrap interval over seeds, in words."""
    if not data.confidence:
        return ""
    rows = []
    for label, mean, low, high, seeds in data.confidence:
        if seeds < 2:
            verdict = "one seed: no interval"
        elif low > 0:
            verdict = "<span class=good>a win: the interval is above 0</span>"
        elif high < 0:
            verdict = "worse: the interval is below 0"
        else:
            verdict = "not separable from noise"
        interval = f"[{low:.4g}, {high:.4g}]" if seeds >= 2 else "—"
        rows.append([_e(label), f"{mean:.4g}", interval, seeds, verdict])
    return (
        "<h2>Is the win real?</h2>"
        f"<p>Score of the exported trial minus each baseline's, per seed, on {_e(data.confidence_source)}; "
        "90 % bootstrap interval over seeds. An interval above 0 is a win the seeds agree on.</p>"
        + _table(["baseline", "mean margin", "90 % interval", "seeds", "verdict"], rows)
    )


def _recovery(data: ReportData) -> str:
    if not data.secret:
        return ""
    errors = data.recovery_errors()
    rows = [
        [_e(name), f"{value:.3f}", f"{data.secret[name]:.3f}", f"{errors[name]:.3f}"]
        for name, value, _low, _high in data.weights
        if name in errors
    ]
    mean = sum(errors.values()) / len(errors) if errors else float("nan")
    return (
        f"<h2>Recovered vs secret weights</h2><p>mean |recovered − secret| = <b>{mean:.3f}</b></p>"
        + _table(["dimension", "recovered", "secret", "|error|"], rows)
    )


def _headline(data: ReportData) -> str:
    """``best trial 7, score 0.91``; for another exported trial, the best is named too; with several
    objectives, the exported trial's scores, whether it is on the front and how it was chosen."""
    if data.pareto is not None:
        point = next((p for p in data.pareto.points if p.number == data.exported_number), None)
        scores = data.pareto.scores_text(point.values) if point else ""
        where = "on the Pareto front" if point and point.on_front else "not on the Pareto front"
        return f"exported trial <b>{data.exported_number}</b>: <b class=good>{scores}</b>, {where}"
    exported = f"trial <b>{data.exported_number}</b>, score <b class=good>{data.exported_value:.6g}</b>"
    if data.exported_number == data.best_number:
        return f"best {exported}"
    return f"exported {exported} (the best is trial {data.best_number}, score {data.best_value:.6g})"


def _single_sections(data: ReportData) -> tuple[str, str, str, str]:
    """Baselines, best-so-far curve, importances and validation of a study with one score."""
    baselines = "<h2>Baselines</h2>" + _table(
        ["baseline", "trial", "score"], [[_e(label), n, f"{v:.6g}"] for label, n, v in data.baselines]
    )
    importances = "<h2>Parameter importances</h2>" + (
        _table(["parameter", "importance"], [[_e(k), f"{v:.3f}"] for k, v in data.importances.items()])
        if data.importances
        else "<p class=muted>needs at least 4 completed trials</p>"
    )
    validation = (
        "<h2>Validation (held-out payloads)</h2>"
        + _table(["model", "score"], [[_e(label), f"{value:.6g}"] for label, value in data.validation])
        if data.validation
        else ""
    )
    curve = "<h2>Best so far</h2>" + curve_svg(data.curve, baselines=data.baselines)
    return baselines, curve, importances, validation


def _pareto_sections(data: ReportData, pareto: ParetoData) -> tuple[str, str, str, str]:
    """Baselines, the front, importances and validation of a study with several objectives."""
    validation = (
        "<h2>Validation (held-out payloads)</h2>"
        + _table(
            ["model", *pareto.names],
            [[_e(label), *(f"{v:.6g}" for v in values)] for label, values in pareto.validation],
        )
        if pareto.validation
        else ""
    )
    return _pareto_baselines(pareto), _pareto_section(data, pareto), _pareto_importances(pareto), validation


def render_report(data: ReportData) -> str:
    """The whole page as one HTML string."""
    stages = sorted(data.timings.items(), key=lambda kv: -kv[1])
    total = sum(data.timings.values()) or 1.0
    baselines, progress, importances, validation = (
        _single_sections(data) if data.pareto is None else _pareto_sections(data, data.pareto)
    )
    scored = "; each image's score under it" if data.pareto is None else ""
    parts = [
        f"<!doctype html><html><head><meta charset=utf-8><title>automerge report: {_e(data.title)}</title>",
        f"<style>{_STYLE}</style></head><body>",
        f"<h1>automerge · {_e(data.title)}</h1>",
        f"<p>{_headline(data)} · "
        f"{data.trial_count} trials ({data.completed_count} complete, {data.pruned_count} pruned, {data.failed_count} failed)"
        + (f" · {_e(data.stop_reason)}" if data.stop_reason else "")
        + "</p>"
        + (f"<p class=muted>{_e(data.pareto.how)}</p>" if data.pareto and data.pareto.how else ""),
        baselines,
        progress,
        _guard_section(data.guard),
        f"<h2>Per-block weights of trial {data.exported_number}</h2>"
        + weights_svg(data.weights, data.secret)
        + (
            f"<p class=muted>bars: trial {data.exported_number} · red ticks: the hidden target's weights</p>"
            if data.secret
            else ""
        ),
        _recovery(data),
        importances,
        "<h2>Time per trial (median)</h2>"
        + _table(
            ["stage", "seconds", "share"], [[_e(s), f"{v:.3f}", f"{100 * v / total:.1f}%"] for s, v in stages]
        ),
    ]
    if validation:
        parts.append(validation)
    parts.append(_confidence(data))
    parts.append(
        f"<h2>Images: trial {data.exported_number} vs baselines (same seeds{scored})</h2>" + _grid(data)
    )
    parts.append("</body></html>")
    return "\n".join(parts)
