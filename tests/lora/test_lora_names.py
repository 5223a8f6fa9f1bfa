"""Every layer kohya's LoRAs adapt, in all three families, has its kohya name (both UNet naming styles)
and every accepted name maps back to the same original key and rows. The set of layers is derived here
the way kohya's sd-scripts derives it (networks/lora.py: Linear/Conv2d children of its target module
classes) from the real-size diffusers modules on the meta device, independently of the package's rules."""

from __future__ import annotations

import pytest
import torch

from automerge.arch import ARCHITECTURES, Architecture, View, reference_keys
from automerge.arch.live import build_modules
from automerge.lora import name_index

FAMILIES = ("sd1", "sd2", "sdxl")

# kohya sd-scripts networks/lora.py LoRANetwork: target module classes (diffusers/transformers class
# names; CLIPSdpaAttention is older transformers' name for CLIPAttention).
LORA_CLASSES = {"Transformer2DModel", "CLIPAttention", "CLIPSdpaAttention", "CLIPMLP"}
LOCON_CLASSES = {"ResnetBlock2D", "Downsample2D", "Upsample2D"}

# The module counts sd-scripts logs ("create LoRA for U-Net: 192 modules" …): attention-only LoRA,
# the extra LoCon conv modules, and per text encoder.
KOHYA_COUNTS = {
    "sd1": {"unet": (192, 86), "text_encoder": (72, 0)},
    "sd2": {"unet": (192, 86), "text_encoder": (138, 0)},  # OpenCLIP-H, 23 of its 24 layers used
    "sdxl": {"unet": (722, 66), "text_encoder": (72, 0), "text_encoder_2": (192, 0)},
}


def _kohya_walk(arch: Architecture) -> dict[str, dict[str, str]]:
    """Per component: diffusers module name → "lora" | "locon", walking the modules as kohya does."""
    components = [c.name for c in arch.components if c.name != "vae"]
    modules = build_modules({name: arch.configs[name] for name in components}, meta=True)
    found: dict[str, dict[str, str]] = {}
    for component, root in modules.items():
        layers = found.setdefault(component, {})
        for name, module in root.named_modules():
            kind = type(module).__name__
            if kind not in LORA_CLASSES | LOCON_CLASSES:
                continue
            for child_name, child in module.named_modules():
                if isinstance(child, torch.nn.Linear | torch.nn.Conv2d):
                    full = f"{name}.{child_name}"
                    if component != "unet" and not full.startswith("text_model."):
                        full = "text_model." + full  # transformers ≥ 5.6 flattened CLIPTextModel
                    layers[full] = "lora" if kind in LORA_CLASSES else "locon"
    return found


@pytest.mark.parametrize("family", FAMILIES)
def test_the_kohya_layers_are_the_ones_kohya_walks_to(family: str) -> None:
    arch = ARCHITECTURES.get(family)
    walked = _kohya_walk(arch)
    index = name_index(arch)
    for component, layers in walked.items():
        ours = {s.module: s.kohya for s in index.sites if s.component == component and s.kohya}
        assert ours == layers, component
        counted = tuple(sum(kind == k for kind in layers.values()) for k in ("lora", "locon"))
        assert counted == KOHYA_COUNTS[family][component]


@pytest.mark.parametrize("family", FAMILIES)
def test_every_kohya_layer_has_its_names_and_each_maps_back_to_its_key_and_rows(family: str) -> None:
    arch = ARCHITECTURES.get(family)
    walked = _kohya_walk(arch)
    index = name_index(arch)
    encoders = [c.name for c in arch.components if c.name.startswith("text_encoder")]
    checked = set()
    for ref in reference_keys(family):
        component = arch.component_of(ref.key)
        if component is None or component.name not in walked or not ref.key.endswith("weight"):
            continue
        for target in arch.targets(ref.key):
            module = target.name.removesuffix(".weight")
            if module not in walked[component.name]:
                continue
            flat = module.replace(".", "_")
            if component.name == "unet":  # diffusers names (kohya SD1/SD2), original names (kohya SDXL)
                ldm = ref.key.removeprefix(component.prefix).removesuffix(".weight").replace(".", "_")
                names = ["lora_unet_" + flat, "lora_unet_" + ldm]
            elif len(encoders) == 1:
                names = ["lora_te_" + flat]
            else:
                names = [f"lora_te{encoders.index(component.name) + 1}_" + flat]
            chunk = target.index if target.view is View.ROWS else None
            for name in names:
                assert (index.by_name[name].key, index.by_name[name].chunk) == (ref.key, chunk), name
            assert index.kohya_names[(ref.key, chunk)] in names
            checked.add((component.name, module))
    assert checked == {(component, module) for component, layers in walked.items() for module in layers}


@pytest.mark.parametrize(
    ("family", "name", "key", "chunk"),
    [
        # names as they appear in real LoRA files
        ("sd1", "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_k", "input_blocks.1.1.transformer_blocks.0.attn1.to_k.weight", None),
        ("sd1", "lora_unet_up_blocks_3_attentions_2_proj_out", "output_blocks.11.1.proj_out.weight", None),
        ("sd1", "lora_unet_mid_block_attentions_0_transformer_blocks_0_ff_net_0_proj", "middle_block.1.transformer_blocks.0.ff.net.0.proj.weight", None),
        ("sd1", "lora_unet_down_blocks_0_downsamplers_0_conv", "input_blocks.3.0.op.weight", None),
        ("sd1", "lora_unet_up_blocks_0_upsamplers_0_conv", "output_blocks.2.1.conv.weight", None),
        ("sd1", "lora_unet_down_blocks_1_resnets_0_conv_shortcut", "input_blocks.4.0.skip_connection.weight", None),
        ("sd1", "lora_unet_down_blocks_0_resnets_0_time_emb_proj", "input_blocks.1.0.emb_layers.1.weight", None),
        ("sd1", "lora_unet_mid_block_resnets_1_conv2", "middle_block.2.out_layers.3.weight", None),
        ("sdxl", "lora_unet_input_blocks_4_1_transformer_blocks_1_attn2_to_v", "input_blocks.4.1.transformer_blocks.1.attn2.to_v.weight", None),
        ("sdxl", "lora_unet_middle_block_1_proj_in", "middle_block.1.proj_in.weight", None),
        ("sdxl", "lora_unet_output_blocks_2_2_conv", "output_blocks.2.2.conv.weight", None),
        ("sdxl", "lora_unet_up_blocks_0_attentions_2_transformer_blocks_9_attn1_to_out_0", "output_blocks.2.1.transformer_blocks.9.attn1.to_out.0.weight", None),
    ],
)  # fmt: skip
def test_real_kohya_unet_names_map_to_their_original_keys(
    family: str, name: str, key: str, chunk: int | None
) -> None:
    site = name_index(ARCHITECTURES.get(family)).by_name[name]
    assert (site.key, site.chunk) == ("model.diffusion_model." + key, chunk)


@pytest.mark.parametrize(
    ("family", "name", "key", "chunk"),
    [
        ("sd1", "lora_te_text_model_encoder_layers_11_mlp_fc2", "cond_stage_model.transformer.text_model.encoder.layers.11.mlp.fc2.weight", None),
        ("sd2", "lora_te_text_model_encoder_layers_22_self_attn_k_proj", "cond_stage_model.model.transformer.resblocks.22.attn.in_proj_weight", 1),
        ("sd2", "lora_te_text_model_encoder_layers_3_mlp_fc1", "cond_stage_model.model.transformer.resblocks.3.mlp.c_fc.weight", None),
        ("sdxl", "lora_te1_text_model_encoder_layers_0_self_attn_out_proj", "conditioner.embedders.0.transformer.text_model.encoder.layers.0.self_attn.out_proj.weight", None),
        ("sdxl", "lora_te2_text_model_encoder_layers_31_self_attn_v_proj", "conditioner.embedders.1.model.transformer.resblocks.31.attn.in_proj_weight", 2),
        ("sdxl", "lora_te2_text_model_encoder_layers_5_self_attn_out_proj", "conditioner.embedders.1.model.transformer.resblocks.5.attn.out_proj.weight", None),
        ("sdxl", "text_encoder_2.text_model.encoder.layers.5.mlp.fc2", "conditioner.embedders.1.model.transformer.resblocks.5.mlp.c_proj.weight", None),
        ("sdxl", "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.processor.to_out", "model.diffusion_model.input_blocks.4.1.transformer_blocks.0.attn1.to_out.0.weight", None),
        ("sd1", "base_model.model.down_blocks.0.attentions.1.proj_in", "model.diffusion_model.input_blocks.2.1.proj_in.weight", None),
        ("sd1", "diffusion_model.input_blocks.2.1.proj_in", "model.diffusion_model.input_blocks.2.1.proj_in.weight", None),
    ],
)  # fmt: skip
def test_text_encoder_diffusers_and_peft_names_map_to_their_original_keys(
    family: str, name: str, key: str, chunk: int | None
) -> None:
    site = name_index(ARCHITECTURES.get(family)).by_name[name]
    assert (site.key, site.chunk) == (key, chunk)


def test_kohya_writes_diffusers_unet_names_for_sd1_and_sd2_and_original_names_for_sdxl() -> None:
    key = "model.diffusion_model.input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight"
    names = {family: name_index(ARCHITECTURES.get(family)).kohya_names[(key, None)] for family in FAMILIES}
    assert names == {
        "sd1": "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k",
        "sd2": "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k",
        "sdxl": "lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k",
    }


def test_sd2s_last_open_clip_layer_has_no_lora_name_as_kohyas_text_encoder_drops_it() -> None:
    index = name_index(ARCHITECTURES.get("sd2"))
    assert not any(".resblocks.23." in site.key for site in index.sites)
    assert "lora_te_text_model_encoder_layers_23_mlp_fc1" not in index.by_name
