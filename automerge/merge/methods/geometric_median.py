"""Geometric median of the models (no base): the point minimising the (weighted) sum of Euclidean
distances, streamed over the models (one pass per Weiszfeld step)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated

import torch
from torch import Tensor

from automerge.merge.methods._spec import Param, held_if_small, model_weights, register_method
from automerge.merge.methods.average import weighted_mean

_DISTANCE_FLOOR = 1e-8  # ε in 1/max(‖Mi − m‖, ε): a model at m gets a large, finite weight
_RELATIVE_TOLERANCE = 1e-7  # stop when ‖m_new − m‖ ≤ tol·‖m‖


@register_method("geometric_median", needs_base=False, max_models=None)
def geometric_median(
    models: Sequence[Tensor],
    base: Tensor | None,
    *,
    max_iter: Annotated[int, Param(1, 1000, "Weiszfeld iterations at most")] = 100,
    weights: Sequence[float] | None = None,
) -> Tensor:
    """Weiszfeld: m ← Σ ci·Mi / Σ ci, ci = wi/max(‖Mi − m‖, 1e-8), from the weighted mean, ≤ max_iter steps

    sd-mecha's geometric_median (after krishnap25/geom_median, which also takes weights wi, default
    1): norms over the whole tensor; stops early when ‖m_new − m‖ ≤ 1e-7·‖m‖. Each step is one pass
    over the models, held between steps when they fit in ``MULTI_PASS_BYTES``, else read holding one
    at a time; sums accumulate left to right, so the last bits differ from a stacked matrix product;
    one device sync per step for the stopping test.
    """
    w = model_weights(weights, len(models), method="geometric_median")
    if any(weight < 0 for weight in w):
        raise ValueError(f"merge method 'geometric_median' takes weights ≥ 0, got {w}")
    models = held_if_small(models)  # small keys: read once for every step
    median = weighted_mean(models, w, method="geometric_median")
    for _ in range(int(max_iter)):  # the config layer passes whole numbers as floats
        updated = _weiszfeld_step(models, w, median)
        step = torch.linalg.vector_norm(updated - median)
        median = updated
        if step <= _RELATIVE_TOLERANCE * torch.linalg.vector_norm(median):
            break
    return median


def _weiszfeld_step(models: Sequence[Tensor], w: list[float], median: Tensor) -> Tensor:
    """Σ ci·Mi / Σ ci with ci = wi / max(‖Mi − m‖, 1e-8), in one pass."""
    total: Tensor | None = None
    coefficient_sum = torch.zeros((), dtype=median.dtype, device=median.device)
    for model, weight in zip(models, w, strict=True):
        distance = torch.linalg.vector_norm(model - median).clamp(min=_DISTANCE_FLOOR)  # ()
        coefficient = weight / distance
        term = model * coefficient
        total = term if total is None else total.add_(term)
        coefficient_sum += coefficient
    assert total is not None
    return total.div_(coefficient_sum)
