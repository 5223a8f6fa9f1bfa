"""The live engine's fast task-arithmetic merge (``merge/_sparse_live.py``): bit for bit what the export
writes, for ties, dare, dare_ties and della, over a sequence of parameter changes (density, α alone,
per-block maps, per-model weights), resident and offloaded; and what it hands back to the key-by-key
path (a sign election it cannot prove exact, ``task_statistics=False``)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from automerge.errors import MergeError
from automerge.merge import (
    BlockParams,
    EngineOptions,
    LiveEngine,
    MergePlan,
    export_merge,
    plan_merge,
    recipe_from_data,
)
from automerge.merge._fused_cpu import fused_kernel
from automerge.merge.engine import statistics_fit
from automerge.merge.export import merge_key

START = {
    "alpha": {"default": 0.7, "IN00": 1.3, "OUT11": 0.2},
    "density": {"default": 0.45, "IN04": 0.9, "BASE": 0.3},
}
STEPS: list[dict[str, dict[str, float]]] = [
    {"density": {"IN04": 0.2, "OUT05": 0.75}},  # a study's trial: densities change
    {"alpha": {"IN04": 0.55, "M00": 1.4}},  # α alone: the merged delta is held from now on
    {"alpha": {"IN04": 0.8, "M00": 0.1}},  # α alone again: C + α·(held merged delta)
    {"density": {"IN04": 0.6}, "alpha": {"M00": 0.3}},  # IN04's held delta is dropped, M00's used
]


def _plan(
    models: Mapping[str, Path], method: str, params: Mapping[str, object], **extra: object
) -> MergePlan:
    names = extra.pop("names", "abc")
    data = {
        "models": {
            name: models[name] if isinstance(models[name], dict) else str(models[name]) for name in names
        },
        "method": method,
        "params": dict(params),
        "seed": 5,
        "dtype": "fp32",
        **extra,
    }
    return plan_merge(recipe_from_data(data, source="sparse.yaml"), source="sparse.yaml")


def _start(method: str) -> dict[str, object]:
    return {**START, "epsilon": {"default": 0.2, "OUT05": 0.05}} if method == "della" else dict(START)


def _assert_equals_export(
    engines: list[LiveEngine],
    plan: MergePlan,
    params: BlockParams,
    tmp_path: Path,
    *,
    blocks: set[str] | None = None,
) -> None:
    """Every live key equals the exported file's; with ``blocks``, only those blocks' keys are checked,
    each merged as the export merges it (``merge_key``), the others being unchanged since."""
    plan = plan.with_params(params)
    if blocks is None:
        expected = load_file(export_merge(plan, tmp_path / "o.safetensors", dtype=plan.dtype))
    else:
        checkpoint = plan.primary.checkpoint
        in_blocks = {
            key: plan.merged_block(key, checkpoint.info(key).dtype) for key in engines[0].live_keys()
        }
        expected = {
            key: merge_key(plan, key, block=block, dtype=plan.dtype)
            for key, block in in_blocks.items()
            if block in blocks
        }
        assert expected
    for engine in engines:
        for key in engine.live_keys() if blocks is None else expected:
            assert torch.equal(engine.live_tensor(key).cpu(), expected[key]), key


def _held(engine: LiveEngine) -> int:
    assert engine._task is not None
    return engine._task.held_bytes()


@pytest.mark.parametrize("method", ["ties", "della"])  # dare's draws: the density-ends test
def test_live_merge_equals_the_export_through_density_and_alpha_changes_resident_and_offloaded(
    method: str, tiny_models: dict[str, Path], tmp_path: Path
) -> None:
    plan = _plan(tiny_models, method, _start(method))
    engines = [LiveEngine(plan), LiveEngine(plan, EngineOptions(offload=True))]
    params = plan.params
    for engine in engines:
        engine.apply(params)
    _assert_equals_export(engines, plan, params, tmp_path)
    held = [_held(engines[0])]
    for step in STEPS:
        params = params.with_values(step)
        changed = {block for values in step.values() for block in values}
        for engine in engines:
            assert engine.apply(params) == changed
        _assert_equals_export(engines, plan, params, tmp_path, blocks=changed)
        held.append(_held(engines[0]))
    assert held[0] == held[1]  # density changes hold no merged delta
    assert held[2] > held[1] and held[3] == held[2] and held[4] < held[3]
    plan.close()


@pytest.mark.parametrize("method", ["ties"])
def test_fp16_live_weights_in_chunks_smaller_than_keys_equal_the_fp16_export(
    method: str, tiny_models: dict[str, Path], tmp_path: Path
) -> None:
    """Chunks of 1000 elements: keys span chunks and chunks span keys (each with its own k)."""
    plan = _plan(tiny_models, method, _start(method), dtype="fp16")
    engine = LiveEngine(plan, EngineOptions(dtype=torch.float16, chunk_numel=1000))
    engine.apply(plan.params)
    _assert_equals_export([engine], plan, plan.params, tmp_path)
    plan.close()


@pytest.mark.parametrize("method", ["ties"])
def test_three_models_with_per_model_weights_equal_the_export(
    method: str, tiny_models: dict[str, Path], tmp_path: Path
) -> None:
    weights = {"weight.a": 0.5, "weight.b": {"default": 1.5, "IN04": 0.0}, "weight.d": 2.0}
    plan = _plan(tiny_models, method, {**START, **weights}, names="abdc")
    engine = LiveEngine(plan)
    engine.apply(plan.params)
    _assert_equals_export([engine], plan, plan.params, tmp_path)
    params = plan.params.with_values({"weight.b": {"IN04": 0.75}, "density": {"OUT05": 0.1}})
    assert engine.apply(params) == {"IN04", "OUT05"}
    _assert_equals_export([engine], plan, params, tmp_path, blocks={"IN04", "OUT05"})
    plan.close()


@pytest.mark.parametrize(("method", "density"), [("ties", 0.0), ("ties", 1.0), ("dare", 1.0)])
def test_density_at_its_ends_equals_the_export(
    method: str, density: float, tiny_models: dict[str, Path], tmp_path: Path
) -> None:
    plan = _plan(tiny_models, method, {"alpha": 0.6, "density": density})
    engine = LiveEngine(plan)
    engine.apply(plan.params)
    _assert_equals_export([engine], plan, plan.params, tmp_path)
    plan.close()


@pytest.mark.parametrize("method", ["della"])
def test_fp64_compute_equals_the_export(method: str, tiny_models: dict[str, Path], tmp_path: Path) -> None:
    """Masks as 64-bit integers, and DELLA's draws compared with p in float64."""
    plan = _plan(tiny_models, method, _start(method), compute_dtype="fp64")
    engine = LiveEngine(plan)
    engine.apply(plan.params)
    _assert_equals_export([engine], plan, plan.params, tmp_path)
    plan.close()


def test_an_election_it_cannot_prove_exact_is_merged_key_by_key(
    tiny_models: dict[str, Path], tmp_path: Path
) -> None:
    """A weight below the smallest normal float could make the agreeing weight W subnormal: IN04's
    fast sign election is not used, and the block still equals the export (through the method)."""
    plan = _plan(tiny_models, "ties", {**START, "weight.a": {"default": 1.0, "IN04": 1e-40}})
    engine = LiveEngine(plan)
    engine.apply(plan.params)
    _assert_equals_export([engine], plan, plan.params, tmp_path)
    assert engine._task is not None and "IN04" not in engine._task._blocks and "IN05" in engine._task._blocks
    plan.close()


def test_without_task_statistics_it_merges_key_by_key_to_the_same_bits(tiny_models: dict[str, Path]) -> None:
    plan = _plan(tiny_models, "ties", START)
    fast, slow = LiveEngine(plan), LiveEngine(plan, EngineOptions(task_statistics=False))
    fast.apply(plan.params)
    slow.apply(plan.params)
    assert slow._task is None
    for key in fast.live_keys():
        assert torch.equal(fast.live_tensor(key), slow.live_tensor(key)), key
    plan.close()


def test_a_non_finite_result_names_the_key_as_the_export_does(
    tiny_models: dict[str, Path], tmp_path: Path
) -> None:
    """dare at density 0.25 and α 2 turns a Δ of 30000 into 240000: past fp16 in the live weights."""
    tensors = load_file(tiny_models["b"])
    key = next(
        k for k in tensors if k.startswith("model.diffusion_model.input_blocks.4") and k.endswith("weight")
    )
    tensors[key].view(-1)[:64] = 30000.0
    save_file(tensors, tmp_path / "loud.safetensors")
    models = {**tiny_models, "b": tmp_path / "loud.safetensors"}
    plan = _plan(models, "dare", {"alpha": 2.0, "density": 0.25}, dtype="fp16")
    with pytest.raises(MergeError, match=f"tensor '{key}'") as exported:
        export_merge(plan, tmp_path / "o.safetensors")
    engine = LiveEngine(plan, EngineOptions(dtype=torch.float16))
    with pytest.raises(MergeError) as live:
        engine.apply(plan.params)
    assert str(live.value) == str(exported.value)
    plan.close()


@pytest.mark.parametrize("method", ["ties", "della"])
def test_the_sizes_dry_run_counts_are_what_the_engine_holds(
    method: str, tiny_models: dict[str, Path]
) -> None:
    """Ranks / draws for every merged block (the VAE is not merged here), then merged deltas for the
    blocks whose α alone changed."""
    from automerge.merge.engine import task_statistics_bytes

    plan = _plan(tiny_models, method, _start(method))
    engine = LiveEngine(plan)
    engine.apply(plan.params)
    ranks, _ = task_statistics_bytes(plan)
    assert ranks > 0 and _held(engine) == ranks
    engine.apply(plan.params.with_values({"alpha": {"IN04": 0.1, "OUT05": 1.9}}))
    _, merged = task_statistics_bytes(plan, alpha_only_blocks={"IN04", "OUT05"})
    assert merged > 0 and _held(engine) == ranks + merged
    plan.close()


def test_a_live_lora_strength_change_remakes_the_ranks_of_the_blocks_it_adapts(
    tiny_models: dict[str, Path], style_lora: Path, tmp_path: Path
) -> None:
    """Model a's ranks depend on its LoRA's strength: stale ranks would keep other elements."""
    a = {"checkpoint": str(tiny_models["a"]), "loras": [{"path": str(style_lora), "strength": 1.0}]}
    plan = _plan({**tiny_models, "a": a}, "ties", START)
    engine = LiveEngine(plan, EngineOptions(live_loras=frozenset({"style"})))
    engine.apply(plan.params)
    params = plan.params.with_values({"alpha": {"IN04": 0.4}}, lora_strengths={"style": -0.6})
    engine.apply(params)
    _assert_equals_export([engine], plan, params, tmp_path)
    plan.close()


@pytest.mark.parametrize(
    ("needed", "free", "fits"), [(4, 8, True), (5, 8, False), (0, 0, True), (1, 1, False)]
)
def test_statistics_go_on_a_gpu_only_within_half_of_its_free_memory(
    needed: int, free: int, fits: bool
) -> None:
    """On a GPU the ranks/draws (4–8 bytes per element per model: 21 GB for an SDXL TIES of two
    models) must leave room for the renders; otherwise the engine merges key by key, and says so."""
    assert statistics_fit(needed, free) is fits


@pytest.mark.parametrize("method", ["ties", "dare_ties"])
def test_the_engine_with_the_kernel_equals_the_export(
    method: str, tiny_models: dict[str, Path], tmp_path: Path
) -> None:
    plan = _plan(tiny_models, method, _start(method), dtype="fp16")
    engine = LiveEngine(plan, EngineOptions(dtype=torch.float16))
    assert engine._task is not None
    if fused_kernel() is not None:  # the one-pass CPU kernel (``test_fused_cpu``), else torch's passes
        assert engine._task.fused is not None
    engine.apply(plan.params)
    expected = export_merge(plan, tmp_path / "o.safetensors", dtype=plan.dtype)
    written = load_file(expected)
    for key in engine.live_keys():
        assert torch.equal(engine.live_tensor(key), written[key]), key
    plan.close()
