"""Export: recipe.yaml that `automerge merge` loads, the checkpoint, the report; the exported recipe
reproduces the best trial's score bit-exactly on the CPU."""

from __future__ import annotations

from pathlib import Path

import optuna
from rich.console import Console
from safetensors import safe_open

from automerge.merge.recipe import load_recipe, plan_merge
from automerge.study.config import default_storage, load_study_file
from automerge.study.runner import run_study
from automerge.study.runtime import StudyRuntime

QUIET = Console(quiet=True)


def test_export_writes_recipe_model_and_report_and_reproduces_the_score(make_study, tmp_path: Path) -> None:
    out = tmp_path / "export"
    path = make_study(trials=5, export={"dir": str(out), "dtype": "fp16"})
    summary = run_study(load_study_file(path), console=QUIET)
    assert summary.export_dir == out
    report = (out / "report.html").read_text()
    assert "Recovered vs secret weights" in report and "data:image/png;base64," in report
    with safe_open(out / "model.safetensors", framework="pt") as f:
        metadata = f.metadata()
    assert metadata["automerge.trial"] == str(summary.best_trial)
    assert metadata["automerge.study"] == "test-study"
    # The exported recipe, merged again in memory and rendered, gives the trial's score exactly.
    recipe = load_recipe(out / "recipe.yaml")
    study_file = load_study_file(path)
    runtime = StudyRuntime(study_file)
    try:
        plan = plan_merge(recipe, source="recipe.yaml")
        score = runtime.evaluate(plan.params, runtime.jobs).value
        plan.close()
    finally:
        runtime.close()
    assert score == summary.best_value


def test_export_command_picks_a_trial(make_study, tmp_path: Path, capsys) -> None:
    from cli_helpers import run_cli as run

    path = make_study(trials=4)
    run_study(load_study_file(path), console=QUIET, export=False)
    result = run(capsys, "export", path, "--trial", "1", "-o", tmp_path / "t1")
    assert result.code == 0, result.err
    study_file = load_study_file(path)
    study = optuna.load_study(study_name=study_file.name, storage=default_storage(study_file))
    assert (tmp_path / "t1" / "recipe.yaml").exists()
    assert study.trials[1].number == 1
