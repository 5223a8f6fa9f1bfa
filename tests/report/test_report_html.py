"""report.html's parts: a best-so-far chart whose trials are readable (log distance to the best, axis
titles, the baselines as lines), a per-block chart with a y-axis, each image's score under it, and a
confidence statement with an interval over seeds."""

from __future__ import annotations

import re

import pytest

from automerge.report.html import ReportData, curve_svg, render_report, weights_svg
from automerge.study.export import margins_over_baselines


def _ys(svg: str) -> list[float]:
    return [float(y) for y in re.findall(r'<circle cx="[\d.]+" cy="([\d.]+)"', svg)]


def test_the_curve_spreads_values_that_span_decades_and_names_its_axes() -> None:
    """A linear axis put every trial after the first of a distance-type reward on one line."""
    points = [(0, -1e-2)] + [(n, -(10.0 ** -(2 + n / 10))) for n in range(1, 40)]
    svg = curve_svg(points, baselines=[("A", 0, -2e-2), ("uniform 0.5", 2, -3e-3)])
    ys = _ys(svg)
    assert max(ys[1:]) - min(ys[1:]) > 150  # the later trials use the chart's height, not one line
    assert ">trial</text>" in svg and "best score − score (log)" in svg
    assert svg.count('stroke-dasharray="5 4"') == 2 and ">A</text>" in svg and ">uniform 0.5</text>" in svg
    assert re.search(r">1e-\d+</text>", svg)  # decade ticks


def test_the_block_chart_has_a_y_axis_with_values() -> None:
    svg = weights_svg([("alpha.BASE", 0.7, 0.0, 1.0), ("alpha.IN00", 0.2, 0.0, 1.0)], None)
    assert ">value</text>" in svg
    for tick in ("0", "0.5", "1"):
        assert f">{tick}</text>" in svg


def test_margins_over_baselines_average_per_seed_and_bootstrap_over_seeds() -> None:
    best = {f"p0-i00-s{seed:04d}": 1.0 + 0.1 * seed for seed in range(6)}
    best |= {f"p0-i01-s{seed:04d}": 1.0 for seed in range(6)}
    baseline = dict.fromkeys(best, 0.5)
    noisy = {
        key: value + (0.6 if key.endswith(("s0000", "s0002", "s0004")) else -0.6)
        for key, value in best.items()
    }
    margins = {
        m[0]: m for m in margins_over_baselines({"best": best, "A": baseline, "B": noisy}, best="best")
    }
    label, mean, low, high, seeds = margins["A"]
    assert seeds == 6 and mean == pytest.approx(0.5 + 0.05 * 2.5 / 1)  # per seed: 0.5 + 0.05·seed
    assert 0 < low < mean < high
    _, mean_b, low_b, high_b, _ = margins["B"]
    assert mean_b == pytest.approx(0.0, abs=1e-12) and low_b < 0 < high_b  # noise: the interval holds 0
    assert margins_over_baselines({"best": best, "A": baseline}, best="best") == margins_over_baselines(
        {"best": best, "A": baseline}, best="best"
    )  # a fixed RNG: the report is reproducible


def test_the_report_shows_scores_under_images_and_says_whether_the_win_is_real() -> None:
    data = ReportData(
        title="t",
        exported_number=5,
        exported_value=-1e-6,
        best_number=5,
        best_value=-1e-6,
        trial_count=6,
        completed_count=6,
        failed_count=0,
        pruned_count=0,
        stop_reason="",
        columns=["best (trial 5)", "A", "reference"],
        grid={
            "p0-i00-s0001": [
                ("data:image/png;base64,AA", -1.25e-6),
                ("data:image/png;base64,AB", -3e-3),
                ("data:image/png;base64,AC", None),
            ]
        },
        curve=[(0, -3e-3), (5, -1e-6)],
        weights=[("alpha.BASE", 0.7, 0.0, 1.0)],
        confidence=[("A", 3e-3, 2e-3, 4e-3, 4)],
        confidence_source="the validation payloads",
    )
    page = render_report(data)
    assert "-1.25e-06</div>" in page and "-0.003</div>" in page
    assert "<th>reference</th>" in page
    assert "Is the win real?" in page and "a win: the interval is above 0" in page
