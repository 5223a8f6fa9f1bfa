"""Weighted average of the models (no base), streamed: one model in memory at a time."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from automerge.errors import MergeError
from automerge.merge._fused_cpu import fused_kernel
from automerge.merge.methods._apply import stored_tensor
from automerge.merge.methods._spec import model_weights, register_method


def weighted_mean(models: Sequence[Tensor], weights: Sequence[float], *, method: str) -> Tensor:
    """Σ w_i·Mi / Σ w_i in one pass, left to right (each product rounded, then added: no fused
    multiply-add, so every element, chunk or whole, gets the same bits); Σ w_i = 0 is a ``MergeError``.

    Float32 sources read lazily on a CPU with their stored views go through the fused kernel's
    ``scaled_add`` (the same operations, without the upcast copy and the product's pass)."""
    total_weight = sum(weights)
    if total_weight == 0:
        raise MergeError(
            f"merge method '{method}': the model weights {list(weights)} sum to 0; give a model a weight above 0"
        )
    kernel = fused_kernel() if getattr(models, "dtype", None) == torch.float32 else None
    total: Tensor | None = None
    for index, weight in enumerate(weights):
        stored = stored_tensor(models, index) if kernel is not None else None
        if kernel is not None and stored is not None:
            if total is None:
                total = torch.empty(stored.shape, dtype=torch.float32)
            if kernel.scaled_add(total, stored, weight, first=index == 0):
                continue
        term = models[index] * weight
        total = term if index == 0 or total is None else total.add_(term)
    assert total is not None
    return total.div_(total_weight)


@register_method("average", needs_base=False, max_models=None, elementwise=True)
def average(
    models: Sequence[Tensor], base: Tensor | None, *, weights: Sequence[float] | None = None
) -> Tensor:
    """Σ w_i·Mi / Σ w_i (w_i = 1: the mean)

    mergekit's "linear" (normalize on) and sd-mecha's n_average: the per-model weights are the
    recipe's (default 1), normalised by their sum.
    """
    return weighted_mean(models, model_weights(weights, len(models), method="average"), method="average")
