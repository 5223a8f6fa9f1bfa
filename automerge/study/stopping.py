"""When a study stops by itself: early stopping that really stops (patience on the best value with a
minimum improvement; with several objectives, on the Pareto front's hypervolume with a minimum
relative gain), and a run of failing trials.

Early stopping is stateless: computed from the study's completed trials, so it survives resume and
gives the same answer whoever asks. Both are Optuna callbacks that call ``study.stop()``. (Optuna's
Terminator is deprecated since 4.9 and is not used.)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import optuna
from optuna.trial import FrozenTrial, TrialState

from automerge.study import pareto, records


@dataclass(frozen=True)
class StopDecision:
    stop: bool
    best_trial: int | None
    reason: str


def _since_last_gain(
    series: Sequence[tuple[int, float]], gains: Callable[[float, float], bool]
) -> tuple[float | None, int | None, int]:
    """(best value, its trial, trials after it) over (trial number, value) in order: a value becomes
    the best when it is the first or ``gains(value, best)``."""
    best_value: float | None = None
    best_trial: int | None = None
    since = 0
    for number, value in series:
        if best_value is None or gains(value, best_value):
            best_value, best_trial, since = value, number, 0
        else:
            since += 1
    return best_value, best_trial, since


def early_stop_decision(trials: list[FrozenTrial], *, patience: int, min_delta: float) -> StopDecision:
    """Maximisation: an improvement is a value above the best so far by more than ``min_delta``."""
    values = [
        (trial.number, trial.value)
        for trial in sorted(trials, key=lambda t: t.number)
        if trial.state == TrialState.COMPLETE and trial.value is not None
    ]
    _, best_trial, since = _since_last_gain(values, lambda value, best: value > best + min_delta)
    stop = best_trial is not None and since >= patience
    reason = (
        f"early stopping: no improvement above {min_delta:g} in the {since} completed trials since "
        f"trial {best_trial} (patience {patience})"
        if stop
        else ""
    )
    return StopDecision(stop, best_trial, reason)


def front_hypervolumes(trials: list[FrozenTrial], *, maximize: Sequence[bool]) -> list[tuple[int, float]]:
    """(trial number, hypervolume of the front of the completed trials up to it), in number order.
    Each objective (maximize sense) is normalised by the range of the baselines' scores and the
    reference point is their worst in each objective, so the baselines span the unit box; without
    completed baselines, the first three completed trials stand in for them."""
    completed, points, scale = _baseline_scaled(trials, maximize)
    trace = pareto.hypervolume_trace(points, scale) if completed else []
    return [(t.number, volume) for t, volume in zip(completed, trace, strict=True)]


def front_hypervolume(trials: list[FrozenTrial], *, maximize: Sequence[bool]) -> float | None:
    """The hypervolume of the front of all completed trials, measured as ``front_hypervolumes`` does
    (the last of its values, computed once); None before any trial completed."""
    completed, points, scale = _baseline_scaled(trials, maximize)
    if not completed:
        return None
    return pareto.hypervolume(scale.apply(points), np.zeros(points.shape[1]))


def _baseline_scaled(
    trials: list[FrozenTrial], maximize: Sequence[bool]
) -> tuple[list[FrozenTrial], np.ndarray, pareto.Scale]:
    """The completed trials by number, their scores (maximize sense) and the baselines' scale."""
    completed = sorted(
        (t for t in trials if t.state == TrialState.COMPLETE and t.values), key=lambda t: t.number
    )
    points = pareto.maximized(np.array([t.values for t in completed]), maximize)
    if not completed:
        return completed, points, pareto.Scale(np.zeros(len(maximize)), np.ones(len(maximize)))
    baselines = [i for i, t in enumerate(completed) if t.user_attrs.get(records.BASELINE)] or [0, 1, 2]
    return completed, points, pareto.range_scale(points[[i for i in baselines if i < len(points)]])


def hypervolume_stop_decision(
    trials: list[FrozenTrial], *, maximize: Sequence[bool], patience: int, min_delta: float
) -> StopDecision:
    """Several objectives: an improvement is a front hypervolume (``front_hypervolumes``) above the
    largest so far by more than ``min_delta`` of it (relative)."""
    volumes = front_hypervolumes(trials, maximize=maximize)
    best_volume, best_trial, since = _since_last_gain(
        volumes, lambda volume, best: volume > best * (1 + min_delta)
    )
    stop = best_trial is not None and since >= patience
    reason = (
        f"early stopping: the Pareto front's hypervolume ({best_volume:.4g}) gained no more than "
        f"{min_delta:g} of itself in the {since} completed trials since trial {best_trial} (patience {patience})"
        if stop
        else ""
    )
    return StopDecision(stop, best_trial, reason)


class EarlyStopping:
    """Optuna callback: ``study.stop()`` once ``patience`` trials passed without improvement (of the
    best value, or with several objectives of the front's hypervolume)."""

    def __init__(self, *, patience: int, min_delta: float) -> None:
        self.patience = patience
        self.min_delta = min_delta
        self.reason = ""

    def decide(self, study: optuna.Study) -> StopDecision:
        trials = study.get_trials(deepcopy=False)
        if records.multi_objective(study):
            return hypervolume_stop_decision(
                trials,
                maximize=records.maximize_flags(study),
                patience=self.patience,
                min_delta=self.min_delta,
            )
        return early_stop_decision(trials, patience=self.patience, min_delta=self.min_delta)

    def __call__(self, study: optuna.Study, trial: FrozenTrial) -> None:
        decision = self.decide(study)
        if decision.stop:
            self.reason = decision.reason
            study.set_user_attr(records.STOPPED, decision.reason)
            study.stop()


class ConsecutiveFailures:
    """Stops a study whose trials keep failing (a broken reward, an out-of-memory GPU) instead of
    spinning forever: failed trials do not count towards the budget."""

    def __init__(self, *, limit: int) -> None:
        self.limit = limit
        self.count = 0
        self.reason = ""

    def __call__(self, study: optuna.Study, trial: FrozenTrial) -> None:
        self.count = self.count + 1 if trial.state == TrialState.FAIL else 0
        if self.count >= self.limit:
            last = trial.user_attrs.get(records.FAIL_REASON, "unknown")
            self.reason = f"stopped: {self.count} trials in a row failed; the last because {last}"
            study.stop()


class BudgetTaken:
    """Stops this worker once every place of the study's ``budget`` is held by a counted or running
    trial: with several workers on one study, a worker that asked for one more trial here would only
    be refused it (``records.OVER_BUDGET``), and the refused trial would stay in the study as a
    failure. Queued trials beyond the budget (three baselines for ``trials: 2``) stay queued. Optuna's
    ``MaxTrialsCallback`` counts finished trials only."""

    def __init__(self, budget: int) -> None:
        self.budget = budget

    def __call__(self, study: optuna.Study, trial: FrozenTrial) -> None:
        held = study.get_trials(deepcopy=False, states=(*records.BUDGET_STATES, TrialState.RUNNING))
        if len(held) >= self.budget:
            study.stop()
