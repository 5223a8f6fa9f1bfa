"""The live engine's low-VRAM mode (``EngineOptions(offload=True)``): sources kept in (pinned) host
memory and streamed to the device block by block give exactly the weights of resident sources."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from automerge.merge import EngineOptions, LiveEngine, MergePlan, plan_merge, recipe_from_data, resolve_params

# One method per merge path of the engine: fused in-place op, element-wise on the flat block, per
# key (slerp: a norm per tensor), and task arithmetic from its kept ranks/draws (dare).
PATHS = {
    "weighted_sum": ("a", "b"),
    "add_difference": ("a", "b", "c"),
    "slerp": ("a", "b"),
    "dare": ("a", "b", "c"),
}


def _plan(models: dict[str, Path], method: str) -> MergePlan:
    data = {
        "models": {name: str(models[name]) for name in PATHS[method]},
        "method": method,
        "params": {"alpha": {"default": 0.4, "IN04": 0.8, "OUT11": 0.1}},
        "seed": 7,
        "dtype": "fp32",
    }
    return plan_merge(recipe_from_data(data, source="offload.yaml"), source="offload.yaml")


def _weights(engine: LiveEngine) -> dict[str, torch.Tensor]:
    return {key: engine.live_tensor(key).detach().cpu().clone() for key in engine.live_keys()}


def _apply_twice(engine: LiveEngine, plan: MergePlan) -> list[dict[str, torch.Tensor]]:
    """Every block, then a change of one block's alpha (only that block is re-merged)."""
    first = (engine.apply(plan.params), _weights(engine))
    changed = resolve_params(
        plan.method,
        {"alpha": {"default": 0.4, "IN04": 0.25, "OUT11": 0.1}},
        blocks=plan.arch.blocks,
        source="offload.yaml",
    )
    second = (engine.apply(changed), _weights(engine))
    assert second[0] == {"IN04"}
    return [first[1], second[1]]


@pytest.mark.parametrize(
    ("method", "dtype"),
    [*((method, torch.float32) for method in sorted(PATHS)), ("weighted_sum", torch.float16)],
    ids=[*(f"{method}-fp32" for method in sorted(PATHS)), "weighted_sum-fp16"],
)
def test_offload_gives_the_same_weights_as_resident_sources(
    method: str, dtype: torch.dtype, tiny_models: dict[str, Path]
) -> None:
    plan = _plan(tiny_models, method)
    try:
        resident = _apply_twice(LiveEngine(plan, EngineOptions(dtype=dtype)), plan)
        offloaded = _apply_twice(LiveEngine(plan, EngineOptions(dtype=dtype, offload=True)), plan)
    finally:
        plan.close()
    for step, (expected, got) in enumerate(zip(resident, offloaded, strict=True)):
        assert got.keys() == expected.keys()
        for key, tensor in expected.items():
            assert got[key].dtype == dtype
            assert torch.equal(got[key], tensor), f"apply {step}: {key}"


def test_offload_keeps_sources_in_host_memory_and_live_weights_on_the_device(
    tiny_models: dict[str, Path],
) -> None:
    plan = _plan(tiny_models, "weighted_sum")
    try:
        engine = LiveEngine(plan, EngineOptions(dtype=torch.float16, offload=True))
        engine.apply(plan.params)
        unet = engine.live_parameters()["unet"]
        live = engine.live_tensor("model.diffusion_model.input_blocks.0.0.weight")
        assert unet["conv_in.weight"].data_ptr() == live.data_ptr()
        assert all(p.dtype == torch.float16 for p in unet.values())
        blocks = engine._blocks.values()
        assert all(flat.device.type == "cpu" for b in blocks for flat in b.sources.values())
    finally:
        plan.close()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (runs on the GPU machine)")
def test_offload_on_cuda_streams_pinned_sources_to_the_same_weights(tiny_models: dict[str, Path]) -> None:
    plan = _plan(tiny_models, "weighted_sum")
    try:
        options = {"device": "cuda", "dtype": torch.float16}
        resident = _apply_twice(LiveEngine(plan, EngineOptions(**options)), plan)
        engine = LiveEngine(plan, EngineOptions(**options, offload=True))
        sources = [flat for block in engine._blocks.values() for flat in block.sources.values()]
        assert all(flat.device.type == "cpu" and flat.is_pinned() for flat in sources)
        assert all(block.out is not None and block.out.is_cuda for block in engine._blocks.values())
        offloaded = _apply_twice(engine, plan)
    finally:
        plan.close()
    for expected, got in zip(resident, offloaded, strict=True):
        for key, tensor in expected.items():
            assert torch.equal(got[key], tensor), key
