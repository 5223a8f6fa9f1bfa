"""The format of the family data files (``data/families/<name>.yaml``) and of the unsupported-family
markers (``data/unsupported.yaml``): frozen schemas read by the project's one loader, so an unknown
key, an unknown rule name or an argument a rule does not take is an error naming the file and field."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

from pydantic import Field, ValidationInfo, field_validator

from automerge.arch._base import mbw_blocks
from automerge.arch._rules import BLOCK_RULES, KEY_RULES, bad_arguments
from automerge.config import Schema
from automerge.errors import ConfigError
from automerge.registry import Registry

Config = dict[str, Any]
"""A live module's config: ``_class`` (the module class) + its constructor options, as literal data."""


class RuleSpec(Schema):
    """A rule of ``arch/_rules.py`` by its registered name, with the keyword arguments it takes."""

    rule: str
    args: dict[str, Any] = {}


def _check_rule(registry: Registry[Any], spec: RuleSpec, *given: object, **given_kwargs: object) -> None:
    """``spec`` names a registered rule, and its args bind next to what the loader passes (``given``)."""
    try:
        factory = registry.get(spec.rule)
    except ConfigError as error:
        raise ValueError(str(error)) from None
    taken = sorted(set(spec.args) & set(given_kwargs))
    if taken:
        raise ValueError(f"{registry.what} '{spec.rule}': {taken} come from the family, not from args")
    problem = bad_arguments(factory, *given, **given_kwargs, **spec.args)
    if problem is not None:
        raise ValueError(f"{registry.what} '{spec.rule}' with args {spec.args}: {problem}")


class ComponentSpec(Schema):
    """A part of the checkpoint that becomes one live module."""

    name: str  # the live module: unet | text_encoder | text_encoder_2 | vae
    prefix: str  # original-layout key prefix, e.g. "model.diffusion_model."
    keys: RuleSpec  # key rule: key without prefix → diffusers targets
    block: str | RuleSpec  # a block name (every key in it) or a block rule (given the family's levels)

    @field_validator("keys")
    @classmethod
    def _known_key_rule(cls, keys: RuleSpec, info: ValidationInfo) -> RuleSpec:
        _check_rule(KEY_RULES, keys, info.data.get("name", "component"))
        return keys

    @field_validator("block")
    @classmethod
    def _known_block_rule(cls, block: str | RuleSpec) -> str | RuleSpec:
        if isinstance(block, RuleSpec):
            _check_rule(BLOCK_RULES, block, levels_in=1, levels_out=1)
        return block


class BlockLevels(Schema):
    """MBW blocks: BASE, IN00..IN{levels_in - 1}, M00, OUT00..OUT{levels_out - 1}, VAE."""

    levels_in: int = Field(ge=1)
    levels_out: int = Field(ge=1)

    def names(self) -> tuple[str, ...]:
        return mbw_blocks(self.levels_in, self.levels_out)


class PrefixRename(Schema):
    old: str
    new: str


class ReferencePart(Schema):
    """Keys taken from a reference table (``arch/data/<table>``), optionally renamed."""

    table: str  # file name in arch/data/
    components: tuple[str, ...] | None = None  # the table's components to take; unset: all
    component: str | None = None  # give the taken keys this component name instead
    prefix: PrefixRename | None = None  # rewrite the key prefix
    resblocks: int | None = Field(default=None, ge=1)  # keep OpenCLIP resblocks below this index only
    shapes: bool = True  # false: names only (shape ()), where the table's widths are not this family's


class Alias(Schema):
    """A legacy key prefix and the canonical one it stands for."""

    old: str
    new: str


class TokenizerSpec(Schema):
    folder: str  # its sub-folder in a diffusers model folder
    pad_token: str  # as in the official diffusers repositories


class PipelineSpec(Schema):
    """How ``render/`` assembles the family's diffusers pipeline."""

    diffusers_class: str  # e.g. StableDiffusionPipeline
    tokenizers: dict[str, TokenizerSpec]  # text encoder component → its tokenizer, in pipeline order


class KohyaSpec(Schema):
    """How kohya's sd-scripts names and labels this family's LoRAs (``networks/lora.py``): read by ``lora/``."""

    base_model_version: str  # the `ss_base_model_version` it writes (e.g. sd_v1, sdxl_base_v1-0)
    unet_names: Literal["diffusers", "ldm"]  # its UNet module names: diffusers' or the original ones


class UnetInput(Schema):
    key: str  # original layout: the UNet's input conv, [out, channels, kh, kw]
    channels: int  # diffusers folders: unet/config.json in_channels


class UnetOnly(Schema):
    key: str  # original layout: a cross-attention key projection, [out, width]
    width: int  # diffusers folders: unet/config.json cross_attention_dim


class Detection(Schema):
    """What tells this family's checkpoints apart (see ``arch/detect.py`` for the order of the tests)."""

    unet_input: UnetInput
    key_prefixes: tuple[str, ...] = Field(min_length=1)  # original layout: keys only this family has
    unet_only: UnetOnly | None = None  # no text encoder: told by the UNet's cross-attention width
    folders: tuple[str, ...] = Field(min_length=1)  # diffusers: component sub-folders it must have
    folder_configs: dict[str, dict[str, Any]] = {}  # diffusers: config values only it has (any width)


def _check_names(names: Mapping[str, Any] | tuple[str, ...], known: list[str], what: str) -> None:
    unknown = [name for name in names if name not in known]
    if unknown:
        raise ValueError(f"{what} {unknown}: not components of this family ({', '.join(known)})")


class FamilyFile(Schema):
    """One model family: everything automerge knows about it."""

    name: str
    title: str
    modelspec_architecture: str  # modelspec.architecture written into exported headers
    prediction_type: Literal["epsilon", "v_prediction"]
    reference: tuple[ReferencePart, ...] = Field(min_length=1)
    blocks: BlockLevels
    components: tuple[ComponentSpec, ...] = Field(min_length=1)
    configs: dict[str, Config]  # real-size live-module configs, in build order
    tiny: dict[str, Config]  # per component: the options that differ at tiny widths (same topology)
    aliases: tuple[Alias, ...] = ()
    pipeline: PipelineSpec
    detection: Detection
    kohya: KohyaSpec

    @field_validator("components")
    @classmethod
    def _components_fit_blocks(
        cls, components: tuple[ComponentSpec, ...], info: ValidationInfo
    ) -> tuple[ComponentSpec, ...]:
        names = [c.name for c in components]
        if len(set(names)) != len(names):
            raise ValueError(f"component names must be unique, got {names}")
        levels = info.data.get("blocks")
        blocks = levels.names() if levels is not None else ()
        for component in components:
            if isinstance(component.block, str) and blocks and component.block not in blocks:
                raise ValueError(
                    f"{component.name}: block '{component.block}' is not one of {', '.join(blocks)}"
                )
        return components

    @field_validator("configs")
    @classmethod
    def _one_config_per_component(cls, configs: dict[str, Config], info: ValidationInfo) -> dict[str, Config]:
        names = [c.name for c in info.data.get("components", ())]
        if names and sorted(configs) != sorted(names):
            raise ValueError(f"one config per component ({', '.join(names)}), got {', '.join(configs)}")
        missing = [name for name, config in configs.items() if "_class" not in config]
        if missing:
            raise ValueError(f"{missing}: every config names its module class in `_class`")
        return configs

    @field_validator("tiny")
    @classmethod
    def _tiny_overrides_real_options(cls, tiny: dict[str, Config], info: ValidationInfo) -> dict[str, Config]:
        configs = info.data.get("configs", {})
        for name, overrides in tiny.items():
            if name not in configs:
                raise ValueError(f"'{name}' has no real config to override")
            unknown = sorted(set(overrides) - set(configs[name]))
            if unknown:
                raise ValueError(f"{name}: {unknown} are not options of its real config")
        return tiny

    @field_validator("pipeline")
    @classmethod
    def _tokenizers_of_components(cls, pipeline: PipelineSpec, info: ValidationInfo) -> PipelineSpec:
        known = [c.name for c in info.data.get("components", ())]
        _check_names(pipeline.tokenizers, known, "tokenizers")
        return pipeline

    @field_validator("detection")
    @classmethod
    def _folders_of_components(cls, detection: Detection, info: ValidationInfo) -> Detection:
        known = [c.name for c in info.data.get("components", ())]
        _check_names(detection.folders, known, "folders")
        _check_names(detection.folder_configs, known, "folder_configs")
        return detection


class UnsupportedFamily(Schema):
    """A family automerge recognises but does not merge yet, by a marker of each layout."""

    name: str  # as the error names it, e.g. "SDXL refiner"
    key_ending: str | None = None  # original layout: a key that ends so (whatever its prefix)
    folders: tuple[str, ...] = ()  # diffusers: sub-folders it has ...
    without_folders: tuple[str, ...] = ()  # ... and sub-folders it lacks


class UnsupportedFile(Schema):
    families: tuple[UnsupportedFamily, ...]
    unet_in_channels: dict[int, str]  # UNet input channels → the kind of checkpoint (inpainting, ...)
