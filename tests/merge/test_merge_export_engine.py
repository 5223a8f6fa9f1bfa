"""`automerge merge`, the streaming export and the live engine: they agree on every tensor."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from automerge.checkpoints import open_file_checkpoint, open_model
from automerge.errors import MergeError
from automerge.merge import (
    METHODS,
    EngineOptions,
    LiveEngine,
    Recipe,
    export_merge,
    plan_merge,
    recipe_from_data,
    resolve_params,
)

FEWER_ITERATIONS = {"geometric_median": {"max_iter": 3}}
"""Iterative methods at fewer iterations than their default: the same code paths, a third of the suite's
time for them (geometric median at 100 Weiszfeld steps was the slowest merge test)."""


def _recipe(models: dict[str, Path], method: str, params: dict | None = None, **extra: object) -> Recipe:
    needs_base = METHODS.get(method).needs_base
    names = ["a", "b", "c"] if needs_base else ["a", "b"]
    if METHODS.get(method).max_models is None and not needs_base:
        names = ["a", "b", "d" if "d" in models else "c"]
    params = {**FEWER_ITERATIONS.get(method, {}), **(params or {})}
    data = {"models": {n: str(models[n]) for n in names}, "method": method, "params": params, **extra}
    return recipe_from_data(data, source="test.yaml")


@pytest.mark.parametrize("method", METHODS.names())
def test_every_method_exports_a_loadable_sd1_file_with_a_keys(
    method: str, tiny_models: dict, tmp_path: Path
) -> None:
    plan = plan_merge(_recipe(tiny_models, method, dtype="fp16"), source="test.yaml")
    out = export_merge(plan, tmp_path / "out.safetensors")
    plan.close()
    with open_file_checkpoint(tiny_models["a"]) as a:
        expected = set(a.keys())
    assert set(load_file(out)) == expected
    with open_model(out) as merged:
        assert merged.arch.name == "sd1"
        assert merged.checkpoint.metadata["modelspec.architecture"] == "stable-diffusion-v1"
        assert method in merged.checkpoint.metadata["automerge.recipe"]


@pytest.mark.parametrize("method", METHODS.names())
def test_every_method_merges_tiny_sdxl(method: str, tiny_sdxl_models: dict, tmp_path: Path) -> None:
    plan = plan_merge(_recipe(tiny_sdxl_models, method), source="t.yaml")
    out = export_merge(plan, tmp_path / "xl.safetensors")
    plan.close()
    with open_model(out) as merged:
        assert merged.arch.name == "sdxl"


def test_alpha_zero_gives_a_and_unmerged_keys_come_from_a(tiny_models: dict, tmp_path: Path) -> None:
    plan = plan_merge(_recipe(tiny_models, "weighted_sum", {"alpha": 0.0}, dtype="fp16"), source="t")
    out = load_file(export_merge(plan, tmp_path / "o.safetensors"))
    plan.close()
    a = load_file(tiny_models["a"])
    assert all(torch.equal(out[k], a[k]) for k in a)


def test_vae_is_copied_from_a_unless_named(tiny_models: dict, tmp_path: Path) -> None:
    key = "first_stage_model.decoder.conv_in.weight"
    a, b = load_file(tiny_models["a"]), load_file(tiny_models["b"])
    plain = plan_merge(_recipe(tiny_models, "weighted_sum", {"alpha": 1.0}), source="t")
    named = plan_merge(
        _recipe(tiny_models, "weighted_sum", {"alpha": {"default": 1.0, "VAE": 1.0}}), source="t"
    )
    assert torch.equal(load_file(export_merge(plain, tmp_path / "p.safetensors"))[key], a[key])
    assert torch.equal(load_file(export_merge(named, tmp_path / "n.safetensors"))[key], b[key])
    plain.close()
    named.close()


def test_metadata_names_sources_with_hashes(tiny_models: dict, tmp_path: Path) -> None:
    import json

    from automerge.checkpoints import sha256_file

    plan = plan_merge(_recipe(tiny_models, "add_difference"), source="t")
    out = export_merge(plan, tmp_path / "o.safetensors")
    plan.close()
    with open_file_checkpoint(out) as merged:
        sources = json.loads(merged.metadata["automerge.sources"])
    digest = sha256_file(tiny_models["c"])
    assert {"name": "c", "file": "base.safetensors", "sha256": digest, "autov2": digest[:10]} in sources


def test_metadata_has_a1111s_merge_recipe_and_models_in_its_shape(tiny_models: dict, tmp_path: Path) -> None:
    """A1111 writes ``sd_merge_recipe`` (type, primary/secondary/tertiary model hashes, interp_method,
    multiplier, save_as_half, …) and ``sd_merge_models`` ({sha256: {name, legacy_hash,
    sd_merge_recipe}}); its UI and civitai read them, so an automerge file carries both in that shape."""
    import hashlib
    import json

    from automerge.checkpoints import sha256_file

    recipe = _recipe(tiny_models, "add_difference", {"alpha": {"default": 0.3, "IN00": 0.9}}, dtype="fp16")
    plan = plan_merge(recipe, source="t")
    out = export_merge(plan, tmp_path / "o.safetensors")
    plan.close()
    with open_file_checkpoint(out) as merged:
        merge_recipe = json.loads(merged.metadata["sd_merge_recipe"])
        models = json.loads(merged.metadata["sd_merge_models"])
    digests = {name: sha256_file(tiny_models[name]) for name in "abc"}
    assert merge_recipe["type"] == "automerge"
    assert merge_recipe["primary_model_hash"] == digests["a"]
    assert merge_recipe["secondary_model_hash"] == digests["b"]
    assert merge_recipe["tertiary_model_hash"] == digests["c"]
    assert merge_recipe["interp_method"] == "Add difference"
    assert merge_recipe["multiplier"] is None  # per-block: no single multiplier; the blocks follow
    assert merge_recipe["block_weights"]["alpha"]["IN00"] == 0.9
    assert merge_recipe["save_as_half"] is True
    for name in "abc":
        data = tiny_models[name].read_bytes()
        legacy = hashlib.sha256(data[0x100000 : 0x100000 + 0x10000]).hexdigest()[:8]
        entry = models[digests[name]]
        assert entry["name"] == tiny_models[name].name and entry["legacy_hash"] == legacy
        assert entry["sd_merge_recipe"] is None  # the tiny sources are not merges


def test_a_merge_of_merges_keeps_its_sources_lineage(tiny_models: dict, tmp_path: Path) -> None:
    """As A1111 does, the sources' own ``sd_merge_models`` are carried into the new file's."""
    import json

    first = plan_merge(_recipe(tiny_models, "weighted_sum", {"alpha": 0.5}), source="t")
    merged = export_merge(first, tmp_path / "m1.safetensors")
    first.close()
    second = plan_merge(
        _recipe({"a": merged, "b": tiny_models["b"]}, "weighted_sum", {"alpha": 0.2}), source="t"
    )
    out = export_merge(second, tmp_path / "m2.safetensors")
    second.close()
    with open_file_checkpoint(out) as final:
        models = json.loads(final.metadata["sd_merge_models"])
        recipe = json.loads(final.metadata["sd_merge_recipe"])
    assert recipe["multiplier"] == 0.2 and recipe["interp_method"] == "Weighted sum"
    from automerge.checkpoints import sha256_file

    assert sha256_file(tiny_models["a"]) in models  # a, through m1's own sd_merge_models
    assert json.loads(models[sha256_file(merged)]["sd_merge_recipe"])["multiplier"] == 0.5


PER_BLOCK = {"default": 0.3, "IN00": 0.9, "OUT11": 0.1, "BASE": 0.7}


@pytest.mark.parametrize("method", METHODS.names())
def test_live_engine_equals_the_exported_file(method: str, tiny_models: dict, tmp_path: Path) -> None:
    params = {"alpha": PER_BLOCK} if "alpha" in METHODS.get(method).param_names() else {}
    plan = plan_merge(_recipe(tiny_models, method, params, dtype="fp32", seed=5), source="t")
    engine = LiveEngine(plan, EngineOptions(device="cpu", dtype=torch.float32))
    engine.apply(plan.params)
    exported = load_file(export_merge(plan, tmp_path / "o.safetensors"))
    for key in engine.live_keys():
        assert torch.equal(engine.live_tensor(key), exported[key]), key
    plan.close()


def test_a_random_method_merged_key_by_key_draws_each_keys_noise_as_the_export_does(
    tiny_models: dict, tmp_path: Path
) -> None:
    """Without the task statistics the engine merges dare key by key: each key's draws come from its
    own name and the recipe's seed (``noise_for``), as in the export, so the bits are the file's."""
    plan = plan_merge(_recipe(tiny_models, "dare", {"density": 0.4}, dtype="fp32", seed=5), source="t")
    engine = LiveEngine(plan, EngineOptions(device="cpu", dtype=torch.float32, task_statistics=False))
    engine.apply(plan.params)
    assert engine._task is None
    exported = load_file(export_merge(plan, tmp_path / "o.safetensors"))
    for key in engine.live_keys():
        assert torch.equal(engine.live_tensor(key), exported[key]), key
    plan.close()


@pytest.mark.parametrize("method", METHODS.names())
def test_half_precision_engine_in_small_chunks_equals_the_fp16_export(
    method: str, tiny_models: dict, tmp_path: Path
) -> None:
    """fp16 sources and live weights (the GPU setting), chunks far smaller than a block: same bits."""
    params = {"alpha": PER_BLOCK} if "alpha" in METHODS.get(method).param_names() else {}
    plan = plan_merge(_recipe(tiny_models, method, params, dtype="fp16", seed=5), source="t")
    engine = LiveEngine(plan, EngineOptions(device="cpu", dtype=torch.float16, chunk_numel=1000))
    engine.apply(plan.params)
    exported = load_file(export_merge(plan, tmp_path / "o.safetensors"))
    for key in engine.live_keys():
        assert torch.equal(engine.live_tensor(key), exported[key]), key
    plan.close()


def test_a_value_beyond_the_storage_dtype_is_refused_naming_model_and_key(
    tiny_models: dict, tmp_path: Path
) -> None:
    """An fp32 file whose value overflows fp16 storage would merge as Inf: it is caught at load."""
    tensors = load_file(tiny_models["b"])
    key = next(k for k in tensors if k.startswith("model.diffusion_model.input_blocks.1"))
    tensors[key] = tensors[key].float()
    tensors[key].view(-1)[3] = 1e5
    save_file(tensors, tmp_path / "b32.safetensors")
    models = {"a": tiny_models["a"], "b": tmp_path / "b32.safetensors"}
    plan = plan_merge(_recipe(models, "weighted_sum", dtype="fp16"), source="t")
    with pytest.raises(
        MergeError, match=rf"model b \(b32.safetensors\): tensor '{key}' has NaN/Inf values \(1 of"
    ):
        LiveEngine(plan, EngineOptions(device="cpu", dtype=torch.float16))
    LiveEngine(plan, EngineOptions(device="cpu", dtype=torch.float32))  # fp32 storage holds it
    plan.close()


def test_live_parameters_are_views_of_the_merged_weights(tiny_models: dict) -> None:
    plan = plan_merge(_recipe(tiny_models, "weighted_sum", {"alpha": 0.25}), source="t")
    engine = LiveEngine(plan)
    engine.apply(plan.params)
    conv_in = engine.live_parameters()["unet"]["conv_in.weight"]
    live = engine.live_tensor("model.diffusion_model.input_blocks.0.0.weight")
    assert conv_in.data_ptr() == live.data_ptr()
    new = resolve_params(plan.method, {"alpha": 0.75}, blocks=plan.arch.blocks, source="t")
    engine.apply(new)
    a = load_file(tiny_models["a"])["model.diffusion_model.input_blocks.0.0.weight"].float()
    b = load_file(tiny_models["b"])["model.diffusion_model.input_blocks.0.0.weight"].float()
    assert torch.equal(conv_in, torch.lerp(a, b, 0.75))
    plan.close()


def test_every_live_parameter_of_every_component_is_a_view_into_one_block_buffer(
    tiny_sdxl_models: dict,
) -> None:
    """Fused OpenCLIP q/k/v rows, squeezed convs and the transposed projection share the merged storage."""
    plan = plan_merge(_recipe(tiny_sdxl_models, "weighted_sum"), source="t")
    engine = LiveEngine(plan)
    buffers = {block.out.untyped_storage().data_ptr() for block in engine._blocks.values()}
    parameters = engine.live_parameters()
    assert set(parameters) == {"unet", "text_encoder", "text_encoder_2", "vae"}
    for named in parameters.values():
        for tensor in named.values():
            assert tensor.untyped_storage().data_ptr() in buffers
    q = parameters["text_encoder_2"]["text_model.encoder.layers.0.self_attn.q_proj.weight"]
    fused = engine.live_tensor("conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight")
    assert q.data_ptr() == fused.data_ptr() and q.shape[0] * 3 == fused.shape[0]
    plan.close()


def test_apply_remerges_only_changed_blocks(tiny_models: dict) -> None:
    plan = plan_merge(_recipe(tiny_models, "weighted_sum", {"alpha": 0.5}), source="t")
    engine = LiveEngine(plan)
    assert engine.apply(plan.params) == set(plan.arch.blocks)  # 26 merged + the VAE from A
    one = resolve_params(
        plan.method, {"alpha": {"default": 0.5, "IN04": 0.9}}, blocks=plan.arch.blocks, source="t"
    )
    assert engine.apply(one) == {"IN04"}
    assert engine.apply(one) == set()
    plan.close()


def test_same_recipe_same_weights_for_dare(tiny_models: dict, tmp_path: Path) -> None:
    recipe = _recipe(tiny_models, "dare", {"density": 0.3}, seed=11, dtype="fp32")
    files = []
    for i in range(2):
        plan = plan_merge(recipe, source="t")
        files.append(export_merge(plan, tmp_path / f"{i}.safetensors"))
        plan.close()
    assert files[0].read_bytes() == files[1].read_bytes()


def test_the_same_file_given_twice_is_held_once(tiny_models: dict) -> None:
    data = {"models": {"a": str(tiny_models["a"]), "b": str(tiny_models["a"])}, "method": "weighted_sum"}
    plan = plan_merge(recipe_from_data(data, source="t"), source="t")
    engine = LiveEngine(plan)
    for block in engine._blocks.values():
        assert block.sources["a"].data_ptr() == block.sources["b"].data_ptr()
    plan.close()


def test_an_exported_merge_drops_the_sources_ema_weights(tiny_models: dict, tmp_path: Path) -> None:
    """No test model carried EMA keys, so disabling the export's EMA filter survived (issue 15)."""
    with_ema = {}
    for name in ("a", "b"):
        tensors = load_file(tiny_models[name])
        key = "model.diffusion_model.out.2.weight"
        tensors["model_ema.diffusion_modelout2weight"] = tensors[key].clone()
        tensors["model_ema.decay"] = torch.tensor(0.9999)
        tensors["model_ema.num_updates"] = torch.tensor(1000, dtype=torch.int32)
        with_ema[name] = tmp_path / f"{name}-ema.safetensors"
        save_file(tensors, with_ema[name], metadata=_metadata_of(tiny_models[name]))
    plan = plan_merge(_recipe(with_ema, "weighted_sum", {"alpha": 0.5}), source="t")
    out = export_merge(plan, tmp_path / "o.safetensors")
    plan.close()
    merged = load_file(out)
    assert not [key for key in merged if key.startswith("model_ema.")]
    assert "model.diffusion_model.out.2.weight" in merged


def _metadata_of(path: Path) -> dict[str, str]:
    with open_file_checkpoint(path) as checkpoint:
        return dict(checkpoint.metadata)


SPARSE_PARAMS = {
    "ties": {"density": {"default": 0.5, "IN04": 0.9}},
    "dare": {"density": {"default": 0.5, "IN04": 0.9}},
    "dare_ties": {"density": {"default": 0.5, "IN04": 0.9}},
    "della": {"density": {"default": 0.5, "IN04": 0.9}, "epsilon": {"default": 0.1, "OUT11": 0.3}},
}


@pytest.mark.parametrize("method", sorted(SPARSE_PARAMS))
def test_per_block_density_and_epsilon_change_only_their_blocks_and_engine_equals_export(
    method: str, tiny_models: dict, tmp_path: Path
) -> None:
    """Per-block parameters were exercised for alpha only (issue 15)."""
    from automerge.arch import ARCHITECTURES

    per_block = plan_merge(
        _recipe(tiny_models, method, SPARSE_PARAMS[method], dtype="fp32", seed=5), source="t"
    )
    uniform_params = {name: value["default"] for name, value in SPARSE_PARAMS[method].items()}
    uniform = plan_merge(_recipe(tiny_models, method, uniform_params, dtype="fp32", seed=5), source="t")
    engine = LiveEngine(per_block, EngineOptions(device="cpu", dtype=torch.float32))
    engine.apply(per_block.params)
    mine = load_file(export_merge(per_block, tmp_path / "p.safetensors"))
    plain = load_file(export_merge(uniform, tmp_path / "u.safetensors"))
    for key in engine.live_keys():
        assert torch.equal(engine.live_tensor(key), mine[key]), key
    arch = ARCHITECTURES.get("sd1")
    changed = {arch.block_of(key, mine[key].dtype) for key in mine if not torch.equal(mine[key], plain[key])}
    expected = {block for values in SPARSE_PARAMS[method].values() for block in values if block != "default"}
    assert changed == expected
    per_block.close()
    uniform.close()
