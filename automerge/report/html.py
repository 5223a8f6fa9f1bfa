"""report.html: one self-contained page (inline SVG charts, images as data URIs, no scripts or CDNs),
drawn from a ``ReportData`` that the study gathers; nothing here knows about Optuna or studies."""

from __future__ import annotations

import html
from dataclasses import dataclass, field

_STYLE = """
body{font:14px/1.45 system-ui,sans-serif;margin:24px auto;max-width:1180px;color:#1d232a;padding:0 16px}
h1{font-size:22px;margin:0 0 4px} h2{font-size:17px;margin:28px 0 8px;border-bottom:1px solid #dde3ea;padding-bottom:4px}
table{border-collapse:collapse} td,th{padding:3px 10px;border-bottom:1px solid #edf0f3;text-align:right}
th{background:#f5f7f9} td:first-child,th:first-child{text-align:left}
.grid img{width:128px;height:auto;image-rendering:pixelated;display:block}
.muted{color:#6b7785} .good{color:#17803d} .chart{background:#fbfcfd;border:1px solid #e4e8ec}
"""


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
    grid: dict[str, list[str | None]]  # image key → data URI per column
    curve: list[tuple[int, float]]  # (trial number, value) of completed trials
    weights: list[tuple[str, float, float, float]]  # (dimension, best value, low, high)
    secret: dict[str, float] | None = None
    importances: dict[str, float] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)  # median seconds per stage
    baselines: list[tuple[str, int, float]] = field(default_factory=list)
    validation: list[tuple[str, float]] = field(default_factory=list)


def _e(text: object) -> str:
    return html.escape(str(text))


def curve_svg(points: list[tuple[int, float]], *, width: int = 760, height: int = 260) -> str:
    """Trial values (dots) and the best-so-far line."""
    if not points:
        return "<p class=muted>no completed trials</p>"
    pad = 40
    xs = [n for n, _ in points]
    ys = [v for _, v in points]
    lo, hi = min(ys), max(ys)
    span = (hi - lo) or 1.0
    x_max = max(xs) or 1

    def px(n: int) -> float:
        return pad + (width - 2 * pad) * n / x_max

    def py(v: float) -> float:
        return height - pad - (height - 2 * pad) * (v - lo) / span

    dots = "".join(f'<circle cx="{px(n):.1f}" cy="{py(v):.1f}" r="2.5" fill="#8aa1b8"/>' for n, v in points)
    best, line = -float("inf"), []
    for n, v in points:
        best = max(best, v)
        line.append(f"{px(n):.1f},{py(best):.1f}")
    axis = (
        f'<text x="{pad}" y="{height - 10}" font-size="11">trial 0</text>'
        f'<text x="{width - pad - 40}" y="{height - 10}" font-size="11">trial {x_max}</text>'
        f'<text x="4" y="{py(hi) + 4:.1f}" font-size="11">{hi:.4g}</text>'
        f'<text x="4" y="{py(lo) + 4:.1f}" font-size="11">{lo:.4g}</text>'
    )
    return (
        f'<svg class=chart width="{width}" height="{height}" xmlns="http://www.w3.org/2000/svg">{dots}'
        f'<polyline points="{" ".join(line)}" fill="none" stroke="#17803d" stroke-width="2"/>{axis}</svg>'
    )


def weights_svg(weights: list[tuple[str, float, float, float]], secret: dict[str, float] | None) -> str:
    """One bar per searched dimension (its range scaled to the bar height); the secret as a red tick."""
    if not weights:
        return ""
    bar = 40 if len(weights) <= 12 else 22
    gap, height, pad, label_room = 12, 250, 20, 60
    width = pad + len(weights) * (bar + gap) + pad
    plot = height - label_room  # bars end here; rotated labels below
    parts = []
    for index, (name, value, low, high) in enumerate(weights):
        span = (high - low) or 1.0
        x = pad + index * (bar + gap)
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


def _table(header: list[str], rows: list[list[object]]) -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{cell}</td>" for cell in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _grid(data: ReportData) -> str:
    if not data.grid:
        return "<p class=muted>no trial images stored</p>"
    rows = []
    for key, uris in sorted(data.grid.items()):
        cells = [
            f'<img src="{uri}" alt="{_e(key)}">' if uri else "<span class=muted>—</span>" for uri in uris
        ]
        rows.append([_e(key), *cells])
    return '<div class="grid">' + _table(["image", *data.columns], rows) + "</div>"


def _recovery(data: ReportData) -> str:
    if not data.secret:
        return ""
    rows, errors = [], []
    for name, value, _low, _high in data.weights:
        if name in data.secret:
            error = abs(value - data.secret[name])
            errors.append(error)
            rows.append([_e(name), f"{value:.3f}", f"{data.secret[name]:.3f}", f"{error:.3f}"])
    mean = sum(errors) / len(errors) if errors else float("nan")
    return (
        f"<h2>Recovered vs secret weights</h2><p>mean |recovered − secret| = <b>{mean:.3f}</b></p>"
        + _table(["dimension", "recovered", "secret", "|error|"], rows)
    )


def _headline(data: ReportData) -> str:
    """``best trial 7, score 0.91``; for another exported trial, the best is named too."""
    exported = f"trial <b>{data.exported_number}</b>, score <b class=good>{data.exported_value:.6g}</b>"
    if data.exported_number == data.best_number:
        return f"best {exported}"
    return f"exported {exported} (the best is trial {data.best_number}, score {data.best_value:.6g})"


def render_report(data: ReportData) -> str:
    """The whole page as one HTML string."""
    stages = sorted(data.timings.items(), key=lambda kv: -kv[1])
    total = sum(data.timings.values()) or 1.0
    parts = [
        f"<!doctype html><html><head><meta charset=utf-8><title>automerge report: {_e(data.title)}</title>",
        f"<style>{_STYLE}</style></head><body>",
        f"<h1>automerge · {_e(data.title)}</h1>",
        f"<p>{_headline(data)} · "
        f"{data.trial_count} trials ({data.completed_count} complete, {data.pruned_count} pruned, {data.failed_count} failed)"
        + (f" · {_e(data.stop_reason)}" if data.stop_reason else "")
        + "</p>",
        "<h2>Baselines</h2>"
        + _table(
            ["baseline", "trial", "score"], [[_e(label), n, f"{v:.6g}"] for label, n, v in data.baselines]
        ),
        "<h2>Best so far</h2>" + curve_svg(data.curve),
        f"<h2>Per-block weights of trial {data.exported_number}</h2>"
        + weights_svg(data.weights, data.secret)
        + (
            f"<p class=muted>bars: trial {data.exported_number} · red ticks: the hidden target's weights</p>"
            if data.secret
            else ""
        ),
        _recovery(data),
        "<h2>Parameter importances</h2>"
        + (
            _table(["parameter", "importance"], [[_e(k), f"{v:.3f}"] for k, v in data.importances.items()])
            if data.importances
            else "<p class=muted>needs at least 4 completed trials</p>"
        ),
        "<h2>Time per trial (median)</h2>"
        + _table(
            ["stage", "seconds", "share"], [[_e(s), f"{v:.3f}", f"{100 * v / total:.1f}%"] for s, v in stages]
        ),
    ]
    if data.validation:
        parts.append(
            "<h2>Validation (held-out payloads)</h2>"
            + _table(["model", "score"], [[_e(label), f"{value:.6g}"] for label, value in data.validation])
        )
    parts.append(f"<h2>Images: trial {data.exported_number} vs baselines (same seeds)</h2>" + _grid(data))
    parts.append("</body></html>")
    return "\n".join(parts)
