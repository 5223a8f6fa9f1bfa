"""Tiny, seeded diffusers / transformers modules of the real SD1 and SDXL architectures, and render jobs
for them, for render tests.

The text encoders keep the real 49,408-token vocabulary so the real CLIP tokenizer's ids fit; the VAE
keeps four levels (downscale factor 8) so latent shapes are the real ones (64 px → 8×8 latents).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from automerge.render.payload import RenderJob, job_key
from automerge.render.pipeline import PipelineModules

HIDDEN = 16
TIME_EMBED = 8


def _text_config(*, projection_dim: int = HIDDEN) -> CLIPTextConfig:
    return CLIPTextConfig(
        vocab_size=49408,
        hidden_size=HIDDEN,
        intermediate_size=32,
        num_hidden_layers=3,
        num_attention_heads=2,
        max_position_embeddings=77,
        projection_dim=projection_dim,
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=1,
    )


def _unet(*, cross_attention_dim: int, sdxl: bool) -> UNet2DConditionModel:
    extra = (
        {
            "addition_embed_type": "text_time",
            "addition_time_embed_dim": TIME_EMBED,
            "projection_class_embeddings_input_dim": HIDDEN + 6 * TIME_EMBED,  # pooled text + 6 time ids
            "transformer_layers_per_block": (1, 2),
        }
        if sdxl
        else {}
    )
    return UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(8, 16),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=2,
        norm_num_groups=4,
        **extra,
    )


def tiny_vae(**overrides: Any) -> AutoencoderKL:
    config: dict[str, Any] = {
        "in_channels": 3,
        "out_channels": 3,
        "latent_channels": 4,
        "block_out_channels": (8, 8, 8, 8),
        "down_block_types": ("DownEncoderBlock2D",) * 4,
        "up_block_types": ("UpDecoderBlock2D",) * 4,
        "layers_per_block": 1,
        "norm_num_groups": 4,
        "sample_size": 64,
    }
    return AutoencoderKL(**{**config, **overrides})


def tiny_sd1_modules(seed: int = 0, *, prediction_type: str = "epsilon") -> PipelineModules:
    """SD1-shaped modules with weights drawn from ``seed`` (the global RNG is left as it was)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return PipelineModules(
            family="sd1",
            unet=_unet(cross_attention_dim=HIDDEN, sdxl=False),
            text_encoder=CLIPTextModel(_text_config()),
            text_encoder_2=None,
            vae=tiny_vae(),
            prediction_type=prediction_type,
        )


def tiny_sdxl_modules(seed: int = 0) -> PipelineModules:
    """SDXL-shaped modules: two text encoders (the second with projection), a text_time UNet."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return PipelineModules(
            family="sdxl",
            unet=_unet(cross_attention_dim=2 * HIDDEN, sdxl=True),
            text_encoder=CLIPTextModel(_text_config()),
            text_encoder_2=CLIPTextModelWithProjection(_text_config()),
            vae=tiny_vae(),
        )


def job(item: int, seed: int, **changes: object) -> RenderJob:
    """A 64-px, 3-step render job for ``item`` at ``seed``; ``changes`` override its fields."""
    base = RenderJob(
        key=job_key(item, seed),
        item=item,
        seed=seed,
        prompt=["a lighthouse at dusk", "an old fisherman", "red apples"][item % 3],
        negative_prompt="blurry" if item % 2 else "",
        steps=3,
        cfg=5.0,
        width=64,
        height=64,
        scheduler="euler",
        clip_skip=1,
        weight=1.0,
    )
    return dataclasses.replace(base, **changes)  # type: ignore[arg-type]
