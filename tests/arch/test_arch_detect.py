"""Family detection on tiny checkpoints and on the real reference key tables."""

from __future__ import annotations

import pytest

from automerge.arch import detect_architecture, reference_keys
from automerge.errors import CheckpointError, UnsupportedModelError


def _shapes(family: str) -> dict[str, tuple[int, ...]]:
    return {ref.key: ref.shape for ref in reference_keys(family)}


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_reference_tables_are_detected(family: str) -> None:
    shapes = _shapes(family)
    assert detect_architecture(shapes.keys(), shapes.__getitem__, source="ref").name == family


def test_sd2_is_told_from_sd1_by_its_text_encoder() -> None:
    keys = {ref.key for ref in reference_keys("sd2")}
    shapes = {k: (320, 4, 3, 3) for k in keys}
    assert detect_architecture(keys, shapes.__getitem__, source="x").name == "sd2"


def test_unet_only_file_falls_back_to_cross_attention_width() -> None:
    shapes = {k: s for k, s in _shapes("sd1").items() if k.startswith("model.diffusion_model.")}
    key = "model.diffusion_model.input_blocks.2.1.transformer_blocks.0.attn2.to_k.weight"
    shapes[key] = (320, 1024)
    assert detect_architecture(shapes.keys(), shapes.__getitem__, source="x").name == "sd2"


@pytest.mark.parametrize(
    ("extra_key", "name"),
    [
        ("model.diffusion_model.joint_blocks.0.context_block.adaLN_modulation.1.bias", "Stable Diffusion 3"),
        ("double_blocks.0.img_attn.norm.key_norm.scale", "Flux"),
        ("conditioner.embedders.0.model.transformer.resblocks.9.mlp.c_proj.bias", "SDXL refiner"),
    ],
)
def test_unsupported_families_are_named(extra_key: str, name: str) -> None:
    shapes = _shapes("sd1") | {extra_key: (4,)}
    with pytest.raises(UnsupportedModelError, match=name):
        detect_architecture(shapes.keys(), shapes.__getitem__, source="model.safetensors")


@pytest.mark.parametrize(("channels", "kind"), [(9, "inpainting"), (8, "instruct-pix2pix")])
def test_inpainting_and_pix2pix_are_named(channels: int, kind: str) -> None:
    shapes = _shapes("sd1") | {"model.diffusion_model.input_blocks.0.0.weight": (320, channels, 3, 3)}
    with pytest.raises(UnsupportedModelError, match=kind):
        detect_architecture(shapes.keys(), shapes.__getitem__, source="model.safetensors")


def test_a_file_without_a_unet_is_not_a_stable_diffusion_checkpoint() -> None:
    with pytest.raises(CheckpointError, match="lora.safetensors: not a Stable Diffusion checkpoint"):
        detect_architecture({"lora_unet_down.weight"}, lambda k: (1,), source="lora.safetensors")
