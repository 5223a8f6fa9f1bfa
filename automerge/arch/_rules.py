"""Original-layout → diffusers key rules for the LDM UNet, CLIP, OpenCLIP and the VAE, and the MBW
block rule of the UNet: small functions that the family data files name (``keys: {rule: open_clip}``).

They follow diffusers' single-file converters (``diffusers.loaders.single_file_utils``); a test runs
those converters on tagged tensors and checks every key against these rules. A key rule factory takes
the component name and the keyword arguments its data file gives; a block rule factory takes the
family's MBW levels.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable
from typing import Any

from automerge.arch._targets import BlockRule, KeyRule, Target, View
from automerge.registry import Registry

KeyRuleFactory = Callable[..., KeyRule]
BlockRuleFactory = Callable[..., BlockRule]

KEY_RULES: Registry[KeyRuleFactory] = Registry("key rule")
BLOCK_RULES: Registry[BlockRuleFactory] = Registry("block rule")
BLOCK_RULE_LEVELS = ("levels_in", "levels_out")  # what every block rule is given from its family


def _keyword_only(factory: Callable[..., Any], *, skip: int) -> list[inspect.Parameter]:
    params = list(inspect.signature(factory).parameters.values())
    loose = [p.name for p in params[skip:] if p.kind is not inspect.Parameter.KEYWORD_ONLY]
    if loose:
        raise TypeError(f"{factory.__name__}: rule arguments must be keyword-only, got {loose}")
    return params


def key_rule(name: str) -> Callable[[KeyRuleFactory], KeyRuleFactory]:
    """Register ``factory(component, *, args...) -> KeyRule`` as the key rule ``name``."""

    def register(factory: KeyRuleFactory) -> KeyRuleFactory:
        params = _keyword_only(factory, skip=1)
        if not params or params[0].name != "component":
            raise TypeError(f"{factory.__name__}: a key rule takes `component` first")
        return KEY_RULES.register(name, factory)

    return register


def block_rule(name: str) -> Callable[[BlockRuleFactory], BlockRuleFactory]:
    """Register ``factory(*, levels_in, levels_out, args...) -> BlockRule`` as the block rule ``name``."""

    def register(factory: BlockRuleFactory) -> BlockRuleFactory:
        params = _keyword_only(factory, skip=0)
        missing = set(BLOCK_RULE_LEVELS) - {p.name for p in params}
        if missing:
            raise TypeError(f"{factory.__name__}: a block rule takes {', '.join(BLOCK_RULE_LEVELS)}")
        return BLOCK_RULES.register(name, factory)

    return register


def bad_arguments(factory: Callable[..., Any], *args: object, **kwargs: object) -> str | None:
    """Why ``factory(*args, **kwargs)`` would not bind to its signature, or None when it would."""
    try:
        inspect.signature(factory).bind(*args, **kwargs)
    except TypeError as error:
        return str(error)
    return None


def fixed_block(block: str) -> BlockRule:
    """Every key of a component in one ``block`` (text encoders: BASE, the VAE: VAE)."""

    def rule(key: str) -> str | None:
        return block

    return rule


LAYERS_PER_BLOCK = 2  # every SD family: 2 resnets per level, + 1 down/upsampler slot
_SLOTS = LAYERS_PER_BLOCK + 1

_RESNET_RENAMES = (
    ("in_layers.0", "norm1"),
    ("in_layers.2", "conv1"),
    ("out_layers.0", "norm2"),
    ("out_layers.3", "conv2"),
    ("emb_layers.1", "time_emb_proj"),
    ("skip_connection", "conv_shortcut"),
)
_UNET_FIXED = {
    "time_embed.0.": "time_embedding.linear_1.",
    "time_embed.2.": "time_embedding.linear_2.",
    "label_emb.0.0.": "add_embedding.linear_1.",
    "label_emb.0.2.": "add_embedding.linear_2.",
    "input_blocks.0.0.": "conv_in.",
    "out.0.": "conv_norm_out.",
    "out.2.": "conv_out.",
}
_BLOCK_INDEX = re.compile(r"(input_blocks|output_blocks)\.(\d+)\.(\d+)\.(.*)")
_MIDDLE_INDEX = re.compile(r"middle_block\.(\d+)\.(.*)")


def _resnet(rest: str) -> str:
    for old, new in _RESNET_RENAMES:
        rest = rest.replace(old, new)
    return rest


def _one(component: str, name: str, view: View = View.SAME) -> tuple[Target, ...]:
    return (Target(component, name, view),)


def _unet_target(component: str, key: str) -> tuple[Target, ...]:
    """UNet key (without ``model.diffusion_model.``) → its diffusers UNet2DConditionModel parameter."""
    for old, new in _UNET_FIXED.items():
        if key.startswith(old):
            return _one(component, new + key[len(old) :])
    middle = _MIDDLE_INDEX.fullmatch(key)
    if middle is not None:
        index, rest = int(middle[1]), middle[2]
        layer = {0: f"resnets.0.{_resnet(rest)}", 1: f"attentions.0.{rest}", 2: f"resnets.1.{_resnet(rest)}"}
        return _one(component, f"mid_block.{layer[index]}")
    match = _BLOCK_INDEX.fullmatch(key)
    if match is None:
        return ()
    kind, index, sub, rest = match[1], int(match[2]), int(match[3]), match[4]
    if kind == "input_blocks":
        level, slot = (index - 1) // _SLOTS, (index - 1) % _SLOTS
        if rest.startswith("op."):
            return _one(component, f"down_blocks.{level}.downsamplers.0.conv.{rest[3:]}")
        layer = f"resnets.{slot}.{_resnet(rest)}" if sub == 0 else f"attentions.{slot}.{rest}"
        return _one(component, f"down_blocks.{level}.{layer}")
    level, slot = index // _SLOTS, index % _SLOTS
    if rest.startswith("conv.") and sub > 0:
        return _one(component, f"up_blocks.{level}.upsamplers.0.{rest}")
    layer = f"resnets.{slot}.{_resnet(rest)}" if sub == 0 else f"attentions.{slot}.{rest}"
    return _one(component, f"up_blocks.{level}.{layer}")


@key_rule("unet")
def unet_targets(component: str) -> KeyRule:
    """LDM / sgm UNet → diffusers UNet2DConditionModel (see notes/blocks.md for the block mapping)."""

    def rule(key: str) -> tuple[Target, ...]:
        return _unet_target(component, key)

    return rule


@block_rule("unet")
def unet_block_rule(*, levels_in: int, levels_out: int) -> BlockRule:
    """supermerger's convention: time/label embeddings in IN00, ``out.`` in the last OUT block."""
    last_out = f"OUT{levels_out - 1:02d}"

    def block(key: str) -> str | None:
        if key.startswith(("time_embed.", "label_emb.")):
            return "IN00"
        if key.startswith("out."):
            return last_out
        if key.startswith("middle_block."):
            return "M00"
        for prefix, name, count in (
            ("input_blocks.", "IN", levels_in),
            ("output_blocks.", "OUT", levels_out),
        ):
            if key.startswith(prefix):
                index = int(key.split(".")[1])
                return f"{name}{index:02d}" if index < count else None
        return None

    return block


@key_rule("clip")
def clip_targets(component: str) -> KeyRule:
    """OpenAI CLIP-L (transformers layout inside the checkpoint): a prefix strip."""

    def rule(key: str) -> tuple[Target, ...]:
        return _one(component, key)

    return rule


_OPEN_CLIP_FIXED = {
    "positional_embedding": "text_model.embeddings.position_embedding.weight",
    "token_embedding.weight": "text_model.embeddings.token_embedding.weight",
    "ln_final.weight": "text_model.final_layer_norm.weight",
    "ln_final.bias": "text_model.final_layer_norm.bias",
}
_OPEN_CLIP_RENAMES = (
    ("ln_1", "layer_norm1"),
    ("ln_2", "layer_norm2"),
    (".c_fc.", ".fc1."),
    (".c_proj.", ".fc2."),
    ("attn.", "self_attn."),
)
_RESBLOCK = re.compile(r"transformer\.resblocks\.(\d+)\.(.*)")


def _open_clip_resblock(component: str, layer: str, rest: str) -> tuple[Target, ...]:
    """One OpenCLIP resblock tensor: the fused q/k/v projection is three row blocks."""
    base = f"text_model.encoder.layers.{layer}."
    if rest in ("attn.in_proj_weight", "attn.in_proj_bias"):
        kind = "weight" if rest.endswith("weight") else "bias"
        return tuple(
            Target(component, f"{base}self_attn.{proj}_proj.{kind}", View.ROWS, index=i, chunks=3)
            for i, proj in enumerate(("q", "k", "v"))
        )
    for old, new in _OPEN_CLIP_RENAMES:
        rest = rest.replace(old, new)
    return _one(component, base + rest)


@key_rule("open_clip")
def open_clip_targets(component: str, *, live_layers: int, projection: bool = False) -> KeyRule:
    """OpenCLIP text tower → transformers CLIPTextModel(WithProjection); fused q/k/v are split.

    ``live_layers``: how many resblocks the diffusers text encoder has (SD2 drops the last of 24).
    ``projection``: the live module is ``CLIPTextModelWithProjection`` (SDXL), fed ``text_projection``.
    """

    def rule(key: str) -> tuple[Target, ...]:
        if key in _OPEN_CLIP_FIXED:
            return _one(component, _OPEN_CLIP_FIXED[key])
        if key == "text_projection":
            return _one(component, "text_projection.weight", View.TRANSPOSE) if projection else ()
        match = _RESBLOCK.fullmatch(key)
        if match is None or int(match[1]) >= live_layers:
            return ()
        return _open_clip_resblock(component, match[1], match[2])

    return rule


_VAE_FIXED = {
    "encoder.norm_out.": "encoder.conv_norm_out.",
    "decoder.norm_out.": "decoder.conv_norm_out.",
}
_VAE_ATTN = {
    "norm.": "group_norm.",
    "q.": "to_q.",
    "k.": "to_k.",
    "v.": "to_v.",
    "proj_out.": "to_out.0.",
}


def _vae_level(component: str, parts: list[str], up_levels: int) -> tuple[Target, ...]:
    """``{encoder.down,decoder.up}.N.{block.M,downsample,upsample}.*`` (decoder levels reversed)."""
    side = parts[0]
    level = int(parts[2]) if parts[1] == "down" else up_levels - 1 - int(parts[2])
    prefix = f"{side}.{parts[1]}_blocks.{level}"
    if parts[3] == "block":
        rest = ".".join(parts[5:]).replace("nin_shortcut", "conv_shortcut")
        return _one(component, f"{prefix}.resnets.{parts[4]}.{rest}")
    sampler = "downsamplers" if parts[3] == "downsample" else "upsamplers"
    return _one(component, f"{prefix}.{sampler}.0.{'.'.join(parts[4:])}")


def _vae_mid(component: str, parts: list[str]) -> tuple[Target, ...] | None:
    """``{encoder,decoder}.mid.{block_1,attn_1,block_2}.*``; attention q/k/v/proj are 1×1 convs."""
    side = parts[0]
    if parts[2].startswith("block_"):
        rest = ".".join(parts[3:]).replace("nin_shortcut", "conv_shortcut")
        return _one(component, f"{side}.mid_block.resnets.{int(parts[2][6:]) - 1}.{rest}")
    rest = ".".join(parts[3:])
    for old, new in _VAE_ATTN.items():
        if rest.startswith(old):
            view = View.SQUEEZE if rest.endswith("weight") and old != "norm." else View.SAME
            return _one(component, f"{side}.mid_block.attentions.0.{new}{rest[len(old) :]}", view)
    return None


@key_rule("vae")
def vae_targets(component: str, *, up_levels: int) -> KeyRule:
    """LDM AutoencoderKL → diffusers AutoencoderKL."""

    def rule(key: str) -> tuple[Target, ...]:
        for old, new in _VAE_FIXED.items():
            if key.startswith(old):
                return _one(component, new + key[len(old) :])
        parts = key.split(".")
        if len(parts) > 2 and parts[1] in ("down", "up"):
            return _vae_level(component, parts, up_levels)
        if len(parts) > 2 and parts[1] == "mid":
            mid = _vae_mid(component, parts)
            if mid is not None:
                return mid
        return _one(component, key)

    return rule
