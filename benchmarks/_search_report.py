"""The search suite's results: one ``Run`` per strategy × problem × seed, the per-family summary
(medians with 90 % bootstrap intervals), the paired comparisons a default must win, the Markdown
tables and the best-so-far plots. Reads and writes plain JSON; runs nothing.
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from _search_stats import bootstrap_mean, bootstrap_median, gap_curve, interval_text, plot_curves, trials_to

CHECKPOINTS = (25, 50, 100, 200)
LEVEL = 0.9  # "good": 90 % of the gap closed
MF = "+mf"  # the label of a strategy run with previews
REFERENCE = "random"  # the strategy whose 200-trial median a default must reach early


@dataclass(frozen=True)
class Run:
    problem: str
    family: str
    kind: str
    strategy: str
    seed: int
    workers: int
    optimum: float
    midpoint: float
    values: list[float | None]  # every trial's value, in order (None: stopped after its preview)
    sampler_s: float  # mean per trial
    evaluate_s: float  # mean per trial
    full: list[bool] = field(default_factory=list)  # which trials rendered the full payload ([]: all)
    seconds: list[float] = field(default_factory=list)  # each trial's render seconds ([]: not kept)

    @property
    def key(self) -> str:
        return f"{self.problem}/{self.strategy}/{self.seed}/w{self.workers}"

    def curve(self) -> list[float]:
        """Gap closed after each trial."""
        return gap_curve(self.values, optimum=self.optimum, midpoint=self.midpoint)

    def full_curve(self) -> list[float]:
        """Gap closed after each full-cost render (the same as ``curve`` without previews)."""
        full = self.full or [True] * len(self.values)
        values = [value for value, rendered in zip(self.values, full, strict=True) if rendered]
        return gap_curve(values, optimum=self.optimum, midpoint=self.midpoint)

    def seconds_to(self, level: float) -> float:
        """Render seconds spent until the gap closed reaches ``level`` (previews included); inf
        when it never does. Runs without per-trial seconds count the mean for every trial."""
        trials = trials_to(self.curve(), level)
        if math.isinf(trials):
            return math.inf
        spent = self.seconds or [self.evaluate_s] * len(self.values)
        return sum(spent[: int(trials)])


def load_runs(*paths: Path) -> list[Run]:
    """Every run in the JSON files that exist, in order."""
    runs = []
    for path in paths:
        if path.exists():
            runs += [Run(**run) for run in json.loads(path.read_text()).get("runs", [])]
    return runs


def _group(runs: Sequence[Run]) -> dict[tuple[str, str, int], list[Run]]:
    groups: dict[tuple[str, str, int], list[Run]] = {}
    for run in sorted(runs, key=lambda r: (r.family, r.strategy, r.workers, r.problem, r.seed)):
        groups.setdefault((run.family, run.strategy, run.workers), []).append(run)
    return groups


def reference_levels(runs: Sequence[Run], at: int = CHECKPOINTS[-1]) -> dict[str, float]:
    """Per family, the median gap closed of sequential ``REFERENCE`` runs after ``at`` trials."""
    levels = {}
    for (family, strategy, workers), group in _group(runs).items():
        if strategy == REFERENCE and workers == 1 and all(len(r.values) >= at for r in group):
            levels[family] = statistics.median(r.curve()[at - 1] for r in group)
    return levels


def summary(runs: Sequence[Run], checkpoints: Sequence[int] = CHECKPOINTS) -> list[dict[str, Any]]:
    """Per (family, strategy, workers): gap closed at each checkpoint, trials (and full-cost renders,
    and render seconds) to ``LEVEL``, and trials to the reference's 200-trial median, as medians with
    90 % bootstrap intervals over runs; sampler and evaluation seconds per trial."""
    reference = reference_levels(runs)
    rows = []
    for (family, strategy, workers), group in _group(runs).items():
        curves = [r.curve() for r in group]
        trials = min(len(c) for c in curves)
        level = reference.get(family)
        rows.append(
            {
                "family": family,
                "strategy": strategy,
                "workers": workers,
                "runs": len(group),
                "gap_closed": {
                    str(c): bootstrap_median([curve[c - 1] for curve in curves])
                    for c in checkpoints
                    if c <= trials
                },
                "trials_to_level": bootstrap_median([trials_to(curve, LEVEL) for curve in curves]),
                "full_renders_to_level": bootstrap_median([trials_to(r.full_curve(), LEVEL) for r in group]),
                "seconds_to_level": bootstrap_median([r.seconds_to(LEVEL) for r in group]),
                "trials_to_reference": (
                    bootstrap_median([trials_to(curve, level) for curve in curves])
                    if level is not None
                    else None
                ),
                "reference_level": level,
                "sampler_s": bootstrap_median([r.sampler_s for r in group]),
                "evaluate_s": bootstrap_median([r.evaluate_s for r in group]),
            }
        )
    return rows


def paired(runs: Sequence[Run], default: str, checkpoints: Sequence[int] = (50, 100)) -> list[dict[str, Any]]:
    """The default against every other sequential strategy on the same problems and seeds: the mean
    of (default's gap closed − the other's) at each checkpoint, with its 90 % bootstrap interval."""
    by_key = {(r.family, r.strategy, r.problem, r.seed): r for r in runs if r.workers == 1}
    rows = []
    for family, other in sorted({(f, s) for f, s, _, _ in by_key if s != default}):
        pairs = [
            (run, by_key[(family, other, problem, seed)])
            for (f, s, problem, seed), run in by_key.items()
            if (f, s) == (family, default) and (family, other, problem, seed) in by_key
        ]
        if not pairs:
            continue
        rows.append(
            {
                "family": family,
                "default": default,
                "other": other,
                "pairs": len(pairs),
                "difference": {
                    str(c): bootstrap_mean([a.curve()[c - 1] - b.curve()[c - 1] for a, b in pairs])
                    for c in checkpoints
                    if all(len(a.values) >= c and len(b.values) >= c for a, b in pairs)
                },
            }
        )
    return rows


def _count(value: float) -> str:
    return "∞" if math.isinf(value) else f"{value:.0f}"


def table(rows: Sequence[Mapping[str, Any]], checkpoints: Sequence[int] = CHECKPOINTS) -> str:
    head = ["family", "strategy", "workers", "runs", *(f"gap closed @{c}" for c in checkpoints)]
    head += [f"trials to {LEVEL:.0%}", f"full renders to {LEVEL:.0%}", f"render s to {LEVEL:.0%}"]
    head += [f"trials to {REFERENCE} @{checkpoints[-1]}", "sampler s/trial", "eval s/trial"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        cells = [row["family"], row["strategy"], str(row["workers"]), str(row["runs"])]
        cells += [
            interval_text(row["gap_closed"][str(c)], lambda v: f"{v:.3f}")
            if str(c) in row["gap_closed"]
            else "—"
            for c in checkpoints
        ]
        cells += [interval_text(row[k], _count) for k in ("trials_to_level", "full_renders_to_level")]
        cells.append(interval_text(row["seconds_to_level"], lambda v: "∞" if math.isinf(v) else f"{v:.1f}"))
        cells.append(interval_text(row["trials_to_reference"], _count) if row["trials_to_reference"] else "—")
        cells += [interval_text(row[k], lambda v: f"{v:.3f}") for k in ("sampler_s", "evaluate_s")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def paired_table(rows: Sequence[Mapping[str, Any]]) -> str:
    lines = [
        "| family | default − other | pairs | mean difference @50 | mean difference @100 |",
        "|---|---|---|---|---|",
    ]
    for row in rows:
        cells = [row["family"], f"{row['default']} − {row['other']}", str(row["pairs"])]
        cells += [
            interval_text(row["difference"][c], lambda v: f"{v:+.3f}") if c in row["difference"] else "—"
            for c in ("50", "100")
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plots(runs: Sequence[Run], folder: Path, *, name: str) -> list[Path]:
    """One PNG per family: every (strategy, workers) group's median best-so-far curve and band."""
    paths = []
    for family in sorted({r.family for r in runs}):
        curves = {
            strategy if workers == 1 else f"{strategy} ×{workers}": [r.curve() for r in group]
            for (f, strategy, workers), group in _group(runs).items()
            if f == family
        }
        path = folder / f"{name}_{family}.png"
        plot_curves(path, curves, title=f"{family}: median gap closed per trial (90% bootstrap band)")
        paths.append(path)
    return paths
