"""A LoRA in memory: ``LoraLayer`` (one adapted weight, ΔW = scale · up @ down), ``Lora`` (a file's layers
by original key) and ``apply_loras``, the one function that adds LoRAs to a tensor (the export and the
live engine both call it, so they compute the same bits on the same device)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from automerge.errors import ConfigError

Shape = torch.Size | tuple[int, ...]


@dataclass(frozen=True, eq=False)
class LoraLayer:
    """One adapted weight: delta = scale · up @ down, reshaped to the original tensor's slice."""

    key: str  # the original-layout checkpoint key it adapts
    up: torch.Tensor  # [out, rank] (conv: flattened), in the file's dtype
    down: torch.Tensor  # [rank, in·kh·kw]
    scale: float  # alpha / rank (1.0 when the file has no alpha)
    rows: tuple[int, int] | None  # row range of the original tensor it adds to (fused q/k/v), None = all
    transpose: bool = False  # the diffusers parameter is the transpose of the original tensor
    kernel: tuple[int, ...] | None = None  # a conv's (kh, kw): kohya stores down as [rank, in, kh, kw]

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    def delta(self, shape: Shape, *, device: torch.device | str | None = None) -> torch.Tensor:
        """scale · up @ down in float32, shaped as the original tensor's slice (``shape`` = the full
        original tensor's shape); computed on ``device`` (default: where the layer's tensors are)."""
        target = self._slice_shape(tuple(shape))
        up = self.up.to(device=device, dtype=torch.float32).flatten(1)  # (out, rank)
        down = self.down.to(device=device, dtype=torch.float32).flatten(1)  # (rank, in·kh·kw)
        product = (up @ down) * self.scale  # (out, in·kh·kw)
        if self.transpose:
            product = product.t()
        if product.shape[0] != target[0] or product.shape[1] != math.prod(target[1:]):
            rows = "" if self.rows is None else f" rows {self.rows[0]}:{self.rows[1]} of"
            raise ConfigError(
                f"LoRA layer {product.shape[0]}×{product.shape[1]} does not fit{rows} '{self.key}' of shape "
                f"{list(shape)}; use a LoRA made for this model's family"
            )
        return product.reshape(target)

    def _slice_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        if len(shape) < 2:
            raise ConfigError(f"'{self.key}' has shape {list(shape)}; a LoRA adapts only 2-d and 4-d weights")
        if self.rows is None:
            return shape
        start, end = self.rows
        if not 0 <= start < end <= shape[0]:
            raise ConfigError(f"LoRA rows {start}:{end} are outside '{self.key}' of shape {list(shape)}")
        return (end - start, *shape[1:])


@dataclass(frozen=True, eq=False)
class Lora:
    """A LoRA file's layers, by the original-layout key each adapts (a fused q/k/v tensor can have 3)."""

    path: Path
    format: str  # "kohya" | "diffusers" | "peft"
    layers: Mapping[str, tuple[LoraLayer, ...]]

    def keys(self) -> set[str]:
        return set(self.layers)

    def to(self, device: torch.device | str) -> Lora:
        """This LoRA with its tensors on ``device`` (moved once, then applied without transfers)."""
        moved = {
            key: tuple(replace(layer, up=layer.up.to(device), down=layer.down.to(device)) for layer in layers)
            for key, layers in self.layers.items()
        }
        return Lora(self.path, self.format, moved)

    def delta(
        self, key: str, shape: Shape, *, device: torch.device | str | None = None
    ) -> torch.Tensor | None:
        """The whole float32 delta (strength 1) for original tensor ``key`` of ``shape``, None if untouched."""
        layers = self.layers.get(key)
        if not layers:
            return None
        try:
            if len(layers) == 1 and layers[0].rows is None:
                return layers[0].delta(shape, device=device)
            total = torch.zeros(tuple(shape), dtype=torch.float32, device=device or layers[0].up.device)
            for layer in layers:
                start, end = layer.rows or (0, shape[0])
                total[start:end] += layer.delta(shape, device=total.device)
            return total
        except ConfigError as error:
            raise ConfigError(f"{self.path}: {error}") from None


def apply_loras(tensor: torch.Tensor, key: str, loras: Sequence[tuple[Lora, float]]) -> torch.Tensor:
    """``tensor`` + Σ strength · ΔW over ``loras`` (in their order), in float32 on the tensor's device and
    cast back to its dtype; ``tensor`` itself when no LoRA adapts ``key`` (or every strength is 0)."""
    total: torch.Tensor | None = None
    for lora, strength in loras:
        if strength == 0:
            continue
        delta = lora.delta(key, tensor.shape, device=tensor.device)
        if delta is None:
            continue
        term = delta * strength
        total = term if total is None else total + term
    if total is None:
        return tensor
    return (tensor.to(torch.float32) + total).to(tensor.dtype)
