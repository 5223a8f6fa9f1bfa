"""When a trial stops before its full evaluation: the study's ``pruner`` (none, or median: after a
payload, below the median of the other trials there) and multi-fidelity promotion.

Multi-fidelity (``multi_fidelity:`` in a study file, ``fidelities:`` in its payloads): a trial first
renders the payloads' cheaper previews, one rung per fidelity, and reports each preview's score; at each
rung only the best ``promote`` fraction of the trials that reached it goes on (asynchronous successive
halving at a fixed rate), so the full payload is rendered for promising trials only. Steps 0..F−1 of a
trial's reports are its previews, F, F+1, ... its payloads.
"""

from __future__ import annotations

import optuna
from optuna.trial import FrozenTrial, TrialState

from automerge.study.config import StudyFile


class FidelityPruner(optuna.pruners.BasePruner):
    """Prunes a trial at preview rung r < ``rungs`` unless its score is among the best ``promote``
    of the scores at rung r, its own included (once ``startup_trials`` others have reached it);
    later steps are ``inner``'s. Assumes maximisation, as automerge's studies do."""

    def __init__(
        self, *, rungs: int, promote: float, startup_trials: int, inner: optuna.pruners.BasePruner
    ) -> None:
        self.rungs = rungs
        self.promote = promote
        self.startup_trials = startup_trials
        self.inner = inner

    def prune(self, study: optuna.Study, trial: FrozenTrial) -> bool:
        step = trial.last_step
        if step is None:
            return False
        if step >= self.rungs:
            return self.inner.prune(study, trial)
        others = [
            t.intermediate_values[step]
            for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED))
            if step in t.intermediate_values
        ]
        if len(others) < self.startup_trials:
            return False
        score = trial.intermediate_values[step]
        ranked = sorted([*others, score])
        keep = max(1, round(self.promote * len(ranked)))  # the best `keep` scores at this rung go on
        return score < ranked[-keep]


def make_pruner(study: StudyFile, *, rungs: int) -> optuna.pruners.BasePruner:
    """The study's pruner; wrapped in ``FidelityPruner`` when its payloads have ``rungs`` previews."""
    inner: optuna.pruners.BasePruner = (
        optuna.pruners.MedianPruner(n_startup_trials=max(3, study.sampler.startup_trials // 2))
        if study.pruner == "median"
        else optuna.pruners.NopPruner()
    )
    fidelity = study.multi_fidelity
    if fidelity is None or rungs == 0:
        return inner
    return FidelityPruner(
        rungs=rungs, promote=fidelity.promote, startup_trials=fidelity.startup_trials, inner=inner
    )
