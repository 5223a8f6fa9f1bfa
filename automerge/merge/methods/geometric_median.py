"""Geometric median of the models (no base): the point minimising the sum of Euclidean distances."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated

import torch
from torch import Tensor

from automerge.merge.methods._spec import Param, register_method

_DISTANCE_FLOOR = 1e-8  # ε in the weights 1/max(‖Mi − m‖, ε): a model at m gets a large, finite weight
_RELATIVE_TOLERANCE = 1e-7  # stop when ‖m_new − m‖ ≤ tol·‖m‖


@register_method("geometric_median", needs_base=False, max_models=None)
def geometric_median(
    models: Sequence[Tensor],
    base: Tensor | None,
    *,
    max_iter: Annotated[int, Param(1, 1000, "Weiszfeld iterations at most")] = 100,
) -> Tensor:
    """Weiszfeld: m ← Σ wi·Mi / Σ wi, wi = 1/max(‖Mi − m‖, 1e-8), from the mean, ≤ max_iter steps

    sd-mecha's geometric_median (after krishnap25/geom_median): norms over the whole tensor;
    stops early when ‖m_new − m‖ ≤ 1e-7·‖m‖. One device sync per iteration for that test.
    """
    points = torch.stack(list(models))  # (N, *shape)
    flat = points.reshape(len(points), -1)  # (N, n)
    median = flat.mean(dim=0)  # (n,)
    for _ in range(int(max_iter)):  # the config layer passes whole numbers as floats
        distances = torch.linalg.vector_norm(flat - median, dim=1).clamp(min=_DISTANCE_FLOOR)  # (N,)
        weights = 1.0 / distances
        updated = (weights @ flat) / weights.sum()
        step = torch.linalg.vector_norm(updated - median)
        median = updated
        if step <= _RELATIVE_TOLERANCE * torch.linalg.vector_norm(median):
            break
    return median.view_as(models[0])
