"""The stopping rules, pinned exactly (issue 15: ``>`` changed to ``>=``, a failure streak that never
counted and pruned trials left out of the budget all survived the suite)."""

from __future__ import annotations

import optuna
import pytest
from optuna.trial import TrialState, create_trial

from automerge.study import records
from automerge.study.stopping import BudgetTaken, ConsecutiveFailures, early_stop_decision


def _complete(values: list[float]) -> list[optuna.trial.FrozenTrial]:
    trials = []
    for number, value in enumerate(values):
        trial = create_trial(value=value, state=TrialState.COMPLETE)
        trial.number = number
        trials.append(trial)
    return trials


def test_an_improvement_of_exactly_min_delta_is_not_an_improvement() -> None:
    decision = early_stop_decision(_complete([1.0, 1.5, 1.5]), patience=2, min_delta=0.5)
    assert decision.stop and decision.best_trial == 0  # 1.5 = 1.0 + 0.5: not above it
    decision = early_stop_decision(_complete([1.0, 1.5000001, 1.5]), patience=2, min_delta=0.5)
    assert not decision.stop and decision.best_trial == 1


def test_patience_counts_completed_trials_since_the_best() -> None:
    assert not early_stop_decision(_complete([3.0, 1.0, 2.0]), patience=3, min_delta=0.0).stop
    assert early_stop_decision(_complete([3.0, 1.0, 2.0, 2.9]), patience=3, min_delta=0.0).stop


class _Study:
    """What the callbacks use of a study: its trials and stop()."""

    def __init__(self, trials: list[optuna.trial.FrozenTrial]) -> None:
        self.trials, self.stopped = trials, False

    def get_trials(self, deepcopy: bool = False, states: tuple | None = None) -> list:
        return [t for t in self.trials if states is None or t.state in states]

    def stop(self) -> None:
        self.stopped = True


def _trial(state: TrialState, reason: str | None = None) -> optuna.trial.FrozenTrial:
    attrs = {records.FAIL_REASON: reason} if reason else {}
    value = 1.0 if state == TrialState.COMPLETE else None
    return create_trial(state=state, value=value, user_attrs=attrs)


@pytest.mark.parametrize("limit", [1, 3, 5])
def test_the_failure_streak_stops_at_its_limit_and_a_success_resets_it(limit: int) -> None:
    callback, study = ConsecutiveFailures(limit=limit), _Study([])
    for _ in range(limit - 1):
        callback(study, _trial(TrialState.FAIL, "out of memory"))
    assert not study.stopped
    callback(study, _trial(TrialState.COMPLETE))
    for _ in range(limit - 1):
        callback(study, _trial(TrialState.FAIL, "out of memory"))
    assert not study.stopped  # the success in between reset the count
    callback(study, _trial(TrialState.FAIL, "out of memory"))
    assert study.stopped and f"{limit} trials in a row failed" in callback.reason
    assert "out of memory" in callback.reason


def test_pruned_trials_take_their_place_in_the_budget() -> None:
    study = _Study([_trial(TrialState.COMPLETE), _trial(TrialState.PRUNED)])
    BudgetTaken(3)(study, study.trials[-1])
    assert not study.stopped
    study.trials.append(_trial(TrialState.PRUNED))
    BudgetTaken(3)(study, study.trials[-1])
    assert study.stopped
    assert TrialState.PRUNED in records.BUDGET_STATES and TrialState.FAIL not in records.BUDGET_STATES


def test_failed_pruned_and_running_trials_are_passed_over_and_the_reason_names_the_best() -> None:
    trials = _complete([3.0, 1.0, 2.0, 2.5])
    for number, state in ((1, TrialState.FAIL), (3, TrialState.PRUNED), (5, TrialState.RUNNING)):
        trials.insert(number, create_trial(state=state, value=None))
    for number, trial in enumerate(trials):
        trial.number = number
    decision = early_stop_decision(trials, patience=3, min_delta=0.0)
    assert decision.stop and decision.best_trial == 0  # the 3 later completed trials, past the others
    assert decision.reason == (
        "early stopping: no improvement above 0 in the 3 completed trials since trial 0 (patience 3)"
    )
    waiting = early_stop_decision(trials, patience=4, min_delta=0.0)
    assert not waiting.stop and waiting.reason == "" and waiting.best_trial == 0
    empty = early_stop_decision([], patience=1, min_delta=0.0)
    assert (empty.stop, empty.best_trial, empty.reason) == (False, None, "")


def test_the_early_stopping_callback_stops_the_study_and_records_why() -> None:
    """The callback's reason starts empty, and when it fires it is stored on the study (the report
    and a resumed run read it from there) and the study stops."""
    from automerge.study.stopping import EarlyStopping

    callback = EarlyStopping(patience=2, min_delta=0.0)
    assert callback.reason == ""
    study = optuna.create_study(direction="maximize")
    values = iter([3.0, 1.0, 2.0, 5.0])
    study.optimize(lambda trial: next(values), n_trials=4, callbacks=[callback])
    assert len(study.trials) == 3  # stopped after the second trial without improvement
    assert callback.reason.startswith("early stopping: no improvement above 0 in the 2 completed trials")
    assert study.user_attrs[records.STOPPED] == callback.reason


def test_trials_are_taken_in_number_order_whatever_order_the_storage_gives() -> None:
    trials = _complete([1.0, 2.0, 0.5, 0.4])
    assert early_stop_decision(trials[::-1], patience=2, min_delta=0.0).best_trial == 1
    assert early_stop_decision(trials[::-1], patience=2, min_delta=0.0).stop


# -- several objectives: the front's hypervolume (issue 18) --------------------------------------------


def _scored(points: list[tuple[float, float]], baselines: int = 3) -> list[optuna.trial.FrozenTrial]:
    trials = []
    for number, values in enumerate(points):
        attrs = (
            records.baseline_attrs("AB"[number] if number < 2 else "uniform 0.5")
            if number < baselines
            else {}
        )
        trial = create_trial(values=list(values), state=TrialState.COMPLETE, user_attrs=attrs)
        trial.number = number
        trials.append(trial)
    return trials


BASELINES = [(0.0, 1.0), (1.0, 0.0), (0.5, 0.5)]  # normalised by their own range: the unit box, HV 0.25


def test_the_front_hypervolume_is_measured_in_the_baselines_box_with_their_worst_as_reference() -> None:
    from automerge.study.stopping import front_hypervolumes

    trials = _scored([*BASELINES, (0.6, 0.6), (0.2, 0.2), (2.0, 2.0)])
    assert front_hypervolumes(trials, maximize=[True, True]) == [
        (0, 0.0),
        (1, 0.0),
        (2, pytest.approx(0.25)),
        (3, pytest.approx(0.36)),
        (4, pytest.approx(0.36)),  # dominated: the front is unchanged
        (5, pytest.approx(4.0)),
    ]
    scaled = _scored([(a * 100, -b) for a, b in [*BASELINES, (0.6, 0.6)]])  # other units, b minimized
    assert [v for _, v in front_hypervolumes(scaled, maximize=[True, False])][-1] == pytest.approx(0.36)


def test_a_hypervolume_gain_of_exactly_min_delta_is_not_an_improvement() -> None:
    from automerge.study.stopping import hypervolume_stop_decision

    side = 0.75**0.5  # a square of area 0.75 = 0.25 · (1 + 2): a relative gain of exactly 2
    exact = _scored([*BASELINES, (side, side), (0.1, 0.1)])
    decision = hypervolume_stop_decision(exact, maximize=[True, True], patience=2, min_delta=2.0)
    assert decision.stop and decision.best_trial == 2
    assert decision.reason.startswith("early stopping: the Pareto front's hypervolume (0.25) gained no more")
    above = _scored([*BASELINES, (side + 1e-6, side + 1e-6), (0.1, 0.1)])
    decision = hypervolume_stop_decision(above, maximize=[True, True], patience=2, min_delta=2.0)
    assert not decision.stop and decision.best_trial == 3


def test_patience_counts_the_trials_since_the_front_last_grew() -> None:
    from automerge.study.stopping import hypervolume_stop_decision

    trials = _scored([*BASELINES, (0.6, 0.6), (0.2, 0.2), (0.6, 0.601), (0.1, 0.3)])
    # (0.6, 0.601) adds 0.17 % of the volume: below min_delta 0.2 %
    decision = hypervolume_stop_decision(trials, maximize=[True, True], patience=3, min_delta=0.002)
    assert (
        decision.stop
        and decision.best_trial == 3
        and "in the 3 completed trials since trial 3" in decision.reason
    )
    assert not hypervolume_stop_decision(trials[:-1], maximize=[True, True], patience=3, min_delta=0.002).stop
    unscaled = _scored([(0.0, 1.0), (1.0, 0.0), (0.5, 0.5), (0.6, 0.6)], baselines=0)  # the first 3 stand in
    assert (
        hypervolume_stop_decision(unscaled, maximize=[True, True], patience=1, min_delta=0.0).best_trial == 3
    )


def test_the_early_stopping_callback_watches_the_hypervolume_of_a_study_with_two_objectives() -> None:
    from automerge.study.stopping import EarlyStopping

    callback = EarlyStopping(patience=2, min_delta=0.0)
    study = optuna.create_study(directions=["maximize", "minimize"])
    scores = iter([(0.0, 0.0), (1.0, 1.0), (0.5, 0.5), (0.8, 0.2), (0.1, 0.9), (0.0, 0.9), (1.0, 0.0)])

    def objective(trial: optuna.Trial) -> tuple[float, float]:
        if trial.number < 3:
            trial.set_user_attr(records.BASELINE, "baseline")
        return next(scores)

    study.optimize(objective, n_trials=7, callbacks=[callback])
    assert len(study.trials) == 6  # trial 3 grew the front, 4 and 5 did not
    assert callback.reason.startswith("early stopping: the Pareto front's hypervolume")
    assert study.user_attrs[records.STOPPED] == callback.reason
