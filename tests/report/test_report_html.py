"""report.html's parts: a best-so-far chart whose trials are readable (log distance to the best, axis
titles, the baselines as lines), a per-block chart with a y-axis, each image's score under it, and a
confidence statement with an interval over seeds."""

from __future__ import annotations

import re

import pytest

from automerge.report.html import (
    ParetoData,
    ParetoPoint,
    ReportData,
    curve_svg,
    front_svg,
    render_report,
    weights_svg,
)
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


def _pareto_report(names: list[str], points: list[ParetoPoint], exported: int) -> ReportData:
    return ReportData(
        title="t",
        exported_number=exported,
        exported_value=0.0,
        best_number=exported,
        best_value=0.0,
        trial_count=len(points),
        completed_count=len(points),
        failed_count=0,
        pruned_count=0,
        stop_reason="",
        columns=[f"exported (trial {exported})"],
        grid={},
        curve=[],
        weights=[("alpha.BASE", 0.7, 0.0, 1.0)],
        pareto=ParetoData(
            names=names,
            maximize=[True, False, True][: len(names)],
            points=points,
            how="picked trial 3 (…) of the 2 on the Pareto front (--pick knee): the knee point",
            importances={names[0]: {"alpha.BASE": 1.0}},
            validation=[("exported (trial 3)", tuple(range(len(names))))],
        ),
    )


def test_a_two_objective_report_draws_the_front_with_numbered_linked_points_and_hover_images() -> None:
    """Issue 18: every complete trial a dot, the front's green, numbered and linked to its row of
    images, the baselines named, the exported trial ringed; no best-so-far curve and no single-score
    margin."""
    thumb = "data:image/png;base64,AA"
    points = [
        ParetoPoint(0, "A", (1.0, 5.0), on_front=False, baseline=True, thumbnails=(thumb,)),
        ParetoPoint(3, "trial 3", (2.0, 1.0), on_front=True, thumbnails=(thumb, None)),
        ParetoPoint(4, "trial 4", (0.5, 3.0), on_front=True),
        ParetoPoint(5, "trial 5", (0.4, 4.0), on_front=False),
    ]
    page = render_report(_pareto_report(["near-a", "near-b"], points, exported=3))
    assert '<h2 id="pareto-front">Pareto front: 2 of 4 complete trials</h2>' in page
    assert page.count('<svg class=chart width="640"') == 1 and page.count("<polyline") == 1
    for number in (3, 4):
        assert f'<a href="#front-trial-{number}">' in page and f'<tr id="front-trial-{number}">' in page
    assert "<title>trial 5: near-a 0.4 · near-b 4</title>" in page  # off the front: no link
    assert "<title>A · trial 0: near-a 1 · near-b 5</title>" in page and ">A</text>" in page
    assert 'r="9" fill="none" stroke="#c0392b"' in page  # the exported trial's ring
    assert f'<image class=thumb href="{thumb}"' in page and ".pt:hover .thumb{visibility:visible}" in page
    assert "near-a (higher is better)" in page and "near-b (lower is better)" in page
    assert "exported trial <b>3</b>: <b class=good>near-a 2 · near-b 1</b>, on the Pareto front" in page
    assert "(--pick knee): the knee point" in page
    assert "<th>near-a</th><th>near-b</th>" in page  # baselines, importances and validation per objective
    assert "Best so far" not in page and "Is the win real?" not in page


def test_three_objectives_get_one_scatter_per_pair_and_no_front_line() -> None:
    points = [
        ParetoPoint(0, "trial 0", (1.0, 2.0, 3.0), on_front=True),
        ParetoPoint(1, "trial 1", (3.0, 1.0, 2.0), on_front=True),
    ]
    page = render_report(_pareto_report(["a", "b", "c"], points, exported=1))
    assert page.count('<svg class=chart width="420"') == 3 and "<polyline" not in page
    svg = front_svg(_pareto_report(["a", "b", "c"], points, exported=1).pareto, 0, 2, exported=1)
    assert "a (higher is better)" in svg and "c (higher is better)" in svg


def test_a_report_of_one_score_has_no_front() -> None:
    page = render_report(
        ReportData(
            title="t",
            exported_number=1,
            exported_value=1.0,
            best_number=1,
            best_value=1.0,
            trial_count=1,
            completed_count=1,
            failed_count=0,
            pruned_count=0,
            stop_reason="",
            columns=[],
            grid={},
            curve=[(1, 1.0)],
            weights=[],
        )
    )
    assert "pareto" not in page.lower() and "Best so far" in page
