"""A study whose source carries a LoRA and whose search includes the LoRA's strength (``lora.NAME``):
it runs on tiny models, the hidden target's strength is a secret like the block weights, the export
writes the trial's strength into recipe.yaml, and that recipe reproduces the trial's score."""

from __future__ import annotations

from pathlib import Path

import pytest
from rich.console import Console

from automerge.checkpoints import open_model
from automerge.errors import ConfigError
from automerge.lora import extract_lora, write_kohya_lora
from automerge.merge import load_recipe, plan_merge
from automerge.study import StudyRuntime, load_study_file, run_study

QUIET = Console(quiet=True)


@pytest.fixture(scope="module")
def style_lora(tiny_models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("lora") / "style.safetensors"
    with open_model(tiny_models["c"]) as base, open_model(tiny_models["d"]) as tuned:
        write_kohya_lora(
            path, extract_lora(base.checkpoint, tuned.checkpoint, base.arch, rank=4).layers, base.arch
        )
    return path


def lora_study(make_study, tiny_models, style_lora, tmp_path, **changes) -> Path:
    return make_study(
        models={
            "a": {"checkpoint": str(tiny_models["a"]), "loras": [{"path": str(style_lora), "strength": 0.5}]},
            "b": str(tiny_models["b"]),
        },
        search={
            "alpha": {"groups": {"ALL": ["BASE", "IN00", "IN01", "OUT11"]}},
            "lora.style": {"low": 0, "high": 1.2},
        },
        reward={"reference": {"metric": "mse", "target": {"params": {"alpha": 0.3, "lora.style": 0.9}}}},
        export={"dir": str(tmp_path / "export"), "dtype": "fp32"},
        **changes,
    )


def test_a_study_searches_a_lora_strength_and_exports_it(
    make_study, tiny_models, style_lora, tmp_path
) -> None:
    path = lora_study(make_study, tiny_models, style_lora, tmp_path, trials=6)
    summary = run_study(load_study_file(path), console=QUIET)
    assert summary.ran == 6
    recipe = load_recipe(tmp_path / "export" / "recipe.yaml")
    strength = recipe.loras["a"][0].strength
    assert (
        recipe.loras["a"][0].name == "style" and recipe.loras["a"][0].path.resolve() == style_lora.resolve()
    )
    report = (tmp_path / "export" / "report.html").read_text()
    assert "lora.style" in report  # the secret strength is reported beside the recovered one
    study_file = load_study_file(path)
    runtime = StudyRuntime(study_file)
    try:
        assert runtime.space.live_loras == {"style"}
        best = runtime.space.block_params(
            {"alpha.ALL": recipe.params["alpha"]["BASE"], "lora.style": strength}
        )
        assert best.lora_strengths == {"style": strength}
        with plan_merge(recipe, source="recipe.yaml") as plan:
            assert plan.params.lora_strengths == {"style": strength}
            assert runtime.evaluate(plan.params, runtime.jobs).value == summary.best_value
            # the hidden target itself scores a perfect 0: same strength, same weights, same pixels
            target = plan.params.with_values(
                {"alpha": dict.fromkeys(plan.params.blocks, 0.3)}, lora_strengths={"style": 0.9}
            )
            assert runtime.evaluate(target, runtime.jobs).value == 0.0
    finally:
        runtime.close()


@pytest.mark.parametrize(
    ("search", "message"),
    [
        ({"lora.styel": {"low": 0, "high": 1}}, "no LoRA named 'styel' (did you mean 'style'?)"),
        ({"lora.style": {"low": 0, "high": 1, "blocks": ["IN00"]}}, "a LoRA strength is one number"),
        ({"lora.style": {"low": 0, "high": 11}}, "strengths lie in [-10, 10], got 11"),
    ],
)
def test_a_bad_lora_search_is_refused_before_any_trial(
    make_study, tiny_models, style_lora, tmp_path, search, message
) -> None:
    path = lora_study(make_study, tiny_models, style_lora, tmp_path)
    study = load_study_file(path)
    study = study.model_copy(
        update={"search": {**study.search, **load_study_file(_with_search(path, search)).search}}
    )
    study._path = path
    with pytest.raises(ConfigError) as error:
        run_study(study, console=QUIET, export=False)
    assert message in str(error.value)


def _with_search(path: Path, search: dict) -> Path:
    import yaml

    data = yaml.safe_load(path.read_text())
    data["search"] = search
    other = path.with_name("other.yaml")
    other.write_text(yaml.safe_dump(data))
    return other


def test_the_dry_run_counts_the_tensors_kept_for_a_searched_strength(
    make_study, tiny_models, style_lora, tmp_path
) -> None:
    from automerge.study.dry_run import dry_run

    result = dry_run(load_study_file(lora_study(make_study, tiny_models, style_lora, tmp_path)))
    kept = [item for item in result.memory if "searched LoRAs" in item.name]
    assert [item.where for item in kept] == ["device"]
    assert 0 < kept[0].bytes < next(item.bytes for item in result.memory if item.name.startswith("source a "))
    assert "lora.style" in result.dimensions
