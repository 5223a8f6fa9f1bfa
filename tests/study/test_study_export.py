"""Export: recipe.yaml that `automerge merge` loads, the checkpoint, the report; the exported recipe
reproduces the best trial's score bit-exactly on the CPU."""

from __future__ import annotations

import re
from pathlib import Path

import optuna
from rich.console import Console
from safetensors import safe_open

from automerge.merge import load_recipe, plan_merge
from automerge.study import StudyRuntime, default_storage, find_study, load_study_file, records, run_study

QUIET = Console(quiet=True)


def test_export_writes_recipe_model_and_report_and_reproduces_the_score(make_study, tmp_path: Path) -> None:
    out = tmp_path / "export"
    path = make_study(trials=5, baselines=True, export={"dir": str(out), "dtype": "fp16"})
    summary = run_study(load_study_file(path), console=QUIET)
    assert summary.export_dir == out
    report = (out / "report.html").read_text()
    assert "Recovered vs secret weights" in report and "data:image/png;base64," in report
    # the hidden target's renders beside the best's, each image's score under it, the margin's interval
    assert "<th>reference</th>" in report and re.search(r"<div class=muted>-?[\d.e-]+</div>", report)
    assert "Is the win real?" in report and (
        "per seed, on the study&#x27;s own payloads (no validation_payloads: the search optimized these, "
        "so the margin favours the best);" in report
    )
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
    """``--trial N`` exports trial N: its recipe, its weights, a report that shows it and names the best."""
    from cli_helpers import run_cli as run

    from automerge.merge import load_recipe

    path = make_study(trials=4)
    run_study(load_study_file(path), console=QUIET, export=False)
    study_file = load_study_file(path)
    study = optuna.load_study(study_name=study_file.name, storage=default_storage(study_file))
    best = study.best_trial.number
    other = next(t for t in study.trials if t.number != best)
    result = run(capsys, "export", path, "--trial", str(other.number), "-o", tmp_path / "t")
    assert result.code == 0, result.err
    recipe = load_recipe(tmp_path / "t" / "recipe.yaml")
    assert recipe.params["alpha"]["BASE"] == other.params["alpha.TEXT"]
    assert recipe.params["alpha"]["IN00"] == other.params["alpha.UNET"]
    report = (tmp_path / "t" / "report.html").read_text()
    assert f"exported trial <b>{other.number}</b>" in report and f"the best is trial {best}" in report
    assert "failed)</p>" in report  # ran to its budget: no reason it stopped
    with safe_open(tmp_path / "t" / "model.safetensors", framework="pt") as f:
        assert f.metadata()["automerge.trial"] == str(other.number)
    # a study run on a GPU box exports on a machine without one: its merge device falls back to the CPU
    study.set_user_attr(records.MERGE_DEVICE, "cuda:0")
    study.set_user_attr(records.STOPPED, "stopped early: no gain in 3 trials")  # and the report says why
    result = run(capsys, "export", path, "--trial", str(other.number), "-o", tmp_path / "cpu")
    assert result.code == 0, result.err
    stopped = (tmp_path / "cpu" / "report.html").read_text()
    assert "failed) · stopped early: no gain in 3 trials</p>" in stopped
    with safe_open(tmp_path / "cpu" / "model.safetensors", framework="pt") as f:
        assert f.metadata()["automerge.trial"] == str(other.number)


def test_export_as_supermerger_prints_the_trials_weights_in_its_block_order(
    make_study, tmp_path: Path, capsys
) -> None:
    """``--format supermerger`` (issue 17): the chosen trial's per-block alpha as supermerger's MBW
    string (searched groups expanded to their blocks, unsearched blocks at the study's fixed value),
    its mode and models; nothing written."""
    from cli_helpers import run_cli as run

    from automerge.arch import ARCHITECTURES
    from automerge.interop import parse_mbw_weights

    path = make_study(trials=3, export={"dir": str(tmp_path / "out")})
    run_study(load_study_file(path), console=QUIET, export=False)
    study_file = load_study_file(path)
    trial = optuna.load_study(study_name=study_file.name, storage=default_storage(study_file)).trials[2]
    result = run(capsys, "export", path, "--trial", str(trial.number), "--format", "supermerger")
    assert result.code == 0, result.err
    assert not (tmp_path / "out").exists()
    line = next(line for line in result.out.splitlines() if line.startswith("weights alpha: "))
    base_alpha, weights = parse_mbw_weights(line.removeprefix("weights alpha: "))
    by_block = dict(zip(ARCHITECTURES.get("sd1").merge_blocks, [base_alpha, *weights], strict=True))
    assert by_block["BASE"] == trial.params["alpha.TEXT"]
    assert by_block["IN00"] == by_block["IN01"] == by_block["OUT11"] == trial.params["alpha.UNET"]
    assert "mode: Weight sum" in result.out and "model_b: " in result.out
    assert f"test-study trial {trial.number}\t{line.removeprefix('weights alpha: ')}" in result.out
    bad = run(capsys, "export", path, "--format", "comfy")
    assert (
        bad.code == 2
        and "--format: 'comfy' is not a format; use automerge, supermerger, mecha, comfyui" in bad.err
    )


def test_export_as_mecha_writes_a_recipe_sd_mecha_reads(make_study, tmp_path: Path, capsys) -> None:
    """``--format mecha`` writes NAME-trialN.mecha, read by sd-mecha's own reader (the merge itself is
    compared with automerge's in tests/merge/test_export_loads_in_sd_mecha.py)."""
    import sd_mecha
    from cli_helpers import run_cli as run

    path = make_study(trials=3)
    run_study(load_study_file(path), console=QUIET, export=False)
    result = run(capsys, "export", path, "--trial", "1", "--format", "mecha", "-o", tmp_path / "recipes")
    assert result.code == 0, result.err
    written = tmp_path / "recipes" / "test-study-trial1.mecha"
    assert f"wrote {written}" in result.out.replace("\n", "")
    recipe = sd_mecha.deserialize_path(written)
    assert "weighted_sum" in sd_mecha.serialize(recipe)


def test_export_as_comfyui_writes_both_workflow_forms_with_the_trials_ratios(
    make_study, tmp_path: Path, tiny_models: dict[str, Path], capsys
) -> None:
    """``--format comfyui`` writes NAME-trialN.comfyui-api.json and NAME-trialN.comfyui-workflow.json
    (ratio = A's share = 1 − alpha, per ComfyUI block input) and says how to run them (the graph itself
    is checked in tests/interop/test_comfyui.py)."""
    import json

    from cli_helpers import run_cli as run

    path = make_study(trials=3)
    run_study(load_study_file(path), console=QUIET, export=False)
    study_file = load_study_file(path)
    trial = optuna.load_study(study_name=study_file.name, storage=default_storage(study_file)).trials[1]
    result = run(capsys, "export", path, "--trial", "1", "--format", "comfyui", "-o", tmp_path / "recipes")
    assert result.code == 0 and trial.number == 1, result.err
    api_path = tmp_path / "recipes" / "test-study-trial1.comfyui-api.json"
    graph_path = tmp_path / "recipes" / "test-study-trial1.comfyui-workflow.json"
    for line in (f"wrote {graph_path}", f"wrote {api_path}", "POST", "models/checkpoints/"):
        assert line in result.out, line
    api = json.loads(api_path.read_text())
    by_class = {node["class_type"]: node["inputs"] for node in api.values()}
    loaded = [
        node["inputs"]["ckpt_name"] for node in api.values() if node["class_type"] == "CheckpointLoaderSimple"
    ]
    assert loaded == [tiny_models["a"].name, tiny_models["b"].name]
    unet, text = 1.0 - trial.params["alpha.UNET"], 1.0 - trial.params["alpha.TEXT"]
    # the study's UNET group is IN00, IN01 and OUT11: time_embed. goes with IN00, out. with OUT11
    merge = by_class["ModelMergeSD1"]
    assert merge["time_embed."] == merge["input_blocks.0."] == merge["input_blocks.1."] == unet
    assert merge["output_blocks.11."] == merge["out."] == unet
    assert by_class["CLIPMergeSimple"]["ratio"] == text
    assert by_class["CheckpointSave"]["filename_prefix"] == "checkpoints/test-study-trial1"
    graph = json.loads(graph_path.read_text())
    assert graph["version"] == 0.4 and {node["type"] for node in graph["nodes"]} == {*by_class, "Note"}


def test_export_as_comfyui_refuses_two_models_of_one_file_name_in_one_line(
    make_study, tmp_path: Path, tiny_models: dict[str, Path], capsys
) -> None:
    """ComfyUI finds checkpoints by file name: two sources named alike is one line, exit code 2."""
    import shutil

    from cli_helpers import run_cli as run

    models = {}
    for letter in "ab":
        (tmp_path / letter).mkdir()
        models[letter] = str(shutil.copy(tiny_models[letter], tmp_path / letter / "model.safetensors"))
    path = make_study(trials=1, models=models)
    run_study(load_study_file(path), console=QUIET, export=False)
    bad = run(capsys, "export", path, "--format", "comfyui", "-o", tmp_path / "recipes")
    assert bad.code == 2 and "models a and b are both named 'model.safetensors'" in bad.err
    assert len(bad.err.strip().splitlines()) == 1 and not (tmp_path / "recipes").exists()


def test_the_exported_recipe_loads_from_any_folder_when_the_study_was_named_relatively(
    make_study, tmp_path: Path, tiny_models: dict[str, Path], monkeypatch
) -> None:
    """`automerge optimize studies/x.yaml` from a project root: the models are relative to the study
    file, and the recipe written to out/ must still find them (its paths are relative to itself)."""
    import shutil

    project = tmp_path / "project"
    (project / "models").mkdir(parents=True)
    for letter in "ab":
        shutil.copy(tiny_models[letter], project / "models" / f"{letter}.safetensors")
    path = make_study(trials=2, models={"a": "../models/a.safetensors", "b": "../models/b.safetensors"})
    (project / "studies").mkdir()
    study_path = project / "studies" / "study.yaml"
    shutil.move(path, study_path)
    monkeypatch.chdir(project)
    summary = run_study(load_study_file(Path("studies/study.yaml")), console=QUIET)
    recipe_path = summary.export_dir / "recipe.yaml"
    monkeypatch.chdir(tmp_path)  # another working directory: only the recipe's own folder counts
    recipe = load_recipe(recipe_path)
    assert {name: p.resolve() for name, p in recipe.models.items()} == {
        letter: (project / "models" / f"{letter}.safetensors").resolve() for letter in "ab"
    }
    written = (recipe_path.read_text()).split("method:")[0]
    assert str(project) not in written  # relative to the recipe: the project folder can move
    plan_merge(recipe, source=str(recipe_path)).close()


def test_an_export_folder_that_cannot_be_created_fails_before_any_trial(make_study, tmp_path: Path) -> None:
    from automerge.errors import ConfigError

    blocker = tmp_path / "a-file"
    blocker.write_text("")
    path = make_study(trials=2, export={"dir": str(blocker / "out")})
    try:
        run_study(load_study_file(path), console=QUIET)
    except ConfigError as error:
        assert "a-file/out" in str(error) and "export.dir" in str(error)
    else:
        raise AssertionError("an uncreatable export folder was not reported")
    study_file = load_study_file(path)
    assert not path.with_suffix(".db").exists()  # checked first: not even the study was created
    assert find_study(study_file) is None


def test_export_command_names_an_uncreatable_output_folder(make_study, tmp_path: Path, capsys) -> None:
    from cli_helpers import run_cli as run

    path = make_study(trials=2)
    run_study(load_study_file(path), console=QUIET, export=False)
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    result = run(capsys, "export", path, "-o", blocker / "out")
    assert result.code == 2
    assert "a-file/out" in result.err and "-o" in result.err and "Traceback" not in result.err


def test_an_interrupted_export_leaves_the_folder_with_the_earlier_trial_whole(
    make_study, tmp_path: Path, capsys, monkeypatch
) -> None:
    """Before: Ctrl-C during the report left recipe.yaml of the new trial beside model.safetensors
    and report.html of the old one."""
    from cli_helpers import run_cli as run

    import automerge.study.export as export_module

    path = make_study(trials=4)
    run_study(load_study_file(path), console=QUIET, export=False)
    out = tmp_path / "t"
    assert run(capsys, "export", path, "--trial", "0", "-o", out).code == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(export_module, "render_report", interrupted)
    result = run(capsys, "export", path, "--trial", "1", "-o", out)
    assert result.code == 130 and result.err.strip().endswith("interrupted")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_an_export_into_a_folder_of_other_files_is_refused_before_any_work(
    make_study, tmp_path: Path, capsys
) -> None:
    """The export replaces its folder as a whole, so a folder of the user's models is never one."""
    from cli_helpers import run_cli as run

    path = make_study(trials=2)
    run_study(load_study_file(path), console=QUIET, export=False)
    models = tmp_path / "models"
    models.mkdir()
    (models / "favourite.safetensors").write_bytes(b"mine")
    result = run(capsys, "export", path, "-o", models)
    assert result.code == 2
    assert result.err.startswith(f"error: export folder {models} holds other files (favourite.safetensors)")
    assert [p.name for p in models.iterdir()] == ["favourite.safetensors"]


def test_a_wrong_trial_number_is_said_before_the_render_stack_loads(make_study, tmp_path: Path) -> None:
    """`export --trial 999` took 16 s (importing diffusers, opening the models) before its error."""
    import subprocess
    import sys

    path = make_study(trials=3)
    run_study(load_study_file(path), console=QUIET, export=False)
    probe = (
        "import sys\n"
        "from automerge.cli import main\n"
        f"sys.argv = ['automerge', 'export', {str(path)!r}, '--trial', '999', '-o', {str(tmp_path / 'x')!r}]\n"
        "try:\n    main()\nexcept SystemExit as exit:\n    code = exit.code\n"
        "print('code', code, 'diffusers' in sys.modules, 'automerge.study.runtime' in sys.modules)\n"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300)
    assert done.stdout.strip().splitlines()[-1] == "code 2 False False", done.stdout + done.stderr
    assert "trial 999 is not a completed trial; completed: 0, 1, 2 (best: " in done.stderr
    assert not (tmp_path / "x").exists()


def test_the_list_of_completed_trials_says_how_many_it_leaves_out() -> None:
    import pytest

    from automerge.errors import StudyError
    from automerge.study import choose_trial

    study = optuna.create_study(direction="maximize")
    study.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=25)
    with pytest.raises(StudyError, match=r"completed: 0, 1, .*, 19 and 5 more \(best: \d+\)"):
        choose_trial(study, 999)


def test_each_objectives_importances_are_those_of_its_own_score() -> None:
    """The report's importances per objective: Optuna refuses a study with several objectives unless
    given the objective's value as its target (the refusal read as no importances at all)."""
    from automerge.study.export import _importances

    study = optuna.create_study(
        directions=["maximize", "minimize"], sampler=optuna.samplers.RandomSampler(seed=0)
    )
    study.optimize(lambda t: (t.suggest_float("x", 0, 1), t.suggest_float("y", 0, 1)), n_trials=12)
    first, second = _importances(study, objective=0), _importances(study, objective=1)
    assert set(first) == set(second) == {"x", "y"}
    assert first["x"] > 0.9 and second["y"] > 0.9  # each score depends on one parameter only
