"""A 2-problem slice (weighted sums) of the search suite (``benchmarks/search_suite.py``), as a smoke test: the problems
are built right (the secret scores exactly the optimum), every run is recorded, the table and the plot
are written. No timing is asserted."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


@pytest.fixture
def search_suite(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import search_suite

    yield search_suite
    for name in [m for m in sys.modules if m.startswith(("search_suite", "_search_"))]:
        del sys.modules[name]


@pytest.mark.slow
def test_a_slice_of_the_suite_runs_and_records_every_trial(search_suite, tmp_path: Path, capsys) -> None:
    out = tmp_path / "suite.json"
    args = ["--families", "sd1", "--kinds", "groups:1,frozen:1", "--strategies", "random,gp-rank"]
    args += ["--trials", "10", "--processes", "1", "--workdir", str(tmp_path / "work"), "--json", str(out)]
    runs = search_suite.main(args)
    assert sorted(r.key for r in runs) == sorted(
        f"sd1-{kind}-00/{strategy}/0/w1"
        for kind in ("groups", "frozen")
        for strategy in ("random", "gp-rank")
    )
    for run in runs:
        assert run.optimum == 0.0 and run.midpoint < 0.0  # the secret's own renders: MSE exactly 0
        assert len(run.values) == 10 and all(value <= 0.0 for value in run.values)
        curve = run.curve()
        assert all(0.0 <= a <= b <= 1.0 for a, b in zip(curve, curve[1:], strict=False))
    summary = json.loads(out.read_text())["summary"]
    assert {(row["strategy"], row["runs"]) for row in summary} == {("random", 2), ("gp-rank", 2)}
    assert (tmp_path / "suite_sd1.png").stat().st_size > 0
    assert "| sd1 | gp-rank | 1 | 2 |" in capsys.readouterr().out
    again = search_suite.main(args)  # a rerun finds every run on file and redoes none
    assert sorted(r.key for r in again) == sorted(r.key for r in runs)


def test_the_report_pairs_runs_by_problem_and_finds_the_reference_level(search_suite) -> None:
    from _search_report import Run, paired, reference_levels, summary

    def run(strategy: str, problem: str, values: list[float]) -> Run:
        return Run(problem, "sd1", "groups", strategy, 0, 1, 0.0, -1.0, values, 0.0, 1.0)

    runs = [
        run("random", "p0", [-0.5] * 200),  # gap closed 0.5 from trial 1
        run("random", "p1", [-0.5] * 200),
        run("auto", "p0", [-0.9] * 9 + [-0.4] + [-0.1] * 190),  # 0.6 at trial 10, 0.9 from 11
        run("auto", "p1", [-0.05] * 200),
    ]
    assert reference_levels(runs) == {"sd1": 0.5}
    rows = {row["strategy"]: row for row in summary(runs)}
    assert rows["auto"]["trials_to_reference"][0] == 5.5  # median of 10 (p0) and 1 (p1)
    assert rows["auto"]["seconds_to_level"][0] == 6.0  # 90 % after 11 trials (p0) and 1 (p1), 1 s each
    (row,) = paired(runs, "auto")
    assert (row["other"], row["pairs"]) == ("random", 2)
    assert abs(row["difference"]["50"][0] - 0.425) < 1e-9  # mean of (0.9 − 0.5) and (0.95 − 0.5)
