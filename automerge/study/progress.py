"""What the terminal shows during a run: a status line with a spinner while the study starts (which
phase, and how long each took), then one live line that fits 80 columns (trial n/N, bar, best, ETA,
the current stage) and one log line per finished trial with that trial's own stage times."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Self

import numpy as np
import optuna
from optuna.trial import FrozenTrial, TrialState
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from automerge.study import pareto, records
from automerge.study.records import FAIL_REASON, STAGES
from automerge.study.runtime import Evaluation
from automerge.study.stopping import front_hypervolume

STAGE_LABELS = {
    "sampler": "ask",
    "merge": "merge",
    "render": "render",
    "score": "score",
    "bookkeeping": "save",
}
"""Short names of the timed stages in a trial's log line (the sampler's proposal is Optuna's ask)."""


def stage_times(timings: dict[str, float]) -> str:
    """``ask 40 merge 12 render 310 score 5 save 20 ms``: the stages a trial timed, in pipeline order."""
    shown = " ".join(f"{STAGE_LABELS[s]} {1000 * timings[s]:.0f}" for s in STAGES if s in timings)
    return f"{shown} ms" if shown else ""


class TrialProgress:
    """The live line plus one log line per trial; ``stage``, ``update`` and ``callback`` feed it. With
    several ``objectives`` the live line shows the Pareto front's size and hypervolume (``show_front``)
    instead of the best, and each trial's line its scores and whether it joined the front."""

    def __init__(
        self, console: Console, *, total: int, start_best: float | None, objectives: Sequence[str] = ()
    ) -> None:
        self.console = console
        self.total = total
        self.best = start_best
        self.objectives = list(objectives) if len(objectives) > 1 else []
        self.maximize: list[bool] = [True] * len(self.objectives)
        self.points: list[np.ndarray] = []  # every complete trial's scores, maximize sense
        self.ran = 0
        self.timings: dict[str, list[float]] = {stage: [] for stage in STAGES}
        self._progress = Progress(
            TextColumn("trial"),
            MofNCompleteColumn(),
            BarColumn(bar_width=12),
            TextColumn("{task.fields[best]}" if self.objectives else "best {task.fields[best]}"),
            TextColumn("ETA"),
            TimeRemainingColumn(compact=True),
            TextColumn("{task.fields[stage]}"),
            console=console,
            transient=False,
        )
        best = "—" if start_best is None else f"{start_best:.4g}"
        best = "front —" if self.objectives else best
        self._task = self._progress.add_task("trials", total=total, best=best, stage="")

    def __enter__(self) -> Self:
        self._progress.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._progress.update(self._task, stage="done")
        self._progress.__exit__(*exc)

    def renderable(self) -> object:
        """The live line as rich renders it (for tests and for printing it once)."""
        return self._progress.get_renderable()

    def stage(self, name: str) -> None:
        """The trial now running entered stage ``name`` (propose, merge, render, score, record)."""
        self._progress.update(self._task, stage=name)

    def update(self, number: int, evaluation: Evaluation) -> None:
        """Called by the objective for a completed evaluation."""
        for stage, seconds in evaluation.timings.items():
            self.timings.setdefault(stage, []).append(seconds)
        if self.objectives:
            self._update_front(number, evaluation)
            return
        value = evaluation.value
        improved = self.best is None or value > self.best
        self.best = value if improved else self.best
        self._progress.update(self._task, best=f"{self.best:.4g}")
        mark = " [green](best)[/]" if improved else ""
        self.console.print(
            f"trial {number}: {value:.6g}{mark}  [dim]{stage_times(evaluation.timings)}[/]", highlight=False
        )

    def _update_front(self, number: int, evaluation: Evaluation) -> None:
        """``trial 7: a -0.00123, b -0.0456 (front)``: on the front when no earlier trial dominates it."""
        values = list(evaluation.objective_scores.values())
        point = pareto.maximized(np.array(values), self.maximize)[0]
        joined = not any(pareto.dominates(other, point) for other in self.points)
        self.points.append(point)
        scores = ", ".join(f"{name} {value:.6g}" for name, value in zip(self.objectives, values, strict=True))
        mark = " [green](front)[/]" if joined else ""
        self.console.print(
            f"trial {number}: {scores}{mark}  [dim]{stage_times(evaluation.timings)}[/]", highlight=False
        )

    def show_front(self, study: optuna.Study) -> None:
        """The live line's ``front N HV h``: the front's size and its hypervolume (objectives normalised
        by the baselines' range, as early stopping measures it)."""
        self.maximize = records.maximize_flags(study)
        trials = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        self.points = [pareto.maximized(np.array(t.values), self.maximize)[0] for t in trials]
        volume = front_hypervolume(trials, maximize=self.maximize)
        if volume is not None:
            size = len(records.front_trials(study))
            self._progress.update(self._task, best=f"front {size} HV {volume:.3g}")

    def callback(self, study: optuna.Study, trial: FrozenTrial) -> None:
        self.ran += 1
        if trial.state == TrialState.FAIL:
            self.console.print(
                f"trial {trial.number} failed: {trial.user_attrs.get(FAIL_REASON, '?')}", highlight=False
            )
        elif trial.state == TrialState.PRUNED:
            self.console.print(f"trial {trial.number} pruned", highlight=False)
        elif self.objectives:
            self.show_front(study)
        self._progress.advance(self._task)
