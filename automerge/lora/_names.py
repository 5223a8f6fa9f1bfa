"""LoRA module names → the original-layout tensors they adapt, per family, built from the family's
reference key table through ``Architecture.targets`` (no hand-written table of names).

A LoRA names the *module* it adapts; the tools write these styles (the tensor suffix comes after):

| style | UNet | text encoders |
|---|---|---|
| kohya, diffusers names (sd-scripts' SD1/SD2 UNet) | ``lora_unet_down_blocks_0_attentions_0_proj_in`` | ``lora_te_text_model_encoder_layers_0_self_attn_q_proj`` (``lora_te1_``/``lora_te2_`` with two) |
| kohya, original names (sd-scripts' SDXL UNet) | ``lora_unet_input_blocks_1_1_proj_in`` | as above |
| ComfyUI's generic names | ``diffusion_model.input_blocks.1.1.proj_in`` | — |
| diffusers | ``unet.down_blocks.0.attentions.0.proj_in``, attention processors ``unet.….attn1.processor.to_q`` | ``text_encoder.text_model.encoder.layers.0.self_attn.q_proj``, ``text_encoder_2.…`` |
| PEFT | ``unet.…``, ``base_model.model.…`` or unprefixed | ``text_encoder.…``, ``text_encoder_2.…`` |

Every style is accepted for every family, as ComfyUI (``comfy/lora.py``: ``model_lora_keys_unet``,
``model_lora_keys_clip``) and A1111 do. A fused OpenCLIP ``in_proj_weight`` is three modules
(``q_proj``/``k_proj``/``v_proj``), each adapting its block of rows.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

from automerge.arch import Architecture, View, reference_keys

UNET = "unet"
KohyaKind = Literal["lora", "locon"]

# The layers kohya's sd-scripts adapts (networks/lora.py): every Linear/Conv2d inside its target module
# classes, written as diffusers module names. LoRA: Transformer2DModel (UNet), CLIPAttention and CLIPMLP
# (text encoders); LoCon (conv_dim set) adds ResnetBlock2D, Downsample2D and Upsample2D.
_KOHYA_LORA = re.compile(
    r".*\.attentions\.\d+\.(proj_in|proj_out|transformer_blocks\.\d+\."
    r"(attn[12]\.(to_q|to_k|to_v|to_out\.0)|ff\.net\.0\.proj|ff\.net\.2))"
    r"|text_model\.encoder\.layers\.\d+\.(self_attn\.(q|k|v|out)_proj|mlp\.fc[12])"
)
_KOHYA_LOCON = re.compile(
    r".*\.(resnets\.\d+\.(conv1|conv2|time_emb_proj|conv_shortcut)|(downsamplers|upsamplers)\.0\.conv)"
)


@dataclass(frozen=True)
class Site:
    """One adaptable module: a diffusers parameter and the original tensor (or row block) it is."""

    key: str  # original-layout key, e.g. model.diffusion_model.input_blocks.1.1.proj_in.weight
    component: str  # unet | text_encoder | text_encoder_2
    module: str  # the diffusers module name: the parameter's name without ".weight"
    inner: str  # the original module name without its component prefix (LDM names)
    chunk: int | None  # fused q/k/v: which of `chunks` row blocks of the original; None: all of it
    chunks: int
    transpose: bool  # the diffusers parameter is the original's transpose
    kohya: KohyaKind | None  # what kohya's LoRA (or LoCon) adapts; None: not adapted by kohya


@dataclass(frozen=True)
class NameIndex:
    """A family's LoRA module names in every style, and kohya's own name for each site."""

    family: str
    sites: tuple[Site, ...]  # every UNet / text-encoder weight, reference-table order
    by_name: Mapping[str, Site]  # accepted module name (any style) → site
    kohya_names: Mapping[tuple[str, int | None], str]  # (key, chunk) → kohya's name for this family

    def site(self, key: str, chunk: int | None) -> Site | None:
        name = self.kohya_names.get((key, chunk))
        return None if name is None else self.by_name[name]


def _text_encoders(arch: Architecture) -> list[str]:
    return [c.name for c in arch.components if c.name.startswith("text_encoder")]


def _processor_name(module: str) -> str:
    """diffusers' attention-processor LoRA names (``…attn1.processor.to_q``, ``…processor.to_out``),
    as ComfyUI derives them."""
    name = module.replace(".to_", ".processor.to_")
    return name.removesuffix(".0") if name.endswith(".to_out.0") else name


def _kohya_te_prefix(component: str, encoders: list[str]) -> str:
    """kohya's rule: ``lora_te_`` for a single text encoder, ``lora_te1_``, ``lora_te2_`` for several."""
    return "lora_te_" if len(encoders) == 1 else f"lora_te{encoders.index(component) + 1}_"


def kohya_name(site: Site, arch: Architecture) -> str:
    """The name kohya's sd-scripts gives ``site`` in a LoRA for ``arch``."""
    if site.component == UNET:
        name = site.inner if arch.kohya.unet_names == "ldm" else site.module
        return "lora_unet_" + name.replace(".", "_")
    return _kohya_te_prefix(site.component, _text_encoders(arch)) + site.module.replace(".", "_")


def _accepted_names(site: Site, encoders: list[str]) -> set[str]:
    """Every name a LoRA may give ``site`` (see the module docstring)."""
    flat = site.module.replace(".", "_")
    if site.component == UNET:
        return {
            "lora_unet_" + site.inner.replace(".", "_"),
            "lora_unet_" + flat,
            "diffusion_model." + site.inner,
            "unet." + site.module,
            "unet." + _processor_name(site.module),
            "base_model.model." + site.module,
            site.module,  # diffusers' save_lora_adapter of the UNet alone: no prefix
        }
    position = encoders.index(site.component) + 1
    names = {f"lora_te{position}_{flat}", f"{site.component}.{site.module}"}
    names.add(f"{site.component}.{site.module.removeprefix('text_model.')}")  # transformers ≥ 5.6 names
    if position == 1:
        names.add("lora_te_" + flat)
    return names


def _kohya_kind(module: str) -> KohyaKind | None:
    if _KOHYA_LORA.fullmatch(module):
        return "lora"
    if _KOHYA_LOCON.fullmatch(module):
        return "locon"
    return None


def _sites(arch: Architecture) -> list[Site]:
    """A site per diffusers parameter fed by a UNet or text-encoder weight of the reference table."""
    adaptable = {UNET, *_text_encoders(arch)}
    sites = []
    for ref in reference_keys(arch.name):
        component = arch.component_of(ref.key)
        if component is None or component.name not in adaptable or not ref.key.endswith("weight"):
            continue
        inner = ref.key[len(component.prefix) :].removesuffix(".weight")
        for target in arch.targets(ref.key):
            module = target.name.removesuffix(".weight")
            rows = target.view is View.ROWS
            sites.append(
                Site(
                    key=ref.key,
                    component=component.name,
                    module=module,
                    inner=inner,
                    chunk=target.index if rows else None,
                    chunks=target.chunks if rows else 1,
                    transpose=target.view is View.TRANSPOSE,
                    kohya=_kohya_kind(module),
                )
            )
    return sites


def build_name_index(arch: Architecture) -> NameIndex:
    """The index of ``arch``; two sites under one name is a bug in the rules, not a user error."""
    encoders = _text_encoders(arch)
    sites = _sites(arch)
    by_name: dict[str, Site] = {}
    for site in sites:
        for name in _accepted_names(site, encoders):
            if by_name.setdefault(name, site) != site:
                raise RuntimeError(f"{arch.name}: LoRA name {name} fits {by_name[name].key} and {site.key}")
    kohya_names = {(site.key, site.chunk): kohya_name(site, arch) for site in sites}
    return NameIndex(arch.name, tuple(sites), by_name, kohya_names)


_INDEXES: dict[str, tuple[Architecture, NameIndex]] = {}


def name_index(arch: Architecture) -> NameIndex:
    """``build_name_index(arch)``, built once per family (an index holds a few thousand names)."""
    cached = _INDEXES.get(arch.name)
    if cached is None or cached[0] is not arch:
        cached = (arch, build_name_index(arch))
        _INDEXES[arch.name] = cached
    return cached[1]
