"""What an original-layout tensor becomes in the live modules: ``Target``s (a diffusers parameter and
the ``View`` that derives it from the original tensor) and the ``KeyRule`` type that produces them."""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass

import torch


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

BlockRule = Callable[[str], str | None]
"""Maps a key with its component prefix removed to its MBW block (None: unmerged)."""
