"""Model lists (``models.many``: a glob, a list file or a YAML list), ``models.base``, names beyond z,
per-model weights (``weight.NAME``), duplicate files merged once, and mixed families refused from
the headers."""

from __future__ import annotations

import logging
import re
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from safetensors.torch import load_file

from automerge.checkpoints import duplicate_files
from automerge.errors import ConfigError, MergeError
from automerge.merge import (
    METHODS,
    EngineOptions,
    LiveEngine,
    export_merge,
    load_recipe,
    open_plan,
    plan_merge,
    resolve_params,
)
from automerge.merge.params import changed_blocks
from automerge.merge.recipe import free_model_names, model_order

BLOCKS = ["BASE", *[f"IN{i:02d}" for i in range(12)], "M00", *[f"OUT{i:02d}" for i in range(12)], "VAE"]


def _recipe_file(folder: Path, models: dict[str, Any], **changes: Any) -> Path:
    path = folder / "recipe.yaml"
    path.write_text(yaml.safe_dump({"models": models, "method": "ties", **changes}))
    return path


def _touch(folder: Path, *names: str) -> list[Path]:
    paths = [folder / name for name in names]
    for path in paths:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"")
    return paths


# -- expansion --------------------------------------------------------------------------------------


def test_a_glob_is_sorted_by_path_and_named_after_the_explicit_models_skipping_c(tmp_path: Path) -> None:
    _touch(
        tmp_path,
        "base.safetensors",
        "tunes/zeta.safetensors",
        "tunes/alpha.safetensors",
        "tunes/mid.safetensors",
    )
    recipe = load_recipe(
        _recipe_file(
            tmp_path, {"a": "base.safetensors", "base": "base.safetensors", "many": "tunes/*.safetensors"}
        )
    )
    assert {name: path.name for name, path in recipe.models.items()} == {
        "a": "base.safetensors",
        "b": "alpha.safetensors",
        "c": "base.safetensors",
        "d": "mid.safetensors",
        "e": "zeta.safetensors",
    }
    assert recipe.models["b"] == tmp_path / "tunes" / "alpha.safetensors"  # relative to the recipe file


def test_a_list_file_is_relative_to_itself_and_skips_comments_and_blank_lines(tmp_path: Path) -> None:
    _touch(tmp_path, "lists/one.safetensors", "two.safetensors")
    (tmp_path / "lists" / "tunes.txt").write_text(
        "# my tunes\none.safetensors  # the first\n\n../two.safetensors\n"
    )
    recipe = load_recipe(_recipe_file(tmp_path, {"many": "lists/tunes.txt"}))
    assert recipe.models == {
        "a": tmp_path / "lists" / "one.safetensors",
        "b": tmp_path / "lists" / "../two.safetensors",
    }


def test_a_yaml_list_gives_each_weighted_item_a_weight_parameter(tmp_path: Path) -> None:
    _touch(tmp_path, "base.safetensors", "x.safetensors", "y.safetensors")
    recipe = load_recipe(
        _recipe_file(
            tmp_path,
            {"base": "base.safetensors", "many": ["x.safetensors", {"path": "y.safetensors", "weight": 0.5}]},
            params={"density": 0.3},
        )
    )
    assert list(recipe.models) == ["a", "b", "c"]
    assert recipe.params == {"density": 0.3, "weight.b": 0.5}


def test_names_go_on_after_z_and_sort_by_length_then_alphabet(tmp_path: Path) -> None:
    _touch(tmp_path, *(f"m/{i:02d}.safetensors" for i in range(28)))
    recipe = load_recipe(_recipe_file(tmp_path, {"many": "m/*.safetensors"}))
    names = list(recipe.models)
    assert names[:3] == ["a", "b", "d"] and names[24:] == ["z", "aa", "ab", "ac"]
    assert recipe.models["ac"].name == "27.safetensors"
    assert sorted(["ab", "b", "aa", "z", "c"], key=model_order) == ["b", "c", "z", "aa", "ab"]
    assert list(zip(range(3), free_model_names({"a", "d"}), strict=False)) == [(0, "b"), (1, "e"), (2, "f")]


def test_the_written_recipe_names_the_expanded_models_and_their_weights(tmp_path: Path) -> None:
    _touch(tmp_path, "x.safetensors", "y.safetensors")
    recipe = load_recipe(
        _recipe_file(tmp_path, {"many": [{"path": "x.safetensors", "weight": 2}, "y.safetensors"]})
    )
    written = recipe.to_yaml_dict(model_path=lambda path: path.name)
    assert written["models"] == {"a": "x.safetensors", "b": "y.safetensors"}
    assert written["params"] == {"weight.a": 2}


@pytest.mark.parametrize(
    ("models", "params", "message"),
    [
        ({"many": "tunes/*.ckpt"}, {}, "models.many: the glob 'tunes/*.ckpt' matches no file"),
        ({"many": "absent.txt"}, {}, "models.many: the list file {tmp}/absent.txt does not exist"),
        ({"many": "empty.txt"}, {}, "models.many: the list file {tmp}/empty.txt lists no file"),
        ({"many": "gone.txt"}, {}, "models.many: gone.txt line 2: {tmp}/nowhere.safetensors does not exist"),
        (
            {"many": ["x.safetensors", "nowhere.safetensors"]},
            {},
            "models.many[1]: {tmp}/nowhere.safetensors does not exist",
        ),
        ({"many": []}, {}, "models.many must be a glob"),
        (
            {"many": [{"path": "x.safetensors", "weight": -1}]},
            {},
            "models.many[0].weight must be a number in [0, inf), got -1",
        ),
        (
            {"many": [{"path": "x.safetensors", "wieght": 1}]},
            {},
            "models.many[0]: an item is a path or {path: P, weight: W}; unknown key wieght",
        ),
        (
            {"many": [{"path": "x.safetensors", "weight": 1}]},
            {"weight.a": 2},
            "weight of x.safetensors (weight.a) is given twice",
        ),
        (
            {"base": "x.safetensors", "c": "x.safetensors", "a": "x.safetensors"},
            {},
            "models.base is another name of models.c; give one of them",
        ),
        (
            {"a": "x.safetensors", "B2": "x.safetensors"},
            {},
            "model names are lowercase letters a, b, c (base), ..., z, aa, ab, ...; got 'B2'",
        ),
    ],
)
def test_a_bad_model_list_names_the_file_the_field_and_the_pattern(
    tmp_path: Path, models: dict[str, Any], params: dict[str, Any], message: str
) -> None:
    _touch(tmp_path, "x.safetensors")
    (tmp_path / "empty.txt").write_text("# nothing yet\n\n")
    (tmp_path / "gone.txt").write_text("x.safetensors\nnowhere.safetensors\n")
    path = _recipe_file(tmp_path, models, params=params)
    with pytest.raises(ConfigError) as error:
        load_recipe(path)
    assert str(error.value).startswith(f"{path}: ")
    assert message.replace("{tmp}", str(tmp_path)) in str(error.value)


# -- weights ----------------------------------------------------------------------------------------


def _weights(raw: dict[str, Any], method: str = "ties") -> Any:
    return resolve_params(
        METHODS.get(method), raw, blocks=BLOCKS, source="r.yaml", model_names=("a", "b", "d"), base_name="c"
    )


def test_weights_are_per_model_and_per_block_and_one_by_default() -> None:
    assert _weights({"density": 0.4}).model_weights("IN04", ("a", "b", "d")) is None  # every model weighs 1
    params = _weights({"weight.d": {"default": 0.5, "OUT11": 0.0}, "weight.a": 2})
    assert params.model_weights("IN04", ("a", "b", "d")) == [2.0, 1.0, 0.5]
    assert params.model_weights("OUT11", ("a", "b", "d")) == [2.0, 1.0, 0.0]
    assert params.for_block("IN04") == {"alpha": 1.0, "density": 0.5}  # the method's own parameters only
    assert _weights(params.as_recipe()) == params
    assert params.value("weight.b", "M00") == 1.0 and _weights({}).value("weight.b", "M00") == 1.0


def test_a_changed_weight_re_merges_its_blocks_only() -> None:
    old = _weights({"weight.b": 1.0})
    new = old.with_values({"weight.b": {"IN04": 0.3}})
    assert changed_blocks(old, new) == {"IN04"}


@pytest.mark.parametrize(
    ("raw", "method", "message"),
    [
        (
            {"weight.bb": 1.0},
            "ties",
            "'weight.bb': there is no model 'bb' to weigh (did you mean 'b'?); the weighted models are a, b, d",
        ),
        ({"weight.c": 1.0}, "ties", "'weight.c': model c is the base, which weighs nothing"),
        ({"weight.a": -0.5}, "ties", "`weight.a` must be in [0, inf), got -0.5"),
        ({"weight.a": {"IN99": 1}}, "ties", "`weight.a` names block 'IN99'"),
        (
            {"weight.a": 1.0},
            "add_difference",
            "method 'add_difference' takes no per-model weights ('weight.a')",
        ),
    ],
)
def test_a_bad_weight_is_refused_by_name(raw: dict[str, Any], method: str, message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        _weights(raw, method)


def test_a_weighted_recipe_of_many_models_merges_and_reads_back(
    tiny_models: dict[str, Path], tmp_path: Path
) -> None:
    tunes = tmp_path / "tunes"
    tunes.mkdir()
    for name in "abd":
        shutil.copy(tiny_models[name], tunes / f"{name}.safetensors")
    path = _recipe_file(
        tmp_path,
        {"base": str(tiny_models["c"]), "many": "tunes/*.safetensors"},
        params={"weight.d": 0.0, "weight.a": {"default": 1.0, "IN04": 0.5}},
    )
    with plan_merge(load_recipe(path), source=str(path)) as plan:
        assert plan.model_names == ("a", "b", "d")
        assert plan.params.model_weights("IN04", plan.model_names) == [0.5, 1.0, 0.0]
        again = plan.recipe()
        assert again.params["weight.d"] == 0.0 and again.params["weight.a"]["IN04"] == 0.5
        assert {name: p.name for name, p in again.models.items()} == {
            "a": "a.safetensors",
            "b": "b.safetensors",
            "c": "base.safetensors",
            "d": "d.safetensors",
        }


# -- duplicates and families ------------------------------------------------------------------------


def test_only_files_equal_in_size_and_header_are_hashed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import automerge.checkpoints._duplicates as duplicates

    def safetensors(name: str, header: bytes, data: bytes) -> Path:
        path = tmp_path / name
        path.write_bytes(len(header).to_bytes(8, "little") + header + data)
        return path

    files = {
        "a": safetensors("a.safetensors", b'{"x": 1}', b"12345678"),
        "b": safetensors("b.safetensors", b'{"x": 1}', b"12345678"),  # a copy of a
        "d": safetensors("d.safetensors", b'{"x": 1}', b"87654321"),  # same header, other data
        "e": safetensors("e.safetensors", b'{"y": 1}', b"12345678"),  # same size, other header
        "f": safetensors("f.safetensors", b'{"x": 1}', b"1234"),  # other size
    }
    hashed: list[str] = []
    real = duplicates.cached_sha256
    monkeypatch.setattr(
        duplicates, "cached_sha256", lambda path: hashed.append(Path(path).name) or real(path)
    )
    assert duplicate_files(files) == {"b": "a"}
    assert sorted(set(hashed)) == ["a.safetensors", "b.safetensors", "d.safetensors"]


def test_a_duplicate_file_is_merged_once_with_a_notice(
    tiny_models: dict[str, Path], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    copy = shutil.copy(tiny_models["b"], tmp_path / "b-copy.safetensors")
    models = {"a": tiny_models["a"], "b": tiny_models["b"], "c": tiny_models["c"], "d": Path(copy)}
    with caplog.at_level(logging.WARNING, logger="automerge.merge"):
        with open_plan(models, "ties", params={}, source="r.yaml") as plan:
            assert plan.model_names == ("a", "b") and set(plan.sources) == {"a", "b", "c"}
            assert list(plan.recipe().models) == ["a", "b", "c"]
    [notice] = [record.getMessage() for record in caplog.records]
    assert notice == (
        f"r.yaml: models.d ({copy}) is the same file as models.b ({tiny_models['b']}): merged once, d dropped"
    )
    with pytest.raises(ConfigError, match=re.escape("and is merged once; remove weight.d, or the duplicate")):
        open_plan(models, "ties", params={"weight.d": 0.5}, source="r.yaml")
    caplog.clear()
    with open_plan(
        {"a": tiny_models["b"], "b": Path(copy)}, "weighted_sum", params={}, source="r.yaml"
    ) as plan:
        assert plan.model_names == ("a", "b") and not caplog.records  # a two-model method: as given


def test_mixed_families_among_many_sources_are_refused_from_the_headers(
    tiny_models: dict[str, Path], tiny_sdxl_models: dict[str, Path]
) -> None:
    models = {"a": tiny_models["a"], "b": tiny_models["b"], "c": tiny_models["c"], "d": tiny_sdxl_models["a"]}
    with pytest.raises(MergeError) as error:
        open_plan(models, "ties", params={}, source="r.yaml")
    assert str(error.value) == (
        "r.yaml: models of different families cannot be merged: sd1: a (a.safetensors), b (b.safetensors), "
        "c (base.safetensors); sdxl: d (a.safetensors)"
    )


# one weighted method per path: top-k with sign election, random drops, element-wise with and without a
# base (the contract over every method is test_methods'; della and geometric_median take long here)
@pytest.mark.parametrize("method", ["ties", "dare", "task_sum", "average"])
def test_per_block_weights_give_the_same_bits_live_and_exported(
    method: str, tiny_models: dict[str, Path], tmp_path: Path
) -> None:
    weights = {"weight.a": {"default": 0.5, "IN04": 2.0}, "weight.d": {"default": 1.0, "OUT11": 0.0}}
    models = {name: tiny_models[name] for name in ("abcd" if METHODS.get(method).needs_base else "abd")}
    with open_plan(models, method, params=weights, dtype="fp32", seed=3, source="t") as plan:
        engine = LiveEngine(plan, EngineOptions(device="cpu", dtype=torch.float32))
        engine.apply(plan.params)
        exported = load_file(export_merge(plan, tmp_path / "o.safetensors"))
        for key in engine.live_keys():
            assert torch.equal(engine.live_tensor(key), exported[key]), key
        assert engine.apply(plan.params.with_values({"weight.d": {"OUT11": 1.0}})) == {"OUT11"}
