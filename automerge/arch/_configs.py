"""Configs of the live modules (diffusers UNet2DConditionModel / AutoencoderKL, transformers
CLIPTextModel) for the standard architectures, and their tiny counterparts of the same topology.

Each config is a plain mapping with ``_class`` naming the module class; nothing is fetched from a hub.
"""

from __future__ import annotations

from typing import Any

Config = dict[str, Any]


def unet_sd(*, tiny: bool, v2: bool) -> Config:
    """SD 1.x / 2.x UNet: 4 levels, cross-attention in the first three."""
    return {
        "_class": "UNet2DConditionModel",
        "sample_size": 8 if tiny else (96 if v2 else 64),
        "in_channels": 4,
        "out_channels": 4,
        "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
        "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
        "block_out_channels": [8, 16, 32, 32] if tiny else [320, 640, 1280, 1280],
        "layers_per_block": 2,
        "cross_attention_dim": (32 if tiny else 1024) if v2 else (32 if tiny else 768),
        "attention_head_dim": ([1, 2, 4, 4] if tiny else [5, 10, 20, 20]) if v2 else (2 if tiny else 8),
        "use_linear_projection": v2,
        "norm_num_groups": 4 if tiny else 32,
    }


def unet_sdxl(*, tiny: bool) -> Config:
    """SDXL base UNet: 3 levels, 1/2/10 transformer blocks, text_time additional embedding."""
    return {
        "_class": "UNet2DConditionModel",
        "sample_size": 8 if tiny else 128,
        "in_channels": 4,
        "out_channels": 4,
        "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
        "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
        "block_out_channels": [8, 16, 32] if tiny else [320, 640, 1280],
        "layers_per_block": 2,
        "transformer_layers_per_block": [1, 2, 10],
        "attention_head_dim": [1, 2, 4] if tiny else [5, 10, 20],
        "cross_attention_dim": 64 if tiny else 2048,
        "use_linear_projection": True,
        "addition_embed_type": "text_time",
        "addition_time_embed_dim": 8 if tiny else 256,
        "projection_class_embeddings_input_dim": (32 + 6 * 8) if tiny else 2816,
        "norm_num_groups": 4 if tiny else 32,
    }


def vae(*, tiny: bool, scaling_factor: float, sample_size: int) -> Config:
    """AutoencoderKL with 4 levels (8× down-scaling) and 4 latent channels."""
    return {
        "_class": "AutoencoderKL",
        "in_channels": 3,
        "out_channels": 3,
        "down_block_types": ["DownEncoderBlock2D"] * 4,
        "up_block_types": ["UpDecoderBlock2D"] * 4,
        "block_out_channels": [8, 16, 32, 32] if tiny else [128, 256, 512, 512],
        "layers_per_block": 2,
        "latent_channels": 4,
        "norm_num_groups": 4 if tiny else 32,
        "sample_size": 64 if tiny else sample_size,
        "scaling_factor": scaling_factor,
    }


def clip_text(*, tiny: bool, kind: str, projection: bool = False) -> Config:
    """CLIP text towers: ``kind`` is "L" (OpenAI ViT-L/14), "H" (OpenCLIP, SD2) or "bigG" (SDXL)."""
    real = {
        "L": (768, 3072, 12, 12, "quick_gelu", 768),
        "H": (1024, 4096, 23, 16, "gelu", 512),
        "bigG": (1280, 5120, 32, 20, "gelu", 1280),
    }[kind]
    hidden, intermediate, layers, heads, act, projection_dim = real
    if tiny:
        hidden, intermediate, heads, projection_dim = 32, 64, 4, 32
    return {
        "_class": "CLIPTextModelWithProjection" if projection else "CLIPTextModel",
        "vocab_size": 49408,
        "hidden_size": hidden,
        "intermediate_size": intermediate,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "max_position_embeddings": 77,
        "hidden_act": act,
        "projection_dim": projection_dim,
        "bos_token_id": 49406,
        "eos_token_id": 49407,
        "pad_token_id": 1,
    }
