"""Early stopping that really stops: patience on the best value with a minimum improvement.

Stateless: computed from the study's completed trials, so it survives resume and gives the same
answer whoever asks. As an Optuna callback it calls ``study.stop()``. (Optuna's Terminator is
deprecated since 4.9 and is not used.)
"""

from __future__ import annotations

from dataclasses import dataclass

import optuna
from optuna.trial import FrozenTrial, TrialState


@dataclass(frozen=True)
class StopDecision:
    stop: bool
    best_trial: int | None
    since_best: int  # completed trials since the last improvement by more than min_delta
    reason: str


def early_stop_decision(trials: list[FrozenTrial], *, patience: int, min_delta: float) -> StopDecision:
    """Maximisation: an improvement is a value above the best so far by more than ``min_delta``."""
    best_value: float | None = None
    best_trial: int | None = None
    since = 0
    for trial in sorted(trials, key=lambda t: t.number):
        if trial.state != TrialState.COMPLETE or trial.value is None:
            continue
        if best_value is None or trial.value > best_value + min_delta:
            best_value, best_trial, since = trial.value, trial.number, 0
        else:
            since += 1
    stop = best_trial is not None and since >= patience
    reason = (
        f"early stopping: no improvement above {min_delta:g} in the {since} completed trials since "
        f"trial {best_trial} (patience {patience})"
        if stop
        else ""
    )
    return StopDecision(stop, best_trial, since, reason)


class EarlyStopping:
    """Optuna callback: ``study.stop()`` once ``patience`` trials passed without improvement."""

    def __init__(self, *, patience: int, min_delta: float) -> None:
        self.patience = patience
        self.min_delta = min_delta
        self.reason = ""

    def decide(self, study: optuna.Study) -> StopDecision:
        return early_stop_decision(
            study.get_trials(deepcopy=False), patience=self.patience, min_delta=self.min_delta
        )

    def __call__(self, study: optuna.Study, trial: FrozenTrial) -> None:
        decision = self.decide(study)
        if decision.stop:
            self.reason = decision.reason
            study.set_user_attr("automerge.stopped", decision.reason)
            study.stop()
