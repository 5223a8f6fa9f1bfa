"""One trial's straight line (``study/objective.py``): propose → merge → render → score → record, each
stage told as it starts; a trial past the shared budget, or one whose proposal fails, becomes a FAIL
trial with its reason (stored and logged), never a stopped loop."""

from __future__ import annotations

import logging
from pathlib import Path
from types import SimpleNamespace

import optuna
import pytest
import yaml
from optuna.artifacts import FileSystemArtifactStore
from optuna.trial import TrialState, create_trial

from automerge.study import StudyRuntime, load_study_file, records
from automerge.study.objective import Objective, TrialFailed


def _never_called(*args: object) -> None:
    raise AssertionError("a trial that fails before its evaluation reports nothing")


def test_a_trial_past_the_shared_budget_fails_as_over_budget_and_stops_the_study() -> None:
    """Another worker took the last place: the trial is failed with ``OVER_BUDGET`` (the reason the
    progress and the budget count read), not run, and the study stops."""
    study = optuna.create_study(direction="maximize")
    study.add_trial(create_trial(value=1.0))
    objective = Objective(SimpleNamespace(), store=None, on_trial=_never_called, budget=1)  # type: ignore[arg-type]
    study.optimize(objective, n_trials=3, catch=(TrialFailed,))
    assert [t.state for t in study.trials] == [TrialState.COMPLETE, TrialState.FAIL]  # stopped at once
    assert study.trials[1].user_attrs[records.FAIL_REASON] == records.OVER_BUDGET


def test_a_failed_proposal_is_stored_and_logged_with_its_reason_after_the_propose_stage(
    caplog: pytest.LogCaptureFixture,
) -> None:
    def broken(trial: optuna.Trial) -> dict[str, float]:
        raise ValueError("no such dimension")

    runtime = SimpleNamespace(space=SimpleNamespace(suggest=broken))
    stages: list[str] = []
    objective = Objective(runtime, store=None, on_trial=_never_called, on_stage=stages.append)  # type: ignore[arg-type]
    study = optuna.create_study(direction="maximize")
    with caplog.at_level(logging.INFO, logger="automerge.study"):
        study.optimize(objective, n_trials=1, catch=(TrialFailed,))
    assert stages == ["propose"]
    assert study.trials[0].state == TrialState.FAIL
    assert study.trials[0].user_attrs[records.FAIL_REASON] == "ValueError: no such dimension"
    logged = [r.getMessage() for r in caplog.records if r.name == "automerge.study"]
    assert logged == ["trial 0 failed: ValueError: no such dimension"]


def test_a_baseline_trial_scores_its_proposal_stores_its_nearest_prompt_distance_and_tells_each_stage(
    make_study, tmp_path: Path
) -> None:
    """The baselines' nearest distance of two prompts' images calibrates the near-duplicate check of
    every later trial (``records.baseline_prompt_distances``): a baseline must store it."""
    path = make_study()
    payload = tmp_path / "payload.yaml"  # the fixture's two prompts, at one seed: a distance to measure
    data = yaml.safe_load(payload.read_text())
    data["items"] = [{"prompt": item["prompt"]} for item in data["items"]]
    payload.write_text(yaml.safe_dump(data))
    runtime = StudyRuntime(load_study_file(path))
    try:
        (tmp_path / "artifacts").mkdir()
        stages: list[str] = []
        told: list[int] = []
        objective = Objective(
            runtime,
            store=FileSystemArtifactStore(str(tmp_path / "artifacts")),
            on_trial=lambda number, evaluation: told.append(number),
            on_stage=stages.append,
        )
        study = optuna.create_study(direction="maximize")
        baseline = runtime.space.baselines()[0]
        study.enqueue_trial(baseline.values, user_attrs=records.baseline_attrs(baseline.label))
        study.optimize(objective, n_trials=1)
        proposal = runtime.evaluate(runtime.space.block_params(baseline.values), runtime.jobs)
    finally:
        runtime.close()
    (trial,) = study.trials
    assert trial.state == TrialState.COMPLETE and told == [0]
    assert trial.value == proposal.value  # the proposal was merged, not the plan's own parameters
    assert trial.user_attrs[records.PROMPT_DISTANCE] > 0  # two prompts, two different pictures
    assert records.baseline_prompt_distances(study) == [trial.user_attrs[records.PROMPT_DISTANCE]]
    assert stages == ["propose", "merge", "render", "score", "record"]  # one payload
