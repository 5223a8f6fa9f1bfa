"""A study over six tiny models — a base and five fine-tunes listed by one glob (``models.many``) —
that searches every fine-tune's TIES weight (``search.weights``) and the density against a hidden
target of the same kind: every trial completes, the exported recipe names the six models by their
expanded names and reproduces the best trial's score, and the best trial beats the baselines."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import optuna
import pytest
from rich.console import Console

from automerge.arch import ARCHITECTURES
from automerge.errors import ConfigError
from automerge.merge import METHODS, load_recipe, plan_merge
from automerge.study import StudyRuntime, load_study_file, records, run_study
from automerge.study.runner import find_study
from automerge.study.space import build_space
from automerge.tiny import write_tiny

QUIET = Console(quiet=True)
TUNES = ("anime", "ink", "oil", "photo", "pixel")  # sorted by path: models a, b, d, e, f
GROUPS = {"UNET": ["IN00", "M00", "OUT11"]}  # searched; the other blocks stay fixed (merged once)
SECRET = {  # the hidden target, a recipe of the same kind: mostly model a, a little b, nothing else
    "density": dict.fromkeys(GROUPS["UNET"], 0.95),
    **{
        f"weight.{name}": dict.fromkeys(GROUPS["UNET"], weight)
        for name, weight in zip("abdef", (1.8, 0.2, 0.0, 0.0, 0.0), strict=True)
    },
}


@pytest.fixture(scope="module")
def six_models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """base.safetensors and tunes/<name>.safetensors: five fine-tunes of one fine-tune of the base (as
    real ones share a lineage; with independent deltas every merge's images are as far from the
    target as the base's), fp16 tiny SD1."""
    folder = tmp_path_factory.mktemp("six")
    base = write_tiny("sd1", folder / "base.safetensors", seed=0)
    parent = write_tiny(
        "sd1", tmp_path_factory.mktemp("parent") / "parent.safetensors", seed=5, like=base, delta=0.5
    )
    (folder / "tunes").mkdir()
    for seed, name in enumerate(TUNES, start=11):
        write_tiny("sd1", folder / "tunes" / f"{name}.safetensors", seed=seed, like=parent, delta=0.15)
    return folder


def test_a_study_searches_the_weights_of_five_fine_tunes_and_exports_them(
    make_study, six_models: Path, tmp_path: Path
) -> None:
    shutil.copytree(six_models, tmp_path, dirs_exist_ok=True)  # globbed relative to the study file
    path = make_study(
        models={"base": "base.safetensors", "many": "tunes/*.safetensors"},
        method="ties",
        search={
            "weights": {"low": 0.0, "high": 2.0, "groups": GROUPS},
            "density": {"low": 0.8, "high": 1.0, "groups": GROUPS},
        },
        reward={"reference": {"metric": "mse", "target": {"params": SECRET}}},
        sampler={"name": "random", "seed": 0},  # proposals that do not depend on the scores
        trials=10,
        export={"dir": str(tmp_path / "export"), "dtype": "fp32"},
    )
    study_file = load_study_file(path)
    assert list(study_file.models) == ["a", "b", "c", "d", "e", "f"]

    summary = run_study(study_file, console=QUIET)

    trials = find_study(study_file).trials
    assert summary.ran == 10 and all(t.state == optuna.trial.TrialState.COMPLETE for t in trials)
    best = [r for r in records.records(find_study(study_file)) if r.number == summary.best_trial][0]
    baselines = [r for r in records.records(find_study(study_file)) if r.baseline is not None]
    assert len(baselines) == 3 and best.baseline is None
    assert all(summary.best_value > b.value for b in baselines)
    recipe = load_recipe(tmp_path / "export" / "recipe.yaml")
    tunes = {
        name: (tmp_path / "tunes" / f"{tune}.safetensors") for name, tune in zip("abdef", TUNES, strict=True)
    }
    assert {name: p.resolve() for name, p in recipe.models.items()} == {
        **{name: p.resolve() for name, p in tunes.items()},
        "c": (tmp_path / "base.safetensors").resolve(),
    }
    assert set(recipe.params) == {"alpha", "density", *(f"weight.{name}" for name in "abdef")}
    runtime = StudyRuntime(load_study_file(path))
    try:
        assert {d.name for d in runtime.space.dimensions} == {
            "density.UNET",
            *(f"weight.{name}.UNET" for name in "abdef"),
        }
        with plan_merge(recipe, source="recipe.yaml") as plan:
            assert plan.model_names == ("a", "b", "d", "e", "f")
            assert runtime.evaluate(plan.params, runtime.jobs).value == summary.best_value
    finally:
        runtime.close()


def _space(make_study, tiny_models: dict[str, Path], search: dict, method: str = "ties"):
    models = {
        name: str(tiny_models[name]) for name in ("abcd" if METHODS.get(method).max_models is None else "abc")
    }
    study = load_study_file(make_study(models=models, method=method, search=search))
    return build_space(study, ARCHITECTURES.get("sd1"), METHODS.get(method))


def test_search_weights_is_one_dimension_per_non_base_model(make_study, tiny_models) -> None:
    space = _space(make_study, tiny_models, {"weights": {"low": 0.0, "high": 2.0}})
    assert [d.name for d in space.dimensions] == ["weight.a", "weight.b", "weight.d"]
    params = space.block_params({"weight.a": 0.5, "weight.b": 1.5, "weight.d": 0.0})
    assert params.model_weights("IN04", ("a", "b", "d")) == [0.5, 1.5, 0.0]
    one = _space(make_study, tiny_models, {"weight.d": {"blocks": ["IN04", "OUT11"], "high": 2.0}})
    assert [d.name for d in one.dimensions] == ["weight.d.IN04", "weight.d.OUT11"]
    assert one.block_params({"weight.d.IN04": 2.0, "weight.d.OUT11": 0.0}).model_weights(
        "M00", ("a", "b", "d")
    ) == [1.0, 1.0, 1.0]


@pytest.mark.parametrize(
    ("search", "method", "message"),
    [
        (
            {"weight.dd": {}},
            "ties",
            "search.weight.dd: model 'dd' is not a weighted model (did you mean 'd'?)",
        ),
        ({"weight.c": {}}, "ties", "search.weight.c: model 'c' is the base, which weighs nothing"),
        (
            {"weights": {"high": 2.0}, "weight.a": {}},
            "ties",
            "search.weight.a: search.weights searches it already",
        ),
        ({"weights": {"blocks": ["IN04"]}}, "ties", "search.weights: gives one weight per model"),
        ({"weights": {"low": -1.0}}, "ties", "search.weight.a: must be in [0, inf), got -1"),
        (
            {"weights": {}},
            "add_difference",
            "search.weights: method 'add_difference' takes no per-model weights",
        ),
    ],
)
def test_a_bad_weight_search_is_refused_by_name(make_study, tiny_models, search, method, message) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        _space(make_study, tiny_models, search, method)


def test_a_duplicate_file_is_merged_once_and_no_weight_of_it_is_searched(
    make_study, tiny_models: dict[str, Path], tmp_path: Path
) -> None:
    """``models.d`` is the same file as ``models.b``: the plan drops it, and the runtime's search space
    is built on the models the plan merges, so no trial proposes a weight for a model never merged."""
    copy = shutil.copy(tiny_models["b"], tmp_path / "b-copy.safetensors")
    models = {**{name: str(tiny_models[name]) for name in "abc"}, "d": str(copy)}
    path = make_study(models=models, method="ties", search={"weights": {"low": 0.0, "high": 2.0}})
    runtime = StudyRuntime(load_study_file(path))
    try:
        assert runtime.plan.model_names == ("a", "b")
        assert [d.name for d in runtime.space.dimensions] == ["weight.a", "weight.b"]
    finally:
        runtime.close()
