"""Weighted average of the models (no base), streamed: one model in memory at a time."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from automerge.errors import MergeError
from automerge.merge._fused_cpu import fused_kernel
from automerge.merge.methods._apply import stored_views
from automerge.merge.methods._spec import model_weights, register_method


def weighted_mean(models: Sequence[Tensor], weights: Sequence[float], *, method: str) -> Tensor:
    """Σ w_i·Mi / Σ w_i in one pass, left to right (each product rounded, then added: no fused
    multiply-add, so every element, chunk or whole, gets the same bits); Σ w_i = 0 is a ``MergeError``.

    Sources read lazily on a CPU whose stored views are known (the export's) go through the fused
    kernel's ``weighted_mean``: the same operations in one pass over the stored fp16 bytes, without an
    upcast copy or a pass per operation."""
    total_weight = sum(weights)
    if total_weight == 0:
        raise MergeError(
            f"merge method '{method}': the model weights {list(weights)} sum to 0; give a model a weight above 0"
        )
    views = stored_views(models) if getattr(models, "dtype", None) == torch.float32 else None
    if views is not None and (kernel := fused_kernel()) is not None:
        mean = kernel.weighted_mean(views, weights, total_weight)
        if mean is not None:
            return mean
    total: Tensor | None = None
    for model, weight in zip(models, weights, strict=True):
        term = model * weight
        total = term if total is None else total.add_(term)
    assert total is not None
    return total.div_(total_weight)


def _average_stored_into(
    out: Tensor, models: Sequence[Tensor], base: Tensor | None, *, weights: Sequence[float] | None = None
) -> bool:
    """``average`` straight from the stored sources into ``out`` (the fused kernel's
    ``weighted_mean_into``: ``weighted_mean``'s operations, the result rounded once to out's dtype)."""
    w = model_weights(weights, len(models), method="average")
    kernel = fused_kernel()
    return kernel is not None and sum(w) != 0 and kernel.weighted_mean_into(out, models, w, sum(w))


@register_method(
    "average", needs_base=False, max_models=None, elementwise=True, stored_into=_average_stored_into
)
def average(
    models: Sequence[Tensor], base: Tensor | None, *, weights: Sequence[float] | None = None
) -> Tensor:
    """Σ w_i·Mi / Σ w_i (w_i = 1: the mean)

    mergekit's "linear" (normalize on) and sd-mecha's n_average: the per-model weights are the
    recipe's (default 1), normalised by their sum.
    """
    return weighted_mean(models, model_weights(weights, len(models), method="average"), method="average")
