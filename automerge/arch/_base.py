"""Architecture descriptions: block layouts and key rules as data plus a few small functions.

An ``Architecture`` says, for every tensor key of an original-layout (A1111 / LDM / sgm) checkpoint,
which MBW block it belongs to (or that it is unmerged), and which parameters of the live diffusers
modules it becomes (``Target``s), so that the live engine and the exporter agree on every tensor.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from automerge.registry import Registry

VAE_BLOCK = "VAE"
EMA_PREFIX = "model_ema."


class View(enum.Enum):
    """How a diffusers parameter is derived from its original tensor (always a view, never a copy)."""

    SAME = "same"  # identical tensor
    ROWS = "rows"  # chunk `index` of `chunks` equal chunks along dim 0 (fused q/k/v split)
    SQUEEZE = "squeeze"  # 1×1 conv weight [o, i, 1, 1] or [o, i, 1] → linear [o, i]
    TRANSPOSE = "transpose"  # 2-D transpose (OpenCLIP text_projection)


@dataclass(frozen=True)
class Target:
    """One diffusers parameter fed by an original tensor: ``component`` module, parameter ``name``."""

    component: str
    name: str
    view: View = View.SAME
    index: int = 0
    chunks: int = 1

    def apply(self, tensor: torch.Tensor) -> torch.Tensor:
        """The diffusers parameter as a view of the original ``tensor``."""
        if self.view is View.SAME:
            return tensor
        if self.view is View.ROWS:
            rows = tensor.shape[0] // self.chunks
            return tensor[self.index * rows : (self.index + 1) * rows]
        if self.view is View.SQUEEZE:
            return tensor.reshape(tensor.shape[0], tensor.shape[1]) if tensor.ndim > 2 else tensor
        return tensor.t()


KeyRule = Callable[[str], tuple[Target, ...]]
"""Maps a key with its component prefix removed to its diffusers targets (empty: not used live)."""


@dataclass(frozen=True)
class Component:
    """A part of the checkpoint that becomes one diffusers/transformers module."""

    name: str  # "unet" | "text_encoder" | "text_encoder_2" | "vae"
    prefix: str  # original-layout key prefix, e.g. "model.diffusion_model."
    rule: KeyRule
    block: Callable[[str], str | None]  # key without prefix → MBW block, None for unmerged


@dataclass(frozen=True)
class Architecture:
    """A model family: its MBW blocks, components and the configs of its live modules."""

    name: str  # "sd1" | "sd2" | "sdxl"
    title: str
    modelspec_architecture: str
    blocks: tuple[str, ...]  # MBW blocks in user order, VAE last
    components: tuple[Component, ...]
    configs: Mapping[str, Mapping[str, Any]]  # standard (real-size) config per component
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
