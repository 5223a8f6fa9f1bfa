"""A study with several objectives (issue 18) on tiny SD1 models: two hidden targets, one merged
mostly from A and one mostly from B, each scored by MSE similarity; they conflict, so the trials
form a Pareto front. The study renders each trial once, scores it with both, reports the front, and
exports any trial or the one a rule picks."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import optuna
import pytest
import yaml
from cli_helpers import run_cli
from rich.console import Console
from safetensors import safe_open

from automerge.merge import load_recipe
from automerge.study import default_storage, load_study_file, run_study
from automerge.study.records import OBJECTIVE_IMAGE_SCORES, OBJECTIVE_SCORES, front_trials, pick_trial
from automerge.study.samplers import MULTI_OBJECTIVE_SAMPLERS, make_multi_objective_sampler

QUIET = Console(quiet=True)


def _target(alpha: float) -> dict[str, Any]:
    return {"reference": {"metric": "mse", "target": {"params": {"alpha": alpha}}}}


TWO = [
    {"reward": _target(0.1), "name": "near-a"},
    _target(0.9) | {"name": "near-b"},  # the short form: the reward's own keys beside name
]


def _stored(path: Path) -> optuna.Study:
    study_file = load_study_file(path)
    return optuna.load_study(study_name=study_file.name, storage=default_storage(study_file))


@pytest.fixture(scope="module")
def front_study(tmp_path_factory: pytest.TempPathFactory, tiny_models: dict[str, Path]) -> dict[str, Any]:
    """12 trials (random sampler), exported at the end: the study file, the run's summary and lines."""
    folder = tmp_path_factory.mktemp("two-objectives")
    (folder / "payload.yaml").write_text(
        yaml.safe_dump(
            {
                "defaults": {"steps": 2, "cfg": 1.0, "width": 64, "height": 64, "scheduler": "euler"},
                "items": [{"prompt": "a red house", "seeds": [7]}, {"prompt": "a blue boat", "seeds": [3]}],
            }
        )
    )
    study = {
        "name": "front",
        "models": {"a": str(tiny_models["a"]), "b": str(tiny_models["b"])},
        "search": {"alpha": {"groups": {"TEXT": ["BASE"], "UNET": ["IN00", "IN01", "OUT11"]}}},
        "payloads": ["payload.yaml"],
        "objectives": TWO,
        "sampler": {"name": "random", "seed": 0},
        "trials": 12,
        "early_stopping": {"patience": 40, "min_delta": 0.002},
        "export": {"dir": "out"},
        "render": {"device": "cpu"},
    }
    path = folder / "study.yaml"
    path.write_text(yaml.safe_dump(study, sort_keys=False))
    console = Console(record=True, width=200)
    summary = run_study(load_study_file(path), console=console)
    return {"path": path, "summary": summary, "lines": console.export_text()}


def test_each_trial_is_rendered_once_and_scored_by_both_objectives(front_study: dict[str, Any]) -> None:
    study = _stored(front_study["path"])
    assert [d.name for d in study.directions] == ["MAXIMIZE", "MAXIMIZE"]
    assert study.metric_names == ["near-a", "near-b"]  # what optuna-dashboard's Pareto plot labels
    trials = study.trials
    assert [t.user_attrs.get("baseline") for t in trials[:3]] == ["A", "B", "uniform 0.5"]
    assert len(trials) == 12 and all(t.state.name == "COMPLETE" for t in trials)
    for trial in trials:
        assert list(trial.user_attrs[OBJECTIVE_SCORES].values()) == trial.values
        assert len(trial.user_attrs["images"]) == 2  # two images, stored once for both objectives
        assert set(trial.user_attrs[OBJECTIVE_IMAGE_SCORES]) == {"near-a", "near-b"}
    a, b = trials[0].values, trials[1].values  # pure A is nearer the A-side target, pure B the other
    assert a[0] > b[0] and b[1] > a[1]


def test_the_run_ends_with_a_front_and_exports_its_knee_point(front_study: dict[str, Any]) -> None:
    summary, lines = front_study["summary"], front_study["lines"]
    front = [t.number for t in front_trials(_stored(front_study["path"]))]
    assert len(front) >= 2 and summary.front == front
    knee = pick_trial(_stored(front_study["path"])).trial.number
    assert summary.best_trial == knee and summary.best_value is None
    assert re.search(
        rf"picked trial {knee} \(near-a -?[\d.e-]+, near-b -?[\d.e-]+\) of the {len(front)} on", lines
    )
    assert "(--pick knee): the knee point, nearest the ideal point" in lines
    assert "(front)" in lines and "best" not in lines.split("picked trial")[0]
    out = front_study["path"].parent / "out"
    with safe_open(out / "model.safetensors", framework="pt") as f:
        metadata = f.metadata()
    assert metadata["automerge.trial"] == str(knee)
    assert set(json.loads(metadata["automerge.scores"])) == {"near-a", "near-b"}


def test_the_report_draws_the_front_with_its_trial_numbers(front_study: dict[str, Any]) -> None:
    page = (front_study["path"].parent / "out" / "report.html").read_text()
    front = front_study["summary"].front
    assert f'<h2 id="pareto-front">Pareto front: {len(front)} of 12 complete trials</h2>' in page
    for number in front:
        assert (
            f'<a href="#front-trial-{number}">' in page
            and f'<tr id="front-trial-{number}"><td>trial {number}' in page
        )
    assert page.count('<image class=thumb href="data:image/png;base64,') == 12  # every trial's first image
    assert "near-a (higher is better)" in page and "Best so far" not in page


def test_export_trial_writes_any_front_point_and_pick_chooses_by_the_stated_rule(
    front_study: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path, front = front_study["path"], front_study["summary"].front
    study = _stored(path)
    other = next(n for n in front if n != front_study["summary"].best_trial)
    result = run_cli(capsys, "export", path, "--trial", str(other), "-o", tmp_path / "t")
    assert result.code == 0, result.err
    assert "picked" not in result.out and f"exported trial {other} (near-a " in result.out
    recipe = load_recipe(tmp_path / "t" / "recipe.yaml")
    assert recipe.params["alpha"]["BASE"] == study.trials[other].params["alpha.TEXT"]
    with safe_open(tmp_path / "t" / "model.safetensors", framework="pt") as f:
        assert f.metadata()["automerge.trial"] == str(other)
    assert "chosen with --trial" in (tmp_path / "t" / "report.html").read_text()
    # weights 1, 0: the front point best in near-a (normalised or not, the same one)
    best_near_a = max((t for t in study.trials if t.number in front), key=lambda t: t.values[0]).number
    result = run_cli(capsys, "export", path, "--pick", "weighted:1,0", "--format", "supermerger")
    assert result.code == 0, result.err
    assert f"picked trial {best_near_a} " in result.err and f"front trial {best_near_a}" in result.out
    result = run_cli(capsys, "export", path, "--pick", "knee", "--format", "supermerger")
    assert f"picked trial {front_study['summary'].best_trial} " in result.err


def test_one_objective_is_a_study_with_one_score(make_study) -> None:
    """``objectives:`` of one element gives the trial values ``reward:`` gives, bit for bit."""
    scored = run_study(load_study_file(make_study(trials=3, name="with-reward")), console=QUIET, export=False)
    alone = make_study(trials=3, name="one-objective", reward=None, objectives=[make_reward()])
    summary = run_study(load_study_file(alone), console=QUIET, export=False)
    assert summary.best_value == scored.best_value and summary.front == []
    assert _stored(alone).directions == [optuna.study.StudyDirection.MAXIMIZE]


def make_reward() -> dict[str, Any]:
    """The reward of ``make_study``'s study file (tests/study/conftest.py), as an objective."""
    return {"reference": {"metric": "mse", "target": {"params": {"alpha": {"default": 0.3, "BASE": 0.8}}}}}


@pytest.mark.parametrize("sampler", MULTI_OBJECTIVE_SAMPLERS.names())
def test_every_multi_objective_sampler_proposes_for_two_objectives(sampler: str) -> None:
    """The registry's contract, on a toy problem (no render): past its start-up trials each sampler
    proposes from the two scores."""
    from automerge.study.config import SamplerConfig

    study = optuna.create_study(
        directions=["maximize", "minimize"],
        sampler=make_multi_objective_sampler(SamplerConfig(name=sampler, seed=0, startup_trials=2)),
    )

    def objective(trial: optuna.Trial) -> tuple[float, float]:
        x, y = trial.suggest_float("x", 0.0, 1.0), trial.suggest_float("y", 0.0, 1.0)
        return -((x - 0.2) ** 2) - y**2, (x - 0.8) ** 2 + y

    study.optimize(objective, n_trials=5)
    assert len(study.best_trials) >= 1 and all(t.state.name == "COMPLETE" for t in study.trials)


def test_auto_runs_a_tiny_study_with_two_objectives(make_study) -> None:
    path = make_study(trials=4, reward=None, objectives=TWO, sampler={"name": "auto", "startup_trials": 0})
    summary = run_study(load_study_file(path), console=QUIET, export=False)
    assert summary.completed == 4 and summary.front


def test_auto_with_several_objectives_is_optunas_gp_and_cmaes_has_none() -> None:
    from automerge.errors import ConfigError
    from automerge.study.config import SamplerConfig

    sampler = make_multi_objective_sampler(SamplerConfig(name="auto", startup_trials=3))
    assert isinstance(sampler.inner, optuna.samplers.GPSampler)
    with pytest.raises(
        ConfigError, match=r"^sampler\.name \(several objectives\): unknown multi-objective sampler 'cmaes'"
    ):
        make_multi_objective_sampler(SamplerConfig(name="cmaes"))


def test_a_changed_direction_is_a_changed_search_problem(make_study) -> None:
    from automerge.errors import StudyError

    path = make_study(trials=3, reward=None, objectives=TWO)
    run_study(load_study_file(path), console=QUIET, export=False)
    flipped = [TWO[0], {**TWO[1], "direction": "minimize"}]
    with pytest.raises(StudyError, match="different search problem"):
        run_study(load_study_file(make_study(trials=3, reward=None, objectives=flipped)), console=QUIET)
