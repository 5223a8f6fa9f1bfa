"""The streaming export of an N-model merge: sources read lazily, one model at a time, give exactly
what ``merge_tensor`` gives on the loaded tensors."""

from __future__ import annotations

import gc
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from automerge.errors import MergeError
from automerge.merge import export_merge, plan_merge, recipe_from_data
from automerge.merge.export import (
    HOLD_SHARE,
    READ_START_BYTES,
    SMALL_WRITES_IN_FLIGHT,
    WRITE_BYTES_IN_FLIGHT,
    WRITES_IN_FLIGHT,
    read_order,
    write_backlog_full,
)
from automerge.merge.methods import merge_tensor, noise_for
from automerge.merge.plan import MergePlan
from automerge.tiny import write_tiny


@pytest.fixture(scope="module")
def five_models(tiny_models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Base c and five fine-tunes of it: the session's a, b, d and two more."""
    folder = tmp_path_factory.mktemp("five")
    extra = {
        name: write_tiny("sd1", folder / f"{name}.safetensors", seed=seed, like=tiny_models["c"], delta=0.2)
        for seed, name in [(11, "e"), (12, "f")]
    }
    return {name: tiny_models[name] for name in "abdc"} | extra


def _plan(models: dict[str, Path], method: str, params: dict, *, seed: int) -> MergePlan:
    data = {
        "models": {k: str(v) for k, v in models.items()},
        "method": method,
        "params": params,
        "seed": seed,
    }
    return plan_merge(recipe_from_data(data, source="t.yaml"), source="t.yaml")


@pytest.mark.parametrize(
    ("method", "params"),
    [
        ("dare_ties", {"alpha": 0.9, "density": 0.5, "weight.d": 0.5}),  # random, weighted, two passes
        ("ties", {"alpha": 1.1, "density": 0.3, "weight.e": 1.5}),  # top-k cuts
        ("dare", {"alpha": 0.8, "density": 0.6}),  # the sum, no election
        ("average", {"weight.a": 2.0}),  # no base, element-wise: whole tensors when lazy
    ],
)
def test_export_of_five_models_equals_merge_tensor_on_the_loaded_sources(
    method: str, params: dict, five_models: dict[str, Path], tmp_path: Path
) -> None:
    plan = _plan(five_models, method, params, seed=5)
    if not plan.method.needs_base:  # c is a model like the others then
        assert len(plan.model_names) == 6
    else:
        assert len(plan.model_names) == 5
    exported = load_file(export_merge(plan, tmp_path / "out.safetensors"))
    checked = 0
    for key in list(plan.primary.checkpoint.keys())[::4]:  # a sample: the export merged them all
        block = plan.merged_block(key, plan.primary.checkpoint.info(key).dtype)
        if block is None or not plan.arch.is_exported(key):
            continue
        models = [plan.load(name, key) for name in plan.model_names]
        base = plan.load(plan.base_name, key) if plan.base_name else None
        expected = merge_tensor(
            plan.method,
            models,
            base,
            key=key,
            params=plan.params.for_block(block),
            noise=noise_for(key, plan.seed) if plan.method.random else None,
            weights=plan.params.model_weights(block, plan.model_names),
            compute_dtype=plan.compute_dtype,
        ).to(plan.dtype)
        assert torch.equal(exported[key], expected), key
        checked += 1
    plan.close()
    assert checked > 25


@pytest.mark.parametrize("method", ["average", "ties"])
def test_a_damaged_source_of_an_element_wise_n_model_export_is_named(
    method: str, five_models: dict[str, Path], tmp_path: Path
) -> None:
    """Element-wise methods check only their output (a NaN in any source reaches it), then look for
    the damaged source to name it, as the others do when they read each source; the fused kernel's
    TIES declines a non-finite delta and leaves the naming to the general path."""
    tensors = load_file(five_models["e"])
    key = next(k for k in tensors if k.startswith("model.diffusion_model.input_blocks.1"))
    tensors[key].view(-1)[2] = float("nan")
    damaged = tmp_path / "e_nan.safetensors"
    save_file(tensors, damaged)
    models = {k: str(v) for k, v in five_models.items()} | {"e": str(damaged)}
    data = {"models": models, "method": method}
    plan = plan_merge(recipe_from_data(data, source="t.yaml"), source="t.yaml")
    with pytest.raises(MergeError, match=rf"model e \(e_nan.safetensors\): tensor '{key}' has NaN/Inf"):
        export_merge(plan, tmp_path / "out.safetensors")
    plan.close()
    assert not (tmp_path / "out.safetensors").exists()


@pytest.mark.parametrize(
    ("method", "params", "names"),
    [
        ("average", {"weight.a": 2.0, "weight.e": 0.5}, "abdcef"),  # N models, lazy sources
        ("weighted_sum", {"alpha": {"default": 0.3, "IN04": 0.8}}, "ab"),  # the fused in-place op
        ("add_difference", {"alpha": 0.7}, "abc"),  # element-wise chunks
    ],
)
def test_small_keys_merged_in_runs_give_the_bytes_of_key_by_key(
    method: str, params: dict, names: str, five_models: dict[str, Path], tmp_path: Path, monkeypatch
) -> None:
    """An element-wise export merges runs of small keys as one flat tensor (``merge_run``): the file
    is byte for byte the one merged key by key."""
    from automerge.merge import export as export_module

    data = {"models": {k: str(five_models[k]) for k in names}, "method": method, "params": params}
    plan = plan_merge(recipe_from_data(data, source="t.yaml"), source="t.yaml")
    runs: list[int] = []
    real_run = export_module.merge_run

    def counted(plan_: object, keys: list[str], **options: object) -> object:
        merged = real_run(plan_, keys, **options)  # type: ignore[arg-type]
        runs.append(len(keys) if merged is not None else 0)
        return merged

    monkeypatch.setattr(export_module, "merge_run", counted)
    in_runs = export_merge(plan, tmp_path / "runs.safetensors").read_bytes()
    assert runs and all(count > 1 for count in runs)  # every run lay back to back in every source
    assert sum(runs) > len(plan.primary.checkpoint.keys()) // 2
    monkeypatch.setattr(export_module, "_runs_possible", lambda plan: False)
    assert in_runs == export_merge(plan, tmp_path / "keys.safetensors").read_bytes()
    plan.close()


@pytest.mark.parametrize(
    ("method", "params"),
    [
        ("ties", {"alpha": {"default": 0.9, "IN04": 1.3}, "density": 0.4, "weight.e": 1.5}),
        ("dare_ties", {"alpha": 0.8, "density": {"default": 0.6, "OUT02": 0.2}}),  # per-key draws
        ("model_stock", {"alpha": {"default": 1.0, "IN04": 0.6}}),  # per-key scales
    ],
)
def test_an_n_model_export_merges_each_run_of_small_keys_in_one_call(
    method: str, params: dict, five_models: dict[str, Path], tmp_path: Path, monkeypatch
) -> None:
    """TIES, DARE and Model Stock merge each run of small keys in one kernel call (``merge_run_into``):
    the file is byte for byte the one merged key by key."""
    from automerge.merge import export as export_module
    from automerge.merge._fused_cpu import fused_kernel

    if fused_kernel() is None:
        pytest.skip("no fused CPU kernel here")
    plan = _plan(five_models, method, params, seed=3)
    runs: list[int] = []
    real = export_module.merge_run_into

    def counted(out: torch.Tensor, *args: object, keys: list[str], **options: object) -> bool:
        merged = real(out, *args, keys=keys, **options)  # type: ignore[arg-type]
        runs.append(len(keys) if merged else 0)
        return merged

    monkeypatch.setattr(export_module, "merge_run_into", counted)
    in_runs = export_merge(plan, tmp_path / "runs.safetensors").read_bytes()
    assert runs and all(count > 1 for count in runs)
    assert sum(runs) > len(plan.primary.checkpoint.keys()) // 2
    monkeypatch.setattr(export_module, "_viewed_runs_possible", lambda plan, device: False)
    assert in_runs == export_merge(plan, tmp_path / "keys.safetensors").read_bytes()
    plan.close()


def test_the_export_runs_with_what_it_found_alive_out_of_the_collectors_passes(
    five_models: dict[str, Path], tmp_path: Path
):
    """Full collector passes over the imports and the opened sources paused the merge loop (``gc_scope``)."""
    frozen_during: list[int] = []
    plan = _plan(five_models, "ties", {"density": 0.5}, seed=0)
    export_merge(
        plan,
        tmp_path / "out.safetensors",
        progress=lambda *counts: frozen_during.append(gc.get_freeze_count()),
    )
    assert frozen_during and min(frozen_during) > 0
    assert gc.get_freeze_count() == 0


def test_the_merge_waits_for_the_writer_past_two_tensors_unless_they_are_few_and_small():
    assert not write_backlog_full(WRITES_IN_FLIGHT, 10 * WRITE_BYTES_IN_FLIGHT)  # two of any size
    assert write_backlog_full(WRITES_IN_FLIGHT + 1, WRITE_BYTES_IN_FLIGHT + 1)
    assert not write_backlog_full(SMALL_WRITES_IN_FLIGHT, WRITE_BYTES_IN_FLIGHT)  # a run's small keys
    assert write_backlog_full(SMALL_WRITES_IN_FLIGHT + 1, 1)


def test_read_order_holds_a_large_key_back_until_as_many_bytes_went_before_it() -> None:
    """``read_order``: keys within ``READ_START_BYTES``, the bytes already taken, or ``HOLD_SHARE`` of
    all go as given; a larger one waits (small keys after it do not) until keys of at least its bytes
    went before it; those held go in their order; what is still held goes at the end; every key
    exactly once."""
    start = READ_START_BYTES
    assert read_order([("a", 1), ("b", start), ("c", 5)]) == ["a", "b", "c"]
    sizes = [("p", 10), ("E1", 3 * start), ("s1", start), ("s2", start), ("E2", 3 * start), ("s3", start)]
    # E1 goes once p, s1, s2 and s3 (3·start + 10 bytes) went; E2 right after E1 (6·start + 10 ≥ 3·start)
    assert read_order(sizes) == ["p", "s1", "s2", "s3", "E1", "E2"]
    sizes = [("E1", 2 * start), ("E2", 2 * start), ("s1", start), ("s2", start), ("s3", 10)]
    assert read_order(sizes) == ["s1", "s2", "E1", "E2", "s3"]
    assert read_order([("E", 5 * start), ("s", start)]) == ["s", "E"]  # held to the end
    assert read_order([]) == []
    # a key of at most HOLD_SHARE of all the bytes keeps its place, however large
    small_share = [("p", 10), ("E", 3 * start), *((f"s{i}", start) for i in range(30))]
    assert 3 * start <= HOLD_SHARE * (33 * start + 10)
    assert read_order(small_share) == [key for key, _ in small_share]


def test_an_export_in_another_order_writes_the_same_bytes_in_that_order(
    five_models: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The export merges, reads and writes in ``read_order``'s order (here reversed: no run of small
    keys is back to back then, so each key alone): the file is byte for byte the one in A's order,
    for a random method too (its draws are per key, not per position)."""
    from automerge.checkpoints import ResumableSafetensorsWriter
    from automerge.merge import export as export_module

    plan = _plan(five_models, "dare_ties", {"alpha": 0.9, "density": 0.5}, seed=7)
    in_a_order = export_merge(plan, tmp_path / "a.safetensors").read_bytes()
    written: list[str] = []
    real_write = ResumableSafetensorsWriter.write

    def recording(writer: ResumableSafetensorsWriter, key: str, tensor: torch.Tensor) -> None:
        written.append(key)
        real_write(writer, key, tensor)

    monkeypatch.setattr(ResumableSafetensorsWriter, "write", recording)
    monkeypatch.setattr(export_module, "read_order", lambda sizes: [key for key, _ in sizes][::-1])
    assert export_merge(plan, tmp_path / "reversed.safetensors").read_bytes() == in_a_order
    assert written == list(export_module.output_infos(plan, dtype=plan.dtype))[::-1]
    plan.close()
