"""supermerger recipes (issue 17): the MBW weight string in supermerger's block order with its alpha
semantics, the mode and calcmode names it uses, and a clear refusal for methods it does not have."""

from __future__ import annotations

from types import MappingProxyType

import pytest

from automerge.arch import ARCHITECTURES
from automerge.errors import ConfigError
from automerge.interop.supermerger import parse_mbw_weights, supermerger_recipe
from automerge.merge import BlockParams


def _params(
    blocks: tuple[str, ...], values: dict[str, float], *, unmerged: tuple[str, ...] = ()
) -> BlockParams:
    per_block = {block: values.get(block, 0.25) for block in blocks if block not in unmerged}
    return BlockParams(
        values=MappingProxyType({"alpha": MappingProxyType(per_block)}), blocks=tuple(per_block)
    )


@pytest.mark.parametrize(("family", "count"), [("sd1", 26), ("sd2", 26), ("sdxl", 20)])
def test_the_weight_string_reparsed_as_supermerger_does_gives_the_same_weights(
    family: str, count: int
) -> None:
    blocks = ARCHITECTURES.get(family).merge_blocks
    values = {block: round(0.01 * (i + 1), 2) + 1e-12 * i for i, block in enumerate(blocks)}
    recipe = supermerger_recipe(
        "weighted_sum", _params(blocks, values), blocks, ("a.safetensors", "b.safetensors")
    )
    base_alpha, weights = parse_mbw_weights(recipe.weights_alpha)
    assert len(weights) + 1 == count  # supermerger checks 25 (SD1/SD2) or 19 (SDXL) after the base
    assert [base_alpha, *weights] == [values[block] for block in blocks]  # exactly, in its order
    assert (recipe.mode, recipe.calcmode) == ("Weight sum", "normal")


def test_blocks_automerge_leaves_unmerged_are_zero_the_share_of_b() -> None:
    blocks = ARCHITECTURES.get("sd1").merge_blocks
    recipe = supermerger_recipe(
        "weighted_sum", _params(blocks, {}, unmerged=("IN05", "OUT11")), blocks, ("a.ckpt", "b.ckpt")
    )
    base_alpha, weights = parse_mbw_weights(recipe.weights_alpha)
    assert weights[blocks.index("IN05") - 1] == 0.0 and weights[-1] == 0.0 and base_alpha == 0.25


@pytest.mark.parametrize(
    ("method", "mode", "calcmode", "models"),
    [
        ("add_difference", "Add difference", "normal", 3),
        ("train_difference", "Add difference", "trainDifference", 3),
    ],
)
def test_difference_methods_name_supermerger_s_modes_and_model_c(method, mode, calcmode, models) -> None:
    blocks = ARCHITECTURES.get("sd1").merge_blocks
    names = ("a.safetensors", "b.safetensors", "c.safetensors")
    recipe = supermerger_recipe(method, _params(blocks, {"BASE": 0.5}), blocks, names)
    assert (recipe.mode, recipe.calcmode, recipe.models) == (mode, calcmode, names)
    text = recipe.text(title="my-study trial 7")
    assert f"mode: {mode}" in text and f"calcmode: {calcmode}" in text and "model_c: c.safetensors" in text
    assert f"my-study trial 7\t{recipe.weights_alpha}" in text  # a presets-file line: NAME<TAB>weights


@pytest.mark.parametrize("method", ["ties", "dare", "slerp", "model_stock", "geometric_median"])
def test_methods_supermerger_does_not_have_are_refused_naming_what_it_has(method: str) -> None:
    blocks = ARCHITECTURES.get("sd1").merge_blocks
    with pytest.raises(ConfigError) as caught:
        supermerger_recipe(method, _params(blocks, {}), blocks, ("a", "b"))
    message = str(caught.value)
    assert message.startswith(f"--format supermerger: supermerger has no '{method}' merge")
    assert "weighted_sum, add_difference, train_difference" in message and "\n" not in message


def test_a_second_searched_parameter_is_refused_since_the_string_holds_alpha_only() -> None:
    blocks = ARCHITECTURES.get("sd1").merge_blocks
    params = BlockParams(
        values=MappingProxyType(
            {name: MappingProxyType({block: 0.5 for block in blocks}) for name in ("alpha", "beta")}
        ),
        blocks=blocks,
    )
    with pytest.raises(ConfigError, match="only alpha"):
        supermerger_recipe("weighted_sum", params, blocks, ("a", "b"))
