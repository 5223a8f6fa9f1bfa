"""``MergePlan``: its parameters in the forms recipes write, and the plan written back as a recipe
(for recipe.yaml and the checkpoint header) that plans the same merge."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from safetensors import safe_open

from automerge.merge import METHODS, export_merge, plan_merge, recipe_from_data, resolve_params

BLOCKS = ["BASE", *[f"IN{i:02d}" for i in range(12)], "M00", *[f"OUT{i:02d}" for i in range(12)], "VAE"]
WEIGHTED_SUM = METHODS.get("weighted_sum")


def _params(raw: dict):
    return resolve_params(WEIGHTED_SUM, raw, blocks=BLOCKS, source="t")


def test_with_values_replaces_named_blocks_and_refuses_unmerged_ones() -> None:
    params = _params({"alpha": 0.5})
    changed = params.with_values({"alpha": {"IN04": 0.9}})
    assert changed.for_block("IN04") == {"alpha": 0.9} and changed.for_block("IN05") == {"alpha": 0.5}
    assert params.for_block("IN04") == {"alpha": 0.5}  # the original is unchanged
    with pytest.raises(KeyError, match="VAE"):
        params.with_values({"alpha": {"VAE": 0.1}})


@pytest.mark.parametrize(
    "raw",
    [{"alpha": 0.3}, {"alpha": {"default": 0.3, "IN04": 0.8}}, {"alpha": {"default": 0.3, "VAE": 0.3}}, {}],
)
def test_the_recipe_form_reads_back_to_equal_params(raw: dict) -> None:
    params = _params(raw)
    assert _params(params.as_recipe()) == params


def test_a_plan_with_other_params_records_them_in_its_recipe_and_checkpoint(
    tiny_models: dict[str, Path], tmp_path: Path
) -> None:
    """A study exports ``plan.with_params(trial)``: the header must name the trial's per-block
    weights, not the plan's original ones."""
    data = {"models": {n: str(tiny_models[n]) for n in "ab"}, "method": "weighted_sum", "seed": 3}
    plan = plan_merge(recipe_from_data(data, source="t"), source="t")
    try:
        trial = plan.with_params(_params({"alpha": {"default": 0.2, "IN04": 0.9}}))
        recipe = trial.recipe()
        assert recipe.params["alpha"]["IN04"] == 0.9 and recipe.seed == 3 and recipe.dtype == "fp16"
        again = plan_merge(recipe, source="again")
        assert again.params == trial.params
        again.close()
        out = export_merge(trial, tmp_path / "o.safetensors")
        with safe_open(out, framework="pt") as file:
            written = json.loads(file.metadata()["automerge.recipe"])
        assert written["params"]["alpha"]["IN04"] == 0.9
        assert written["models"] == {"a": "a.safetensors", "b": "b.safetensors"}
    finally:
        plan.close()


def test_recipe_data_resolves_relative_model_paths_against_its_base_dir(tmp_path: Path) -> None:
    data = {"models": {"a": "a.safetensors", "b": "sub/b.safetensors"}, "method": "weighted_sum"}
    recipe = recipe_from_data(data, source="t", base_dir=tmp_path)
    assert recipe.models["a"] == tmp_path / "a.safetensors"
    assert recipe.models["b"] == tmp_path / "sub" / "b.safetensors"
