"""Multi-fidelity: a trial renders its payloads' cheaper previews first, and only the best fraction of
the trials at a preview go on to the full payload."""

from __future__ import annotations

from pathlib import Path

import optuna
import pytest
import yaml
from optuna.trial import TrialState
from rich.console import Console

from automerge.errors import ConfigError
from automerge.study import default_storage, load_study_file, run_study
from automerge.study.pruners import FidelityPruner

QUIET = Console(quiet=True)


def _with_fidelities(path: Path) -> None:
    study = yaml.safe_load(path.read_text())
    payload = Path(study["payloads"][0])
    data = yaml.safe_load(payload.read_text())
    data["fidelities"] = [{"steps": 1}]
    payload.write_text(yaml.safe_dump(data))


def test_only_promoted_trials_render_the_full_payload(make_study) -> None:
    path = make_study(trials=9, multi_fidelity={"promote": 0.34, "startup_trials": 3}, baselines=False)
    _with_fidelities(path)
    summary = run_study(load_study_file(path), console=QUIET, export=False)
    study_file = load_study_file(path)
    trials = optuna.load_study(study_name=study_file.name, storage=default_storage(study_file)).trials
    assert summary.completed == 9 and len(trials) == 9  # pruned trials count toward the budget
    pruned = [t for t in trials if t.state == TrialState.PRUNED]
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    assert pruned and len(complete) >= 3
    assert all(set(t.intermediate_values) == {0} for t in pruned)  # stopped after the preview
    assert all(set(t.intermediate_values) == {0, 1} for t in complete)  # preview, then the payload
    for trial in pruned:  # each was below the best third of the previews up to it, its own included
        ranked = sorted(t.intermediate_values[0] for t in trials[: trial.number + 1])
        assert trial.intermediate_values[0] < ranked[-max(1, round(0.34 * len(ranked)))]


def test_multi_fidelity_without_fidelities_is_refused_before_any_trial(make_study) -> None:
    path = make_study(trials=3, multi_fidelity={})
    with pytest.raises(ConfigError, match="multi_fidelity needs the same number"):
        run_study(load_study_file(path), console=QUIET, export=False)


def test_the_fidelity_pruner_keeps_the_best_fraction_after_its_startup() -> None:
    pruner = FidelityPruner(rungs=1, promote=0.5, startup_trials=2, inner=optuna.pruners.NopPruner())
    study = optuna.create_study(direction="maximize", pruner=pruner)
    decisions = []
    for score in (0.1, 0.9, 0.5, 0.95, 0.2):
        trial = study.ask()
        trial.report(score, 0)
        decisions.append(trial.should_prune())
        study.tell(
            trial,
            state=TrialState.PRUNED if decisions[-1] else TrialState.COMPLETE,
            values=None if decisions[-1] else score,
        )
    # 0.5 is the 2nd best of 3 (2 of 3 go on); 0.2 is below the 2nd best of 5
    assert decisions == [False, False, False, False, True]


def test_payloads_with_different_numbers_of_fidelities_are_refused_naming_each(
    make_study, tmp_path: Path
) -> None:
    from automerge.study.runtime import preview_rungs

    path = make_study(multi_fidelity={})
    first = Path(yaml.safe_load(path.read_text())["payloads"][0])
    _with_fidelities(path)  # one preview
    second = tmp_path / "second.yaml"
    data = yaml.safe_load(first.read_text())
    data["fidelities"] = [{"steps": 1}, {"seeds": 1}]
    second.write_text(yaml.safe_dump(data))
    study = yaml.safe_load(path.read_text())
    study["payloads"] = [str(first), str(second)]
    path.write_text(yaml.safe_dump(study))
    with pytest.raises(ConfigError) as refused:
        preview_rungs(load_study_file(path))
    assert f"({first} has 1, {second} has 2)" in str(refused.value)
    study["payloads"] = [str(first), str(first)]
    path.write_text(yaml.safe_dump(study))
    assert preview_rungs(load_study_file(path)) == 1


def test_pruner_median_is_optunas_median_pruner_after_half_the_samplers_startup(make_study) -> None:
    from automerge.study.pruners import make_pruner

    study = load_study_file(make_study(pruner="median", sampler={"name": "tpe", "startup_trials": 10}))
    pruner = make_pruner(study, rungs=0)
    assert isinstance(pruner, optuna.pruners.MedianPruner) and pruner._n_startup_trials == 5
    few = load_study_file(make_study(pruner="median", sampler={"name": "tpe", "startup_trials": 2}))
    assert make_pruner(few, rungs=0)._n_startup_trials == 3  # at least 3
    assert isinstance(make_pruner(load_study_file(make_study()), rungs=0), optuna.pruners.NopPruner)
