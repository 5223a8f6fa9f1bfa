"""Family detection on tiny checkpoints, the real reference key tables and diffusers folder configs."""

from __future__ import annotations

import pytest

from automerge.arch import detect_architecture, detect_folder_architecture, reference_keys
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


def test_unet_only_file_with_an_unknown_cross_attention_width_names_the_width() -> None:
    shapes = {k: s for k, s in _shapes("sd1").items() if k.startswith("model.diffusion_model.")}
    shapes["model.diffusion_model.input_blocks.2.1.transformer_blocks.0.attn2.to_k.weight"] = (320, 32)
    with pytest.raises(
        CheckpointError, match=r"x: .*cross-attention width 32: unknown SD variant.*sd1 768, sd2 1024"
    ):
        detect_architecture(shapes.keys(), shapes.__getitem__, source="x")


def test_sdxl_unet_only_file_is_an_unknown_variant() -> None:
    shapes = {k: s for k, s in _shapes("sdxl").items() if k.startswith("model.diffusion_model.")}
    with pytest.raises(CheckpointError, match="x: UNet without cross-attention at .*unknown SD variant"):
        detect_architecture(shapes.keys(), shapes.__getitem__, source="x")


def test_text_encoders_of_two_families_are_an_error_not_a_guess() -> None:
    shapes = _shapes("sd1") | {"cond_stage_model.model.ln_final.weight": (1024,)}
    with pytest.raises(CheckpointError, match=r"x: holds the text encoders of several families \(sd1, sd2\)"):
        detect_architecture(shapes.keys(), shapes.__getitem__, source="x")


# ---- diffusers folders: component sub-folders and their config.json ----------------------------

CLIP_L = {"model_type": "clip_text_model", "hidden_act": "quick_gelu", "hidden_size": 32}
OPEN_CLIP = {"model_type": "clip_text_model", "hidden_act": "gelu", "hidden_size": 32}
UNET = {"in_channels": 4, "cross_attention_dim": 32}


@pytest.mark.parametrize(
    ("configs", "family"),
    [
        ({"unet": UNET, "text_encoder": CLIP_L, "vae": {}}, "sd1"),
        ({"unet": UNET, "text_encoder": OPEN_CLIP, "vae": {}}, "sd2"),
        ({"unet": UNET, "text_encoder": OPEN_CLIP | {"hidden_size": 1024}}, "sd2"),
        ({"unet": UNET, "text_encoder": CLIP_L, "text_encoder_2": OPEN_CLIP, "vae": {}}, "sdxl"),
        ({"unet": UNET | {"cross_attention_dim": 1024}, "vae": {}}, "sd2"),
        ({"unet": UNET | {"cross_attention_dim": 768}}, "sd1"),
    ],
)
def test_diffusers_folder_is_told_by_its_folders_and_configs_at_any_width(configs: dict, family: str) -> None:
    assert detect_folder_architecture(configs, source="folder").name == family


@pytest.mark.parametrize(
    ("configs", "error", "message"),
    [
        ({"unet": UNET, "text_encoder_2": OPEN_CLIP}, UnsupportedModelError, "folder: SDXL refiner"),
        (
            {"unet": UNET | {"in_channels": 9}, "text_encoder": CLIP_L},
            UnsupportedModelError,
            "folder: inpainting",
        ),
        (
            {"unet": UNET | {"in_channels": 8}, "text_encoder": CLIP_L},
            UnsupportedModelError,
            "instruct-pix2pix",
        ),
        ({"unet": UNET, "vae": {}}, CheckpointError, "cross-attention width 32: unknown SD variant"),
        ({"unet": {"in_channels": 4}}, CheckpointError, "no cross_attention_dim and no text encoder"),
    ],
)
def test_diffusers_folder_of_an_unsupported_or_unknown_kind_is_named(
    configs: dict, error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=message):
        detect_folder_architecture(configs, source="folder")


@pytest.mark.parametrize(
    ("key", "shape"),
    [
        ("model.diffusion_model.input_blocks.0.0.weight", (320,)),
        ("model.diffusion_model.input_blocks.0.0.weight", ()),
        ("model.diffusion_model.input_blocks.2.1.transformer_blocks.0.attn2.to_k.weight", ()),
    ],
)
def test_a_detection_key_of_the_wrong_rank_is_a_one_line_error(key: str, shape: tuple[int, ...]) -> None:
    """`automerge inspect` died with an IndexError on a file whose input_blocks.0.0.weight was not 4-D."""
    shapes = {k: s for k, s in _shapes("sd1").items() if k.startswith("model.diffusion_model.")}
    shapes[key] = shape
    with pytest.raises(CheckpointError, match=rf"m.safetensors: tensor '{key}' has shape \[.*\]; a SD"):
        detect_architecture(shapes.keys(), shapes.__getitem__, source="m.safetensors")
