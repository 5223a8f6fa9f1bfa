"""A LoRA that does not fit is one line naming the file, the first key or layer that does not fit, and
the fix: unknown names, another family's LoRA (named), shapes that do not fit, adapter types not
supported yet, non-safetensors files, incomplete or ambiguous files."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from automerge.arch import ARCHITECTURES
from automerge.checkpoints import open_safetensors
from automerge.errors import ConfigError
from automerge.lora import read_lora

TO_K = (
    "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"  # SD1 [320, 768], SD2 [320, 1024]
)


def shapes_of(path: Path) -> dict[str, tuple[int, ...]]:
    with open_safetensors(path) as checkpoint:
        return {key: checkpoint.info(key).shape for key in checkpoint.keys()}


def lora_error(
    tmp_path: Path, tensors: dict[str, torch.Tensor], family: str = "sd1", **options: object
) -> str:
    path = tmp_path / "style.safetensors"
    save_file(tensors, path)
    with pytest.raises(ConfigError) as caught:
        read_lora(path, ARCHITECTURES.get(family), **options)  # type: ignore[arg-type]
    message = str(caught.value)
    assert "\n" not in message and str(path) in message
    return message


def pair(name: str, out: int, inp: int, *, up: str = ".lora_up.weight", down: str = ".lora_down.weight"):
    return {name + up: torch.zeros(out, 1), name + down: torch.zeros(1, inp)}


def test_an_unknown_layer_name_is_named_with_the_closest_one(tmp_path: Path) -> None:
    message = lora_error(tmp_path, pair(TO_K.replace("attn2", "attn3"), 320, 768))
    assert (
        "layer 'lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn3_to_k' names no weight"
        in message
    )
    assert f"did you mean '{TO_K}'" in message and "use a LoRA made for Stable Diffusion 1.x" in message


def test_a_tensor_name_of_no_lora_format_is_named(tmp_path: Path) -> None:
    message = lora_error(tmp_path, {"string_to_param.*": torch.zeros(2, 768), **pair(TO_K, 320, 768)})
    assert "'string_to_param.*' is not a LoRA tensor name automerge reads" in message
    assert "convert the file to kohya format" in message


def test_an_sdxl_lora_given_to_an_sd1_model_says_it_looks_like_an_sdxl_lora(tmp_path: Path) -> None:
    tensors = {
        **pair("lora_unet_input_blocks_4_1_transformer_blocks_1_attn1_to_k", 640, 640),
        **pair("lora_te2_text_model_encoder_layers_0_self_attn_q_proj", 1280, 1280),
    }
    message = lora_error(tmp_path, tensors)
    assert (
        "looks like a LoRA for Stable Diffusion XL base, not for this Stable Diffusion 1.x model" in message
    )
    assert "use a LoRA made for Stable Diffusion 1.x" in message


def test_an_sd1_lora_given_to_an_sdxl_model_is_told_from_sd2_by_its_shapes(tmp_path: Path) -> None:
    message = lora_error(tmp_path, pair(TO_K, 320, 768), family="sdxl")  # SD1 and SD2 share this name
    assert (
        "looks like a LoRA for Stable Diffusion 1.x, not for this Stable Diffusion XL base model" in message
    )


def test_an_sd2_lora_given_to_an_sd1_model_is_told_by_its_shapes(tmp_path: Path) -> None:
    message = lora_error(tmp_path, pair(TO_K, 320, 1024))
    assert f"layer '{TO_K}' is 320×1024 but" in message
    assert (
        "'model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight' is [320, 768]"
        in message
    )
    assert "in this Stable Diffusion 1.x model; it looks like a LoRA for Stable Diffusion 2.x" in message


def test_shapes_are_checked_against_the_checkpoints_header(
    tiny_models: dict[str, Path], tmp_path: Path
) -> None:
    shapes = shapes_of(tiny_models["c"])
    out, inp = shapes["model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"]
    message = lora_error(tmp_path, pair(TO_K, out, inp + 1), shapes=shapes)
    assert (
        f"is {out}×{inp + 1} but" in message
        and f"is [{out}, {inp}] in this Stable Diffusion 1.x model" in message
    )


def test_a_layer_for_a_tensor_the_checkpoint_lacks_is_named(
    tiny_models: dict[str, Path], tmp_path: Path
) -> None:
    shapes = shapes_of(tiny_models["c"])
    key = "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"
    out, inp = shapes.pop(key)
    message = lora_error(tmp_path, pair(TO_K, out, inp), shapes=shapes)
    assert f"layer '{TO_K}' adapts '{key}', which is missing in this Stable Diffusion 1.x model" in message


def test_a_fused_row_block_that_does_not_fit_names_its_rows(tmp_path: Path) -> None:
    name = "lora_te2_text_model_encoder_layers_0_self_attn_k_proj"
    message = lora_error(tmp_path, pair(name, 1280, 1024), family="sdxl")
    assert (
        "rows 2 of 3 of 'conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight'"
        in message
    )


@pytest.mark.parametrize(
    ("suffixes", "kind"),
    [
        ((".hada_w1_a", ".hada_w1_b", ".hada_w2_a", ".hada_w2_b"), "LoHa"),
        ((".lokr_w1", ".lokr_w2"), "LoKr"),
        ((".lora_up.weight", ".lora_down.weight", ".dora_scale"), "DoRA"),
        ((".lora_A.weight", ".lora_B.weight", ".lora_magnitude_vector"), "DoRA"),
    ],
)
def test_other_adapter_types_are_not_supported_yet(
    suffixes: tuple[str, ...], kind: str, tmp_path: Path
) -> None:
    message = lora_error(tmp_path, {TO_K + suffix: torch.zeros(1, 1) for suffix in suffixes})
    assert f"is a {kind} layer, which automerge does not support yet" in message


def test_a_pickled_lora_is_refused_unread(tmp_path: Path) -> None:
    path = tmp_path / "style.pt"
    torch.save({TO_K + ".lora_up.weight": torch.zeros(320, 1)}, path)
    with pytest.raises(ConfigError) as caught:
        read_lora(path, ARCHITECTURES.get("sd1"))
    assert str(caught.value).startswith(f"LoRA {path} is not a .safetensors file")
    assert "pickle" in str(caught.value) and "convert it to safetensors" in str(caught.value)


def test_a_missing_lora_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist; give a LoRA .safetensors file"):
        read_lora(tmp_path / "nope.safetensors", ARCHITECTURES.get("sd1"))


def test_a_layer_without_its_down_is_incomplete(tmp_path: Path) -> None:
    message = lora_error(tmp_path, {TO_K + ".lora_up.weight": torch.zeros(320, 1)})
    assert f"'{TO_K}' has no down tensor" in message and "the file is incomplete" in message


def test_a_file_mixing_key_formats_is_refused(tmp_path: Path) -> None:
    peft = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_v"
    tensors = {**pair(TO_K, 320, 768), **pair(peft, 320, 768, up=".lora_B.weight", down=".lora_A.weight")}
    message = lora_error(tmp_path, tensors)
    assert (
        "mixes LoRA key formats kohya" in message
        and "peft" in message
        and "convert it to one format" in message
    )


def test_an_alpha_of_zero_is_ambiguous_between_the_tools(tmp_path: Path) -> None:
    message = lora_error(tmp_path, {**pair(TO_K, 320, 768), TO_K + ".alpha": torch.tensor(0.0)})
    assert f"'{TO_K}.alpha' is 0.0" in message and "set it to the rank for scale 1" in message


def test_two_names_for_one_layer_are_refused(tmp_path: Path) -> None:
    ldm = "lora_unet_input_blocks_1_1_transformer_blocks_0_attn2_to_k"
    message = lora_error(tmp_path, {**pair(TO_K, 320, 768), **pair(ldm, 320, 768)})
    assert f"layers '{TO_K}' and '{ldm}' both adapt" in message


def test_a_rank_mismatch_between_up_and_down_is_refused(tmp_path: Path) -> None:
    tensors = {TO_K + ".lora_up.weight": torch.zeros(320, 2), TO_K + ".lora_down.weight": torch.zeros(3, 768)}
    message = lora_error(tmp_path, tensors)
    assert "lora up [320, 2] and lora down [3, 768] have different ranks" in message
