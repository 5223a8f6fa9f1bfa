"""The supported families (SD 1.x, SD 2.x, SDXL base), registered in ``ARCHITECTURES``.

Each is data: its blocks, its components (key prefix → live module, key rule, block rule) and the
configs of its real-size live modules. Adding a family adds an entry here and its rules.
"""

from __future__ import annotations

from automerge.arch import _configs as configs
from automerge.arch._base import ARCHITECTURES, VAE_BLOCK, Architecture, Component
from automerge.arch._rules import (
    clip_targets,
    fixed_block,
    open_clip_targets,
    unet_block_rule,
    unet_targets,
    vae_targets,
)

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."


def mbw_blocks(levels_in: int, levels_out: int) -> tuple[str, ...]:
    """BASE, IN00.., M00, OUT00.., VAE in supermerger's order."""
    return (
        ("BASE",)
        + tuple(f"IN{i:02d}" for i in range(levels_in))
        + ("M00",)
        + tuple(f"OUT{i:02d}" for i in range(levels_out))
        + (VAE_BLOCK,)
    )


def _unet(blocks: int) -> Component:
    return Component("unet", UNET_PREFIX, unet_targets, unet_block_rule(blocks, blocks))


def _vae() -> Component:
    return Component("vae", VAE_PREFIX, vae_targets(up_levels=4), fixed_block(VAE_BLOCK))


SD1 = ARCHITECTURES.register(
    "sd1",
    Architecture(
        name="sd1",
        title="Stable Diffusion 1.x",
        modelspec_architecture="stable-diffusion-v1",
        blocks=mbw_blocks(12, 12),
        components=(
            _unet(12),
            Component(
                "text_encoder",
                "cond_stage_model.transformer.",
                clip_targets("text_encoder"),
                fixed_block("BASE"),
            ),
            _vae(),
        ),
        configs={
            "unet": configs.unet_sd(tiny=False, v2=False),
            "text_encoder": configs.clip_text(tiny=False, kind="L"),
            "vae": configs.vae(tiny=False, scaling_factor=0.18215, sample_size=512),
        },
        # transformers < 4.2 wrote the CLIP text model without its `text_model.` level
        aliases=(
            (
                "cond_stage_model.transformer.embeddings.",
                "cond_stage_model.transformer.text_model.embeddings.",
            ),
            ("cond_stage_model.transformer.encoder.", "cond_stage_model.transformer.text_model.encoder."),
            (
                "cond_stage_model.transformer.final_layer_norm.",
                "cond_stage_model.transformer.text_model.final_layer_norm.",
            ),
        ),
    ),
)

SD2 = ARCHITECTURES.register(
    "sd2",
    Architecture(
        name="sd2",
        title="Stable Diffusion 2.x",
        modelspec_architecture="stable-diffusion-v2-768-v",
        blocks=mbw_blocks(12, 12),
        components=(
            _unet(12),
            Component(
                "text_encoder",
                "cond_stage_model.model.",
                open_clip_targets("text_encoder", live_layers=23),
                fixed_block("BASE"),
            ),
            _vae(),
        ),
        configs={
            "unet": configs.unet_sd(tiny=False, v2=True),
            "text_encoder": configs.clip_text(tiny=False, kind="H"),
            "vae": configs.vae(tiny=False, scaling_factor=0.18215, sample_size=768),
        },
        prediction_type="v_prediction",  # 768-px SD2 models are v-prediction by convention
    ),
)

SDXL = ARCHITECTURES.register(
    "sdxl",
    Architecture(
        name="sdxl",
        title="Stable Diffusion XL base",
        modelspec_architecture="stable-diffusion-xl-v1-base",
        blocks=mbw_blocks(9, 9),
        components=(
            _unet(9),
            Component(
                "text_encoder",
                "conditioner.embedders.0.transformer.",
                clip_targets("text_encoder"),
                fixed_block("BASE"),
            ),
            Component(
                "text_encoder_2",
                "conditioner.embedders.1.model.",
                open_clip_targets("text_encoder_2", live_layers=32),
                fixed_block("BASE"),
            ),
            _vae(),
        ),
        configs={
            "unet": configs.unet_sdxl(tiny=False),
            "text_encoder": configs.clip_text(tiny=False, kind="L"),
            "text_encoder_2": configs.clip_text(tiny=False, kind="bigG", projection=True),
            "vae": configs.vae(tiny=False, scaling_factor=0.13025, sample_size=1024),
        },
    ),
)


def tiny_configs(arch: Architecture) -> dict[str, configs.Config]:
    """Configs of the same topology as ``arch`` at tiny widths (for ``automerge tiny``)."""
    vae = configs.vae(tiny=True, scaling_factor=arch.configs["vae"]["scaling_factor"], sample_size=64)
    if arch.name == "sdxl":
        return {
            "unet": configs.unet_sdxl(tiny=True),
            "text_encoder": configs.clip_text(tiny=True, kind="L"),
            "text_encoder_2": configs.clip_text(tiny=True, kind="bigG", projection=True),
            "vae": vae,
        }
    v2 = arch.name == "sd2"
    return {
        "unet": configs.unet_sd(tiny=True, v2=v2),
        "text_encoder": configs.clip_text(tiny=True, kind="H" if v2 else "L"),
        "vae": vae,
    }
