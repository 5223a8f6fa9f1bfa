"""Family detection from tensor keys and shapes, as diffusers' ``infer_diffusers_model_type`` does.

Recognised but unsupported families (SDXL refiner, SD3, Flux, inpainting / instruct-pix2pix) are named
in an ``UnsupportedModelError``; anything else unknown is a ``CheckpointError``.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from dataclasses import dataclass

from automerge.arch._base import ARCHITECTURES, Architecture
from automerge.errors import CheckpointError, UnsupportedModelError

ShapeOf = Callable[[str], tuple[int, ...]]

_SD_ATTN2_TO_K = "model.diffusion_model.input_blocks.2.1.transformer_blocks.0.attn2.to_k.weight"
_SD_CONV_IN = "model.diffusion_model.input_blocks.0.0.weight"
_SDXL_OPEN_CLIP = "conditioner.embedders.1.model.transformer.resblocks.9.mlp.c_proj.bias"
_REFINER_OPEN_CLIP = "conditioner.embedders.0.model.transformer.resblocks.9.mlp.c_proj.bias"


@dataclass(frozen=True)
class _Unsupported:
    marker: str
    name: str


_UNSUPPORTED = (
    _Unsupported("joint_blocks.0.context_block.adaLN_modulation.1.bias", "Stable Diffusion 3 / 3.5"),
    _Unsupported("double_blocks.0.img_attn.norm.key_norm.scale", "Flux"),
    _Unsupported(_REFINER_OPEN_CLIP, "SDXL refiner"),
)


def detect_architecture(keys: Collection[str], shape_of: ShapeOf, *, source: str) -> Architecture:
    """The family of an original-layout checkpoint; ``source`` names it in errors."""
    for family in _UNSUPPORTED:
        if any(key.endswith(family.marker) for key in keys):
            raise UnsupportedModelError(f"{source}: {family.name} checkpoints are not supported yet")
    if _SD_CONV_IN not in keys:
        raise CheckpointError(
            f"{source}: not a Stable Diffusion checkpoint in the original (A1111/LDM) layout: "
            f"no '{_SD_CONV_IN}' among its {len(keys)} tensors"
        )
    in_channels = shape_of(_SD_CONV_IN)[1]
    if in_channels != 4:
        kind = {9: "inpainting", 8: "instruct-pix2pix"}.get(in_channels, f"{in_channels}-channel")
        raise UnsupportedModelError(
            f"{source}: {kind} checkpoints (UNet input with {in_channels} channels) are not supported yet"
        )
    if _SDXL_OPEN_CLIP in keys:
        return ARCHITECTURES.get("sdxl")
    # The text encoder tells SD1 (CLIP-L) from SD2 (OpenCLIP-H) at any width; a file without one
    # falls back to diffusers' test on the cross-attention width (768 vs 1024).
    if any(k.startswith("cond_stage_model.model.") for k in keys):
        return ARCHITECTURES.get("sd2")
    if any(k.startswith("cond_stage_model.transformer.") for k in keys):
        return ARCHITECTURES.get("sd1")
    if _SD_ATTN2_TO_K in keys:
        return ARCHITECTURES.get("sd2" if shape_of(_SD_ATTN2_TO_K)[-1] == 1024 else "sd1")
    raise CheckpointError(f"{source}: UNet without cross-attention at input_blocks.2: unknown SD variant")
