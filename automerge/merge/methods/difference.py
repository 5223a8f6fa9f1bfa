"""Difference methods: add what B learned relative to the base C onto A."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated

import torch
from torch import Tensor

from automerge.merge.methods._spec import Param, register_method

_TRAIN_DIFFERENCE_GAIN = 1.8  # supermerger's constant

Strength = Annotated[
    float, Param(0.0, 2.0, "strength of B − C added to A; above 1 over-applies it, negative is not allowed")
]
TrainStrength = Annotated[float, Param(0.0, 1.0, "strength of the scaled B − C added to A (times 1.8)")]


def _add_difference_into(out: Tensor, models: Sequence[Tensor], base: Tensor | None, *, alpha: float) -> None:
    """out ← A + α·(B − C) in four passes and no temporaries; A bit-exactly at α = 0.

    The one kernel of add difference: ``add_difference`` allocates ``out`` and calls it, and chunked
    merges call it with ``out`` in the compute dtype and the sources in any float dtype.
    """
    a, b = models
    assert base is not None
    if alpha == 0.0:
        out.copy_(a)
        return
    out.copy_(b)
    out.sub_(base)
    out.mul_(alpha)
    out.add_(a)


@register_method(
    "add_difference",
    needs_base=True,
    elementwise=True,
    compute_into=_add_difference_into,
    growth=lambda alpha: 1.0 + 2.0 * alpha,  # |A| + α(|B| + |C|)
)
def add_difference(models: Sequence[Tensor], base: Tensor | None, *, alpha: Strength = 1.0) -> Tensor:
    """A + α·(B − C)

    A1111's and supermerger's "Add difference" with multiplier α (s1dlx #42: this exact formula,
    no clipping, no cosine scaling). α = 0 gives A bit-exactly.
    """
    out = torch.empty_like(models[0])
    _add_difference_into(out, models, base, alpha=alpha)
    return out


@register_method(
    "train_difference",
    needs_base=True,
    elementwise=True,
    growth=lambda alpha: 1.0 + 2.0 * _TRAIN_DIFFERENCE_GAIN * alpha,  # scale ≤ 1: |A| + 1.8α(|B| + |C|)
)
def train_difference(models: Sequence[Tensor], base: Tensor | None, *, alpha: TrainStrength = 1.0) -> Tensor:
    """A + 1.8·α·(B−C)·|B−A| / (|B−A| + |B−C|), the added term 0 where the denominator is 0

    supermerger's "trainDifference" (also sd-mecha): B − C is added where A is still far from B
    and damped where A already moved like B. α = 0 gives A bit-exactly.
    """
    a, b = models
    assert base is not None
    if alpha == 0.0:
        return a.clone()
    diff = b - base
    distance_a = (b - a).abs()
    denominator = distance_a + diff.abs()
    scale = torch.where(denominator > 0, distance_a / denominator, torch.zeros_like(denominator))
    return a + (_TRAIN_DIFFERENCE_GAIN * alpha) * diff * scale
