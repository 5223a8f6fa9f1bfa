"""Every key of the real reference tables gets exactly one MBW block or is declared unmerged."""

from __future__ import annotations

import pytest
import torch

from automerge.arch import ARCHITECTURES, VAE_BLOCK, reference_keys

UNMERGED_COMPONENTS = {"scheduler", "ema"}


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_every_reference_key_has_one_block_or_is_declared_unmerged(family: str) -> None:
    arch = ARCHITECTURES.get(family)
    for ref in reference_keys(family):
        block = arch.block_of(ref.key, getattr(torch, ref.dtype))
        if block is None:
            declared = (
                ref.component in UNMERGED_COMPONENTS
                or ref.key.endswith("position_ids")
                or ref.dtype != "float32"
                or arch.component_of(ref.key) is None  # markers such as v_pred, edm_vpred.*
            )
            assert declared, f"{ref.key} has no block and is not a declared unmerged tensor"
        else:
            assert block in arch.blocks


@pytest.mark.parametrize(
    ("family", "count", "last_out"), [("sd1", 26, "OUT11"), ("sd2", 26, "OUT11"), ("sdxl", 20, "OUT08")]
)
def test_block_names_follow_supermerger(family: str, count: int, last_out: str) -> None:
    arch = ARCHITECTURES.get(family)
    assert len(arch.merge_blocks) == count
    assert arch.blocks[-1] == VAE_BLOCK
    assert arch.block_of("model.diffusion_model.out.2.weight", torch.float32) == last_out
    assert arch.block_of("model.diffusion_model.time_embed.0.weight", torch.float32) == "IN00"
    assert arch.block_of("model.diffusion_model.middle_block.1.norm.weight", torch.float32) == "M00"
    assert arch.block_of("first_stage_model.decoder.conv_in.weight", torch.float32) == VAE_BLOCK


def test_sdxl_label_embedding_and_both_text_encoders() -> None:
    arch = ARCHITECTURES.get("sdxl")
    assert arch.block_of("model.diffusion_model.label_emb.0.0.weight", torch.float32) == "IN00"
    assert (
        arch.block_of("conditioner.embedders.1.model.transformer.resblocks.0.ln_1.weight", torch.float32)
        == "BASE"
    )
    assert (
        arch.block_of("conditioner.embedders.0.transformer.text_model.final_layer_norm.weight", torch.float32)
        == "BASE"
    )


def test_unmerged_tensors_and_ema() -> None:
    arch = ARCHITECTURES.get("sd1")
    assert (
        arch.block_of("cond_stage_model.transformer.text_model.embeddings.position_ids", torch.float32)
        is None
    )
    assert arch.block_of("alphas_cumprod", torch.float32) is None
    assert arch.block_of("model_ema.decay", torch.float32) is None
    assert arch.block_of("model.diffusion_model.input_blocks.1.0.in_layers.0.weight", torch.int64) is None
    assert not arch.is_exported("model_ema.diffusion_modelinput_blocks00weight")


def test_legacy_clip_key_names_map_like_current_ones() -> None:
    arch = ARCHITECTURES.get("sd1")
    legacy = "cond_stage_model.transformer.encoder.layers.0.mlp.fc1.weight"
    assert arch.block_of(legacy, torch.float32) == "BASE"
    assert arch.targets(legacy)[0].name == "text_model.encoder.layers.0.mlp.fc1.weight"
