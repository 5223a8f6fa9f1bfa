"""``Architecture``: one model family as the rest of the package sees it, built from its data file.

An ``Architecture`` says, for every tensor key of an original-layout (A1111 / LDM / sgm) checkpoint,
which MBW block it belongs to (or that it is unmerged), and which parameters of the live diffusers
modules it becomes (``Target``s), so that the live engine and the exporter agree on every tensor. It
also carries the configs of its live modules (real and tiny), its reference key table, how its
pipeline is assembled and what tells its checkpoints apart.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from automerge.arch._targets import BlockRule, KeyRule, Target
from automerge.registry import Registry

if TYPE_CHECKING:
    from automerge.arch._schema import Detection, KohyaSpec, PipelineSpec, ReferencePart

VAE_BLOCK = "VAE"
EMA_PREFIX = "model_ema."


def mbw_blocks(levels_in: int, levels_out: int) -> tuple[str, ...]:
    """BASE, IN00.., M00, OUT00.., VAE in supermerger's order."""
    return (
        ("BASE",)
        + tuple(f"IN{i:02d}" for i in range(levels_in))
        + ("M00",)
        + tuple(f"OUT{i:02d}" for i in range(levels_out))
        + (VAE_BLOCK,)
    )


@dataclass(frozen=True)
class Component:
    """A part of the checkpoint that becomes one diffusers/transformers module."""

    name: str  # "unet" | "text_encoder" | "text_encoder_2" | "vae"
    prefix: str  # original-layout key prefix, e.g. "model.diffusion_model."
    rule: KeyRule
    block: BlockRule  # key without prefix → MBW block, None for unmerged


@dataclass(frozen=True)
class Architecture:
    """A model family: its MBW blocks, components and the configs of its live modules."""

    name: str  # "sd1" | "sd2" | "sdxl"
    title: str
    modelspec_architecture: str
    blocks: tuple[str, ...]  # MBW blocks in user order, VAE last
    components: tuple[Component, ...]
    configs: Mapping[str, Mapping[str, Any]]  # standard (real-size) config per component
    tiny_configs: Mapping[str, Mapping[str, Any]]  # same topology at tiny widths (`automerge tiny`)
    reference: tuple[ReferencePart, ...]  # where its reference key table comes from
    pipeline: PipelineSpec
    detection: Detection
    kohya: KohyaSpec  # how kohya's sd-scripts names and labels its LoRAs (lora/)
    prediction_type: str = "epsilon"
    aliases: tuple[tuple[str, str], ...] = field(default=())  # legacy key prefixes → canonical

    @property
    def merge_blocks(self) -> tuple[str, ...]:
        """The blocks a user sets weights for (BASE, IN.., M00, OUT..), without VAE."""
        return tuple(b for b in self.blocks if b != VAE_BLOCK)

    def canonical_key(self, key: str) -> str:
        for old, new in self.aliases:
            if key.startswith(old):
                return new + key[len(old) :]
        return key

    def component_of(self, key: str) -> Component | None:
        key = self.canonical_key(key)
        for component in self.components:
            if key.startswith(component.prefix):
                return component
        return None

    def block_of(self, key: str, dtype: torch.dtype) -> str | None:
        """The MBW block of ``key``; None for unmerged tensors (copied from model A)."""
        if not dtype.is_floating_point or key.endswith("position_ids"):
            return None
        component = self.component_of(key)
        if component is None:
            return None
        return component.block(self.canonical_key(key)[len(component.prefix) :])

    def targets(self, key: str) -> tuple[Target, ...]:
        """The live diffusers parameters that are views of the original tensor ``key``."""
        component = self.component_of(key)
        if component is None or key.endswith("position_ids"):
            return ()
        return component.rule(self.canonical_key(key)[len(component.prefix) :])

    @staticmethod
    def is_exported(key: str) -> bool:
        """EMA weights are dropped on export, as "pruned" saves do."""
        return not key.startswith(EMA_PREFIX)


ARCHITECTURES: Registry[Architecture] = Registry("architecture")
