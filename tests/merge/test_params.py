"""Per-block parameters: numbers and per-block maps, validation errors, the VAE rule, change sets."""

from __future__ import annotations

import math
import re
from typing import Annotated, Any

import pytest
from torch import Tensor

from automerge.errors import ConfigError
from automerge.merge.methods import METHODS, MergeMethod, Param
from automerge.merge.params import BlockParams, changed_blocks, resolve_params

BLOCKS = ["BASE", *[f"IN{i:02d}" for i in range(12)], "M00", *[f"OUT{i:02d}" for i in range(12)], "VAE"]
UNET_AND_BASE = BLOCKS[:-1]
SOURCE = "recipe.yaml"


def _resolve(name: str, raw: dict[str, Any], *, blocks: list[str] = BLOCKS) -> BlockParams:
    return resolve_params(METHODS.get(name), raw, blocks=blocks, source=SOURCE)


def _fails(name: str, raw: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        _resolve(name, raw)


def _required_beta_method() -> MergeMethod:
    def needs_beta(
        models: list[Tensor], base: Tensor | None, *, beta: Annotated[float, Param(doc="required, unbounded")]
    ):
        """A·β"""
        return models[0] * beta

    return MergeMethod.from_function(needs_beta, name="needs_beta", needs_base=False)


def test_a_number_applies_to_every_block_except_vae() -> None:
    params = _resolve("ties", {"alpha": 0.7})
    assert params.blocks == tuple(UNET_AND_BASE)
    assert params.for_block("IN04") == {"alpha": 0.7, "density": 0.5}
    assert not params.merges("VAE")
    with pytest.raises(KeyError, match="'VAE' is not merged"):
        params.for_block("VAE")


def test_a_map_sets_named_blocks_and_default_the_rest() -> None:
    params = _resolve("weighted_sum", {"alpha": {"default": 0.2, "IN04": 0.9, "OUT11": 1}})
    assert params.for_block("IN04") == {"alpha": 0.9}
    assert params.for_block("OUT11") == {"alpha": 1.0}
    assert params.for_block("M00") == {"alpha": 0.2}
    assert all(isinstance(v, float) for v in params.values["alpha"].values())


def test_a_map_without_default_uses_the_method_default_for_unnamed_blocks() -> None:
    params = _resolve("ties", {"density": {"IN00": 0.9}})
    assert params.for_block("IN00") == {"alpha": 1.0, "density": 0.9}
    assert params.for_block("BASE") == {"alpha": 1.0, "density": 0.5}


def test_naming_vae_in_a_map_merges_it_with_the_other_parameters_at_their_defaults() -> None:
    params = _resolve("ties", {"alpha": 0.3, "density": {"VAE": 0.8}})
    assert params.merges("VAE")
    assert params.for_block("VAE") == {"alpha": 0.3, "density": 0.8}


def test_families_without_a_vae_block_merge_every_block() -> None:
    params = _resolve("slerp", {}, blocks=UNET_AND_BASE)
    assert params.blocks == tuple(UNET_AND_BASE)
    assert params.for_block("M00") == {"alpha": 0.5}


def test_resolved_values_cannot_be_modified() -> None:
    params = _resolve("weighted_sum", {"alpha": 0.5})
    with pytest.raises(TypeError):
        params.values["alpha"]["IN00"] = 1.0  # type: ignore[index]


def test_unknown_parameter_is_named_with_a_suggestion_and_the_valid_names() -> None:
    _fails(
        "ties",
        {"alfa": 0.5},
        "recipe.yaml: method 'ties' takes no parameter 'alfa' (did you mean 'alpha'?); it takes: alpha, density",
    )


def test_unknown_parameter_of_a_method_without_parameters_says_so() -> None:
    def plain(models: list[Tensor], base: Tensor | None) -> Tensor:
        """A"""
        return models[0].clone()

    method = MergeMethod.from_function(plain, name="plain", needs_base=False)
    with pytest.raises(ConfigError, match="takes no parameter 'alpha'; it takes no parameters"):
        resolve_params(method, {"alpha": 1.0}, blocks=BLOCKS, source=SOURCE)


@pytest.mark.parametrize(
    ("block", "hint"),
    [
        ("IN12", " (did you mean 'IN11'?)"),
        ("in04", " (did you mean 'IN04'?)"),
        ("defualt", " (did you mean 'default'?)"),
    ],
)
def test_unknown_block_is_named_with_a_suggestion_and_the_valid_blocks(block: str, hint: str) -> None:
    _fails(
        "weighted_sum",
        {"alpha": {block: 0.5}},
        f"recipe.yaml: `alpha` names block '{block}'{hint}, which this model family does not have; "
        "valid: default, BASE, IN00, IN01",
    )


def test_vae_is_an_unknown_block_for_families_without_one() -> None:
    with pytest.raises(ConfigError, match="names block 'VAE'"):
        _resolve("weighted_sum", {"alpha": {"VAE": 0.5}}, blocks=UNET_AND_BASE)


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"alpha": {"IN04": 1.3}}, "recipe.yaml: `alpha` for block IN04 must be in [0, 1], got 1.3"),
        ({"alpha": -0.1}, "recipe.yaml: `alpha` must be in [0, 1], got -0.1"),
        ({"alpha": {"default": 2}}, "recipe.yaml: `alpha` default must be in [0, 1], got 2"),
        ({"alpha": {"M00": math.nan}}, "`alpha` for block M00 must be a finite number, got nan"),
    ],
)
def test_value_outside_the_range_names_parameter_block_and_value(raw: dict[str, Any], message: str) -> None:
    _fails("weighted_sum", raw, message)


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"alpha": "0.5"}, "`alpha` must be a number (or a map of block → number), got '0.5'"),
        ({"alpha": True}, "`alpha` must be a number (or a map of block → number), got True"),
        (
            {"alpha": {"OUT03": [0.5]}},
            "`alpha` for block OUT03 must be a number (or a map of block → number), got [0.5]",
        ),
    ],
)
def test_value_that_is_not_a_number_is_rejected(raw: dict[str, Any], message: str) -> None:
    _fails("weighted_sum", raw, message)


def test_integer_parameter_rejects_fractions() -> None:
    _fails(
        "geometric_median",
        {"max_iter": {"IN01": 2.5}},
        "`max_iter` for block IN01 must be a whole number, got 2.5",
    )
    assert _resolve("geometric_median", {"max_iter": 20}).for_block("IN01") == {"max_iter": 20.0}


def test_missing_required_parameter_is_an_error() -> None:
    with pytest.raises(
        ConfigError, match=r"recipe.yaml: method 'needs_beta' needs `beta` \(it has no default\)"
    ):
        resolve_params(_required_beta_method(), {}, blocks=BLOCKS, source=SOURCE)


def test_required_parameter_map_without_default_must_name_every_block() -> None:
    raw = {"beta": {block: 1.5 for block in UNET_AND_BASE if block != "OUT07"}}
    with pytest.raises(ConfigError, match=r"needs `beta` \(it has no default\) for blocks OUT07;"):
        resolve_params(_required_beta_method(), raw, blocks=BLOCKS, source=SOURCE)
    raw["beta"]["OUT07"] = -3.0
    assert resolve_params(_required_beta_method(), raw, blocks=BLOCKS, source=SOURCE).for_block("OUT07") == {
        "beta": -3.0
    }


def test_changed_blocks_lists_every_merged_block_when_there_is_no_previous_set() -> None:
    assert changed_blocks(None, _resolve("ties", {})) == set(UNET_AND_BASE)


def test_changed_blocks_is_empty_for_equal_parameters() -> None:
    assert (
        changed_blocks(_resolve("ties", {"alpha": 0.5}), _resolve("ties", {"alpha": {"default": 0.5}}))
        == set()
    )


def test_changed_blocks_lists_only_the_blocks_whose_values_differ() -> None:
    old = _resolve("ties", {"alpha": {"default": 0.5, "IN04": 0.6}})
    new = _resolve("ties", {"alpha": {"default": 0.5, "OUT02": 0.6}, "density": {"M00": 0.9}})
    assert changed_blocks(old, new) == {"IN04", "OUT02", "M00"}


def test_changed_blocks_includes_vae_when_it_starts_or_stops_being_merged() -> None:
    without_vae = _resolve("weighted_sum", {"alpha": 0.5})
    with_vae = _resolve("weighted_sum", {"alpha": {"default": 0.5, "VAE": 0.5}})
    assert changed_blocks(without_vae, with_vae) == {"VAE"}
    assert changed_blocks(with_vae, without_vae) == {"VAE"}
