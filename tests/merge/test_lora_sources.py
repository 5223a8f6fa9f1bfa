"""Sources with LoRAs: a recipe names them (``models: {a: {checkpoint, loras}}``), the export and the
live engine read the source as checkpoint + Σ strength·ΔW through one function, and a live LoRA's
strength changes per ``apply`` without re-reading anything, bit-identical to the export."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from automerge.checkpoints import open_safetensors
from automerge.errors import ConfigError
from automerge.lora import write_kohya_lora
from automerge.merge import EngineOptions, LiveEngine, export_merge, load_recipe, plan_merge
from automerge.tiny import write_tiny


def write_recipe(folder: Path, models: dict, **changes) -> Path:
    path = folder / "recipe.yaml"
    data = {"models": models, "method": "weighted_sum", "params": {"alpha": 0.25}, "dtype": "fp32"}
    path.write_text(yaml.safe_dump({**data, **changes}))
    return path


def lora_model(checkpoint: Path, lora: Path, strength: float) -> dict:
    return {"checkpoint": str(checkpoint), "loras": [{"path": str(lora), "strength": strength}]}


def test_an_exported_merge_applies_the_lora_to_its_source_first(tiny_models, style_lora, tmp_path) -> None:
    a, b = tiny_models["a"], tiny_models["b"]
    recipe = write_recipe(tmp_path, {"a": lora_model(a, style_lora, 0.8), "b": str(b)})
    plan = plan_merge(load_recipe(recipe), source=str(recipe))
    with plan:
        out = export_merge(plan, tmp_path / "merged.safetensors")
        lora = plan.loras["a"][0][1]
    adapted = sorted(lora.keys())
    assert len(adapted) > 100
    with open_safetensors(out) as merged, open_safetensors(a) as ca, open_safetensors(b) as cb:
        for key in adapted[:: len(adapted) // 12]:
            weight_a = ca.load(key)
            source_a = weight_a.float() + 0.8 * lora.delta(key, weight_a.shape)  # float32, not rounded
            expected = torch.lerp(source_a.float(), cb.load(key).float(), 0.25)
            torch.testing.assert_close(merged.load(key), expected, rtol=0, atol=1e-6)
        untouched = next(
            k for k in ca.keys() if k.startswith("model.diffusion_model.") and k not in lora.layers
        )
        torch.testing.assert_close(
            merged.load(untouched), torch.lerp(ca.load(untouched).float(), cb.load(untouched).float(), 0.25)
        )


def test_the_recipe_of_a_plan_with_loras_plans_the_same_merge(tiny_models, style_lora, tmp_path) -> None:
    recipe = write_recipe(
        tmp_path, {"a": lora_model(tiny_models["a"], style_lora, 0.5), "b": str(tiny_models["b"])}
    )
    with plan_merge(load_recipe(recipe), source="r") as plan:
        written = plan.recipe().to_yaml_dict()
    assert written["models"]["a"] == {
        "checkpoint": str(tiny_models["a"]),
        "loras": [{"path": str(style_lora), "strength": 0.5, "name": "style"}],
    }
    again = tmp_path / "again.yaml"
    again.write_text(yaml.safe_dump(written))
    with plan_merge(load_recipe(again), source="again") as replanned:
        assert replanned.params == plan.params and replanned.params.lora_strengths == {"style": 0.5}


@pytest.mark.parametrize("offload", [False, True])
def test_a_live_lora_strength_changes_per_apply_and_matches_the_export(
    tiny_models, style_lora, tmp_path, offload
) -> None:
    recipe = write_recipe(
        tmp_path, {"a": lora_model(tiny_models["a"], style_lora, 1.0), "b": str(tiny_models["b"])}
    )
    with plan_merge(load_recipe(recipe), source="r") as plan:
        engine = LiveEngine(plan, EngineOptions(live_loras=frozenset({"style"}), offload=offload))
        lora = plan.loras["a"][0][1]
        adapted_block = plan.arch.block_of(next(iter(lora.keys())), torch.float32)
        engine.apply(plan.params)
        for strength in (0.3, -0.6, 0.3):
            params = plan.params.with_values({}, lora_strengths={"style": strength})
            changed = engine.apply(params)
            assert adapted_block in changed
            exported = export_merge(
                plan.with_params(params), tmp_path / f"m{strength}.safetensors", dtype=torch.float32
            )
            with open_safetensors(exported) as merged:
                for key in engine.live_keys():
                    assert torch.equal(engine.live_tensor(key), merged.load(key)), key
        assert engine.apply(params) == set()  # nothing changed: nothing re-merged


def test_a_fixed_lora_strength_cannot_change_in_the_engine(tiny_models, style_lora, tmp_path) -> None:
    recipe = write_recipe(
        tmp_path, {"a": lora_model(tiny_models["a"], style_lora, 1.0), "b": str(tiny_models["b"])}
    )
    with plan_merge(load_recipe(recipe), source="r") as plan:
        engine = LiveEngine(plan)
        with pytest.raises(ValueError, match="holds them fixed"):
            engine.apply(plan.params.with_values({}, lora_strengths={"style": 0.5}))


def test_the_same_file_with_and_without_a_lora_is_two_sources(tiny_models, style_lora, tmp_path) -> None:
    a = tiny_models["a"]
    recipe = write_recipe(tmp_path, {"a": lora_model(a, style_lora, 1.0), "b": str(a)}, params={"alpha": 1.0})
    with plan_merge(load_recipe(recipe), source="r") as plan:
        engine = LiveEngine(plan)
        engine.apply(plan.params)
        key = next(iter(plan.loras["a"][0][1].keys()))
        with open_safetensors(a) as ca:
            assert torch.equal(engine.live_tensor(key), ca.load(key).float())  # alpha 1: plain b


def test_a_lora_of_another_size_is_refused_naming_the_recipe_and_the_lora(style_lora, tmp_path) -> None:
    other = write_tiny("sdxl", tmp_path / "xl.safetensors", seed=1)
    recipe = write_recipe(tmp_path, {"a": lora_model(other, style_lora, 1.0), "b": str(other)})
    with pytest.raises(ConfigError) as error:
        plan_merge(load_recipe(recipe), source=str(recipe))
    assert str(error.value).startswith(f"{recipe}: LoRA 'style' on xl.safetensors:")
    assert "\n" not in str(error.value)


@pytest.mark.parametrize(
    ("models", "message"),
    [
        ({"a": {"checkpoint": "a.safetensors", "lora": []}, "b": "b.safetensors"}, "unknown key lora"),
        ({"a": {"loras": []}, "b": "b.safetensors"}, "checkpoint is missing"),
        (
            {
                "a": {"checkpoint": "a.safetensors", "loras": [{"path": "s.safetensors"}]},
                "b": {"checkpoint": "b.safetensors", "loras": [{"path": "s.safetensors"}]},
            },
            "two LoRAs are named 's' (models a and b)",
        ),
        (
            {
                "a": {"checkpoint": "a.safetensors", "loras": [{"path": "s.safetensors", "name": "a b"}]},
                "b": "b",
            },
            "LoRA name 'a b' must be letters",
        ),
    ],
)
def test_bad_model_entries_are_one_line(tmp_path, models, message) -> None:
    recipe = write_recipe(tmp_path, models)
    with pytest.raises(ConfigError, match=None) as error:
        load_recipe(recipe)
    assert message in str(error.value) and "\n" not in str(error.value)


def test_a_strength_that_overflows_fails_that_apply_and_the_next_strength_is_exact(
    tiny_models, style_lora, tmp_path
) -> None:
    """A strength whose source overflows raises (the trial fails), again when asked again (before:
    the second time it counted as applied and merged the half-updated sources); the next strength
    recomputes them and equals the export again."""
    import dataclasses

    from automerge.arch import ARCHITECTURES
    from automerge.errors import MergeError
    from automerge.lora import read_lora

    arch = ARCHITECTURES.get("sd1")
    with open_safetensors(tiny_models["a"]) as ca:
        shapes = {key: ca.info(key).shape for key in ca.keys()}
    lora = read_lora(style_lora, arch, shapes=shapes)
    layers = [layer for group in lora.layers.values() for layer in group]
    first = layers[0]  # ×1e40: its delta is beyond float32's range
    big = [
        dataclasses.replace(first, up=first.up.float() * 1e20, down=first.down.float() * 1e20),
        *layers[1:],
    ]
    loud = tmp_path / "loud.safetensors"
    write_kohya_lora(loud, big, arch)
    recipe = write_recipe(
        tmp_path, {"a": lora_model(tiny_models["a"], loud, 0.0), "b": str(tiny_models["b"])}
    )
    with plan_merge(load_recipe(recipe), source="r") as plan:
        engine = LiveEngine(plan, EngineOptions(live_loras=frozenset({"loud"})))
        engine.apply(plan.params)
        for _ in range(2):  # the same strength again is not taken as applied: it fails again
            with pytest.raises(MergeError):
                engine.apply(plan.params.with_values({}, lora_strengths={"loud": 10.0}))
        params = plan.params.with_values({}, lora_strengths={"loud": 0.0})
        engine.apply(params)
        exported = export_merge(plan.with_params(params), tmp_path / "m.safetensors", dtype=torch.float32)
        with open_safetensors(exported) as merged:
            for key in engine.live_keys():
                assert torch.equal(engine.live_tensor(key), merged.load(key)), key
