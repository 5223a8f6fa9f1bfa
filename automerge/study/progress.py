"""The progress display: trial n / N, last and best score, elapsed, ETA, per-stage time, plus one line
per trial that stays in the terminal log."""

from __future__ import annotations

import statistics
import time
from typing import Self

import optuna
from optuna.trial import FrozenTrial, TrialState
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from automerge.study.records import FAIL_REASON, STAGES
from automerge.study.runtime import Evaluation


class TrialProgress:
    """A live progress bar plus one log line per trial; ``update`` and ``callback`` feed it."""

    def __init__(self, console: Console, *, total: int, start_best: float | None) -> None:
        self.console = console
        self.total = total
        self.best = start_best
        self.ran = 0
        self.timings: dict[str, list[float]] = {stage: [] for stage in STAGES}
        self._progress = Progress(
            TextColumn("trial"),
            MofNCompleteColumn(),
            BarColumn(),
            TimeElapsedColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            TextColumn("{task.fields[status]}"),
            console=console,
            transient=False,
        )
        self._task = self._progress.add_task("trials", total=total, status="")
        self._started = time.perf_counter()

    def __enter__(self) -> Self:
        self._progress.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._progress.__exit__(*exc)

    def update(self, number: int, evaluation: Evaluation) -> None:
        """Called by the objective for a completed evaluation."""
        for stage, seconds in evaluation.timings.items():
            self.timings.setdefault(stage, []).append(seconds)
        value = evaluation.value
        self.best = value if self.best is None else max(self.best, value)
        stages = " ".join(
            f"{s} {1000 * statistics.median(self.timings[s]):.0f}ms" for s in STAGES if self.timings.get(s)
        )
        status = f"last {value:.6g} best {self.best:.6g} | {stages}"
        self._progress.update(self._task, status=status)
        self.console.log(f"trial {number}: {value:.6g} (best {self.best:.6g}) {stages}", highlight=False)

    def callback(self, study: optuna.Study, trial: FrozenTrial) -> None:
        self.ran += 1
        if trial.state == TrialState.FAIL:
            self.console.log(
                f"trial {trial.number} failed: {trial.user_attrs.get(FAIL_REASON, '?')}", highlight=False
            )
        elif trial.state == TrialState.PRUNED:
            self.console.log(f"trial {trial.number} pruned", highlight=False)
        self._progress.advance(self._task)
