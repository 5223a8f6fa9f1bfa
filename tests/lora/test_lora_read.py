"""LoRAs written here in every supported key format, with known up/down/alpha, read back and applied to a
tiny model: the delta is the hand-computed one (alpha/rank scaling, strength), conv LoRAs act as their
convolutions do, and fused q/k/v layers land in their rows."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F  # noqa: N812
from safetensors.torch import save_file

from automerge.arch import ARCHITECTURES
from automerge.checkpoints import open_safetensors
from automerge.lora import apply_loras, read_lora

UNET = "model.diffusion_model."
TO_K = UNET + "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"  # linear [o, i]
PROJ_IN = UNET + "input_blocks.1.1.proj_in.weight"  # SD1: 1×1 conv [o, i, 1, 1]
CONV1 = UNET + "input_blocks.1.0.in_layers.2.weight"  # 3×3 conv [o, i, 3, 3]
Q_PROJ = "cond_stage_model.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight"


def shapes_of(path: Path) -> dict[str, tuple[int, ...]]:
    with open_safetensors(path) as checkpoint:
        return {key: checkpoint.info(key).shape for key in checkpoint.keys()}


def load(path: Path, key: str) -> torch.Tensor:
    with open_safetensors(path) as checkpoint:
        return checkpoint.load(key)


def factors(shape: tuple[int, ...], rank: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """up [o, r] and down [r, i·kh·kw] for a weight of ``shape``, fp16 like real files."""
    generator = torch.Generator().manual_seed(seed)
    up = torch.randn(shape[0], rank, generator=generator).half()
    down = torch.randn(rank, int(torch.tensor(shape[1:]).prod()), generator=generator).half()
    return up, down


def expected_delta(
    up: torch.Tensor, down: torch.Tensor, scale: float, shape: tuple[int, ...]
) -> torch.Tensor:
    return (scale * (up.float().flatten(1) @ down.float().flatten(1))).reshape(shape)


FORMATS = {
    # format: (name of TO_K's module, name of Q_PROJ's module, up suffix, down suffix)
    "kohya": (
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k",
        "lora_te_text_model_encoder_layers_0_self_attn_q_proj",
        ".lora_up.weight",
        ".lora_down.weight",
    ),
    "kohya-ldm-names": (
        "lora_unet_input_blocks_1_1_transformer_blocks_0_attn2_to_k",
        "lora_te1_text_model_encoder_layers_0_self_attn_q_proj",
        ".lora_up.weight",
        ".lora_down.weight",
    ),
    "diffusers": (
        "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.lora",
        "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_linear_layer",
        ".up.weight",
        ".down.weight",
    ),
    "diffusers-processor": (
        "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.processor.to_k_lora",
        "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora",
        ".up.weight",
        ".down.weight",
    ),
    "peft": (
        "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k",
        "text_encoder.text_model.encoder.layers.0.self_attn.q_proj",
        ".lora_B.weight",
        ".lora_A.weight",
    ),
    "peft-base-model": (
        "base_model.model.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k",
        None,
        ".lora_B.weight",
        ".lora_A.weight",
    ),
}


@pytest.mark.parametrize("style", FORMATS)
def test_each_key_format_reads_back_to_the_hand_computed_delta(
    style: str, tiny_models: dict[str, Path], tmp_path: Path
) -> None:
    model, arch, shapes = tiny_models["c"], ARCHITECTURES.get("sd1"), shapes_of(tiny_models["c"])
    unet_name, te_name, up_suffix, down_suffix = FORMATS[style]
    tensors, scales = {}, {}
    for key, name, rank, alpha in ((TO_K, unet_name, 4, 2.0), (Q_PROJ, te_name, 3, None)):
        if name is None:
            continue
        up, down = factors(shapes[key], rank, seed=len(tensors))
        tensors[name + up_suffix], tensors[name + down_suffix] = up, down
        if alpha is not None and not style.startswith("peft"):
            tensors[name.removesuffix("_lora").removesuffix(".lora") + ".alpha"] = torch.tensor(alpha)
        scales[key] = (up, down, alpha / rank if alpha is not None and not style.startswith("peft") else 1.0)
    path = tmp_path / f"{style}.safetensors"
    save_file(tensors, path)

    lora = read_lora(path, arch, shapes=shapes)

    assert lora.format == style.split("-")[0]
    assert lora.keys() == set(scales)
    for key, (up, down, scale) in scales.items():
        weight = load(model, key)
        want = expected_delta(up, down, scale, tuple(weight.shape))
        torch.testing.assert_close(lora.delta(key, weight.shape), want)
        applied = apply_loras(weight, key, [(lora, 0.7)])
        assert applied.dtype == weight.dtype
        torch.testing.assert_close(applied, (weight.float() + 0.7 * want).to(weight.dtype), rtol=0, atol=0)


def test_peft_alpha_comes_from_diffusers_header_metadata_and_its_alpha_pattern(
    tiny_models: dict[str, Path], tmp_path: Path
) -> None:
    shapes = shapes_of(tiny_models["c"])
    module_k = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k"
    module_q = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_q"
    to_q = TO_K.replace("to_k", "to_q")
    up_k, down_k = factors(shapes[TO_K], 4, seed=1)
    up_q, down_q = factors(shapes[to_q], 4, seed=2)
    tensors = {
        f"{module_k}.lora_B.weight": up_k,
        f"{module_k}.lora_A.weight": down_k,
        f"{module_q}.lora_B.weight": up_q,
        f"{module_q}.lora_A.weight": down_q,
    }
    config = {
        "unet.r": 4,
        "unet.lora_alpha": 8,
        "unet.alpha_pattern": {"attn2.to_q": 2},
        "unet.use_rslora": False,
    }
    save_file(tensors, tmp_path / "peft.safetensors", metadata={"lora_adapter_metadata": json.dumps(config)})

    lora = read_lora(tmp_path / "peft.safetensors", ARCHITECTURES.get("sd1"), shapes=shapes)

    torch.testing.assert_close(
        lora.delta(TO_K, shapes[TO_K]), expected_delta(up_k, down_k, 8 / 4, shapes[TO_K])
    )
    torch.testing.assert_close(
        lora.delta(to_q, shapes[to_q]), expected_delta(up_q, down_q, 2 / 4, shapes[to_q])
    )


def test_a_locon_3x3_layer_acts_as_its_two_convolutions(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    shapes = shapes_of(tiny_models["c"])
    out, inp, kh, kw = shapes[CONV1]
    generator = torch.Generator().manual_seed(3)
    down = torch.randn(2, inp, kh, kw, generator=generator)  # kohya LoCon: a conv down, a 1×1 conv up
    up = torch.randn(out, 2, 1, 1, generator=generator)
    name = "lora_unet_down_blocks_0_resnets_0_conv1"
    save_file(
        {f"{name}.lora_down.weight": down, f"{name}.lora_up.weight": up, f"{name}.alpha": torch.tensor(1.0)},
        tmp_path / "locon.safetensors",
    )

    lora = read_lora(tmp_path / "locon.safetensors", ARCHITECTURES.get("sd1"), shapes=shapes)

    (layer,) = lora.layers[CONV1]  # factors flattened to 2-d, the kernel kept for writing
    assert (layer.up.shape, layer.down.shape, layer.kernel) == ((out, 2), (2, inp * kh * kw), (kh, kw))
    x = torch.randn(1, inp, 6, 6, generator=generator)
    through_lora = F.conv2d(F.conv2d(x, down, padding=1), up) * (1.0 / 2)
    torch.testing.assert_close(F.conv2d(x, lora.delta(CONV1, shapes[CONV1]), padding=1), through_lora)


def test_a_locon_mid_layer_acts_as_its_three_convolutions(
    tiny_models: dict[str, Path], tmp_path: Path
) -> None:
    shapes = shapes_of(tiny_models["c"])
    out, inp, _, _ = shapes[CONV1]
    generator = torch.Generator().manual_seed(4)
    down, mid = torch.randn(3, inp, 1, 1, generator=generator), torch.randn(3, 3, 3, 3, generator=generator)
    up = torch.randn(out, 3, 1, 1, generator=generator)
    name = "lora_unet_input_blocks_1_0_in_layers_2"
    tensors = {f"{name}.lora_down.weight": down, f"{name}.lora_mid.weight": mid, f"{name}.lora_up.weight": up}
    save_file({**tensors, f"{name}.alpha": torch.tensor(6.0)}, tmp_path / "tucker.safetensors")

    lora = read_lora(tmp_path / "tucker.safetensors", ARCHITECTURES.get("sd1"), shapes=shapes)

    x = torch.randn(1, inp, 5, 5, generator=generator)
    through_lora = F.conv2d(F.conv2d(F.conv2d(x, down), mid, padding=1), up) * (6.0 / 3)
    torch.testing.assert_close(F.conv2d(x, lora.delta(CONV1, shapes[CONV1]), padding=1), through_lora)


def test_a_linear_lora_on_a_1x1_conv_reshapes_to_the_conv(
    tiny_models: dict[str, Path], tmp_path: Path
) -> None:
    shapes = shapes_of(tiny_models["c"])
    assert len(shapes[PROJ_IN]) == 4  # SD1's proj_in is a 1×1 conv
    up, down = factors(shapes[PROJ_IN], 2, seed=5)
    name = "unet.down_blocks.0.attentions.0.proj_in"
    save_file({f"{name}.lora.up.weight": up, f"{name}.lora.down.weight": down}, tmp_path / "p.safetensors")

    lora = read_lora(tmp_path / "p.safetensors", ARCHITECTURES.get("sd1"), shapes=shapes)

    torch.testing.assert_close(
        lora.delta(PROJ_IN, shapes[PROJ_IN]), expected_delta(up, down, 1.0, shapes[PROJ_IN])
    )


@pytest.mark.parametrize("projection", ["q", "k", "v"])
def test_a_fused_qkv_layer_lands_in_its_rows(
    projection: str, tiny_sdxl_models: dict[str, Path], tmp_path: Path
) -> None:
    key = "conditioner.embedders.1.model.transformer.resblocks.1.attn.in_proj_weight"
    model, shapes = tiny_sdxl_models["c"], shapes_of(tiny_sdxl_models["c"])
    width = shapes[key][1]
    generator = torch.Generator().manual_seed(6)
    up, down = torch.randn(width, 2, generator=generator), torch.randn(2, width, generator=generator)
    name = f"lora_te2_text_model_encoder_layers_1_self_attn_{projection}_proj"
    save_file({f"{name}.lora_up.weight": up, f"{name}.lora_down.weight": down}, tmp_path / "te2.safetensors")

    lora = read_lora(tmp_path / "te2.safetensors", ARCHITECTURES.get("sdxl"), shapes=shapes)

    index = "qkv".index(projection)
    (layer,) = lora.layers[key]
    assert layer.rows == (index * width, (index + 1) * width)
    want = torch.zeros(shapes[key])
    want[index * width : (index + 1) * width] = up @ down
    torch.testing.assert_close(lora.delta(key, shapes[key]), want)
    weight = load(model, key)
    applied = apply_loras(weight, key, [(lora, 1.0)])
    torch.testing.assert_close(applied, (weight.float() + want).to(weight.dtype), rtol=0, atol=0)


def test_q_k_and_v_of_one_fused_tensor_make_one_delta(
    tiny_sdxl_models: dict[str, Path], tmp_path: Path
) -> None:
    key = "conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight"
    shapes = shapes_of(tiny_sdxl_models["c"])
    width = shapes[key][1]
    tensors, blocks = {}, []
    for seed, projection in enumerate("qkv"):
        up, down = factors((width, width), 2, seed=seed)
        name = f"text_encoder_2.text_model.encoder.layers.0.self_attn.{projection}_proj"
        tensors[f"{name}.lora_B.weight"], tensors[f"{name}.lora_A.weight"] = up, down
        blocks.append(up.float() @ down.float())
    save_file(tensors, tmp_path / "qkv.safetensors")

    lora = read_lora(tmp_path / "qkv.safetensors", ARCHITECTURES.get("sdxl"), shapes=shapes)

    assert [layer.rows for layer in lora.layers[key]] == [
        (0, width),
        (width, 2 * width),
        (2 * width, 3 * width),
    ]
    torch.testing.assert_close(lora.delta(key, shapes[key]), torch.cat(blocks))


def test_two_loras_add_with_their_strengths_in_float32(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    shapes = shapes_of(tiny_models["c"])
    name = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"
    loras = []
    for seed in (7, 8):
        up, down = factors(shapes[TO_K], 4, seed=seed)
        path = tmp_path / f"{seed}.safetensors"
        save_file(
            {
                f"{name}.lora_up.weight": up,
                f"{name}.lora_down.weight": down,
                f"{name}.alpha": torch.tensor(4.0),
            },
            path,
        )
        loras.append(
            (
                read_lora(path, ARCHITECTURES.get("sd1"), shapes=shapes),
                expected_delta(up, down, 1.0, shapes[TO_K]),
            )
        )
    weight = load(tiny_models["c"], TO_K)

    applied = apply_loras(weight, TO_K, [(loras[0][0], 0.8), (loras[1][0], -0.3)])

    want = weight.float() + (0.8 * loras[0][1] + -0.3 * loras[1][1])
    torch.testing.assert_close(applied, want.to(weight.dtype), rtol=0, atol=0)
    moved = [(lora.to("cpu"), strength) for (lora, _), strength in zip(loras, (0.8, -0.3), strict=True)]
    assert torch.equal(apply_loras(weight, TO_K, moved), applied)
    assert apply_loras(weight, TO_K, [(loras[0][0], 0.0)]) is weight
    assert apply_loras(weight, PROJ_IN, [(loras[0][0], 1.0)]) is weight  # a key the LoRA does not adapt


def test_without_shapes_a_lora_is_checked_against_a_real_size_model(tmp_path: Path) -> None:
    arch = ARCHITECTURES.get("sd2")
    name = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"  # SD2: [320, 1024]
    save_file(
        {f"{name}.lora_up.weight": torch.zeros(320, 1), f"{name}.lora_down.weight": torch.zeros(1, 1024)},
        tmp_path / "sd2.safetensors",
    )

    lora = read_lora(tmp_path / "sd2.safetensors", arch)

    assert lora.keys() == {TO_K}
