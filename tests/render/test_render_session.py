"""``RenderSession``: the one chain plan → live engine → modules → pipeline → renderer, and
``RenderConfig``, the one owner of each render setting's default and check."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from pydantic import ValidationError
from tiny_modules import job

from automerge.errors import ConfigError
from automerge.merge import plan_checkpoint, plan_merge, recipe_from_data, resolve_params
from automerge.render import RenderConfig, RenderSession

JOB = job(0, 1, steps=2, cfg=1.0)
CPU = RenderConfig(device="cpu")


def test_the_pipeline_modules_are_views_of_the_engine_weights(tiny_models: dict[str, Path]) -> None:
    data = {"models": {"a": str(tiny_models["a"]), "b": str(tiny_models["b"])}, "method": "weighted_sum"}
    plan = plan_merge(recipe_from_data(data, source="t"), source="t")
    try:
        session = RenderSession(plan, CPU)
        session.apply(resolve_params(plan.method, {"alpha": 0.25}, blocks=plan.arch.blocks, source="t"))
        live = session.engine.live_tensor("model.diffusion_model.input_blocks.0.0.weight")
        assert session.pipeline.unet.conv_in.weight.data_ptr() == live.data_ptr()
        encoder = session.pipeline.text_encoder
        key = "cond_stage_model.transformer.text_model.final_layer_norm.weight"
        assert getattr(encoder, "text_model", encoder).final_layer_norm.weight.data_ptr() == (
            session.engine.live_tensor(key).data_ptr()
        )
        before = session.render([JOB])[0].image
        assert session.apply(resolve_params(plan.method, {"alpha": 0.9}, blocks=plan.arch.blocks, source="t"))
        after = session.render([JOB])[0].image
        assert before.tobytes() != after.tobytes()  # the next render sees the new weights
    finally:
        plan.close()


def test_a_checkpoint_renders_as_itself_and_twice_the_same(tiny_models: dict[str, Path]) -> None:
    plan = plan_checkpoint(tiny_models["a"])
    try:
        assert plan.params.for_block("IN04") == {"alpha": 0.0}
        session = RenderSession(plan, CPU)
        session.apply()
        first, second = session.render([JOB, JOB])
        assert first.image.tobytes() == second.image.tobytes()
        blocks = session.engine._blocks.values()
        assert all(block.sources["a"].data_ptr() == block.sources["b"].data_ptr() for block in blocks)
    finally:
        plan.close()


@pytest.mark.parametrize("batch_size", [0, -1, 65])
def test_batch_size_has_one_range(batch_size: int) -> None:
    with pytest.raises(ValidationError, match="batch_size"):
        RenderConfig(batch_size=batch_size)


def test_dtypes_resolve_by_device() -> None:
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert RenderConfig().torch_dtype(cpu) == torch.float32
    assert RenderConfig().torch_dtype(cuda) == torch.float16
    assert RenderConfig(dtype="bf16").torch_dtype(cpu) == torch.bfloat16
    assert RenderConfig(source_dtype="fp16").storage_dtype(cpu) == torch.float16
    assert RenderConfig(dtype="bf16").storage_dtype(cpu) == torch.bfloat16  # "same" as the live weights


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown without a GPU")
def test_a_cuda_device_without_a_gpu_is_one_clear_error() -> None:
    with pytest.raises(ConfigError, match="render.device is 'cuda' but no CUDA GPU is available"):
        RenderConfig(device="cuda").torch_device()
    assert RenderConfig().torch_device() == torch.device("cpu")


def test_a_device_that_is_not_one_is_named() -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="'gpu0' is not a device; use auto, cpu, cuda or cuda:N"):
        RenderConfig(device="gpu0")
